#!/usr/bin/env bash
# The link projection of `mpiqsgd report --link` against a measurement on a shaped link.
#
# Inside the shaped namespace of scripts/shaped_link.sh (one loopback shared by all ranks,
# rate-limited by tc tbf): a link sweep (alpha, beta), then short training runs with their
# timeline traced, then the report projecting each run onto the link (--link-shared: the
# ranks share the one loopback). The measured figures are each run's communicate seconds
# per step from trace.json (steps 2 on: step 0 compiles kernels), mean over ranks, as
# measured and less the time each rank waited for the last rank's backward to end.
#
# Usage: sudo bash scripts/check_projection_shaped.sh [MODEL] [RATE] [RANKS] [STEPS] [OUT_DIR]
#   e.g. resnet20 100mbit 4 12
set -euo pipefail
model=${1:-resnet20}; rate=${2:-100mbit}; ranks=${3:-4}; steps=${4:-12}
out=${5:-runs/projection-$model-$rate}
mkdir -p "$out"
source "$(dirname "$0")/shaped_link.sh"
in_ns mpiexec -n 2 python -m mpi4py -m mpiqsgd bench exchange --sweep --max-mb 3 --out "$out/link.json"
train() {
  name=$1; shift
  in_ns mpiexec -n "$ranks" python -m mpi4py -m mpiqsgd train --model "$model" --dataset synthetic \
    --synthetic-size $((ranks * 32 * steps)) --val-fraction 0 --batch-size 32 --epochs 1 --threads 1 \
    --diag-every 0 --no-progress --trace-steps "2-$steps" --run-dir "$out/$name" "$@" > /dev/null
  python - "$out/$name/trace.json" "$name" <<'PY'
import json, sys
from collections import defaultdict
spans = [e for e in json.load(open(sys.argv[1]))["traceEvents"] if e["ph"] == "X"]
last_end = defaultdict(float)  # step -> when the last rank's compute ended (one host: one clock)
for e in spans:
    if e["cat"] == "compute":
        last_end[e["args"]["step"]] = max(last_end[e["args"]["step"]], (e["ts"] + e["dur"]) / 1e6)
comm, early = defaultdict(float), 0.0
for e in spans:
    if e["cat"] == "communicate" and e["args"]["step"] in last_end:
        start, end = e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6
        comm[e["pid"]] += end - start
        # no message completes before the last rank's backward ends: time in communicate
        # before that is waiting for a slower rank, which the projection leaves out
        early += max(0.0, min(end, last_end[e["args"]["step"]]) - start)
steps, ranks = len(last_end), len(comm)
total = sum(comm.values())
print(f"{sys.argv[2]:<14} measured communicate {total / ranks / steps:.4f} s/step, "
      f"{(total - early) / ranks / steps:.4f} after the last rank's compute "
      f"(trace, mean over {ranks} ranks, {steps} steps)")
PY
}
train fp32-allreduce --codec fp32 --topology allreduce
train qsgd4-ring --codec qsgd --bits 4 --topology ring
python -m mpiqsgd report "$out/fp32-allreduce" "$out/qsgd4-ring" --link "$rate,model" --link-model "$out/link.json" \
  --link-shared | sed -n '/^Projected/,$p'
