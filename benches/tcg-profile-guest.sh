#!/bin/bash
# Guest half of benches/tcg-profile.sh (run by it inside the testbed VM): prints the guest
# kernel's text symbols between KALLSYMS markers, then runs each phase in PHASES between
# "PHASE-START name" / "PHASE-END name" lines (the host records perf while a phase runs):
#   rep       peerpipe replicate data1 -> replica data2, SIZE, BS, WINDOW, host buffers
#   rep_split the same with the primary on vCPU 0 and the replica on vCPU 1 (taskset), as
#             replicator-bench.sh's PLACEMENTS=split
#   rdma_bw   peerpipe's rdma_bw, the same bytes, block size and depth (the network alone)
#   fio_read  fio read of data1, fio_write  fio write of data2 (the drive stages alone,
#             FIO_SECS long, time-based)
#   nvmf_a    fio (NVMF_RW, NVMF_BS, NVMF_QD: 4 KiB randread QD32 by default, FIO_SECS long)
#             from the kernel's nvme-rdma host through `peerpipe target --buffers host` on
#             data1 (NVMF_ARGS: extra target options)
#   nvmf_c    the same through the kernel's nvmet-rdma target on data2
#             (nvmf phases: the target is set up and connected before PHASE-START, torn
#             down after PHASE-END, so the recording holds fio's run only)
set -u
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/peerpipe}; RDMA_BW=${RDMA_BW:-target/release/examples/rdma_bw}
SIZE=${SIZE:-256M}; BS=${BS:-64K}; WINDOW=${WINDOW:-16}
PHASES=${PHASES:-"rep rdma_bw"}
A0=${PEERPIPE_ADDR0:-10.77.0.1}; A1=${PEERPIPE_ADDR1:-10.77.0.2}
dev() { for d in /sys/block/nvme*; do [ "$(tr -d ' ' < $d/device/serial)" = "$1" ] && echo /dev/$(basename $d); done; }
SRC=$(dev data1); D2=$(dev data2)
bytes() { numfmt --from=iec "$1"; }
echo "KALLSYMS-BEGIN"; awk '$2 ~ /^[tT]$/ {print $1, $3}' /proc/kallsyms; echo "KALLSYMS-END"
dd if=/dev/urandom of=$SRC bs=1M count=$(( $(bytes $SIZE) >> 20 )) oflag=direct status=none
SECRET=/tmp/peerpipe-tcg-secret; head -c 32 /dev/urandom | base64 > $SECRET
NVMF_RW=${NVMF_RW:-randread}; NVMF_BS=${NVMF_BS:-4k}; NVMF_QD=${NVMF_QD:-32}
NQN=nqn.2026-12.io.peerpipe:tcg; HN=nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000c5
CFS=/sys/kernel/config/nvmet
nvmf_up() { # a|c: serve a drive, connect the kernel host; FDEV = the fabrics block device
    local drive=$1 t=$2
    fio --name=fill --filename=$drive --rw=write --bs=1M --iodepth=8 --ioengine=io_uring --direct=1 >/dev/null
    if [ $t = a ]; then
        # shellcheck disable=SC2086 # NVMF_ARGS: several options
        $BIN target --listen $A1:4420 --nqn $NQN --ns $drive --buffers host ${NVMF_ARGS:-} \
            >/dev/null 2>/tmp/tcg-target.err &
        TPID=$!
        for _ in $(seq 600); do grep -q "target: listening on" /tmp/tcg-target.err && break; sleep 0.1; done
    else
        [ -d $CFS ] || mount -t configfs none /sys/kernel/config
        mkdir -p $CFS/subsystems/$NQN/namespaces/1 $CFS/ports/1
        echo 1 > $CFS/subsystems/$NQN/attr_allow_any_host
        echo -n $drive > $CFS/subsystems/$NQN/namespaces/1/device_path
        echo 1 > $CFS/subsystems/$NQN/namespaces/1/enable
        echo rdma > $CFS/ports/1/addr_trtype; echo ipv4 > $CFS/ports/1/addr_adrfam
        echo $A1 > $CFS/ports/1/addr_traddr; echo 4420 > $CFS/ports/1/addr_trsvcid
        ln -s $CFS/subsystems/$NQN $CFS/ports/1/subsystems/$NQN
    fi
    nvme connect -t rdma -a $A1 -s 4420 -w $A0 -n $NQN -q $HN --ctrl-loss-tmo=5 >/dev/null || return 1
    local c
    FDEV=
    for _ in $(seq 300); do
        for c in /sys/class/nvme/nvme*; do
            [ "$(cat $c/subsysnqn 2>/dev/null)" = "$NQN" ] && FDEV=/dev/$(basename $c)n1
        done
        [ -b "$FDEV" ] && break; sleep 0.1
    done
    echo none > /sys/block/$(basename $FDEV)/queue/scheduler
}
nvmf_down() {
    nvme disconnect -n $NQN >/dev/null
    if [ $1 = a ]; then
        kill -TERM $TPID; wait $TPID
        tail -3 /tmp/tcg-target.err
    else
        rm -f $CFS/ports/1/subsystems/$NQN; rmdir $CFS/ports/1
        echo 0 > $CFS/subsystems/$NQN/namespaces/1/enable
        rmdir $CFS/subsystems/$NQN/namespaces/1 $CFS/subsystems/$NQN
    fi
}
# Phase marks also go to $PEERPIPE_OUT/tcg-phases, a file the host reads as it is written (the
# VM's stdout reaches the host in chunks, too late to start a recording by).
mark() { echo "$1"; [ -n "${PEERPIPE_OUT:-}" ] && echo "$1" >> "$PEERPIPE_OUT/tcg-phases"; }
for p in $PHASES; do
    case $p in
    nvmf_a|nvmf_c)
        t=${p#nvmf_}; drv=$([ $t = a ] && echo $SRC || echo $D2)
        nvmf_up $drv $t || { echo "nvmf $t: connect failed"; continue; }
        mark "PHASE-START $p"
        fio --name=t --filename=$FDEV --rw=$NVMF_RW --bs=$NVMF_BS --iodepth=$NVMF_QD --ioengine=io_uring \
            --direct=1 --time_based --runtime=${FIO_SECS:-12} --norandommap --randrepeat=0 \
            --output-format=terse --terse-version=3 |
            awk -F';' -v rw=$NVMF_RW '{w = (rw ~ /write/); printf "%d IOPS, %.2f MB/s\n", w ? $49 : $8, (w ? $48 : $7) * 1.024 / 1000}'
        mark "PHASE-END $p"
        nvmf_down $t
        continue;;
    esac
    mark "PHASE-START $p"
    case $p in
    rep|rep_split)
        on0=(); on1=()
        [ $p = rep_split ] && { on0=(taskset -c 0); on1=(taskset -c 1); }
        "${on1[@]}" $BIN replica --listen $A1:7710 --target $D2 --buffers host --iodepth $WINDOW --bs $BS \
            --allow-primary $A0 --secret-file $SECRET 2>/tmp/tcg-replica.err &
        k=$!
        for _ in $(seq 200); do grep -q listening /tmp/tcg-replica.err && break; sleep 0.05; done
        "${on0[@]}" $BIN replicate --source $SRC --bind $A0 --replica $A1:7710 --size $SIZE --bs $BS \
            --iodepth $WINDOW --buffers host --secret-file $SECRET 2>&1 | grep -o 'replicated .* MB/s'
        wait $k;;
    rdma_bw)
        $RDMA_BW bw --bind $A1 -p 18518 >/tmp/tcg-rdma_bw.srv 2>&1 &
        k=$!
        for _ in $(seq 100); do grep -q waiting /tmp/tcg-rdma_bw.srv && break; sleep 0.1; done
        $RDMA_BW bw -s $(bytes $BS) -n $(( $(bytes $SIZE) / $(bytes $BS) )) -t $WINDOW \
            --source_ip $A0 -p 18518 $A1 | awk '$1 ~ /^[0-9]+$/ && NF >= 5 {printf "%.2f MB/s\n", $4 * 1.048576}'
        wait $k;;
    fio_read|fio_write)
        rw=${p#fio_}; d=$([ $rw = read ] && echo $SRC || echo $D2)
        fio --name=t --filename=$d --rw=$rw --bs=$BS --iodepth=$WINDOW --ioengine=io_uring \
            --direct=1 --size=$SIZE --time_based --runtime=${FIO_SECS:-12} \
            --output-format=terse --terse-version=3 |
            awk -F';' -v rw=$rw '{printf "%.2f MB/s\n", (rw=="read" ? $7 : $48) * 1.024 / 1000}';;
    esac
    mark "PHASE-END $p"
done
