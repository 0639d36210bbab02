#!/bin/bash
# Replicator throughput against bounds that bound, all in one testbed VM run:
#   cargo build --release -p peerpipe --bin peerpipe --example rdma_bw
#   cargo xtask vm -- bash benches/replicator-bench.sh            # SIZE=32M RUNS=1
#   cargo xtask vm -- env SIZE=128M RUNS=3 MODES="host:none host:bounce" REPLICAS="1 2" \
#       bash benches/replicator-bench.sh
#   PEERPIPE_VM_TCG=multi cargo xtask vm -- ...                   # multi-threaded TCG
#   ... env PLACEMENTS="any split" ...                            # placement as one more case
#
# Each run first measures every stage alone, at block size BS and depth WINDOW, then runs the
# replicator once per case (interleaved, so slow phases of the host hit all alike):
#   R_read  fio sequential read of the source (io_uring, O_DIRECT)
#   R_net   the best RDMA WRITE stream rxe0 -> rxe1 (the larger of perftest's ib_write_bw -R and
#           peerpipe's rdma_bw; p2p modes: the same two with both buffers in /dev/p2pmem0,
#           --mmap on both sides)
#   R_write fio sequential write of the target with the replicator's flush policy: when the
#           target's write cache is volatile ("write back"), a flush every WINDOW writes
#           (--fsync=WINDOW: the replica flushes once per batch of completed writes), + end fsync
# and reports two bounds for N replicas (each replica's copy crosses rxe0 -> rxe1 and is
# written to its own drive):
#   serial bound  1 / (1/R_read + N/R_net + N/R_write): single-threaded TCG (the default) runs
#                 every guest CPU cycle on one host thread, so stages cannot overlap
#   min bound     min(R_read, R_net/N, R_write): where stages overlap (PEERPIPE_VM_TCG=multi,
#                 hardware)
# PLACEMENTS: "any" (the scheduler places every process) and/or "split": the primary's side
# (the replicator's primary, the network tools' client) on vCPU 0 and the replicas' side (each
# replica, the network tools' server) on vCPU 1 (taskset), as two hosts would be. In single-
# threaded TCG each guest address-space switch empties the vCPU's translated-code jump cache
# and softmmu TLB, and split placement keeps one user process per vCPU. R_net is then the
# best stream over both tools and every placement listed.
# Guest CPU: busy time of the whole VM (/proc/stat: all CPUs, user+nice+system+irq+softirq)
# per GiB moved, for each stage alone and for the replicator; "x stages" divides the
# replicator's by R_read's + N x (R_net's + R_write's) (the network stage's tool is the one
# that gave R_net).
# Units: every rate is MB/s = 10^6 bytes/s, the replicator's own unit. fio's terse output gives
# KiB/s (x 1024 / 10^6); perftest's and rdma_bw's "BW average[MB/sec]" is MiB/s (x 1.048576).
set -u
BIN=${BIN:-target/release/peerpipe}
RDMA_BW=${RDMA_BW:-target/release/examples/rdma_bw}
SIZE=${SIZE:-32M}; BS=${BS:-64K}; WINDOW=${WINDOW:-16}; RUNS=${RUNS:-1}
MODES=${MODES:-"host:none p2p:none host:bounce"}
WAITS=${WAITS:-events}; REPLICAS=${REPLICAS:-"1 2"}; PLACEMENTS=${PLACEMENTS:-any}
PL=any
on() { # SIDE CMD...: CMD on vCPU SIDE when the placement is "split", wherever otherwise
  local side=$1; shift
  if [ "$PL" = split ]; then taskset -c "$side" "$@"; else "$@"; fi
}
A0=${PEERPIPE_ADDR0:-10.77.0.1}; A1=${PEERPIPE_ADDR1:-10.77.0.2}
dev() { for d in /sys/block/nvme*; do [ "$(cat $d/device/serial | tr -d ' ')" = "$1" ] && echo /dev/$(basename $d); done; }
SRC=$(dev data1); D2=$(dev data2); D3=$(dev data3)
bytes() { numfmt --from=iec "$1"; }
N=$(( $(bytes $SIZE) / $(bytes $BS) ))
GIB=$(awk -v s=$(bytes $SIZE) 'BEGIN{print s/1073741824}')
median() { tr ' ' '\n' | grep -v '^$' | grep -v FAIL | sort -g | awk '{a[NR]=$1} END {if (NR) print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
dd if=/dev/urandom of=$SRC bs=1M count=$(( $(bytes $SIZE) >> 20 )) oflag=direct status=none

# Whole-VM busy CPU seconds so far (all CPUs; USER_HZ ticks).
busy() { awk -v hz=$(getconf CLK_TCK) '/^cpu / {print ($2+$3+$4+$7+$8) / hz}' /proc/stat; }
# per_gib T0 T1 [copies] -> CPU s per GiB of source data between two busy() readings
per_gib() { awk -v a=$1 -v b=$2 -v g=$GIB 'BEGIN{printf "%.2f", (b-a)/g}'; }

WCACHE=$(cat /sys/block/$(basename $D2)/queue/write_cache)
FSYNC=$([ "$WCACHE" = "write back" ] && echo "--fsync=$WINDOW")
fio_mbs() { # rw dev [fio args] -> "MB/s cpu_s_per_gib"; terse fields 7 / 48: read / write KiB/s
  local rw=$1 d=$2; shift 2
  local t0; t0=$(busy)
  local kib; kib=$(fio --name=b --filename=$d --rw=$rw --bs=$BS --iodepth=$WINDOW --ioengine=io_uring \
      --direct=1 --size=$SIZE --end_fsync=1 "$@" --output-format=terse --terse-version=3 |
    awk -F';' -v rw=$rw '{print (rw=="read" ? $7 : $48)}')
  echo "$(awk -v k=$kib 'BEGIN{printf "%.2f", k * 1.024 / 1000}') $(per_gib $t0 $(busy))"
}
mib_to_mbs() { awk '$1 ~ /^[0-9]+$/ && NF >= 5 {printf "%.2f\n", $4 * 1048576 / 1000000; exit}'; }
ib_mbs() { # [extra ib_write_bw args, e.g. --mmap=/dev/p2pmem0] -> "MB/s cpu_s_per_gib"
  local t0; t0=$(busy)
  on 1 ib_write_bw -R -d rxe1 -s $(bytes $BS) -n $N -t $WINDOW -p 18515 "$@" >/dev/null 2>&1 & local s=$!
  sleep 1
  local m; m=$(on 0 ib_write_bw -R -d rxe0 --source_ip $A0 -s $(bytes $BS) -n $N -t $WINDOW -p 18515 "$@" $A1 2>/dev/null | mib_to_mbs)
  wait $s
  echo "${m:-FAIL} $(per_gib $t0 $(busy))"
}
pp_mbs() { # [--mmap=/dev/p2pmem0] peerpipe's rdma_bw, same size, count and depth -> "MB/s cpu_s_per_gib"
  [ -x "$RDMA_BW" ] || { echo "FAIL 0"; return; }
  local t0; t0=$(busy)
  on 1 $RDMA_BW bw --bind $A1 -p 18516 "$@" >/tmp/rdma_bw.srv 2>&1 & local s=$!
  for _ in $(seq 100); do grep -q waiting /tmp/rdma_bw.srv && break; sleep 0.1; done
  local m; m=$(on 0 $RDMA_BW bw -s $(bytes $BS) -n $N -t $WINDOW --source_ip $A0 -p 18516 "$@" $A1 2>/dev/null | mib_to_mbs)
  wait $s
  echo "${m:-FAIL} $(per_gib $t0 $(busy))"
}
SECRET=/tmp/peerpipe-bench-secret; head -c 32 /dev/urandom | base64 > $SECRET
rep_run() { # bufs copy nrep wait -> "mbs primary-cpu copied replica1-cpu vm-cpu-per-gib"
  local bufs=$1 copy=$2 nrep=$3 wait=$4 kids=() args=()
  local t0; t0=$(busy)
  for i in $(seq 1 $nrep); do
    local t=$([ $i = 1 ] && echo $D2 || echo $D3)
    on 1 $BIN replica --listen $A1:$((7600+i)) --target $t --buffers $bufs --copy $copy --wait $wait --iodepth $WINDOW --bs $BS --allow-primary $A0 --secret-file $SECRET 2>/tmp/replicator-replica$i.err & kids+=($!)
    args+=(--replica $A1:$((7600+i)))
  done
  for i in $(seq 1 $nrep); do
    for _ in $(seq 200); do grep -q listening /tmp/replicator-replica$i.err && break; sleep 0.05; done
  done
  local j; j=$(on 0 $BIN replicate --source $SRC --bind $A0 "${args[@]}" --size $SIZE --bs $BS \
      --iodepth $WINDOW --buffers $bufs --copy $copy --wait $wait --output-format=json --secret-file $SECRET 2>/tmp/replicator-primary.err)
  wait "${kids[@]}"
  local vm; vm=$(per_gib $t0 $(busy))
  field() { echo "$j" | grep -o "\"$1\":[0-9.]*" | cut -d: -f2; }
  if echo "$j" | grep -q '"success":true'; then
    echo "$(printf %.2f "$(field mb_per_s)") $(field cpu_seconds) $(field payload_bytes_copied) $(grep -o 'CPU [0-9.]* s' /tmp/replicator-replica1.err | awk '{print $2}') $vm"
  else
    echo FAIL
    sed 's/^/    primary: /' /tmp/replicator-primary.err >&2
  fi
}
serial() { awk -v r=$1 -v n=$2 -v w=$3 -v k=$4 'BEGIN{ if (r>0 && n>0 && w>0) printf "%.2f", 1/(1/r + k/n + k/w) }'; }
minb() { awk -v r=$1 -v n=$2 -v w=$3 -v k=$4 'BEGIN{ m=r; if (n/k<m) m=n/k; if (w<m) m=w; printf "%.2f", m }'; }
ratio() { awk -v a=$1 -v b=$2 'BEGIN{ if (b>0) printf "%.2f", a/b }'; }
better() { # RATE1 CPU1 RATE2 CPU2 -> "rate cpu" of the faster tool (a FAIL never wins)
  if [ "$1" != FAIL ] && { [ "$3" = FAIL ] || awk -v a=$1 -v b=$3 'BEGIN{exit !(a>=b)}'; }; then
    echo "$1 $2"
  else
    echo "$3 $4"
  fi
}

P2P=$([ -e /dev/p2pmem0 ] && case "$MODES" in *p2p*) echo 1;; esac)
R=(); W=(); NET=(); IP=(); CR=(); CW=(); CN=(); CIP=()
declare -A M C RC X XS XM VC XC IB PP IPT IPP
CASES=()
for nrep in $REPLICAS; do for m in $MODES; do for wait in $WAITS; do for pl in $PLACEMENTS; do
  CASES+=("$nrep:$m:$wait:$pl")
