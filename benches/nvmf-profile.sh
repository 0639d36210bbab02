#!/bin/bash
# Where `peerpipe target`'s CPU goes, in one testbed VM boot: the target (host buffers) on
# data1, the kernel host connected from rxe0's address, fio 4 KiB randread at each QD in QDS
# for SECS seconds; per run the target process's user and system time per I/O (/proc/PID/stat,
# USER_HZ ticks) and a `perf record -a -g` profile (cpu-clock under TCG) of the whole VM,
# reported by DSO and by symbol for the target process.
#
#   cargo build --release -p peerpipe --bins
#   cargo xtask vm -- env QDS="1 32" SECS=5 bash benches/nvmf-profile.sh | tee target/nvmf-profile.txt
#
# Knobs: BIN, QDS, SECS, ARGS (extra target options), TOP (symbols listed, 40).
set -u
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/peerpipe}; QDS=${QDS:-"1 32"}; SECS=${SECS:-5}; TOP=${TOP:-40}
ARGS=${ARGS:-}
A0=${PEERPIPE_ADDR0:-10.77.0.1}; A1=${PEERPIPE_ADDR1:-10.77.0.2}
HN=nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000c4
NQN=nqn.2026-11.io.peerpipe:profile
LOG=/tmp/nvmf-profile; mkdir -p $LOG
drive() { for d in /sys/block/nvme*; do [ "$(tr -d ' ' < $d/device/serial 2>/dev/null)" = "$1" ] && echo /dev/$(basename $d); done; }
DRIVE=$(drive data1)
[ -b "$DRIVE" ] || { echo "no drive data1" >&2; exit 1; }
fio --name=fill --filename=$DRIVE --rw=write --bs=1M --iodepth=8 --ioengine=io_uring --direct=1 >/dev/null
# shellcheck disable=SC2086 # ARGS: several options
$BIN target --listen $A1:4420 --nqn $NQN --ns $DRIVE --buffers host $ARGS 2>$LOG/target.err &
PID=$!
trap 'nvme disconnect -n $NQN >/dev/null 2>&1; kill -TERM $PID 2>/dev/null' EXIT
for _ in $(seq 600); do grep -q "target: listening on" $LOG/target.err && break; sleep 0.1; done
nvme connect -t rdma -a $A1 -s 4420 -w $A0 -n $NQN -q $HN --ctrl-loss-tmo=5 >/dev/null || exit 1
DEV=
for _ in $(seq 300); do
    for c in /sys/class/nvme/nvme*; do
        [ "$(cat $c/subsysnqn 2>/dev/null)" = "$NQN" ] && DEV=/dev/$(basename $c)n1
    done
    [ -b "$DEV" ] && break; sleep 0.1
done
echo none > /sys/block/$(basename $DEV)/queue/scheduler
ticks() { awk '{i = index($0, ") "); split(substr($0, i + 2), f, " "); print f[12], f[13]}' /proc/$PID/stat; }
for qd in $QDS; do
    read -r u0 s0 < <(ticks)
    perf record -q -a -g -o $LOG/perf-qd$qd.data -- fio --name=p --filename=$DEV --ioengine=io_uring --direct=1 \
        --rw=randread --bs=4k --iodepth=$qd --time_based --runtime=$SECS --norandommap \
        --output-format=terse --terse-version=3 > $LOG/fio-qd$qd.txt 2>/dev/null
    read -r u1 s1 < <(ticks)
    ios=$(awk -F';' '/^3;/ {print int($6 / 4)}' $LOG/fio-qd$qd.txt)
    echo "## QD $qd: $ios I/Os; target process per I/O: user $(( (u1 - u0) * 10000 / (ios + 1) )) us, system $(( (s1 - s0) * 10000 / (ios + 1) )) us"
    echo "### whole VM by command"
    perf report -i $LOG/perf-qd$qd.data --no-children --sort comm --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -15
    echo "### whole VM by symbol"
    perf report -i $LOG/perf-qd$qd.data --no-children --sort comm,sym --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -$TOP
    echo "### target process by DSO"
    perf report -i $LOG/perf-qd$qd.data --no-children --pid $PID --sort dso --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -12
    echo "### target process by symbol"
    perf report -i $LOG/perf-qd$qd.data --no-children --pid $PID --sort sym --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -$TOP
done
