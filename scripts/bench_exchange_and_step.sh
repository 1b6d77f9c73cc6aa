#!/usr/bin/env bash
# The exchange and step benchmarks behind the README's "time" tables (root, iproute2).
# Run on an otherwise idle machine; each figure is a median against a baseline timed in
# the same run. Writes JSON and text under OUT (default runs/bench-exchange-and-step).
set -euo pipefail
out=${1:-runs/bench-exchange-and-step}; mkdir -p "$out"
here=$(dirname "$0")
loop() {  # oversubscribed ranks on loopback: backoff vs spin waits (8 ranks, 2 cores)
  for wait in spin backoff; do
    OMP_NUM_THREADS=1 mpiexec -n 8 python -m mpi4py -m mpiqsgd bench exchange --numel 5000000 --codec qsgd \
      --bits 4 --topology scatter --repeats 5 --wait "$wait" --json > "$out/loop8-$wait.json"
    python - "$out/loop8-$wait.json" "$wait" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); c = r["candidate"]
ph = c["phase_seconds_this_rank"]
print(f"loopback 8 ranks wait={sys.argv[2]:8s} scatter qsgd4 {c['median_seconds']*1e3:7.1f} ms "
      f"(allreduce {r['baseline']['median_seconds']*1e3:.1f} ms) rank 0 encode {ph.get('encode',0)*1e3:.1f} ms "
      f"decode {ph.get('decode',0)*1e3:.1f} ms (last exchange)")
PY
  done
}
loop | tee "$out/loopback.txt"
for ranks in 4 8; do
  rate=1gbit bash "$here/bench_shaped.sh" "$ranks" 25000000 1gbit "$out/exchange-$ranks" qsgd4 | tee "$out/exchange-$ranks.txt"
done
bash "$here/bench_step_shaped.sh" resnet20 100mbit 4 10 "$out/step-resnet20-100mbit" | tee "$out/step-resnet20.txt"
bash "$here/bench_step_shaped.sh" alexnet 1gbit 4 5 "$out/step-alexnet-1gbit" | tee "$out/step-alexnet.txt"
