#!/usr/bin/env bash
# GPU check, one command, a few minutes on one GPU: the CUDA tests (tests/test_cuda.py, skipped
# where there is no GPU), then `mpiqsgd bench codec --all` on the device, each codec's GB/s against
# a device-to-device copy of the same buffer timed in the same run, tabled as in the README.
# Usage: bash scripts/gpu_check.sh [OUT_DIR] [NUMEL]
set -euo pipefail
out=${1:-runs/gpu-check}; numel=${2:-25000000}
mkdir -p "$out"
python - <<'PY' | tee "$out/device.txt"
import torch
assert torch.cuda.is_available(), "gpu_check: torch sees no CUDA device"
print(torch.cuda.get_device_name(0), "torch", torch.__version__, "CUDA", torch.version.cuda)
PY
python -m pytest -q -rs tests/test_cuda.py 2>&1 | tee "$out/tests.txt"
python -m mpiqsgd bench codec --all --device cuda --numel "$numel" --repeats 5 --json > "$out/codecs.json"
python scripts/codec_table.py "$out/codecs.json" | tee "$out/codecs.md"
