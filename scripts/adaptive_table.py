"""The adaptive-quantizer evidence table and figure from ``mpiqsgd sweep scripts/grids/adaptive.json``.

    python scripts/adaptive_table.py runs/adaptive [--plot docs/adaptive.png] [--seed 0]

One row per model and codec configuration (codec, --fit, --norm), over its seeds: test
accuracy mean +- std, the measured quantization variance ||Q(v) - v||^2 / ||v||^2 over
training (median of the diagnostics after step 0, and its range over seeds), the refit
gain, kurtosis and nvar (medians), bytes per step per rank, and which table won each
refit. Runs that failed (diverged) are counted as such. ``--plot`` draws, for one seed,
the measured variance, refit gain, kurtosis and nvar over training of every configuration
(the ALQ paper's Figure 1 at small scale).
"""

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def label(flags):
    codec = flags["codec"]
    extra = [f"{k}={flags[k]}" for k in ("fit", "norm") if flags.get(k)]
    return codec + (f" ({', '.join(extra)})" if extra else "")


def lines(path):
    if not path.exists():
        return []
    return [json.loads(s) for s in path.read_text().splitlines() if s.strip()]


def load(root):
    runs = defaultdict(list)
    for cfg_path in sorted(Path(root).glob("*/config.json")):
        d = cfg_path.parent
        flags = json.loads(cfg_path.read_text())["flags"]
        summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else None
        diag = lines(d / "diagnostics.jsonl")
        runs[(flags["model"], label(flags))].append({"flags": flags, "summary": summary, "diag": diag, "dir": d})
    return runs


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def table(runs):
    out = ["| model | codec | seeds | test acc (mean ± std) | measured variance: median (range over seeds) "
           "| refit gain | kurtosis | nvar | bytes/step/rank | refits won by |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for (model, name), group in sorted(runs.items()):
        done = [r for r in group if r["summary"] is not None]
        acc = [r["summary"]["test_acc"] for r in done]
        mean = statistics.mean(acc) if acc else None
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        per_seed = [med([x.get("quant_variance") for x in r["diag"] if x.get("step", 0) > 0]) for r in done]
        per_seed = [v for v in per_seed if v is not None]
        gain = med([x.get("refit_gain") for r in done for x in r["diag"] if x.get("step", 0) > 0])
        kurt = med([x.get("kurtosis") for r in done for x in r["diag"]])
        nvar = med([x.get("nvar") for r in done for x in r["diag"]])
        won = defaultdict(int)
        for r in done:
            for x in r["diag"]:
                if "refit" in x:
                    won[x["refit"]["won"]] += 1
        nbytes = med([r["summary"]["bytes_per_step_per_rank"] for r in done])
        seeds = f"{len(done)}" + (f" ({len(group) - len(done)} failed or unfinished)" if len(done) < len(group) else "")
        acc_s = "-" if mean is None else f"{mean:.3f} ± {std:.3f}"
        var_s = "-" if not per_seed else f"{med(per_seed):.3g} ({min(per_seed):.3g}–{max(per_seed):.3g})"
        won_s = ", ".join(f"{k} {v}" for k, v in sorted(won.items())) or "-"
        out.append(f"| {model} | {name} | {seeds} | {acc_s} | {var_s} | {fmt(gain)} | {fmt(kurt)} | {fmt(nvar)} "
                   f"| {fmt(nbytes, ',.0f')} | {won_s} |")
    return "\n".join(out)


def plot(runs, path, seed):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({m for m, _ in runs})
    keys = ("quant_variance", "refit_gain", "kurtosis", "nvar")
    fig, axes = plt.subplots(len(models), len(keys), figsize=(4.2 * len(keys), 3.2 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for (m, name), group in sorted(runs.items()):
            if m != model or name.startswith("fp32"):
                continue
            run = next((r for r in group if r["flags"].get("seed", 0) == seed and r["summary"]), None)
            if run is None:
                continue
            for j, key in enumerate(keys):
                pts = [(x["step"], x[key]) for x in run["diag"] if x.get(key) is not None]
                if pts:
                    axes[i][j].plot(*zip(*pts), marker=".", label=name)
        for j, key in enumerate(keys):
            ax = axes[i][j]
            ax.set_title(f"{model}: {key}")
            ax.set_xlabel("step")
            if key in ("quant_variance", "refit_gain"):
                ax.set_yscale("log")
        axes[i][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root")
    p.add_argument("--plot")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    runs = load(args.root)
    print(table(runs))
    if args.plot:
        plot(runs, args.plot, args.seed)


if __name__ == "__main__":
    main()
