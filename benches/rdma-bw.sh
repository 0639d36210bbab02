#!/bin/bash
# RDMA WRITE bandwidth (4 KiB, 64 KiB) and 8-byte latency: perftest vs peerpipe-rdma, same VM
# run, interleaved, medians of $RUNS runs, rxe0 (client, ADDR0) -> rxe1 (server, ADDR1).
#
#   cargo build --release --example rdma_bw && cargo xtask vm -- bash benches/rdma-bw.sh
set -u
cd "$(dirname "$0")/.."
A0=${PEERPIPE_ADDR0:-10.77.0.1}
A1=${PEERPIPE_ADDR1:-10.77.0.2}
RUNS=${RUNS:-5}
OURS=target/release/examples/rdma_bw
[ -x "$OURS" ] || { echo "build first: cargo build --release --example rdma_bw" >&2; exit 1; }
TMP=$(mktemp -d)
echo 19000 >"$TMP/port"   # run_pair runs in a subshell: keep the port counter in a file

# run_pair SERVER_CMD CLIENT_CMD FIELD: prints FIELD of the result line after the #bytes header
run_pair() {
    local PORT=$(( $(cat "$TMP/port") + 1 ))
    echo $PORT >"$TMP/port"
    local srv="${1//@P/$PORT}" cli="${2//@P/$PORT}"
    $srv >"$TMP/srv" 2>&1 &
    local spid=$!
    sleep 2
    timeout 300 $cli >"$TMP/cli" 2>&1
    local rc=$?
    for _ in $(seq 50); do kill -0 $spid 2>/dev/null || break; sleep 0.2; done
    kill $spid 2>/dev/null; wait $spid 2>/dev/null
    if [ $rc -ne 0 ]; then
        echo "FAILED($rc): $cli" >&2; cat "$TMP/cli" "$TMP/srv" >&2; echo "nan"; return
    fi
    awk -v f="$3" '/#bytes/ {getline; print $f; exit}' "$TMP/cli"
}

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

declare -A R
bw_case() { # size iters
    local s=$1 n=$2
    for i in $(seq "$RUNS"); do
        R[pt_bw_$s]+="$(run_pair "ib_write_bw -R -d rxe1 -s $s -n $n -p @P" \
            "ib_write_bw -R -d rxe0 --source_ip $A0 -s $s -n $n -p @P $A1" 4) "
        R[pp_bw_$s]+="$(run_pair "$OURS bw --bind $A1 -p @P" \
            "$OURS bw -s $s -n $n -t 128 --source_ip $A0 -p @P $A1" 4) "
    done
}
lat_case() { # size iters
    local s=$1 n=$2
    for i in $(seq "$RUNS"); do
        R[pt_lat_$s]+="$(run_pair "ib_write_lat -R -d rxe1 -s $s -n $n -p @P" \
            "ib_write_lat -R -d rxe0 --source_ip $A0 -s $s -n $n -p @P $A1" 5) "
        R[pp_lat_$s]+="$(run_pair "$OURS lat --bind $A1 -p @P" \
            "$OURS lat -s $s -n $n --source_ip $A0 -p @P $A1" 5) "
    done
}

bw_case 4096 5000
bw_case 65536 1000
lat_case 8 1000

{
echo "runs per case: $RUNS (interleaved perftest/peerpipe), kernel $(uname -r)"
printf "%-28s %-40s %-40s %s\n" case "perftest runs" "peerpipe runs" "median perftest / peerpipe / ratio"
for k in bw_4096 bw_65536 lat_8; do
    pt=$(echo ${R[pt_$k]} | tr ' ' '\n' | grep -v nan | median)
    pp=$(echo ${R[pp_$k]} | tr ' ' '\n' | grep -v nan | median)
    ratio=$(awk -v a="$pp" -v b="$pt" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "n/a"}')
    unit=$([ "${k%%_*}" = bw ] && echo "MiB/s" || echo "us t_typical")
    printf "%-28s %-40s %-40s %s / %s %s / %sx\n" "$k ($unit)" "${R[pt_$k]}" "${R[pp_$k]}" "$pt" "$pp" "$unit" "$ratio"
done
} | tee "$TMP/summary"
[ -n "${PEERPIPE_OUT:-}" ] && cp "$TMP/summary" "$PEERPIPE_OUT/rdma-bw.txt"
rm -rf "$TMP"
