#!/usr/bin/env bash
# Adaptive vs fixed level sets: ResNet-20 on CIFAR-10, 4 simulated workers, 3 bits, bucket 8192.
# Usage: bash scripts/evidence_issue4.sh [OUT_DIR] [EXTRA FLAGS...]
set -uo pipefail
out=${1:-runs/evidence4}; shift || true
common=(train --simulate 4 --model resnet20 --epochs 5 --train-subset 20000 --warmup-epochs 0.5 --no-progress
        --bits 3 --bucket 8192 --diag-every 10 "$@")
run() { name=$1; shift; [ -f "$out/$name/summary.json" ] && return
        python -m mpiqsgd "${common[@]}" --run-dir "$out/$name" "$@" > "$out/$name.log" 2>&1 || echo "$name failed: $(tail -1 "$out/$name.log")"; }
mkdir -p "$out"
run alq      --codec alq
run alq-n    --codec alq-n
run amq      --codec amq
run amq-n    --codec amq-n
run nuqsgd   --codec nuqsgd
run nuqsgd-zero --codec nuqsgd-zero
run qsgd-inf --codec qsgd-inf
run terngrad --codec terngrad --bits 2
python -m mpiqsgd report "$out" --out "$out/report"
