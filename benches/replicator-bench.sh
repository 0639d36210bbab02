#!/bin/bash
# Replicator throughput vs. the bottleneck bound, all in one testbed VM run:
#   cargo build --release -p peerpipe --bin peerpipe
#   cargo xtask vm -- bash benches/replicator-bench.sh            # SIZE=256M RUNS=3 for the full run
#   cargo xtask vm -- env SIZE=32M RUNS=3 MODES=host:none REPLICAS=1 WAITS="events busy" \
#       bash benches/replicator-bench.sh                          # event-driven vs busy-poll wait
# Prints a markdown table: fio read of the source, ib_write_bw -R between rxe0/rxe1, fio write
# (+fsync at the end) of the target, all at block size BS and depth WINDOW; then the replicator
# in each mode to 1 and 2 replicas (medians of RUNS runs; MB/s, CPU s per GiB, bytes copied),
# with each wait mode in WAITS (events: sleep in io_uring on the RDMA completion channels; busy).
# Units: every rate is MB/s = 10^6 bytes/s, the replicator's own unit. fio's terse output gives
# KiB/s (x 1024 / 10^6); perftest's "BW average[MB/sec]" is MiB/s (x 1048576 / 10^6 = 1.048576).
set -u
BIN=${BIN:-target/release/peerpipe}
SIZE=${SIZE:-32M}; BS=${BS:-64K}; WINDOW=${WINDOW:-16}; RUNS=${RUNS:-1}
MODES=${MODES:-"host:none p2p:none host:bounce"}
WAITS=${WAITS:-events}; REPLICAS=${REPLICAS:-"1 2"}
A0=${PEERPIPE_ADDR0:-10.77.0.1}; A1=${PEERPIPE_ADDR1:-10.77.0.2}
dev() { for d in /sys/block/nvme*; do [ "$(cat $d/device/serial | tr -d ' ')" = "$1" ] && echo /dev/$(basename $d); done; }
SRC=$(dev data1); D2=$(dev data2); D3=$(dev data3)
bytes() { numfmt --from=iec "$1"; }
N=$(( $(bytes $SIZE) / $(bytes $BS) ))
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
dd if=/dev/urandom of=$SRC bs=1M count=$(( $(bytes $SIZE) >> 20 )) oflag=direct status=none

