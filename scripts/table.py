"""Print a results table (accuracy per epoch, bytes per step) from run directories."""

import json
import sys
from pathlib import Path


def main(dirs):
    rows = []
    for d in map(Path, dirs):
        if not (d / "summary.json").exists():
            continue
        s = json.loads((d / "summary.json").read_text())
        flags = json.loads((d / "config.json").read_text())["flags"]
        metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        per_epoch = [m for m in metrics if abs(m["epoch"] - round(m["epoch"])) < 1e-9]
        diag_file = d / "diagnostics.jsonl"
        diag = [json.loads(line) for line in diag_file.read_text().splitlines()] if diag_file.exists() else []
        qv = [x["quant_variance"] for x in diag if x["quant_variance"] is not None]
        s["quant_variance"] = (qv[0], sorted(qv)[len(qv) // 2], qv[-1]) if qv else None
        rows.append((d.name, flags, s, per_epoch))
    epochs = max((len(r[3]) for r in rows), default=0)
    head = "| run | codec | topology | " + " | ".join(f"val@{e + 1}" for e in range(epochs))
    print(head + " | test | bytes/step/rank | vs fp32 | ||Q(v)-v||²/||v||² first / median / last | wall s |")
    print("|" + "---|" * (head.count("|") + 4))
    for name, f, s, per in rows:
        codec = f["codec"] + (f" {f['bits']}b" if f["bits"] else "") + (f" d={f['bucket']}" if f["bucket"] else "")
        codec += (f" {f['rounding']}" if f["rounding"] else "") + (" +EF" if f["error_feedback"] else "")
        accs = " | ".join(f"{m['val_acc']:.3f}" for m in per)
        qv = " / ".join(f"{v:.3g}" for v in s["quant_variance"]) if s["quant_variance"] else "-"
        print(f"| {name} | {codec} | {f['topology']} | {accs} | {s['test_acc']:.3f} | "
              f"{s['bytes_per_step_per_rank']:,.0f} | {s['compression_vs_fp32']:.2f}x | {qv} | "
              f"{s['wall_seconds']:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
