#!/bin/bash
# Where the host's CPU goes while the testbed VM runs each phase of tcg-profile-guest.sh: a
# host-side `perf record` of the QEMU process, with QEMU's -perfmap so that translated guest
# code is named by its guest address, which benches/tcg-profile.py maps to the guest kernel's
# symbols. Unlike a profile taken inside the guest, this sees the emulator's own cost (TB
# lookups, softmmu TLB refills, device emulation, the vCPU thread's sleeps) per MB moved.
#
#   cargo build --release -p peerpipe --bin peerpipe --example rdma_bw
#   bash benches/tcg-profile.sh                        # PHASES="rep rdma_bw", SIZE=256M
#   env PHASES="rep rdma_bw fio_read fio_write" SIZE=128M bash benches/tcg-profile.sh
#
# Needs perf on the host. SECS: seconds recorded per phase (default 8; a phase must last
# longer: pick SIZE so that the replicator and rdma_bw take more; fio phases run SECS + 4 s). Output: per phase its rate, the QEMU threads' shares, and
# a table of host CPU ms per MB by category (tcg-profile.py).
set -u
cd "$(dirname "$0")/.."
SECS=${SECS:-8}; OUT=${OUT:-target/tcg-profile}; mkdir -p $OUT
command -v perf >/dev/null || { echo "needs perf on the host" >&2; exit 1; }
rm -f $OUT/vm.out
PEERPIPE_VM_QEMU_OPTS=-perfmap cargo xtask vm -- env PHASES="${PHASES:-rep rdma_bw}" FIO_SECS=$((SECS + 4)) \
    SIZE=${SIZE:-256M} BS=${BS:-64K} WINDOW=${WINDOW:-16} bash benches/tcg-profile-guest.sh \
    > $OUT/vm.out 2>&1 &
VM=$!
QEMU=
for p in ${PHASES:-rep rdma_bw}; do
    until grep -q "PHASE-START $p" $OUT/vm.out 2>/dev/null; do
        kill -0 $VM 2>/dev/null || { echo "the VM ended before phase $p" >&2; exit 1; }
        sleep 0.5
    done
    [ -n "$QEMU" ] || QEMU=$(pgrep -n -f qemu-system-x86)
    perf record -q -p $QEMU -o $OUT/perf-$p.data -- sleep $SECS 2>/dev/null
    until grep -q "PHASE-END $p" $OUT/vm.out; do sleep 0.5; done
done
wait $VM
awk '/KALLSYMS-BEGIN/ {f = 1; next} /KALLSYMS-END/ {f = 0} f' $OUT/vm.out > $OUT/kallsyms.txt
for p in ${PHASES:-rep rdma_bw}; do
    rate=$(awk -v p=$p '$0 == "PHASE-START " p {f = 1; next} $0 == "PHASE-END " p {f = 0} f && /MB\/s/' $OUT/vm.out | grep -o '[0-9.]* MB/s' | tail -1)
    echo "## $p: $rate"
    perf report -i $OUT/perf-$p.data --stdio --sort pid 2>/dev/null | grep -v '^#' | grep -v '^$' | head -3
    perf report -i $OUT/perf-$p.data --stdio --sort sym 2>/dev/null > $OUT/report-$p.txt
    python3 benches/tcg-profile.py $OUT/kallsyms.txt $OUT/report-$p.txt "${rate% MB/s}" $SECS
done