fio_mbs() { # rw dev -> MB/s (10^6 B/s); terse fields 7 / 48 are read / write bandwidth in KiB/s
  fio --name=b --filename=$2 --rw=$1 --bs=$BS --iodepth=$WINDOW --ioengine=io_uring --direct=1 \
      --size=$SIZE --end_fsync=1 --output-format=terse --terse-version=3 |
    awk -F';' -v rw=$1 '{printf "%.2f\n", (rw=="read" ? $7 : $48) * 1.024 / 1000}'
}
ib_mbs() { # [extra ib_write_bw args, e.g. --mmap=/dev/p2pmem0 for buffers in p2pmem] -> MB/s
  # perftest's BW average[MB/sec] (4th column) is MiB/s: convert to MB/s (10^6 B/s)
  ib_write_bw -R -d rxe1 -s $(bytes $BS) -n $N -t $WINDOW -p 18515 "$@" >/dev/null 2>&1 & local s=$!
  sleep 1
  ib_write_bw -R -d rxe0 --source_ip $A0 -s $(bytes $BS) -n $N -t $WINDOW -p 18515 "$@" $A1 2>/dev/null |
    awk '$1 ~ /^[0-9]+$/ && NF >= 5 {printf "%.2f\n", $4 * 1048576 / 1000000}'
  wait $s
}
SECRET=/tmp/peerpipe-bench-secret; head -c 32 /dev/urandom | base64 > $SECRET
rep_run() { # bufs copy nrep wait -> "mbs cpu copied replica1-cpu"
  local bufs=$1 copy=$2 nrep=$3 wait=$4 kids=() args=()
  for i in $(seq 1 $nrep); do
    local t=$([ $i = 1 ] && echo $D2 || echo $D3)
    $BIN replica --listen $A1:$((7600+i)) --target $t --buffers $bufs --copy $copy --wait $wait --iodepth $WINDOW --bs $BS --allow-primary $A0 --secret-file $SECRET 2>/tmp/replicator-replica$i.err & kids+=($!)
    args+=(--replica $A1:$((7600+i)))
  done
  local j; j=$($BIN replicate --source $SRC --bind $A0 "${args[@]}" --size $SIZE --bs $BS \
      --iodepth $WINDOW --buffers $bufs --copy $copy --wait $wait --output-format=json --secret-file $SECRET 2>/tmp/replicator-primary.err)
  wait "${kids[@]}"
  field() { echo "$j" | grep -o "\"$1\":[0-9.]*" | cut -d: -f2; }
  if echo "$j" | grep -q '"success":true'; then
    echo "$(field mb_per_s) $(field cpu_seconds) $(field payload_bytes_copied) $(grep -o 'CPU [0-9.]* s' /tmp/replicator-replica1.err | awk '{print $2}')"
  else
    echo FAIL
    sed 's/^/    primary: /' /tmp/replicator-primary.err >&2
  fi
}
# Interleaved: each run measures the bound components and then every case once, so slow
# phases of the host hit all cases alike and each case can be compared run by run.
P2P=$([ -e /dev/p2pmem0 ] && case "$MODES" in *p2p*) echo 1;; esac)
R=(); W=(); I=(); IP=()
declare -A M C RC X XB
CASES=()
for nrep in $REPLICAS; do for m in $MODES; do for wait in $WAITS; do CASES+=("$nrep:$m:$wait"); done; done; done
for i in $(seq 1 $RUNS); do
  # p2p modes are judged against the network bound with perftest's buffers in p2pmem too
  # (under emulation rxe's CPU copies out of the CMB BAR are MMIO accesses, far slower than DRAM)
  r_i=$(fio_mbs read $SRC); i_i=$(ib_mbs); w_i=$(fio_mbs write $D2)
  R+=($r_i); I+=($i_i); W+=($w_i)
  [ -n "$P2P" ] && { ip_i=$(ib_mbs --mmap=/dev/p2pmem0); IP+=($ip_i); }
  for c in "${CASES[@]}"; do
    nrep=${c%%:*}; rest=${c#*:}; wait=${rest##*:}; m=${rest%:*}; bufs=${m%:*}; copy=${m#*:}
    set -- $(rep_run $bufs $copy $nrep $wait)
    if [ "$1" = FAIL ]; then M[$c]+="FAIL "; continue; fi
    M[$c]+="$1 "; X[$c]=$3
    C[$c]+="$(awk -v c=$2 -v s=$(bytes $SIZE) 'BEGIN{printf "%.2f", c / (s/1073741824)}') "
    RC[$c]+="$(awk -v c=${4:-0} -v s=$(bytes $SIZE) 'BEGIN{printf "%.2f", c / (s/1073741824)}') "
    # this run's bound: every replica's copy crosses the same rxe0 -> rxe1 path here, so N
    # replicas share its bandwidth: the network part is ib_write_bw / N
    nb=$i_i; [ "$bufs" = p2p ] && [ -n "$P2P" ] && nb=$ip_i
    b=$(printf '%s\n' $r_i $(awk -v x=$nb -v n=$nrep 'BEGIN{printf "%.2f", x/n}') $w_i | sort -g | head -1)
    XB[$c]+="$(awk -v a=$1 -v b=$b 'BEGIN{ if (b>0) printf "%.2f", a/b }') "
  done
done
r=$(echo ${R[*]} | median); ib=$(echo ${I[*]} | median); w=$(echo ${W[*]} | median)
bound=$(printf '%s\n' $r $ib $w | sort -g | head -1)
if [ -n "$P2P" ]; then
  ibp=$(echo ${IP[*]} | median); pbound=$(printf '%s\n' $r $ibp $w | sort -g | head -1)
fi
echo "size $SIZE, block $BS, depth/window $WINDOW, runs $RUNS (interleaved: bound, then every case, per run); MB/s = 10^6 bytes/s everywhere (perftest's MiB/s converted)"
echo "| bound component | MB/s (10^6 B/s, median) | runs (MB/s) |"
echo "|---|---|---|"
echo "| fio read source (io_uring, O_DIRECT) | $r | ${R[*]} |"
echo "| ib_write_bw -R rxe0->rxe1 | $ib | ${I[*]} |"
echo "| fio write target (+end fsync) | $w | ${W[*]} |"
echo "| **bottleneck bound** (MB/s) | $bound | |"
if [ -n "$P2P" ]; then
  echo "| ib_write_bw -R, both buffers mmap'ed from /dev/p2pmem0 | $ibp | ${IP[*]} |"
  echo "| **bottleneck bound, p2p buffers** (MB/s; x bound of p2p modes) | $pbound | |"
fi
echo
echo "x bound: median over runs of (MB/s / that run's min(fio read, ib_write_bw / replicas, fio write)), all in MB/s (10^6 B/s), with the p2p ib_write_bw for p2p modes"
echo
echo "| mode | wait | replicas | MB/s (10^6 B/s, median) | x bound | CPU s/GiB (primary) | CPU s/GiB (replica 1) | payload bytes copied | runs (MB/s) | runs (x bound) | runs (primary CPU s/GiB) |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for c in "${CASES[@]}"; do
  nrep=${c%%:*}; rest=${c#*:}; wait=${rest##*:}; m=${rest%:*}; bufs=${m%:*}; copy=${m#*:}
  mm=$(echo ${M[$c]} | tr ' ' '\n' | grep -v FAIL | median); cc=$(echo ${C[$c]:-} | median)
  rc=$(echo ${RC[$c]:-} | median); xb=$(echo ${XB[$c]:-} | median)
  echo "| $bufs, copy $copy | $wait | $nrep | $mm | $xb | $cc | $rc | ${X[$c]:-} | ${M[$c]} | ${XB[$c]:-} | ${C[$c]:-} |"
done
# Zero-copy against bounce, run by run (same buffers, replicas and wait mode).
for c in "${CASES[@]}"; do
  case $c in *:none:*) ;; *) continue;; esac
  b=${c/:none:/:bounce:}
  [ -n "${M[$b]:-}" ] || continue
  ratios=$(paste -d' ' <(echo ${M[$c]} | tr ' ' '\n') <(echo ${M[$b]} | tr ' ' '\n') |
    awk '$1 != "FAIL" && $2 != "FAIL" && $2 > 0 {printf "%.2f ", $1/$2}')
  echo
  echo "zero-copy / bounce, $c: per run $ratios-> median $(echo $ratios | median)"
done
