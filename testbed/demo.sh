#!/usr/bin/env bash
# The README's main command, run inside the testbed VM by `cargo xtask demo`:
# show the devices, the p2pmem provider, and an rping round trip between rxe0 and rxe1.
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
echo "demo: ok"
