#!/bin/bash
# NVMe over Fabrics (RDMA) target benchmark, all in one testbed VM boot:
#   (a) `peerpipe target --buffers host`, (b) `peerpipe target --buffers p2p`,
#   (c) the kernel's nvmet-rdma target (configfs, bdev backend),
# each on its own port/NQN on rxe1's address and backed by its own emulated NVMe drive of the
# same kind (data1, data2, data3: block devices, O_DIRECT). The kernel's nvme-rdma host
# connects to all three from rxe0's address; fio (io_uring, O_DIRECT, time-based) runs through
# each fabrics device, interleaved per round (a, b, c, a, b, c, ...).
#
#   cargo build --release -p peerpipe --bins
#   cargo xtask vm -- env RUNS=5 SECS=5 SWEEP_RUNS=3 bash benches/nvmf-bench.sh | tee target/nvmf-bench.txt
#   python3 benches/plot-nvmf.py target/nvmf-bench.txt benches/nvmf-qd.svg
#
# Knobs: BIN (peerpipe binary), RUNS rounds of TESTS (default 3), SECS per fio run (5),
# SWEEP_RUNS rounds of the 4 KiB randread queue-depth sweep over QDS (2; 0 skips it),
# SWEEP_SECS (4), FILL=1 writes every drive once before the targets start (so reads never hit
# holes of the sparse image files), VERIFY=1 runs a short fio crc32c verify through each target.
#
# Output: one `RESULT key=value ...` line per fio run, then markdown tables of medians with the
# ratios (a)/(c) and (b)/(c). CPU columns (ticks of /proc, USER_HZ = 100, deltas taken right
# before and after each fio process):
#   tgt_us_per_io   (a), (b): utime+stime of the peerpipe target process (all its threads,
#                   /proc/PID/stat fields 14+15); (c): the kern figure below, since nvmet-rdma
#                   runs in kernel workers and softirq.
#   kern_us_per_io  utime+stime of every kworker/* thread (/proc/*/stat, per-thread deltas;
#                   a kworker that exits during a run loses its share: an undercount) + the irq and softirq columns of /proc/stat. It holds the target-side
#                   kernel work (nvmet, rxe responder/requester of both ends, the backing
#                   drive's completions) but also the host side's (nvme-rdma completes in
#                   softirq, its rxe work runs in kworkers). ksoftirqd threads are not added:
#                   with tick accounting (the testbed kernel: TICK_CPU_ACCOUNTING, no
#                   IRQ_TIME_ACCOUNTING) their time is already in the softirq column.
#   proc_kern_us_per_io  the target process (0 for (c)) + kern: the same scope for all three
#                   (what the whole serving side costs in the VM, host-side kernel work
#                   included alike; a softirq tick landing on the target process counts twice).
#   sys_us_per_io   all busy CPU of the VM (/proc/stat user+nice+system+irq+softirq+steal):
#                   fio + host + target + both rxe ends: the same-scope total for all three.
set -u
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/peerpipe}
RUNS=${RUNS:-3}; SECS=${SECS:-5}
SWEEP_RUNS=${SWEEP_RUNS:-2}; SWEEP_SECS=${SWEEP_SECS:-4}; QDS=${QDS:-"1 2 4 8 16 32"}
TESTS=${TESTS:-"rr4k_qd1 rr4k_qd32 rw4k_qd32 sr128k_qd8 sw128k_qd8"}
FILL=${FILL:-1}; VERIFY=${VERIFY:-1}
A0=${PEERPIPE_ADDR0:-10.77.0.1}; A1=${PEERPIPE_ADDR1:-10.77.0.2}
HN=nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000c3
LOG=/tmp/nvmf-bench; mkdir -p $LOG
[ -x "$BIN" ] || { echo "build first: cargo build --release -p peerpipe --bins (BIN=$BIN)" >&2; exit 1; }
# Variants for A/B runs in the same boot: TARGETS="a b c d e" adds (d) and (e), peerpipe with
# host buffers like (a) on their own drives (data4, data5: `cargo xtask vm --drives 5`), started
# with the extra target options ARGS_d / ARGS_e (e.g. ARGS_d="--busy-poll 200"); ARGS_a and
# ARGS_b add options to (a) and (b) (e.g. ARGS_a="--busy-poll 0").
# BIN_d, BIN_e (or BIN_a, BIN_b) run that target from another peerpipe binary (a build before
# and after a change, A/B in one boot), e.g. BIN_d=/tmp/peerpipe-before.
TARGETS=${TARGETS:-"a b c"}
PEERS=$(echo $TARGETS | tr ' ' '\n' | grep -v '^c$' | tr '\n' ' ')
declare -A DESC=([a]="peerpipe, host buffers" [b]="peerpipe, p2p buffers" [c]="kernel nvmet-rdma"
    [d]="peerpipe, host buffers, ${ARGS_d:-}" [e]="peerpipe, host buffers, ${ARGS_e:-}")
