"""Plot run directories: validation accuracy per epoch and against bytes sent, and the
normalized quantization variance over training (from diagnostics.jsonl).

Usage: python scripts/plot_runs.py OUT.png RUN_DIR [RUN_DIR ...]
Needs matplotlib (pip install -e ".[plot]").
"""

import json
import sys
from pathlib import Path


def load(d):
    d = Path(d)
    metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    diag_file = d / "diagnostics.jsonl"
    diag = [json.loads(line) for line in diag_file.read_text().splitlines()] if diag_file.exists() else []
    return d.name, metrics, [x for x in diag if x.get("quant_variance") is not None]


def main(out, dirs):
    try:
        import matplotlib
    except ImportError:
        sys.exit('plot_runs.py needs matplotlib: pip install -e ".[plot]"')
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load(d) for d in dirs if (Path(d) / "metrics.jsonl").exists()]
    if not runs:
        sys.exit("no run directory with a metrics.jsonl among: " + " ".join(dirs))
    panels = 3 if any(diag for _, _, diag in runs) else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), constrained_layout=True)
    for name, metrics, diag in runs:
        epochs = [m["epoch"] for m in metrics]
        acc = [m["val_acc"] for m in metrics]
        axes[0].plot(epochs, acc, marker="o", label=name)
        axes[1].plot([m["bytes_sent"] / 1e9 for m in metrics], acc, marker="o", label=name)
        if panels == 3 and diag:
            axes[2].plot([x["step"] for x in diag], [x["quant_variance"] for x in diag], label=name)
    axes[0].set(xlabel="epoch", ylabel="validation accuracy")
    axes[1].set(xlabel="GB sent by all ranks", ylabel="validation accuracy", xscale="log")
    if panels == 3:
        axes[2].set(xlabel="step", ylabel="||Q(v) - v||² / ||v||²  (rank 0)", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
