"""The report's PNG figures, one set per comparison group (matplotlib, imported only here).

- ``accuracy.png``: validation accuracy against epoch, wall-clock seconds and bytes sent;
- ``results.png``: validation accuracy against wall-clock seconds beside a picture of the
  results table (a row per configuration: test accuracy, time to target, bytes per step,
  speedup), whose colour and marker keys the curves;
- ``phases.png``: seconds per step by meter phase, stacked;
- ``variance.png`` (runs with ``diagnostics.jsonl``): quantization variance over training.

Every line carries markers (a run with one sample is a point), and every legend sits
outside the data. Each ``*_figure`` function returns the figure, unsaved, for tests to look into.
"""

from pathlib import Path

from .runs import codec_label
from .text import Footnotes, cell, wrap

__all__ = ["plot_group", "accuracy_figure", "results_figure", "phases_figure", "variance_figure", "label"]

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
GLYPHS = dict(zip(MARKERS, "●■▲◆▼✚✖◀▶★"))
DPI = 110


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label(row):
    """A configuration row as a legend label: ``qsgd 4b ring ×2 sim``."""
    return f"{codec_label(row.config)} {row.config['topology']} ×{row.config['ranks']}" + \
        (f" ({row.state})" if row.state else "") + (f" {row.notes}" if row.notes else "")


