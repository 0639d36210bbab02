#!/usr/bin/env bash
# The README's main command, run inside the testbed VM by `cargo xtask demo`:
# show the devices, the p2pmem provider, an rping round trip between rxe0 and rxe1, then
# replicate a range of one drive to two others through p2pmem, verified.
set -euo pipefail
a0=$PEERPIPE_ADDR0 a1=$PEERPIPE_ADDR1

echo "== kernel"; uname -r
echo "== NVMe controllers (serial p2p0 has the CMB)"
for c in /sys/class/nvme/nvme*; do
  printf '%s  serial=%s  pci=%s\n' "$(basename "$c")" "$(tr -d ' ' < "$c/serial")" "$(basename "$(readlink -f "$c/device")")"
done
ls -1 /dev/ng*n1 /dev/nvme*n1
echo "== p2pmem providers"
ls -l /dev/p2pmem*
for d in /sys/bus/pci/devices/*/p2pmem; do
  printf '%s  size=%s available=%s published=%s\n' "$(basename "$(dirname "$d")")" \
    "$(cat "$d/size")" "$(cat "$d/available")" "$(cat "$d/published")"
done
echo "== RDMA devices"
rdma link show
ibv_devinfo -l
echo "== rping: rxe0 ($a0) -> rxe1 ($a1), 5 round trips, verbose"
rping -s -a "$a1" -C 5 -v > /tmp/rping-server.log 2>&1 &
server=$!
sleep 1
timeout 60 rping -c -I "$a0" -a "$a1" -C 5 -S 64 -v
wait "$server"
echo "== server side"; cat /tmp/rping-server.log

# The replicator: primary on data1, replicas on data2 and data3, buffers from the CMB's p2pmem.
dev() { for d in /sys/block/nvme*; do [ "$(tr -d ' ' < "$d/device/serial")" = "$1" ] && echo "/dev/$(basename "$d")"; done; }
src=$(dev data1) r0=$(dev data2) r1=$(dev data3)
len=${DEMO_LEN:-8M}
bin=target/debug/examples/replicator
echo "== replicator: $len of $src -> $r0 and $r1 (p2pmem buffers, verify)"
dd if=/dev/urandom of="$src" bs=1M count=16 oflag=direct status=none
# Who may write to the replicas: the primary's address, proving a shared secret.
secret=/tmp/peerpipe-demo-secret
head -c 32 /dev/urandom | base64 > "$secret"
auth=(--allow-primary "$a0" --secret-file "$secret")
# Each replica is awaited by its "listening" line, not by a sleep.
await() { for _ in $(seq 600); do grep -q "listening on" "$1" 2>/dev/null && return; sleep 0.1; done; cat "$1"; exit 1; }
"$bin" replica --listen "$a1:7471" --target "$r0" --buffers p2p --timeout 60 "${auth[@]}" 2> >(tee /tmp/rep0.log >&2) & rep0=$!
"$bin" replica --listen "$a1:7472" --target "$r1" --buffers p2p --timeout 60 "${auth[@]}" 2> >(tee /tmp/rep1.log >&2) & rep1=$!
await /tmp/rep0.log; await /tmp/rep1.log
timeout 600 "$bin" primary --source "$src" --replica "$a1:7471" --replica "$a1:7472" \
  --bind "$a0" --len "$len" --buffers p2p --verify --timeout 60 --secret-file "$secret"
wait "$rep0" "$rep1"
echo "demo: ok"
