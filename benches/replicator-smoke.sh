#!/bin/bash
# Smoke run of the replicator in the testbed VM: one replica, verify, host and p2p buffers.
#   cargo build -p peerpipe --bin peerpipe && cargo xtask vm -- bash benches/replicator-smoke.sh
set -u
BIN=${BIN:-target/debug/peerpipe}
A0=${PEERPIPE_ADDR0:-10.77.0.1}; A1=${PEERPIPE_ADDR1:-10.77.0.2}
dev() { for d in /sys/block/nvme*; do [ "$(cat $d/device/serial | tr -d ' ')" = "$1" ] && echo /dev/$(basename $d); done; }
SRC=$(dev data1); DST=$(dev data2)
LEN=${LEN:-8M}
echo "source $SRC target $DST"
SECRET=/tmp/peerpipe-smoke-secret; head -c 32 /dev/urandom | base64 > $SECRET
dd if=/dev/urandom of=$SRC bs=1M count=16 oflag=direct status=none
for BUFS in ${MODES:-host p2p}; do
  $BIN replica --listen $A1:7471 --target $DST --buffers $BUFS --timeout 20 --allow-primary $A0 --secret-file $SECRET & RP=$!
  sleep 1
  timeout 120 $BIN replicate --source $SRC --replica $A1:7471 --bind $A0 --size $LEN --buffers $BUFS ${EXTRA:---verify} --output-format=json --timeout 20 --secret-file $SECRET
  echo "primary exit $?"
  wait $RP; echo "replica exit $?"
  cmp -n $((8<<20)) $SRC $DST && echo "cmp: identical"
done
