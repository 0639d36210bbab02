#!/bin/bash
# Where the replicator's time goes, in one testbed VM boot: for each case in CASES, one
# replication of SIZE from data1 to data2 (1 replica, host buffers, zero-copy) under
# `perf record -a -g` (cpu-clock under TCG) of the whole VM, then: MB/s, the VM's busy and idle
# share (/proc/stat), and the profile by command and by symbol. Stage-alone runs for
# comparison: peerpipe's rdma_bw (the network stage) under the same perf.
#
#   cargo build --release -p peerpipe --bin peerpipe --example rdma_bw
#   cargo xtask vm -- env SIZE=64M bash benches/replicator-profile.sh | tee target/replicator-profile.txt
#
# Knobs: BIN, SIZE, BS, WINDOW, TOP (symbols listed, 40), CASES (default "events busy wt"):
#   events  --wait events (the default)          busy  --wait busy
#   wt      --wait events, target's write cache set to "write through" (no flushes)
#   rdma_bw the network stage alone (peerpipe's rdma_bw, same size, count and depth)
set -u
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/peerpipe}; RDMA_BW=${RDMA_BW:-target/release/examples/rdma_bw}
SIZE=${SIZE:-64M}; BS=${BS:-64K}; WINDOW=${WINDOW:-16}; TOP=${TOP:-40}
CASES=${CASES:-"rdma_bw events busy wt"}
A0=${PEERPIPE_ADDR0:-10.77.0.1}; A1=${PEERPIPE_ADDR1:-10.77.0.2}
LOG=/tmp/replicator-profile; mkdir -p $LOG
dev() { for d in /sys/block/nvme*; do [ "$(tr -d ' ' < $d/device/serial)" = "$1" ] && echo /dev/$(basename $d); done; }
SRC=$(dev data1); D2=$(dev data2)
WC=/sys/block/$(basename $D2)/queue/write_cache; WC0=$(cat $WC)
bytes() { numfmt --from=iec "$1"; }
dd if=/dev/urandom of=$SRC bs=1M count=$(( $(bytes $SIZE) >> 20 )) oflag=direct status=none
SECRET=/tmp/peerpipe-bench-secret; head -c 32 /dev/urandom | base64 > $SECRET
stat_cpu() { awk '/^cpu / {print $2+$3+$4+$7+$8, $5+$6}' /proc/stat; }

run_case() {
    local c=$1 wait=events
    case $c in busy) wait=busy;; wt) echo "write through" > $WC;; esac
    if [ $c = rdma_bw ]; then
        $RDMA_BW bw --bind $A1 -p 18517 >$LOG/srv.txt 2>&1 &
        local s=$!
        for _ in $(seq 100); do grep -q waiting $LOG/srv.txt && break; sleep 0.1; done
        $RDMA_BW bw -s $(bytes $BS) -n $(( $(bytes $SIZE) / $(bytes $BS) )) -t $WINDOW \
            --source_ip $A0 -p 18517 $A1 > $LOG/out-$c.txt 2>&1
        wait $s
        awk '$1 ~ /^[0-9]+$/ && NF >= 5 {printf "%.2f MB/s\n", $4 * 1.048576; exit}' $LOG/out-$c.txt
        return
    fi
    $BIN replica --listen $A1:7700 --target $D2 --buffers host --wait $wait --iodepth $WINDOW \
        --bs $BS --allow-primary $A0 --secret-file $SECRET 2>$LOG/replica-$c.err &
    local r=$!
    for _ in $(seq 200); do grep -q listening $LOG/replica-$c.err && break; sleep 0.05; done
    $BIN replicate --source $SRC --bind $A0 --replica $A1:7700 --size $SIZE --bs $BS \
        --iodepth $WINDOW --buffers host --wait $wait --output-format=json \
        --secret-file $SECRET > $LOG/out-$c.txt 2>$LOG/primary-$c.err
    wait $r
    echo "$WC0" > $WC
    grep -o '"mb_per_s":[0-9.]*' $LOG/out-$c.txt | cut -d: -f2 | sed 's/$/ MB\/s/'
}

for c in $CASES; do
    read -r b0 i0 < <(stat_cpu)
    perf record -q -a -g -o $LOG/perf-$c.data -- bash -c "$(declare -f run_case bytes); $(declare -p BIN RDMA_BW SIZE BS WINDOW A0 A1 LOG SRC D2 WC WC0 SECRET); run_case $c" > $LOG/rate-$c.txt
    read -r b1 i1 < <(stat_cpu)
    echo "## $c: $(cat $LOG/rate-$c.txt); VM busy $(( (b1 - b0) * 100 / (b1 - b0 + i1 - i0 + 1) )) % of its CPU time (idle+iowait the rest)"
    echo "### whole VM by command"
    perf report -i $LOG/perf-$c.data --no-children --sort comm --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -15
    echo "### whole VM by symbol"
    perf report -i $LOG/perf-$c.data --no-children --sort comm,sym --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -$TOP
    for comm in peerpipe rdma_bw; do
        echo "### $comm processes by symbol"
        perf report -i $LOG/perf-$c.data --no-children --comm $comm --sort sym --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -$TOP
    done
    echo "### kernel work by caller (children, top entry points)"
    perf report -i $LOG/perf-$c.data --children --sort sym --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -$TOP
done
