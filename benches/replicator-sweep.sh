#!/bin/bash
# Throughput against block size, for the SVG plot: replicator-bench.sh once per block size, in
# one testbed VM run (1 replica, modes host zero-copy / host bounce / p2p zero-copy).
#   cargo build --release -p peerpipe --bin peerpipe --example rdma_bw
#   cargo xtask vm -- bash benches/replicator-sweep.sh > target/sweep.md
#   python3 benches/plot-sweep.py target/sweep.md benches/replicator-throughput.svg
# Env: BLOCKS (default "16K 64K 256K 1M"), SIZE (default 64M), RUNS (default 1), and what
# replicator-bench.sh takes (MODES, WAITS, REPLICAS, WINDOW).
set -u
cd "$(dirname "$0")/.."
export SIZE=${SIZE:-64M} RUNS=${RUNS:-1} REPLICAS=${REPLICAS:-1}
export MODES=${MODES:-"host:none host:bounce p2p:none"}
for bs in ${BLOCKS:-16K 64K 256K 1M}; do
  BS=$bs bash benches/replicator-bench.sh
  echo
done
