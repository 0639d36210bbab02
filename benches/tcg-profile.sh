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
#   env PHASES="rep rep_split rdma_bw" bash benches/tcg-profile.sh   # placement: any vs split
#   env PHASES="nvmf_a nvmf_c" bash benches/tcg-profile.sh   # issue 15: the NVMe-oF targets,
#       fio 4 KiB randread QD32 from the kernel host (NVMF_RW, NVMF_BS, NVMF_QD, NVMF_ARGS)
#
# Needs perf on the host. SECS: seconds recorded per phase (default 8; a phase must last
# longer: pick SIZE so that the replicator and rdma_bw take more; fio phases run SECS + 4 s). Output: per phase its rate, the QEMU threads' shares, and
# a table of host CPU ms per MB by category (tcg-profile.py).
set -u
cd "$(dirname "$0")/.."
SECS=${SECS:-8}; OUT=${OUT:-target/tcg-profile}; mkdir -p $OUT
command -v perf >/dev/null || { echo "needs perf on the host" >&2; exit 1; }
rm -f $OUT/vm.out; touch $OUT/start.stamp
PEERPIPE_VM_QEMU_OPTS=-perfmap cargo xtask vm -- env PHASES="${PHASES:-rep rdma_bw}" FIO_SECS=$((SECS + 4)) \
    SIZE=${SIZE:-256M} BS=${BS:-64K} WINDOW=${WINDOW:-16} NVMF_RW=${NVMF_RW:-randread} \
    NVMF_BS=${NVMF_BS:-4k} NVMF_QD=${NVMF_QD:-32} NVMF_ARGS="${NVMF_ARGS:-}" bash benches/tcg-profile-guest.sh \
    > $OUT/vm.out 2>&1 &
VM=$!
# The guest's phase marks, written through the VM's shared output directory as they happen.
MARKS=
until [ -n "$MARKS" ]; do
    kill -0 $VM 2>/dev/null || { echo "the VM ended before its first phase" >&2; exit 1; }
    sleep 0.5
    MARKS=$(find ~/.cache/peerpipe/runs -path '*/out/tcg-phases' -newer $OUT/start.stamp 2>/dev/null | head -1)
done
QEMU=
# A phase may be listed more than once (A/B rounds): the k-th "PHASE-START p" line is round k.
declare -A ROUND
TAGS=()
for p in ${PHASES:-rep rdma_bw}; do
    k=$(( ${ROUND[$p]:-0} + 1 )); ROUND[$p]=$k; TAGS+=("$p.$k")
    until [ "$(grep -c "^PHASE-START $p\$" $MARKS 2>/dev/null)" -ge $k ]; do
        kill -0 $VM 2>/dev/null || { echo "the VM ended before phase $p (round $k)" >&2; exit 1; }
        sleep 0.5
    done
    # this VM's QEMU: the one whose drive images are in the run directory of MARKS
    [ -n "$QEMU" ] || QEMU=$(pgrep -f "qemu-system-x86.*$(dirname "$(dirname "$MARKS")")/")
    perf record -q -p $QEMU -o $OUT/perf-$p.$k.data -- sleep $SECS 2>/dev/null
    until [ "$(grep -c "^PHASE-END $p\$" $MARKS 2>/dev/null)" -ge $k ]; do
        kill -0 $VM 2>/dev/null || break
        sleep 0.5
    done
done
wait $VM
awk '/KALLSYMS-BEGIN/ {f = 1; next} /KALLSYMS-END/ {f = 0} f' $OUT/vm.out > $OUT/kallsyms.txt
for tag in "${TAGS[@]}"; do
    p=${tag%.*}; k=${tag##*.}
    # the lines of the k-th run of phase p
    out=$(awk -v p=$p -v k=$k '$0 == "PHASE-START " p {n++; f = (n == k); next} $0 == "PHASE-END " p {f = 0} f' $OUT/vm.out)
    rate=$(echo "$out" | grep -o '[0-9.]* MB/s' | tail -1)
    iops=$(echo "$out" | grep -o '^[0-9]* IOPS' | tail -1)
    echo "## $p (round $k): $rate${iops:+, $iops}"
    perf report -i $OUT/perf-$tag.data --stdio --sort pid 2>/dev/null | grep -v '^#' | grep -v '^$' | head -3
    perf report -i $OUT/perf-$tag.data --stdio --sort sym 2>/dev/null > $OUT/report-$tag.txt
    python3 benches/tcg-profile.py $OUT/kallsyms.txt $OUT/report-$tag.txt "${rate% MB/s}" $SECS ${iops% IOPS}
done
