#!/usr/bin/env bash
# 4 KiB random reads: peerpipe-uring (uring/examples/randread.rs) against fio in the same run,
# runs interleaved (order alternating, after one warm-up each), medians and ratio.
#
# Testbed (inside the VM, NVMe passthrough on a data drive, QD1 and QD32):
#   cargo build --release -p peerpipe-uring --example randread
#   cargo xtask vm -- bash benches/uring-randread.sh
# Host (O_DIRECT on a 1 GiB file, QD32, fio with fixed buffers + registered files):
#   cargo build --release -p peerpipe-uring --example randread
#   bash benches/uring-randread.sh host
# The testbed cases run twice against fio: plain, and with --gtod_reduce=1 (fio's cheapest).
# Env: RUNS (default 5), SECS per run (default 5), FILE (host file), SERIAL (testbed drive).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/examples/randread}
RUNS=${RUNS:-5}
SECS=${SECS:-5}
[ -x "$BIN" ] || { echo "build first: cargo build --release -p peerpipe-uring --example randread" >&2; exit 1; }

median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.0f\n", (a[NR/2]+a[NR/2+1])/2}'; }
fio_iops() { fio "$@" --output-format=terse --terse-version=3 | awk -F';' '{printf "%.0f\n", $8}'; }
ours_iops() { "$BIN" "$@" | sed -n 's/^iops=\([0-9]*\).*/\1/p'; }

# compare LABEL "ours args" "fio args"
compare() {
    local label=$1 ours_args=$2 fio_args=$3 o f
    local -a O=() F=()
    # One discarded warm-up each, then alternate who goes first (caches warm up over a run).
    ours_iops $ours_args >/dev/null; fio_iops $fio_args >/dev/null
    for i in $(seq "$RUNS"); do
        if [ $((i % 2)) = 1 ]; then
            o=$(ours_iops $ours_args); f=$(fio_iops $fio_args)
        else
            f=$(fio_iops $fio_args); o=$(ours_iops $ours_args)
        fi
        O+=("$o"); F+=("$f")
        echo "  run $i: ours $o fio $f" >&2
    done
    local om fm
    om=$(printf '%s\n' "${O[@]}" | median); fm=$(printf '%s\n' "${F[@]}" | median)
    printf '| %s | %s | %s | %s | %.3f |\n' "$label" "$om" "$fm" "$RUNS" "$(awk -v a="$om" -v b="$fm" 'BEGIN{print a/b}')"
    echo "    ours runs: ${O[*]}; fio runs: ${F[*]}" >&2
}

echo "| case | peerpipe-uring IOPS (median) | fio IOPS (median) | runs | ratio |"
echo "|---|---|---|---|---|"
if [ "${1:-}" = host ]; then
    FILE=${FILE:-/tmp/peerpipe-uring-bench.dat}
    if [ ! -s "$FILE" ]; then dd if=/dev/urandom of="$FILE" bs=1M count=1024 status=none; fi
    FIO="--name=r --filename=$FILE --ioengine=io_uring --direct=1 --rw=randread --bs=4k --iodepth=32 --fixedbufs=1 --registerfiles=1 --time_based --runtime=$SECS --size=1G"
    compare "host file O_DIRECT 4K QD32" "$FILE --qd 32 --secs $SECS" "$FIO"
    if [ "${ABLATE:-0}" = 1 ]; then
        compare "host, ours --batch (resubmit a whole reap in one enter)" "$FILE --qd 32 --secs $SECS --batch" "$FIO"
        compare "host, ours --naive (alloc per I/O, no fixed/registered)" "$FILE --qd 32 --secs $SECS --naive" "$FIO"
    fi
else
    SERIAL=${SERIAL:-data1}
    DEV=
    for b in /sys/block/nvme*; do
        [ "$(cat "$b/device/serial" | tr -d ' ')" = "$SERIAL" ] && DEV=/dev/$(basename "$b" | sed 's/^nvme/ng/')
    done
    [ -n "$DEV" ] || { echo "no drive with serial $SERIAL" >&2; exit 1; }
    echo "device $DEV ($SERIAL), $(uname -r)" >&2
    for QD in 1 32; do
        FIO="--name=r --filename=$DEV --ioengine=io_uring_cmd --cmd_type=nvme --rw=randread --bs=4k --iodepth=$QD --fixedbufs=1 --registerfiles=1 --time_based --runtime=$SECS --size=1G"
        compare "testbed $DEV passthrough 4K QD$QD" "$DEV --qd $QD --secs $SECS" "$FIO"
        # fio at its cheapest: no per-I/O clock reads (gtod_reduce drops latency stats, which
        # cost fio a lot of CPU under TCG); the ratio against this is the conservative one
        compare "testbed $DEV passthrough 4K QD$QD vs fio --gtod_reduce=1" "$DEV --qd $QD --secs $SECS" "$FIO --gtod_reduce=1"
        if [ "$QD" = 32 ] && [ "${ABLATE:-1}" = 1 ]; then
            compare "testbed $DEV passthrough 4K QD32, ours --batch" "$DEV --qd 32 --secs $SECS --batch" "$FIO"
        fi
    done
fi