declare -A PORT=([a]=4420 [b]=4421 [c]=4422 [d]=4423 [e]=4424)
declare -A SERIAL=([a]=data1 [b]=data2 [c]=data3 [d]=data4 [e]=data5)
declare -A BUFS=([a]=host [b]=p2p [d]=host [e]=host)
declare -A ARGS=([a]="${ARGS_a:-}" [b]="${ARGS_b:-}" [d]="${ARGS_d:-}" [e]="${ARGS_e:-}")
declare -A TBIN=([a]="${BIN_a:-$BIN}" [b]="${BIN_b:-$BIN}" [d]="${BIN_d:-$BIN}" [e]="${BIN_e:-$BIN}")
for t in a b d e; do [ "${TBIN[$t]}" = "$BIN" ] || DESC[$t]="${DESC[$t]} (binary ${TBIN[$t]})"; done
declare -A NQN DRIVE DEV PID
for t in $TARGETS; do NQN[$t]=nqn.2026-11.io.peerpipe:bench-$t; done

say() { echo "# $(date -u +%T) $*"; }
drive() { for d in /sys/block/nvme*; do [ "$(tr -d ' ' < $d/device/serial 2>/dev/null)" = "$1" ] && echo /dev/$(basename $d); done; }
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {if (NR == 0) print "n/a"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

# snapshot PID -> "proc irq+softirq busy kworkers" (ticks; kworkers: pid:ticks,pid:ticks,...).
# cat skips threads that vanished meanwhile.
snapshot() {
    cat /proc/stat /proc/[0-9]*/stat 2>/dev/null | awk -v pid="$1" '
        $1 == "cpu" { busy = $2 + $3 + $4 + $7 + $8 + $9; isr = $7 + $8; next }
        $1 ~ /^[0-9]+$/ && $2 ~ /^\(/ {
            i = index($0, ") "); comm = substr($0, index($0, "(") + 1, i - index($0, "(") - 1)
            n = split(substr($0, i + 2), f, " "); t = f[12] + f[13]
            if (comm ~ /^kworker/) kw = kw (kw == "" ? "" : ",") $1 ":" t
            if ($1 == pid) p = t
        }
        END { printf "%d %d %d %s\n", p, isr, busy, (kw == "" ? "-" : kw) }'
}

cleanup() {
    for t in $TARGETS; do nvme disconnect -n ${NQN[$t]} >/dev/null 2>&1; done
    for t in $PEERS; do [ -n "${PID[$t]:-}" ] && kill -TERM ${PID[$t]} 2>/dev/null; done
}
trap cleanup EXIT

DMESG0=$(dmesg | wc -l)
say "kernel $(uname -r), $(nproc) CPUs, $(fio --version), $(nvme version | head -1), binary $BIN"
for t in $TARGETS; do
    DRIVE[$t]=$(drive ${SERIAL[$t]})
    [ -b "${DRIVE[$t]}" ] || { echo "no drive with serial ${SERIAL[$t]}" >&2; exit 1; }
    say "target $t (${DESC[$t]}): port ${PORT[$t]}, nqn ${NQN[$t]}, backing ${DRIVE[$t]} (serial ${SERIAL[$t]})"
done

if [ "$FILL" = 1 ]; then
    for t in $TARGETS; do
        fio --name=fill --filename=${DRIVE[$t]} --rw=write --bs=1M --iodepth=8 --ioengine=io_uring \
            --direct=1 --output-format=terse --terse-version=3 |
            awk -F';' -v d=${DRIVE[$t]} '{printf "# filled %s: %.0f MiB at %.1f MiB/s\n", d, $47/1024, $48/1024}'
    done
fi

# (a), (b) and the variants: peerpipe targets
for t in $PEERS; do
    # shellcheck disable=SC2086 # ARGS: several options
    ${TBIN[$t]} target --listen $A1:${PORT[$t]} --nqn ${NQN[$t]} --ns ${DRIVE[$t]} --buffers ${BUFS[$t]} \
        ${ARGS[$t]} 2>$LOG/target-$t.err &
    PID[$t]=$!
done
for t in $PEERS; do
    for _ in $(seq 600); do grep -q "target: listening on" $LOG/target-$t.err && break; kill -0 ${PID[$t]} 2>/dev/null || break; sleep 0.1; done
    grep -q "target: listening on" $LOG/target-$t.err || { echo "target $t did not start:"; cat $LOG/target-$t.err; exit 1; }
    sed "s/^/# target $t: /" $LOG/target-$t.err
done

# (c): the kernel's nvmet-rdma target
C=/sys/kernel/config/nvmet
[ -d $C ] || mount -t configfs none /sys/kernel/config
N=${NQN[c]}
mkdir -p $C/subsystems/$N/namespaces/1
echo 1 > $C/subsystems/$N/attr_allow_any_host
echo -n ${DRIVE[c]} > $C/subsystems/$N/namespaces/1/device_path
echo 1 > $C/subsystems/$N/namespaces/1/enable
mkdir -p $C/ports/3
echo rdma > $C/ports/3/addr_trtype; echo ipv4 > $C/ports/3/addr_adrfam
echo $A1 > $C/ports/3/addr_traddr; echo ${PORT[c]} > $C/ports/3/addr_trsvcid
ln -s $C/subsystems/$N $C/ports/3/subsystems/$N
say "nvmet: subsystem $N, ns 1 = $(cat $C/subsystems/$N/namespaces/1/device_path), port 3 = rdma $A1:${PORT[c]}"

# The kernel host: connect to all three, find each namespace's block device.
fabrics_dev() { # NQN -> /dev/nvmeXnY
    local c n
    for c in /sys/class/nvme/nvme*; do
        [ "$(cat $c/subsysnqn 2>/dev/null)" = "$1" ] || continue
        for n in $c/$(basename $c)n*; do [ -e "$n" ] && [ -b /dev/$(basename $n) ] && { echo /dev/$(basename $n); return; }; done
    done
}
for t in $TARGETS; do
    nvme connect -t rdma -a $A1 -s ${PORT[$t]} -w $A0 -n ${NQN[$t]} -q $HN --ctrl-loss-tmo=5 \
        || { echo "nvme connect to target $t failed"; cat $LOG/target-$t.err 2>/dev/null; dmesg | tail -20; exit 1; }
    for _ in $(seq 300); do DEV[$t]=$(fabrics_dev ${NQN[$t]}); [ -n "${DEV[$t]}" ] && break; sleep 0.1; done
    [ -n "${DEV[$t]}" ] || { echo "no namespace of target $t appeared"; dmesg | tail -20; exit 1; }
    q=/sys/block/$(basename ${DEV[$t]})/queue
    echo none > $q/scheduler 2>/dev/null
    ctrl=$(basename ${DEV[$t]}); ctrl=${ctrl%n*}
    say "target $t: ${DEV[$t]} ($(cat /sys/class/nvme/$ctrl/transport) $(cat /sys/class/nvme/$ctrl/address)), $(($(cat /sys/block/$(basename ${DEV[$t]})/size) / 2048)) MiB, scheduler [$(cat $q/scheduler)], max_sectors_kb $(cat $q/max_sectors_kb), $(ls -d /sys/block/$(basename ${DEV[$t]})/mq/* | wc -l) hw queues, queue size $(cat /sys/class/nvme/$ctrl/sqsize 2>/dev/null)"
done
say "RC QPs per device: $(rdma res show qp | awk '/type RC/ {n[$2]++} END {for (d in n) printf "%s %d; ", d, n[d]}')"
say "target-side QPs owned by processes: $(rdma res show qp | awk '/type RC/ && / comm nvmf/ {n++} END {print n+0}') (peerpipe queue threads; the kernel target's and host's show comm [rdma_cm])"

if [ "$VERIFY" = 1 ]; then
    for t in $TARGETS; do
        if fio --name=vfy --filename=${DEV[$t]} --rw=randwrite --bs=4k --iodepth=16 --ioengine=io_uring \
            --direct=1 --size=8M --offset=256M --verify=crc32c --do_verify=1 --verify_fatal=1 \
            --verify_state_save=0 >$LOG/verify-$t.txt 2>&1 && ! grep -qi "verify:\|bad magic\|verify failed" $LOG/verify-$t.txt; then
            say "target $t: fio crc32c verify of 8 MiB passed"
        else
            say "target $t: fio VERIFY FAILED:"; sed 's/^/#   /' $LOG/verify-$t.txt
        fi
    done
fi

# run PHASE ROUND TARGET TEST SECS: one fio run, one RESULT line
run() {
    local phase=$1 round=$2 t=$3 test=$4 secs=$5 rw bs qd
    case $test in
        rr4k_qd*) rw=randread bs=4k qd=${test#rr4k_qd} ;;
        rw4k_qd*) rw=randwrite bs=4k qd=${test#rw4k_qd} ;;
        sr128k_qd*) rw=read bs=128k qd=${test#sr128k_qd} ;;
        sw128k_qd*) rw=write bs=128k qd=${test#sw128k_qd} ;;
        *) echo "unknown test $test" >&2; return ;;
    esac
    local pid=${PID[$t]:-0} before after out rc
    before=$(snapshot $pid)
    out=$(timeout $((secs + 120)) fio --name=nvmf --filename=${DEV[$t]} --ioengine=io_uring --direct=1 \
        --rw=$rw --bs=$bs --iodepth=$qd --time_based --runtime=$secs --norandommap --randrepeat=0 \
        --output-format=terse --terse-version=3 2>&1)
    rc=$?
    after=$(snapshot $pid)
    local line; line=$(echo "$out" | grep '^3;' | tail -1)
    if [ $rc -ne 0 ] || [ -z "$line" ]; then
        echo "RESULT phase=$phase round=$round target=$t test=$test rw=$rw bs=$bs qd=$qd secs=$secs fail=1 fio_rc=$rc"
        echo "$out" | sed "s/^/# fio $t $test: /" | tail -30
        kill -0 $pid 2>/dev/null || [ $t = c ] || { echo "# target $t is gone:"; sed "s/^/#   /" $LOG/target-$t.err | tail -30; }
        dmesg | tail -20 | sed 's/^/# dmesg: /'
        return
    fi
    echo "$line" | awk -F';' -v phase=$phase -v round=$round -v t=$t -v test=$test -v rw=$rw -v bs=$bs \
        -v qd=$qd -v secs=$secs -v before="$before" -v after="$after" '
        function pct(s) { sub(/.*=/, "", s); return s }
        {
            w = (rw ~ /write/)
            kb = w ? $47 : $6; bw = w ? $48 : $7; iops = w ? $49 : $8
            cm = w ? $57 : $16; p50 = w ? pct($65) : pct($24)
            bsk = (bs == "4k") ? 4 : 128; ios = kb / bsk
            split(before, b, " "); split(after, a, " ")
            pr = a[1] - b[1]; isr = a[2] - b[2]; busy = a[3] - b[3]
            # kworkers: per-thread deltas; one born during the run counts whole, one that
            # exited during the run is lost (an undercount: its time since `before` is gone)
            nb = split(b[4], kb_, ","); for (j = 1; j <= nb; j++) { split(kb_[j], x, ":"); kb0[x[1]] = x[2] }
            na = split(a[4], ka_, ","); kw = 0
            for (j = 1; j <= na; j++) { split(ka_[j], x, ":"); kw += x[2] - ((x[1] in kb0) ? kb0[x[1]] : 0) }
            kern = kw + isr; tgt = (t == "c") ? kern : pr; pk = pr + kern
            us = (ios > 0) ? 10000 / ios : 0
            printf "RESULT phase=%s round=%s target=%s test=%s rw=%s bs=%s qd=%s secs=%s ios=%d iops=%d mibs=%.2f clat_mean_us=%.1f clat_p50_us=%s proc_ticks=%d kworker_ticks=%d irq_softirq_ticks=%d busy_ticks=%d tgt_us_per_io=%.1f kern_us_per_io=%.1f proc_kern_us_per_io=%.1f sys_us_per_io=%.1f\n",
                phase, round, t, test, rw, bs, qd, secs, ios, iops, bw / 1024, cm, p50, pr, kw, isr, busy,
                tgt * us, kern * us, pk * us, busy * us
        }'
}

START=$(date +%s)
say "main: $RUNS rounds x ($TESTS) x ($TARGETS), $SECS s each"
for r in $(seq $RUNS); do
    for test in $TESTS; do for t in $TARGETS; do run main $r $t $test $SECS; done; done
done | tee $LOG/results.txt
say "main took $(( $(date +%s) - START )) s"
START=$(date +%s)
if [ "$SWEEP_RUNS" -gt 0 ]; then
    say "sweep: $SWEEP_RUNS rounds x 4 KiB randread QD ($QDS) x ($TARGETS), $SWEEP_SECS s each"
    for r in $(seq $SWEEP_RUNS); do
        for qd in $QDS; do for t in $TARGETS; do run sweep $r $t rr4k_qd$qd $SWEEP_SECS; done; done
    done | tee -a $LOG/results.txt
    say "sweep took $(( $(date +%s) - START )) s"
fi

# Summary: medians over rounds, ratios of medians (a)/(c) and (b)/(c).
val() { # phase target test key -> the run values
    grep "^RESULT phase=$1 .* target=$2 test=$3 " $LOG/results.txt | grep -v fail=1 | tr ' ' '\n' | sed -n "s/^$4=//p" | tr '\n' ' '
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "n/a" || b == "n/a" || b == 0) print "n/a"; else printf "%.2f", a / b }'; }
table() { # phase tests key label
    local phase=$1 tests=$2 key=$3 label=$4
    echo
    echo "$label (median of the runs; per-run values in brackets)"
    echo
    echo "| test | (a) ${DESC[a]} | (b) ${DESC[b]} | (c) ${DESC[c]} | (a)/(c) | (b)/(c) |"
    echo "|---|---|---|---|---|---|"
    for test in $tests; do
        local m=() cell=()
        for t in a b c; do
            local v; v=$(val $phase $t $test $key)
            m+=("$(echo $v | median)"); cell+=("${m[-1]} [${v% }]")
        done
        echo "| $test | ${cell[0]} | ${cell[1]} | ${cell[2]} | $(ratio ${m[0]} ${m[2]}) | $(ratio ${m[1]} ${m[2]}) |"
    done
}
echo
echo "## Summary (RUNS=$RUNS, SECS=$SECS; sweep SWEEP_RUNS=$SWEEP_RUNS, SWEEP_SECS=$SWEEP_SECS)"
table main "$TESTS" iops "IOPS"
table main "$TESTS" mibs "MiB/s"
table main "rr4k_qd1" clat_mean_us "4 KiB randread QD1 completion latency, mean (us)"
table main "rr4k_qd1" clat_p50_us "4 KiB randread QD1 completion latency, p50 (us)"
table main "$TESTS" tgt_us_per_io "target CPU per I/O (us): (a), (b) the peerpipe process; (c) kworkers + irq + softirq"
table main "$TESTS" kern_us_per_io "kworkers + irq + softirq CPU per I/O (us), every target (includes the host side's kernel work)"
table main "$TESTS" proc_kern_us_per_io "target process (0 for (c)) + kworkers + irq + softirq CPU per I/O (us): same scope for all three"
table main "$TESTS" sys_us_per_io "all busy CPU of the VM per I/O (us): fio + host + target + rxe"
for v in d e; do
    case " $TARGETS " in *" $v "*) ;; *) continue ;; esac
    echo
    echo "Variant ($v) ${DESC[$v]} against (a) and (c), medians, per-round ratios ($v)/(a) in brackets"
    echo
    echo "| test | key | (a) | ($v) | (c) | ($v)/(a) | ($v)/(c) | per-round ($v)/(a) |"
    echo "|---|---|---|---|---|---|---|---|"
    for test in $TESTS; do for key in iops clat_p50_us sys_us_per_io; do
        ma=$(val main a $test $key | median); mv=$(val main $v $test $key | median); mc=$(val main c $test $key | median)
        per=$(paste -d' ' <(val main $v $test $key | tr ' ' '\n' | grep -v '^$') <(val main a $test $key | tr ' ' '\n' | grep -v '^$') | awk '$2 > 0 {printf "%s%.2f", (NR > 1 ? " " : ""), $1 / $2}')
        echo "| $test | $key | $ma | $mv | $mc | $(ratio $mv $ma) | $(ratio $mv $mc) | $per |"
    done; done
