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
        rows.append((d.name, flags, s, per_epoch))
    epochs = max((len(r[3]) for r in rows), default=0)
    head = f"| run | codec | topology | " + " | ".join(f"val@{e + 1}" for e in range(epochs))
    print(head + " | test | bytes/step/rank | vs fp32 | wall s |")
    print("|" + "---|" * (head.count("|") + 3))
    for name, f, s, per in rows:
        codec = f["codec"] + (f" {f['bits']}b" if f["bits"] else "") + (f" d={f['bucket']}" if f["bucket"] else "")
        codec += (f" {f['rounding']}" if f["rounding"] else "") + (" +EF" if f["error_feedback"] else "")
        accs = " | ".join(f"{m['val_acc']:.3f}" for m in per)
        print(f"| {name} | {codec} | {f['topology']} | {accs} | {s['test_acc']:.3f} | "
              f"{s['bytes_per_step_per_rank']:,.0f} | {s['compression_vs_fp32']:.2f}x | {s['wall_seconds']:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
