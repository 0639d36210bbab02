#!/bin/bash
# Allocation + free throughput of the peerpipe-p2p-alloc pool vs the system allocator
# (host memory; 4 KiB..1 MiB; 1 and 2 threads; medians of interleaved runs).
# Usage: bash benches/alloc-host.sh        (env: PEERPIPE_BENCH_RUNS, PEERPIPE_BENCH_OPS)
set -euo pipefail
cd "$(dirname "$0")/.."
PEERPIPE_BENCH_RUNS=${PEERPIPE_BENCH_RUNS:-9} cargo bench -p peerpipe-p2p-alloc --bench alloc