done
if [ "$SWEEP_RUNS" -gt 0 ]; then
    table sweep "$(for q in $QDS; do printf 'rr4k_qd%s ' $q; done)" iops "QD sweep, 4 KiB randread, IOPS"
    table sweep "$(for q in $QDS; do printf 'rr4k_qd%s ' $q; done)" tgt_us_per_io "QD sweep, target CPU per I/O (us)"
fi

# Teardown, with the evidence of anything that went wrong.
echo
for t in $TARGETS; do nvme disconnect -n ${NQN[$t]} | sed "s/^/# disconnect $t: /"; done
for t in $PEERS; do
    if kill -TERM ${PID[$t]} 2>/dev/null; then
        for _ in $(seq 300); do kill -0 ${PID[$t]} 2>/dev/null || break; sleep 0.1; done
        wait ${PID[$t]}; rc=$?
    else
        wait ${PID[$t]}; rc="$? (exited before SIGTERM)"
    fi
    PID[$t]=
    say "target $t exit status $rc; its stderr:"
    sed "s/^/#   /" $LOG/target-$t.err | tail -40
done
rm -f $C/ports/3/subsystems/$N; rmdir $C/ports/3
echo 0 > $C/subsystems/$N/namespaces/1/enable; rmdir $C/subsystems/$N/namespaces/1 $C/subsystems/$N
say "dmesg lines logged during the benchmark about nvme/nvmet/rdma/rxe (routine connect lines left out):"
dmesg | tail -n +$((DMESG0 + 1)) | grep -iE "nvme|rdma|rxe|blk_update|I/O error" | grep -ivE "new ctrl|creating .* I/O queues|mapped .* queues|Please enable CONFIG_NVME_MULTIPATH|adding nsid|enabling port|allocated controller|Removing ctrl|creating nvm controller" | tail -40 | sed 's/^/#   /'
[ -n "${PEERPIPE_OUT:-}" ] && cp $LOG/results.txt "$PEERPIPE_OUT/nvmf-results.txt"
exit 0
