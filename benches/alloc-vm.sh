#!/bin/bash
# The same benchmark inside the testbed VM, adding a p2pmem pool row (the 64 MiB CMB).
# Build on the host first, then boot the VM with the prebuilt binary:
#   cargo bench -p peerpipe-p2p-alloc --bench alloc --no-run
#   cargo xtask vm -- bash benches/alloc-vm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(ls -t target/release/deps/alloc-* | grep -v '\.d$' | head -1)
PEERPIPE_BENCH_P2P=1 PEERPIPE_BENCH_RUNS=${PEERPIPE_BENCH_RUNS:-5} \
  PEERPIPE_BENCH_OPS=${PEERPIPE_BENCH_OPS:-100000} "$bin"
