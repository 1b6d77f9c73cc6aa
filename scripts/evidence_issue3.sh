#!/usr/bin/env bash
# ResNet-20 on CIFAR-10, 4 simulated workers: fp32 vs QSGD 4/2-bit, stochastic vs nearest, error feedback.
# Usage: bash scripts/evidence_issue3.sh [OUT_DIR] [EXTRA FLAGS...]
set -euo pipefail
out=${1:-runs/evidence3}; shift || true
common=(train --simulate 4 --model resnet20 --epochs 5 --train-subset 20000 --warmup-epochs 0.5 --no-progress "$@")
run() { name=$1; shift; [ -f "$out/$name/summary.json" ] && return; python -m mpiqsgd "${common[@]}" --run-dir "$out/$name" "$@" > "$out/$name.log" 2>&1; }
mkdir -p "$out"
run fp32            --codec fp32 --topology allreduce
run qsgd4           --codec qsgd --bits 4
run qsgd4-nearest   --codec qsgd --bits 4 --rounding nearest
run qsgd4-nearest-ef --codec qsgd --bits 4 --rounding nearest --error-feedback
run qsgd2           --codec qsgd --bits 2 --bucket 128
run qsgd2-nearest-ef --codec qsgd --bits 2 --bucket 128 --rounding nearest --error-feedback
python -m mpiqsgd report "$out" --out "$out/report"
