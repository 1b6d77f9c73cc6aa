"""The seed study's figure from ``mpiqsgd report RUNS --out DIR`` (its report.csv): accuracy, time to
target and seconds per step against node count, one line per codec configuration.

    python scripts/seed_figure.py runs/seed-cluster/report/report.csv --out docs/seed-cluster.png

Plots the rows of the QSGD study (``scripts/grids/seed-cluster.json``): fp32 and QSGD at each bit width,
stochastic or nearest rounding, with or without error feedback; mean and standard deviation over seeds as
the report gives them. A configuration that never reached the target has no time-to-target point.
"""

import argparse
import csv
import sys
from collections import defaultdict


COLORS = {"2": "tab:red", "4": "tab:blue", "8": "tab:green"}  # by bit width; fp32 black
LINES = {(False, False): "-", (False, True): ":", (True, False): "--", (True, True): "-."}  # (nearest, EF)


def label(row):
    if row["codec"] == "fp32":
        return "fp32"
    parts = [f"{row['codec']} {row['bits']}b"]
    if row["rounding"] == "nearest":
        parts.append("nearest")
    if row["EF"] == "yes":
        parts.append("+EF")
    return " ".join(parts)


def number(text):
    return float(text) if text not in ("", None) else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="report.csv of `mpiqsgd report --out`")
    ap.add_argument("--out", required=True, help="PNG to write")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(dict)  # label -> nodes -> row
    with open(args.csv, newline="") as f:
        for row in csv.DictReader(f):
            if row["state"] == "complete":  # diverged or unfinished seeds: no point (the report lists them)
                series[label(row)][int(row["ranks"])] = row
    if not series:
        print(f"seed_figure: no rows in {args.csv}", file=sys.stderr)
        return 2
    panels = [("test_acc", "test accuracy (mean ± std over seeds)"),
              ("seconds_to_target", "seconds to target validation accuracy"),
              ("wall_seconds_per_step", "wall seconds per step")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.5))
    for name in sorted(series, key=lambda s: (s != "fp32", s)):
        nodes = sorted(series[name])
        bits = next((b for b in COLORS if f" {b}b" in name), None)
        variant = ("nearest" in name, "+EF" in name)
        style = dict(marker="o", lw=2.5 if name == "fp32" else 1.3, color=COLORS.get(bits, "black"),
                     ls=LINES[variant])
        for ax, (key, _) in zip(axes, panels):
            pts = [(n, number(series[name][n][key]), number(series[name][n].get(key + "_std", "")))
                   for n in nodes if number(series[name][n][key]) is not None]
            if key == "seconds_to_target":  # fp32 on one node is no baseline of a time to target
                pts = [p for p in pts if p[0] > 1]
            if not pts:
                continue
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=[e or 0 for e in es], label=name, capsize=2, **style)
    for ax, (_, title) in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        ax.set_xlabel("nodes (one rank each)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
