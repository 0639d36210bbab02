#!/usr/bin/env bash
# Runs as root inside the testbed VM before the command: two "hosts" on one wire.
# veth0 (10.77.0.1) <-> veth1 (10.77.0.2), rxe0 on veth0 and rxe1 on veth1, and policy
# routing so traffic between the two addresses really crosses the veth pair (otherwise
# both are local, rdma_cm binds both ends to one rxe device and nothing leaves it).
# The guest has no network device to the outside world.
set -euxo pipefail
a0=${PEERPIPE_ADDR0:-10.77.0.1} a1=${PEERPIPE_ADDR1:-10.77.0.2}

ip link set lo up
ip link add veth0 type veth peer name veth1
ip addr add "$a0/24" dev veth0
ip addr add "$a1/24" dev veth1
ip link set veth0 up
ip link set veth1 up
for i in all veth0 veth1; do
  sysctl -qw net.ipv4.conf.$i.accept_local=1 net.ipv4.conf.$i.rp_filter=0
done
ip rule add pref 10 to "$a1" iif lo lookup 100
ip rule add pref 11 to "$a0" iif lo lookup 101
ip rule add pref 100 lookup local
ip rule del pref 0
ip route add "$a1" dev veth0 src "$a0" table 100
ip route add "$a0" dev veth1 src "$a1" table 101

rdma link add rxe0 type rxe netdev veth0
rdma link add rxe1 type rxe netdev veth1

# Ports go ACTIVE once the netdevs are up; wait (bounded) so tests start on a ready fabric.
for _ in $(seq 100); do
  n=$(rdma link show | grep -c 'state ACTIVE' || true)
  [ "$n" -ge 2 ] && break
  sleep 0.1
done
rdma link show
[ "$(rdma link show | grep -c 'state ACTIVE')" -ge 2 ]

# Writable scratch for tests (the host root is read-only in the guest).
mkdir -p /tmp/peerpipe
ls /dev/p2pmem* /dev/ng* /dev/nvme* 2>/dev/null || true