def _styles(group):
    """Per row (by id): colour, marker and line style; 10 colours and markers, then the same dashed, dotted..."""
    import matplotlib.pyplot as plt

    return {id(r): dict(color=plt.cm.tab10(i % 10), marker=MARKERS[i % len(MARKERS)], markersize=4,
                        ls=("-", "--", ":", "-.")[i // 10 % 4])
            for i, r in enumerate(group.rows)}


def _legend_columns(entries):
    """Columns of a legend of ``entries``: one per 20, so that a large grid's legend is not cut off."""
    return max(1, -(-entries // 20))


def _legend(fig, ax):
    """A legend beside the panels, outside the data (``fig.legend(loc="outside ...")`` needs constrained layout)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=7, ncol=_legend_columns(len(labels)))


def _accuracy_lines(ax, group, styles, x_of, with_labels=True):
    """Validation accuracy of every run against ``x_of(metric)`` (runs lacking x are left out)."""
    for row in group.rows:
        for k, run in enumerate(row.runs):
            xs = [x_of(m) for m in run.metrics if m.get("val_acc") is not None]
            if not xs or any(x is None for x in xs):
                continue
            ax.plot(xs, [m["val_acc"] for m in run.metrics if m.get("val_acc") is not None], alpha=0.9,
                    label=label(row) if k == 0 and with_labels else None, **styles[id(row)])
    if group.target is not None:
        ax.axhline(group.target, color="grey", lw=0.8, ls="--", gid="target")
    ax.grid(alpha=0.3)


def accuracy_figure(group):
    """Validation accuracy against epoch, wall-clock seconds and MB sent, legend on the right."""
    import matplotlib.ticker

    plt = _pyplot()
    styles = _styles(group)
    columns = _legend_columns(len(group.rows))  # one label per row: widen the figure for each extra column
    fig, axes = plt.subplots(1, 3, figsize=(15 + 3.5 * (columns - 1), 4.2), layout="constrained")
    _accuracy_lines(axes[0], group, styles, lambda m: m.get("epoch"))
    _accuracy_lines(axes[1], group, styles, lambda m: m.get("wall_seconds"), with_labels=False)
    _accuracy_lines(axes[2], group, styles, lambda m: m["bytes_sent"] / 1e6 if m.get("bytes_sent") else None,
                    with_labels=False)
    axes[0].set(xlabel="epoch", ylabel="validation accuracy")
    axes[1].set(xlabel="wall-clock seconds", ylabel="validation accuracy")
    sent = [m.get("bytes_sent") or 0 for run in group.runs for m in run.metrics]
    wide = bool(sent) and min(sent) > 0 and max(sent) / min(sent) > 20
    axes[2].set(xlabel="MB sent by all ranks", ylabel="validation accuracy", xscale="log" if wide else "linear")
    axes[2].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    _legend(fig, axes[0])
    fig.suptitle(group.description, fontsize=9, x=0.02, ha="left")
    return fig


RESULT_COLUMNS = (("test acc", "test_acc", "acc"), ("time to target", "seconds_to_target", "seconds"),
                  ("bytes/step", "bytes_per_step_per_rank", "bytes"), ("speedup", "speedup", "ratio"))


def results_figure(group):
    """Validation accuracy against wall-clock seconds, and beside it the results table keyed by colour and marker."""
    plt = _pyplot()
    styles = _styles(group)
    notes = Footnotes()
    text = [[f"{GLYPHS[styles[id(r)]['marker']]} {label(r)}", str(len(r.runs))]
            + [cell(r.stats[key], kind, notes) for _, key, kind in RESULT_COLUMNS] for r in group.rows]
    widest = max(len(row[0]) for row in text)
    height = max(3.6, 0.24 * len(group.rows) + 1.6 + 0.3 * len(notes.notes))
    fig, (ax, tab) = plt.subplots(1, 2, figsize=(5.5 + 0.06 * widest + 3.2, height), layout="constrained",
                                  gridspec_kw={"width_ratios": [5.5, 0.06 * widest + 3.2]})
    _accuracy_lines(ax, group, styles, lambda m: m.get("wall_seconds"), with_labels=False)
    ax.set(xlabel="wall-clock seconds", ylabel="validation accuracy")
    tab.axis("off")
    target = f"target {group.target:g}" if group.target is not None else "no target accuracy"
    tab.set_title(f"mean ± std over seeds; {target}", fontsize=8, loc="left")
    table = tab.table(cellText=text, colLabels=["configuration", "runs"] + [h for h, _, _ in RESULT_COLUMNS],
                      cellLoc="right", colLoc="right", loc="upper center", edges="horizontal")
    table.auto_set_font_size(False)
    table.set_fontsize(7.5)
    table.auto_set_column_width(list(range(2 + len(RESULT_COLUMNS))))
    for i, r in enumerate(group.rows, 1):
        c = table[i, 0]
        c.get_text().set_color(styles[id(r)]["color"])
        c.get_text().set_horizontalalignment("left")
    table[0, 0].get_text().set_horizontalalignment("left")
    if notes.notes:
        tab.text(0, 0, wrap(notes.text(), 90), fontsize=6.5, va="bottom", transform=tab.transAxes)
    fig.suptitle(group.description, fontsize=9, x=0.02, ha="left")
    return fig


def phases_figure(group):
    """Seconds per step by meter phase, one stacked bar per configuration, legend on the right."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(group.rows) + 3), 4.2), layout="constrained")
    bottom = [0.0] * len(group.rows)
    for i, p in enumerate(group.phases):
        heights = [r.phases[p].mean or 0.0 for r in group.rows]
        ax.bar(range(len(group.rows)), heights, bottom=bottom, label=p, color=plt.cm.tab10(i % 10))
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(range(len(group.rows)), [label(r) for r in group.rows], rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="seconds per step (mean over ranks)", title="time per step by phase")
    _legend(fig, ax)
    return fig


def variance_figure(group):
    """Quantization variance over training (log scale), or None when no run has a positive sample."""
    plt = _pyplot()
    series = [(row, k, run.quant_variance()) for row in group.rows for k, run in enumerate(row.runs)]
    series = [(row, k, qv) for row, k, qv in series if qv and any(v > 0 for _, v in qv)]
    if not series:
        return None
    styles = _styles(group)
    fig, ax = plt.subplots(figsize=(8, 4.2), layout="constrained")
    for row, k, qv in series:
        ax.plot([s for s, _ in qv], [v for _, v in qv], label=label(row) if k == 0 else None, **styles[id(row)])
    ax.set(xlabel="step", ylabel="||Q(v) - v||² / ||v||²  (rank 0)", yscale="log",
           title="quantization variance over training")
    ax.grid(alpha=0.3)
    _legend(fig, ax)
    return fig


def plot_group(group, out_dir, prefix=""):
    """Write ``accuracy.png``, ``results.png``, ``phases.png`` and (with diagnostics) ``variance.png``.

    Returns:
        the paths written.

    Raises:
        ImportError: matplotlib is not installed.
    """
    plt = _pyplot()
    written = []
    for name, make in (("accuracy", accuracy_figure), ("results", results_figure), ("phases", phases_figure),
                       ("variance", variance_figure)):
        fig = make(group)
        if fig is None:
            continue
        written.append(Path(out_dir) / f"{prefix}{name}.png")
        fig.savefig(written[-1], dpi=DPI)
        plt.close(fig)
    return written
