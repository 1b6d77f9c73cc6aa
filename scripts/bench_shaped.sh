#!/usr/bin/env bash
# Exchange benchmark over a rate-limited link on one machine (needs root and iproute2).
#
# Runs `mpiqsgd bench exchange` for several codecs and topologies inside the shaped
# namespace of scripts/shaped_link.sh, each timed against fp32 MPI_Allreduce in the same run.
#
# Usage: [scenario=hub|switch] sudo -E bash scripts/bench_shaped.sh [RANKS] [NUMEL] [RATE] [OUT_DIR] [ONLY]
#   ONLY=qsgd4: just the 4-bit QSGD rows (ring, scatter; dense and entropy-coded) with 3 repeats (large NUMEL)
set -euo pipefail
ranks=${1:-4}; numel=${2:-5000000}; rate=${3:-1gbit}; out=${4:-runs/bench-shaped}; only=${5:-}
repeats=5; [ "$only" = qsgd4 ] && repeats=3
mkdir -p "$out"
source "$(dirname "$0")/shaped_link.sh"
bench() {
  name=$1; shift
  mpi_run "$ranks" python -m mpi4py -m mpiqsgd bench exchange \
    --numel "$numel" --repeats "$repeats" --json "$@" > "$out/$name.json"
  python - "$out/$name.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
c, b = r["candidate"], r["baseline"]
ph = {k: v * 1e3 for k, v in c["phase_seconds_this_rank"].items()}  # the last repeat
print(f"{sys.argv[2]:<22} {c['median_seconds']*1e3:9.1f} ms (range {min(c['seconds_per_repeat'])*1e3:.0f}-"
      f"{max(c['seconds_per_repeat'])*1e3:.0f})  allreduce {b['median_seconds']*1e3:9.1f} ms  "
      f"speedup {r['speedup_vs_allreduce']:5.2f}x  bytes/rank {c['sent_bytes_this_rank']:>12,} "
      f"({r['bytes_vs_allreduce']:.3f}x)  rel.err {r['relative_error_vs_exact_mean']:.3f}  rank 0 ms (last repeat): "
      + " ".join(f"{k} {v:.0f}" for k, v in sorted(ph.items())))
PY
}
echo "$scenario, rate $rate, $ranks ranks, numel $numel (fp32 $((numel * 4)) bytes), medians of $repeats"
if [ "$only" = qsgd4 ]; then
  bench ring-qsgd4     --topology ring --codec qsgd --bits 4
  bench scatter-qsgd4  --topology scatter --codec qsgd --bits 4
  bench ring-qsgd4-entropy    --topology ring --codec qsgd --bits 4 --encoding entropy
  bench scatter-qsgd4-entropy --topology scatter --codec qsgd --bits 4 --encoding entropy
  exit 0
fi
bench ring-fp32      --topology ring --codec fp32
bench ring-qsgd4     --topology ring --codec qsgd --bits 4
bench ring-qsgd2     --topology ring --codec qsgd --bits 2 --bucket 128
bench scatter-qsgd4  --topology scatter --codec qsgd --bits 4
bench scatter-qsgd2  --topology scatter --codec qsgd --bits 2 --bucket 128
bench allgather-qsgd4 --topology allgather --codec qsgd --bits 4
bench ps-qsgd4       --topology ps --codec qsgd --bits 4
bench ps-qsgd4-down  --topology ps --codec qsgd --bits 4 --downlink codec
bench ring-sign      --topology ring --codec sign
