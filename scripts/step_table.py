"""One line per result of `mpiqsgd bench step --json` or scripts/bench_ddp.py (JSON lines)."""

import json
import sys


def line(name, r):
    a, s = r["compute_seconds"], r["step_seconds"]
    steps = r["step_seconds_per_repeat"]
    extra = f"  {r['bytes_per_step_per_rank']:>10,.0f} B/step/rank" if "bytes_per_step_per_rank" in r else ""
    return (f"{name:<26} step {s * 1e3:7.1f} ms (range {min(steps) * 1e3:.0f}-{max(steps) * 1e3:.0f})  "
            f"compute {a * 1e3:7.1f} ms  overhead {(s - a) * 1e3:7.1f} ms ({100 * (s - a) / a:5.1f}%){extra}")


path, name = sys.argv[1], sys.argv[2]
text = open(path).read().strip()
results = [json.loads(text)] if text.startswith("{\n") else [json.loads(t) for t in text.splitlines() if t.strip()]
for r in results:
    print(line(f"{name}-{r['hook']}" if "hook" in r else name, r))