done; done; done; done
for i in $(seq 1 $RUNS); do
  set -- $(fio_mbs read $SRC); r_i=$1; R+=($1); CR+=($2)
  # the network stage is the best of both tools in every placement; its CPU is that one's
  n_i=FAIL; cn_i=0; ip_i=FAIL; ip_c=0
  for PL in $PLACEMENTS; do
    set -- $(ib_mbs); IB[$PL]+="$1 "; set -- $(better $n_i $cn_i $1 $2); n_i=$1; cn_i=$2
    set -- $(pp_mbs); PP[$PL]+="$1 "; set -- $(better $n_i $cn_i $1 $2); n_i=$1; cn_i=$2
    if [ -n "$P2P" ]; then
      set -- $(ib_mbs --mmap=/dev/p2pmem0); IPT[$PL]+="$1 "; set -- $(better $ip_i $ip_c $1 $2); ip_i=$1; ip_c=$2
      set -- $(pp_mbs --mmap=/dev/p2pmem0); IPP[$PL]+="$1 "; set -- $(better $ip_i $ip_c $1 $2); ip_i=$1; ip_c=$2
    fi
  done
  PL=any
  NET+=($n_i); CN+=($cn_i)
  [ -n "$P2P" ] && { IP+=($ip_i); CIP+=($ip_c); }
  set -- $(fio_mbs write $D2 $FSYNC); w_i=$1; W+=($1); CW+=($2)
  for c in "${CASES[@]}"; do
    IFS=: read -r nrep bufs copy wait PL <<< "$c"
    set -- $(rep_run $bufs $copy $nrep $wait)
    if [ "$1" = FAIL ]; then M[$c]+="FAIL "; continue; fi
    M[$c]+="$1 "; X[$c]=$3
    C[$c]+="$(awk -v c=$2 -v g=$GIB 'BEGIN{printf "%.2f", c / g}') "
    RC[$c]+="$(awk -v c=${4:-0} -v g=$GIB 'BEGIN{printf "%.2f", c / g}') "
    VC[$c]+="$5 "
    nb=$n_i; ncpu=$cn_i
    [ "$bufs" = p2p ] && [ -n "$P2P" ] && { nb=$ip_i; ncpu=${CIP[-1]}; }
    XS[$c]+="$(ratio $1 $(serial $r_i $nb $w_i $nrep)) "
    XM[$c]+="$(ratio $1 $(minb $r_i $nb $w_i $nrep)) "
    XC[$c]+="$(ratio $5 $(awk -v r=${CR[-1]} -v n=$ncpu -v w=${CW[-1]} -v k=$nrep 'BEGIN{print r + k*(n+w)}')) "
  done
