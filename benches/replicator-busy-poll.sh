#!/bin/bash
# Same-boot A/B of the replicator's --busy-poll (how long an event-driven loop polls before it
# sleeps), in one or both placements, 1 replica, host buffers, zero-copy:
#   cargo build --release -p peerpipe --bin peerpipe
#   cargo xtask vm -- env SPINS="0 100 200" PLACEMENTS="split any" ROUNDS=4 bash benches/replicator-busy-poll.sh
# Each round runs every (placement, busy-poll) pair once, interleaved; primary and replica use
# the same --busy-poll. "split": the primary on vCPU 0, the replica on vCPU 1 (taskset), as
# in replicator-bench.sh. Prints MB/s (10^6 B/s) per round and the runs per pair.
set -u
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/peerpipe}; SIZE=${SIZE:-128M}; BS=${BS:-64K}; WINDOW=${WINDOW:-16}
ROUNDS=${ROUNDS:-4}; SPINS=${SPINS:-"0 200"}; PLACEMENTS=${PLACEMENTS:-"split any"}
A0=${PEERPIPE_ADDR0:-10.77.0.1}; A1=${PEERPIPE_ADDR1:-10.77.0.2}
dev() { for d in /sys/block/nvme*; do [ "$(tr -d ' ' < $d/device/serial)" = "$1" ] && echo /dev/$(basename $d); done; }
SRC=$(dev data1); D2=$(dev data2)
dd if=/dev/urandom of=$SRC bs=1M count=$(( $(numfmt --from=iec $SIZE) >> 20 )) oflag=direct status=none
SECRET=/tmp/peerpipe-busy-poll-secret; head -c 32 /dev/urandom | base64 > $SECRET
declare -A R
for r in $(seq $ROUNDS); do
  for pl in $PLACEMENTS; do
    for sp in $SPINS; do
      on0=(); on1=()
      [ $pl = split ] && { on0=(taskset -c 0); on1=(taskset -c 1); }
      "${on1[@]}" $BIN replica --busy-poll $sp --listen $A1:7650 --target $D2 --buffers host \
          --iodepth $WINDOW --bs $BS --allow-primary $A0 --secret-file $SECRET 2>/tmp/busy-poll-replica.err &
      k=$!
      for _ in $(seq 200); do grep -q listening /tmp/busy-poll-replica.err && break; sleep 0.05; done
      j=$("${on0[@]}" $BIN replicate --busy-poll $sp --source $SRC --bind $A0 --replica $A1:7650 \
          --size $SIZE --bs $BS --iodepth $WINDOW --buffers host --output-format=json \
          --secret-file $SECRET 2>/tmp/busy-poll-primary.err)
      wait $k
      mbs=$(echo "$j" | grep -o '"mb_per_s":[0-9.]*' | cut -d: -f2)
      echo "$j" | grep -q '"success":true' || mbs=FAIL
      echo "round $r, placement $pl, --busy-poll $sp: ${mbs} MB/s"
      R[$pl:$sp]+="$([ "$mbs" = FAIL ] && echo FAIL || printf %.2f "$mbs") "
    done
  done
done
echo
echo "| placement | --busy-poll (us) | MB/s per round |"
echo "|---|---|---|"
for pl in $PLACEMENTS; do for sp in $SPINS; do echo "| $pl | $sp | ${R[$pl:$sp]}|"; done; done
