#!/usr/bin/env bash
# Training-step benchmark over a rate-limited link: mpiqsgd configurations and torch DDP
# (gloo; no hook, fp16, PowerSGD ranks 1 and 2) on the same model, batch, ranks and link,
# each against its compute-only step timed in the same run (scripts/shaped_link.sh).
#
# Usage: [scenario=hub|switch] [short=1] sudo -E bash scripts/bench_step_shaped.sh [MODEL] [RATE] [RANKS] [REPEATS] [OUT_DIR]
#   e.g. resnet20 100mbit 4, alexnet 1gbit 4; short=1: fp32, the intsum and scatter rows with overlap, and
#   DDP without a hook, with PowerSGD ranks 1 and 2 and with the mpiqsgd hooks
set -euo pipefail
model=${1:-resnet20}; rate=${2:-100mbit}; ranks=${3:-4}; repeats=${4:-10}
out=${5:-runs/bench-step-$model-$rate}
mkdir -p "$out"
source "$(dirname "$0")/shaped_link.sh"
step() {
  name=$1; shift
  mpi_run "$ranks" python -m mpi4py -m mpiqsgd bench step --model "$model" --batch-size 32 \
    --repeats "$repeats" --json "$@" > "$out/$name.json"
  python "$(dirname "$0")/step_table.py" "$out/$name.json" "$name"
}
echo "$scenario: model $model, rate $rate, $ranks ranks, batch 32, medians of $repeats (slowest rank per repeat)"
step fp32-allreduce        --topology allreduce --codec fp32
step qsgd4-intsum          --topology intsum --codec qsgd --bits 4
step qsgd4-intsum-b1-ovl   --topology intsum --codec qsgd --bits 4 --bucket-mb 1 --overlap
if [ "${short:-}" = 1 ]; then
  step qsgd4-scatter-b1-ovl  --topology scatter --codec qsgd --bits 4 --bucket-mb 1 --overlap
  step sign-ef-scatter-b1-ovl --topology scatter --codec sign --error-feedback --bucket-mb 1 --overlap
  mpi_run "$ranks" python "$(dirname "$0")/bench_ddp.py" --model "$model" --batch-size 32 --repeats "$repeats" \
    --hooks none,powersgd1,powersgd2,mpiqsgd-qsgd4,mpiqsgd-qsgd4-intsum > "$out/ddp.jsonl"
  python "$(dirname "$0")/step_table.py" "$out/ddp.jsonl" ddp
  exit 0
fi
step qsgd4-ring            --topology ring --codec qsgd --bits 4
step qsgd4-scatter         --topology scatter --codec qsgd --bits 4
step qsgd4-scatter-b1      --topology scatter --codec qsgd --bits 4 --bucket-mb 1
step qsgd4-scatter-b1-ovl  --topology scatter --codec qsgd --bits 4 --bucket-mb 1 --overlap
step qsgd4-scatter-b.25-ovl --topology scatter --codec qsgd --bits 4 --bucket-mb 0.25 --overlap
step qsgd2-scatter-b1-ovl  --topology scatter --codec qsgd --bits 2 --bucket 128 --bucket-mb 1 --overlap
step sign-ef-scatter-b1-ovl --topology scatter --codec sign --error-feedback --bucket-mb 1 --overlap
step qsgd4-ring-entropy    --topology ring --codec qsgd --bits 4 --encoding entropy
step qsgd4-scatter-entropy --topology scatter --codec qsgd --bits 4 --encoding entropy
step qsgd4-scatter-entropy-b1-ovl --topology scatter --codec qsgd --bits 4 --encoding entropy --bucket-mb 1 --overlap
step qsgd8-scatter-entropy --topology scatter --codec qsgd --bits 8 --encoding entropy
mpi_run "$ranks" python "$(dirname "$0")/bench_ddp.py" --model "$model" --batch-size 32 \
  --repeats "$repeats" > "$out/ddp.jsonl"
python "$(dirname "$0")/step_table.py" "$out/ddp.jsonl" ddp