done
r=$(echo ${R[*]} | median); net=$(echo ${NET[*]} | median); w=$(echo ${W[*]} | median)
echo "size $SIZE, block $BS, depth/window $WINDOW, runs $RUNS (interleaved: stages, then every case, per run), TCG ${PEERPIPE_VM_TCG:-single}; target write cache: $WCACHE; MB/s = 10^6 bytes/s everywhere (MiB/s converted)"
echo
echo "| stage alone | MB/s (10^6 B/s, median) | runs (MB/s) | VM CPU s/GiB (runs) |"
echo "|---|---|---|---|"
echo "| R_read: fio read source (io_uring, O_DIRECT) | $r | ${R[*]} | ${CR[*]} |"
for pl in $PLACEMENTS; do
  echo "| perftest ib_write_bw -R rxe0->rxe1, placement $pl | $(echo ${IB[$pl]} | median) | ${IB[$pl]} | |"
  echo "| peerpipe rdma_bw bw rxe0->rxe1, placement $pl | $(echo ${PP[$pl]} | median) | ${PP[$pl]} | |"
done
echo "| R_net: the best of these, per run | $net | ${NET[*]} | ${CN[*]} |"
echo "| R_write: fio write target ($([ -n "$FSYNC" ] && echo "$FSYNC, " )+end fsync) | $w | ${W[*]} | ${CW[*]} |"
if [ -n "$P2P" ]; then
  for pl in $PLACEMENTS; do
    echo "| perftest ib_write_bw -R, both buffers in /dev/p2pmem0, placement $pl | $(echo ${IPT[$pl]} | median) | ${IPT[$pl]} | |"
    echo "| peerpipe rdma_bw bw, both buffers in /dev/p2pmem0, placement $pl | $(echo ${IPP[$pl]} | median) | ${IPP[$pl]} | |"
  done
  echo "| R_net p2p: the best of these, per run | $(echo ${IP[*]} | median) | ${IP[*]} | ${CIP[*]} |"
