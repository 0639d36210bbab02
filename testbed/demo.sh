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

# Replication (`peerpipe replicate` / `peerpipe replica`): primary on data1, replicas on data2 and data3, buffers from the CMB's p2pmem.
dev() { for d in /sys/block/nvme*; do [ "$(tr -d ' ' < "$d/device/serial")" = "$1" ] && echo "/dev/$(basename "$d")"; done; }
src=$(dev data1) r0=$(dev data2) r1=$(dev data3)
len=${DEMO_LEN:-8M}
bin=target/debug/peerpipe
echo "== peerpipe replicate: $len of $src -> $r0 and $r1 (p2pmem buffers, verify)"
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
timeout 600 "$bin" replicate --source "$src" --replica "$a1:7471" --replica "$a1:7472" \
  --bind "$a0" --size "$len" --buffers p2p --verify --timeout 60 --secret-file "$secret"
wait "$rep0" "$rep1"

# The NVMe over Fabrics target: the kernel's own nvme-rdma host (rxe0) connects to
# `peerpipe target` (rxe1) serving data3, writes and verifies through it with fio, and the
# bytes are then read straight from the backing drive.
nqn=nqn.2026-11.io.peerpipe:demo
hostnqn=nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000d0
echo "== NVMe-oF: peerpipe target on $a1:4420 serving $r1 as $nqn"
target/debug/peerpipe target --listen "$a1:4420" --nqn "$nqn" --ns "$r1" --buffers auto \
  2> >(tee /tmp/target.log >&2) & tgt=$!
await_target() { for _ in $(seq 600); do grep -q "listening on" /tmp/target.log 2>/dev/null && return; sleep 0.1; done; cat /tmp/target.log; exit 1; }
await_target
nvme discover -t rdma -a "$a1" -s 4420 -w "$a0" -q "$hostnqn"
nvme connect -t rdma -a "$a1" -s 4420 -w "$a0" -n "$nqn" -q "$hostnqn" --ctrl-loss-tmo=5
fdev=
for _ in $(seq 100); do
  for c in /sys/class/nvme/nvme*; do
    [ "$(cat "$c/subsysnqn" 2>/dev/null)" = "$nqn" ] || continue
    for n in "$c"/nvme*n*; do [ -e "/dev/$(basename "$n")" ] && fdev=/dev/$(basename "$n"); done
  done
  [ -n "$fdev" ] && break; sleep 0.1
done
[ -n "$fdev" ] || { echo "no fabrics namespace for $nqn"; exit 1; }
nvme list-subsys | sed -n '1,12p'
echo "== fio through $fdev (kernel nvme-rdma host -> peerpipe target), crc32c verify"
fio --name=demo --filename="$fdev" --ioengine=io_uring --direct=1 --rw=randwrite --bs=64k \
  --size=8M --iodepth=8 --verify=crc32c --do_verify=1 --verify_state_save=0 --output=/tmp/fio.log
grep -E "WRITE:|READ:" /tmp/fio.log; echo "fio: written and verified through the fabric"
echo "== the same 8 MiB read from the fabrics device and straight from $r1"
cmp <(dd if="$fdev" bs=1M count=8 iflag=direct status=none) <(dd if="$r1" bs=1M count=8 iflag=direct status=none) && echo "cmp: identical"
nvme disconnect -n "$nqn"
kill -TERM "$tgt"; wait "$tgt"
echo "demo: ok"
