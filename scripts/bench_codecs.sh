#!/usr/bin/env bash
# Codec throughput table: `mpiqsgd bench codec` at 25M coordinates (ResNet-50 size) for each codec.
# Usage: bash scripts/bench_codecs.sh [NUMEL] [OUT_DIR]
set -euo pipefail
numel=${1:-25000000}; out=${2:-runs/bench/codecs}
mkdir -p "$out"
while read -r name flags; do
  [ -z "$name" ] && continue
  python -m mpiqsgd bench codec --numel "$numel" --json $flags > "$out/$name.json"
done <<'LIST'
fp32 --codec fp32
fp16 --codec fp16
qsgd4 --codec qsgd --bits 4
qsgd4-nearest --codec qsgd --bits 4 --rounding nearest
qsgd2-d128 --codec qsgd --bits 2 --bucket 128
qsgd8 --codec qsgd --bits 8
qsgd-inf4 --codec qsgd-inf --bits 4
qsgd-elias2 --codec qsgd-elias --bits 2
qsgd-elias2-d128 --codec qsgd-elias --bits 2 --bucket 128
qsgd-elias4 --codec qsgd-elias --bits 4
sign --codec sign
nuqsgd3 --codec nuqsgd --bits 3
nuqsgd-zero3 --codec nuqsgd-zero --bits 3
terngrad --codec terngrad
alq3 --codec alq --bits 3
alq-n3 --codec alq-n --bits 3
amq3 --codec amq --bits 3
amq-n3 --codec amq-n --bits 3
LIST
python - "$out" <<'PY'
import json, sys
from pathlib import Path
rows = [json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("*.json"), key=lambda p: p.stat().st_mtime)]
m = rows[0]["machine"]
print(f"{rows[0]['numel']:,} coordinates, median of {rows[0]['repeats']}; {m['processor']}, {m['cpu_count']} cores, "
      f"torch {m['torch']}, {m['device']}")
print("| codec | bytes/coord | encode GB/s | decode GB/s | memcpy GB/s | encode/memcpy | ‖Q(v)-v‖²/‖v‖² | QSGD bound | fit s |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    fit = r["adaptive"]["fit_seconds"] if r.get("adaptive") else None
    print(f"| {r['codec'].split(' #')[0]} | {r['bytes_per_coordinate']:.4f} | {r['encode_GBps']:.2f} | "
          f"{r['decode_GBps']:.2f} | {r['memcpy_GBps']:.1f} | {r['encode_vs_memcpy']:.3f} | {r['variance_ratio']:.4g} | "
          f"{'-' if r['variance_bound'] is None else format(r['variance_bound'], '.3g')} | "
          f"{'-' if fit is None else format(fit, '.3f')} |")
PY