fi
for k in $REPLICAS; do
  echo "| **serial bound**, $k replica(s) (MB/s) | $(serial $r $net $w $k) | | |"
  echo "| **min bound**, $k replica(s) (MB/s) | $(minb $r $net $w $k) | | |"
  if [ -n "$P2P" ]; then
    netp=$(echo ${IP[*]} | median)
    echo "| **serial bound, p2p buffers**, $k replica(s) (MB/s) | $(serial $r $netp $w $k) | | |"
    echo "| **min bound, p2p buffers**, $k replica(s) (MB/s) | $(minb $r $netp $w $k) | | |"
  fi
done
echo
echo "x serial / x min: median over runs of MB/s / that run's bound (p2p modes: with R_net p2p). VM CPU: whole-VM busy s per GiB replicated; x stages: over R_read's + N x (R_net's + R_write's)"
echo
echo "| mode | wait | placement | replicas | MB/s (10^6 B/s, median) | x serial bound | x min bound | VM CPU s/GiB | x stages CPU | CPU s/GiB primary | CPU s/GiB replica 1 | payload bytes copied | runs (MB/s) | runs (x serial) | runs (x stages CPU) |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for c in "${CASES[@]}"; do
  IFS=: read -r nrep bufs copy wait pl <<< "$c"
  echo "| $bufs, copy $copy | $wait | $pl | $nrep | $(echo ${M[$c]} | median) | $(echo ${XS[$c]:-} | median) | $(echo ${XM[$c]:-} | median) | $(echo ${VC[$c]:-} | median) | $(echo ${XC[$c]:-} | median) | $(echo ${C[$c]:-} | median) | $(echo ${RC[$c]:-} | median) | ${X[$c]:-} | ${M[$c]} | ${XS[$c]:-} | ${XC[$c]:-} |"
done
per_run_ratios() { # "A1 A2 ..." "B1 B2 ..." -> "A1/B1 A2/B2 ..." (runs with a FAIL left out)
  paste -d' ' <(echo $1 | tr ' ' '\n') <(echo $2 | tr ' ' '\n') |
    awk '$1 != "FAIL" && $2 != "FAIL" && $2 > 0 {printf "%.2f ", $1/$2}'
}
# Zero-copy against bounce, run by run (same buffers, replicas and wait mode).
for c in "${CASES[@]}"; do
  case $c in *:none:*) ;; *) continue;; esac
  b=${c/:none:/:bounce:}
  [ -n "${M[$b]:-}" ] || continue
  ratios=$(per_run_ratios "${M[$c]}" "${M[$b]}")
  echo
  echo "zero-copy / bounce, $c: per run $ratios-> median $(echo $ratios | median)"
done
# Split placement against the scheduler's, run by run (same everything else).
for c in "${CASES[@]}"; do
  case $c in *:any) ;; *) continue;; esac
  b=${c%:any}:split
  [ -n "${M[$b]:-}" ] || continue
  ratios=$(per_run_ratios "${M[$b]}" "${M[$c]}")
  echo
  echo "split / any, ${c%:any}: per run $ratios-> median $(echo $ratios | median)"
done
