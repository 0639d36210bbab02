#!/bin/bash
# Guest half of benches/tcg-profile.sh (run by it inside the testbed VM): prints the guest
# kernel's text symbols between KALLSYMS markers, then runs each phase in PHASES between
# "PHASE-START name" / "PHASE-END name" lines (the host records perf while a phase runs):
#   rep       peerpipe replicate data1 -> replica data2, SIZE, BS, WINDOW, host buffers
#   rdma_bw   peerpipe's rdma_bw, the same bytes, block size and depth (the network alone)
#   fio_read  fio read of data1, fio_write  fio write of data2 (the drive stages alone,
#             FIO_SECS long, time-based)
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
for p in $PHASES; do
    echo "PHASE-START $p"
    case $p in
    rep)
        $BIN replica --listen $A1:7710 --target $D2 --buffers host --iodepth $WINDOW --bs $BS \
            --allow-primary $A0 --secret-file $SECRET 2>/tmp/tcg-replica.err &
        k=$!
        for _ in $(seq 200); do grep -q listening /tmp/tcg-replica.err && break; sleep 0.05; done
        $BIN replicate --source $SRC --bind $A0 --replica $A1:7710 --size $SIZE --bs $BS \
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
    echo "PHASE-END $p"
done
