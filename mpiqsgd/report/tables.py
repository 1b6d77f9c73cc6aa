"""Communication-cost reports: tables and plots from ``mpiqsgd train`` run directories.

``mpiqsgd report RUN_DIR... [--out DIR]`` reads each run's ``config.json``,
``summary.json``, ``metrics.jsonl``, ``diagnostics.jsonl`` and ``comm.json`` and
writes:

1. the configuration table: one row per configuration (model, ranks, codec, bits,
   bucket, rounding, error feedback, topology), runs that differ only in their seed
   averaged (mean +- sample std), with accuracy, time to a target accuracy, bytes,
   compression, seconds per step by meter phase and speedup in time-to-accuracy
   against the fp32 row of the same model and ranks;
2. the run table: one row per run, validation accuracy after each epoch, test accuracy,
   bytes, quantization variance (first / median / last sample) and wall seconds;
3. with ``--link RATE,...`` (and ``--link-model FILE`` from ``mpiqsgd bench exchange
   --sweep``): each run's communication seconds per step projected onto those links by
   the alpha-beta model of :mod:`mpiqsgd.linkmodel`, beside the measured ones;
4. for runs with a ``trace.json`` (``--trace-steps``): what the timeline holds and what
   recording it cost (from the file's ``otherData``);
5. with ``--out``: ``report.md``, ``report.csv`` (configurations), ``runs.csv``,
   ``projection.csv`` (with ``--link``) and, where matplotlib is installed,
   ``accuracy.png``, ``phases.png``, ``variance.png``.

Runs whose data or schedule differ (dataset, subset, epochs, batch size, learning-rate
schedule...) are never compared: each such comparison group gets its own tables, and
the report says which flags separate the groups. A cell a run cannot fill reads
``n/a [k]``, footnote k saying why. Nothing here needs MPI.
"""

import csv
import io
import json
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import MpiqsgdError

__all__ = ["Run", "RunError", "load_run", "find_runs", "group_runs", "build_report", "Report", "write_report",
           "add_report_args", "run_report", "PLOT_HINT", "Projection", "trace_lines"]

# Flags that change the data or the schedule: runs differing in one are not compared.
GROUP_FLAGS = ("dataset", "train_subset", "synthetic_size", "val_fraction", "epochs", "max_steps", "batch_size",
               "lr", "lr_schedule", "lr_decay_epochs", "lr_decay_factor", "warmup_epochs", "momentum", "nesterov",
               "weight_decay")
# Flags that change neither the result being compared nor the configuration (output, seeds, plumbing).
IGNORED_FLAGS = ("seed", "run_dir", "progress", "resume", "data_dir", "download", "threads", "device", "diag_every",
                 "eval_every", "checkpoint_every", "check_sync_every", "target_acc", "simulate", "trace_steps")
# Flags shown in the configuration columns (directly or folded into the topology / bits labels).
SHOWN_FLAGS = ("model", "codec", "encoding", "bits", "levels", "bucket", "rounding", "error_feedback", "topology",
               "downlink", "server_error_feedback", "dedicated_server", "overlap")
CONFIG_COLUMNS = ("model", "ranks", "codec", "bits", "bucket", "rounding", "EF", "topology")
PHASE_ORDER = ("compute", "encode", "communicate", "decode", "wait")
PLOT_HINT = 'plots need matplotlib: pip install -e ".[plot]" (tables were written)'


class RunError(MpiqsgdError):
    """A directory that is not a finished run directory."""


def _read_jsonl(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Run:
    """One run directory, as read from its files."""

    path: Path
    config: dict
    summary: dict
    metrics: list
    diagnostics: list
    comm: Optional[dict]

    @property
    def flags(self):
        return self.config.get("flags", {})

    @property
    def name(self):
        return self.path.name

    @property
    def seed(self):
        return self.flags.get("seed")

    @property
    def n_ranks(self):
        return self.summary.get("n_ranks") or self.config.get("world_size") or self.flags.get("simulate") or 1

    @property
    def steps(self):
        return self.summary.get("steps") or (self.metrics[-1]["step"] if self.metrics else 0)

    def reached(self, target):
        """``(epoch, wall seconds)`` of the first evaluation at or above ``target``, or None."""
        for m in self.metrics:
            if m.get("val_acc") is not None and m["val_acc"] >= target:
                return m["epoch"], m.get("wall_seconds")
        return None

    def quant_variance(self):
        """The quantization-variance samples of ``diagnostics.jsonl`` as ``[(step, value)]``."""
        return [(d["step"], d["quant_variance"]) for d in self.diagnostics if d.get("quant_variance") is not None]


def load_run(path):
    """Read one run directory.

    Raises:
        RunError: no ``config.json`` or ``metrics.jsonl``, or no ``summary.json`` (a run
            that is still going, or that stopped before its end).
    """
    path = Path(path)
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        if not (path / name).exists():
            why = "unfinished or broken run" if name == "summary.json" else "not a run directory"
            raise RunError(f"{path}: no {name} ({why})")
    try:
        config = json.loads((path / "config.json").read_text())
        summary = json.loads((path / "summary.json").read_text())
        metrics = _read_jsonl(path / "metrics.jsonl")
        diagnostics = _read_jsonl(path / "diagnostics.jsonl")
        comm = json.loads((path / "comm.json").read_text()) if (path / "comm.json").exists() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: unreadable run file ({exc})") from None
    if not metrics:
        raise RunError(f"{path}: metrics.jsonl has no evaluation")
    return Run(path, config, summary, metrics, diagnostics, comm)


def find_runs(paths):
    """Load the run directories among ``paths``; a path holding no ``config.json`` is searched one level down.

    Returns:
        ``(runs, skipped)``: the runs in the order given, and ``[(path, reason)]`` for
        directories that could not be used.
    """
    runs, skipped = [], []
    for p in map(Path, paths):
        candidates = [p]
        if p.is_dir() and not (p / "config.json").exists():
            candidates = sorted(d for d in p.iterdir() if (d / "config.json").exists()) or [p]
        for d in candidates:
            try:
                runs.append(load_run(d))
            except RunError as exc:
                skipped.append((d, str(exc)))
    return runs, skipped


# ---------------------------------------------------------------- configuration of a run

def _codec_params(flags):
    """(bits, bucket, rounding) as the codec resolves them, "-" where a parameter does not apply."""
    from .codecs import codec_from_flags

    name = flags.get("codec", "?")
    try:
        with warnings.catch_warnings():  # the run already gave its codec's warnings
            warnings.simplefilter("ignore")
            codec = codec_from_flags(name, flags.get("bits"), flags.get("levels"), flags.get("bucket"),
                                     flags.get("rounding"), flags.get("clip_sigma"), norm=flags.get("norm"),
                                     fit=flags.get("fit"), encoding=flags.get("encoding"))
    except (MpiqsgdError, TypeError):  # a run written by another version: show its flags as they are
        return (flags.get("bits") or "-", flags.get("bucket") or "-", flags.get("rounding") or "-")
    bits, bucket = codec.bits, codec.bucket
    rounding = codec.rounding or ("stochastic" if codec.stochastic else None)
    return (bits if bits is not None else "-", bucket if bucket is not None else "-", rounding or "-")


def _topology_label(flags):
    label = flags.get("topology", "?")
    if label == "ps":
        if flags.get("downlink") == "codec":
            label += ", codec down" + (" +EF" if flags.get("server_error_feedback") else "")
        if flags.get("dedicated_server"):
            label += ", dedicated"
    if flags.get("overlap"):
        label += " +overlap"
    return label


def configuration(run):
    """The configuration columns of ``run`` (a dict keyed by :data:`CONFIG_COLUMNS`)."""
    f = run.flags
    bits, bucket, rounding = _codec_params(f)
    ranks = str(run.n_ranks) + (" sim" if run.config.get("simulated") else "")
    codec = f.get("codec", "?") + (f"+{f['encoding']}" if f.get("encoding") not in (None, "dense") else "")
    return {"model": f.get("model", "?"), "ranks": ranks, "codec": codec, "bits": bits,
            "bucket": bucket, "rounding": rounding, "EF": "yes" if f.get("error_feedback") else "no",
            "topology": _topology_label(f)}


def _extra_flags(run):
    """Flags that are neither shown, nor data/schedule, nor ignored (min_compress_numel, adapt_at ...)."""
    skip = set(GROUP_FLAGS) | set(IGNORED_FLAGS) | set(SHOWN_FLAGS)
    return tuple(sorted((k, json.dumps(v)) for k, v in run.flags.items() if k not in skip))


def _group_key(run):
    f = run.flags
    return tuple((k, json.dumps(f.get(k) if k != "synthetic_size" or f.get("dataset") == "synthetic" else None))
                 for k in GROUP_FLAGS)


def group_runs(runs):
    """Split runs into comparison groups: same data and schedule (:data:`GROUP_FLAGS`) within a group.

    Returns:
        a list of lists of runs, in order of first appearance.
    """
    groups = {}
    for run in runs:
        groups.setdefault(_group_key(run), []).append(run)
    return list(groups.values())


def _describe_group(runs):
    f = runs[0].flags
    data = f.get("dataset", "?")
    if data == "synthetic":
        data += f" ({f.get('synthetic_size')} images)"
    if f.get("train_subset"):
        data += f", {f['train_subset']} training images"
    sched = f"{f.get('epochs')} epochs" + (f" (max {f['max_steps']} steps)" if f.get("max_steps") else "")
    lr = f"lr {f.get('lr')} {f.get('lr_schedule')}"
    if f.get("warmup_epochs"):
        lr += f", {f['warmup_epochs']} warm-up epochs"
    return f"{data}; {sched}; batch {f.get('batch_size')} per worker; {lr}"


def _group_differences(groups):
    """The data/schedule flags whose values separate the groups, as ``name (v1 / v2 ...)``."""
    out = []
    for k in GROUP_FLAGS:
        values = []
        for g in groups:
            v = dict(_group_key(g[0]))[k]
            if v not in values:
                values.append(v)
        if len(values) > 1:
            out.append(f"{k} ({' / '.join(values)})")
    return out


# ---------------------------------------------------------------- numbers

@dataclass
class Stat:
    """A value over seeds: mean, sample std (None for one run), n; ``mean`` None when missing."""

    mean: Optional[float]
    std: Optional[float] = None
    n: int = 0
    why: Optional[str] = None  # why it is missing

    @classmethod
    def of(cls, values, why_missing):
        if not values or any(v is None for v in values):
            missing = sum(v is None for v in values)
            why = why_missing if missing == len(values) or len(values) == 1 else \
                f"{why_missing} in {missing} of {len(values)} seeds"
            return cls(None, None, len(values), why)
        values = [float(v) for v in values]
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(statistics.fmean(values), std, len(values))


class Footnotes:
    """Numbered reasons for ``n/a`` cells."""

    def __init__(self):
        self.notes = []

    def mark(self, why):
        if why not in self.notes:
            self.notes.append(why)
        return f"n/a [{self.notes.index(why) + 1}]"

    def lines(self):
        return [f"[{i}] {why}" for i, why in enumerate(self.notes, 1)]


@dataclass
class Row:
    """One configuration of a comparison group, over its seeds."""

    config: dict
    runs: list
    stats: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)
    notes: str = ""
    baseline: Optional["Row"] = None


def _phase_names(rows):
    names = {p for r in rows for run in r.runs for p in run.summary.get("seconds_per_phase", {})}
    return [p for p in PHASE_ORDER if p in names] + sorted(names - set(PHASE_ORDER))


def _row_stats(row, target, phases):
    runs = row.runs
    s = row.stats
    s["final_val_acc"] = Stat.of([r.summary.get("final_val_acc") for r in runs], "not in summary.json")
    s["best_val_acc"] = Stat.of([r.summary.get("best_val_acc") for r in runs], "not in summary.json")
    s["test_acc"] = Stat.of([r.summary.get("test_acc") for r in runs], "not in summary.json")
    if target is None:
        s["epochs_to_target"] = s["seconds_to_target"] = Stat(None, why="no --target-acc given")
    else:
        hits = [r.reached(target) for r in runs]
        why = f"validation accuracy never reached {target:g}"
        s["epochs_to_target"] = Stat.of([h and h[0] for h in hits], why)
        s["seconds_to_target"] = Stat.of([h and h[1] for h in hits], why)
    s["bytes_per_step_per_rank"] = Stat.of([r.summary.get("bytes_per_step_per_rank") for r in runs],
                                           "not in summary.json")
    s["total_bytes"] = Stat.of([r.summary.get("total_bytes") for r in runs], "not in summary.json")
    ratios = []
    for r in runs:
        sent = (r.comm or {}).get("sent") or {}
        ratios.append(sent["fp32_bytes"] / sent["bytes"] if sent.get("bytes") else r.summary.get("compression_vs_fp32"))
    s["compression_vs_fp32"] = Stat.of(ratios, "no bytes sent (one rank?)")
    for p in phases:
        row.phases[p] = Stat.of([r.summary.get("seconds_per_phase", {}).get(p, 0.0) / max(1, r.steps) for r in runs],
                                "no steps")
    s["wall_seconds_per_step"] = Stat.of([r.summary.get("wall_seconds") and r.summary["wall_seconds"] / max(1, r.steps)
                                          for r in runs], "not in summary.json")


def _pick_baseline(row, rows):
    """The fp32 row with the same model and ranks (allreduce first), or None."""
    same = [r for r in rows if r.config["codec"] == "fp32" and r.config["EF"] == "no"
            and r.config["model"] == row.config["model"] and r.config["ranks"] == row.config["ranks"]]
    same.sort(key=lambda r: r.config["topology"] != "allreduce")
    return same[0] if same else None


def _speedup(row):
    if row.baseline is None:
        return Stat(None, why="no fp32 run with the same model and ranks")
    mine, base = row.stats["seconds_to_target"], row.baseline.stats["seconds_to_target"]
    if base.mean is None:
        return Stat(None, why=f"fp32 baseline: {base.why}")
    if mine.mean is None:
        return Stat(None, why=mine.why)
    return Stat(base.mean / mine.mean, n=mine.n)


@dataclass
class Group:
    """A comparison group: runs with the same data and schedule."""

    runs: list
    rows: list
    phases: list
    target: Optional[float]
    description: str


def _target_of(runs, target):
    if target is not None:
        return target
    own = {r.summary.get("target_acc") for r in runs}
    return own.pop() if len(own) == 1 else None


def build_group(runs, target=None):
    """The configuration rows of one comparison group.

    Args:
        runs: runs sharing data and schedule (one element of :func:`group_runs`).
        target: validation accuracy for the time-to-accuracy columns; default: the runs'
            own ``--target-acc`` when they all share one.
    """
    target = _target_of(runs, target)
    by_key = {}
    for run in runs:
        cfg = configuration(run)
        by_key.setdefault((tuple(cfg.values()), _extra_flags(run)), Row(cfg, [])).runs.append(run)
    # Per model and rank count, the fp32 rows first; otherwise in the order the runs came.
    rows = sorted(by_key.values(), key=lambda r: (r.config["model"], int(r.config["ranks"].split()[0]),
                                                  r.config["ranks"], r.config["codec"] != "fp32"))
    # Flags outside the shown columns that vary between rows go into a notes column.
    extras = [dict(_extra_flags(r.runs[0])) for r in rows]
    varying = sorted(k for k in set().union(*extras) if len({e.get(k) for e in extras}) > 1)
    phases = _phase_names(rows)
    for row, extra in zip(rows, extras):
        row.notes = ", ".join(f"{k}={extra.get(k, '-')}" for k in varying)
        _row_stats(row, target, phases)
    for row in rows:
        row.baseline = _pick_baseline(row, rows)
        row.stats["speedup"] = _speedup(row)
    return Group(runs, rows, phases, target, _describe_group(runs))


# ---------------------------------------------------------------- formatting

def _fmt(stat, kind, notes):
    if stat.mean is None:
        return notes.mark(stat.why)
    v = stat.mean
    text = {"acc": "{:.3f}", "epochs": "{:.2f}", "seconds": "{:.1f}", "bytes": "{:,.0f}", "ratio": "{:.2f}x",
            "step": "{:.4g}"}[kind].format(v)
    if stat.std is not None and kind in ("acc", "epochs", "seconds"):
        text += " ± " + {"acc": "{:.3f}", "epochs": "{:.2f}", "seconds": "{:.1f}"}[kind].format(stat.std)
    return text


STAT_COLUMNS = (("final val", "final_val_acc", "acc"), ("best val", "best_val_acc", "acc"),
                ("test", "test_acc", "acc"), ("epochs to target", "epochs_to_target", "epochs"),
                ("s to target", "seconds_to_target", "seconds"),
                ("bytes/step/rank", "bytes_per_step_per_rank", "bytes"),
                ("total bytes", "total_bytes", "bytes"), ("vs fp32", "compression_vs_fp32", "ratio"))


@dataclass
class Table:
    headers: list
    rows: list
    numeric: list  # per column: right-align

    def markdown(self):
        out = ["| " + " | ".join(self.headers) + " |",
               "|" + "|".join("---:" if n else "---" for n in self.numeric) + "|"]
        out += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
        return "\n".join(out)

    def text(self):
        cells = [self.headers] + [[str(c) for c in row] for row in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.headers))]
        lines = []
        for j, r in enumerate(cells):
            lines.append("  ".join(c.rjust(w) if n and j else c.ljust(w)
                                   for c, w, n in zip(r, widths, self.numeric)).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)


def config_table(group, notes):
    """The configuration table of ``group``, n/a reasons added to ``notes``."""
    has_notes = any(r.notes for r in group.rows)
    headers = list(CONFIG_COLUMNS) + (["notes"] if has_notes else []) + ["runs"]
    headers += [h for h, _, _ in STAT_COLUMNS] + [f"s/step {p}" for p in group.phases] + ["s/step wall", "speedup"]
    numeric = [False] * (len(CONFIG_COLUMNS) + has_notes) + [True] * (len(headers) - len(CONFIG_COLUMNS) - has_notes)
    rows = []
    for r in group.rows:
        cells = [r.config[c] for c in CONFIG_COLUMNS] + ([r.notes] if has_notes else []) + [len(r.runs)]
        cells += [_fmt(r.stats[key], kind, notes) for _, key, kind in STAT_COLUMNS]
        cells += [_fmt(r.phases[p], "step", notes) for p in group.phases]
        cells += [_fmt(r.stats["wall_seconds_per_step"], "step", notes), _fmt(r.stats["speedup"], "ratio", notes)]
        rows.append(cells)
    return Table(headers, rows, numeric)


def run_table(group, notes):
    """One row per run: validation accuracy after each whole epoch, test, bytes, variance, wall seconds."""
    per_epoch = {id(r): [m for m in r.metrics if abs(m["epoch"] - round(m["epoch"])) < 1e-9 and m["epoch"] > 0]
                 for r in group.runs}
    n_epochs = max((len(v) for v in per_epoch.values()), default=0)
    headers = ["run", "codec", "topology", "seed"] + [f"val@{e + 1}" for e in range(n_epochs)]
    headers += ["test", "bytes/step/rank", "vs fp32", "Q var first / median / last", "wall s"]
    rows = []
    for r in group.runs:
        cfg = configuration(r)
        codec = cfg["codec"] + (f" {cfg['bits']}b" if r.flags.get("bits") else "")
        codec += (f" d={cfg['bucket']}" if r.flags.get("bucket") else "")
        codec += (f" {cfg['rounding']}" if r.flags.get("rounding") else "") + (" +EF" if cfg["EF"] == "yes" else "")
        accs = [f"{m['val_acc']:.3f}" for m in per_epoch[id(r)]]
        if len(accs) < n_epochs:
            accs += [notes.mark("the run has fewer epochs")] * (n_epochs - len(accs))
        qv = [v for _, v in r.quant_variance()]
        qv_cell = (" / ".join(f"{v:.3g}" for v in (qv[0], statistics.median_low(qv), qv[-1])) if qv
                   else notes.mark("no quantization variance in diagnostics.jsonl"))
        s = r.summary
        ratio = Stat.of([s.get("compression_vs_fp32")], "no bytes sent (one rank?)")
        rows.append([r.name, codec, cfg["topology"], r.seed] + accs + [
            _fmt(Stat.of([s.get("test_acc")], "not in summary.json"), "acc", notes),
            _fmt(Stat.of([s.get("bytes_per_step_per_rank")], "not in summary.json"), "bytes", notes),
            _fmt(ratio, "ratio", notes),
            qv_cell,
            _fmt(Stat.of([s.get("wall_seconds")], "not in summary.json"), "seconds", notes)])
    return Table(headers, rows, [False] * 3 + [True] * (len(headers) - 3))


LEGEND = ("Rows: one per configuration; runs differing only in --seed are averaged (mean ± sample std). "
          "bits/bucket/rounding as the codec resolved them (\"-\": does not apply). "
          "Accuracy: validation (final, best) and test at the end. To target: first evaluation whose validation "
          "accuracy reached the target (evaluations happen each epoch, or every --eval-every steps). "
          "Bytes: sent on the wire by all ranks, headers included; vs fp32: the fp32 bytes the messages stand for "
          "over the bytes sent. s/step: meter seconds per phase averaged over ranks, per training step. "
          "Speedup: seconds to target of the fp32 row with the same model and ranks (allreduce when there is one) "
          "over this row's.")
SIM_NOTE = ("\"sim\": --simulate N workers as threads of one process; phase seconds include waits for other "
            "workers.")


@dataclass
class Report:
    """Everything :func:`write_report` and the printed output need."""

    groups: list
    skipped: list
    differences: list
    tables: list  # per group: (config Table, run Table, Footnotes)
    projection: Optional["Projection"] = None  # --link
    runs: list = field(default_factory=list)

    def sections(self, fmt):
        """The report as text blocks; ``fmt`` is ``"markdown"`` or ``"text"``."""
        md = fmt == "markdown"
        out = []
        if len(self.groups) > 1:
            out.append(f"{len(self.groups)} comparison groups: the runs differ in data or schedule "
                       f"({'; '.join(self.differences)}), so each group is compared on its own.")
        for i, (g, (ct, rt, notes)) in enumerate(zip(self.groups, self.tables), 1):
            title = f"Group {i}: " if len(self.groups) > 1 else ""
            target = f"target validation accuracy {g.target:g}" if g.target is not None else "no target accuracy"
            out.append(("## " if md else "") + f"{title}{g.description}; {target}")
            out.append(ct.markdown() if md else ct.text())
            out.append(("### " if md else "") + "Runs")
            out.append(rt.markdown() if md else rt.text())
            foot = notes.lines()
            if any(r.config["ranks"].endswith("sim") for r in g.rows):
                foot.append(SIM_NOTE)
            if foot:
                out.append("\n".join(foot) if not md else "\n".join(f"- {f}" for f in foot))
        out.append(LEGEND)
        if self.projection is not None:
            out += self.projection.sections(md)
        timelines = trace_lines(self.runs)
        if timelines:
            out.append(("## " if md else "") + "Timelines")
            out.append("\n".join(("- " if md else "") + line for line in timelines))
        if self.skipped:
            out.append("Skipped:\n" + "\n".join(f"- {why}" for _, why in self.skipped))
        return out

    def csv_rows(self):
        """Configuration rows as flat dicts with raw numbers (empty where missing)."""
        out = []
        for i, g in enumerate(self.groups, 1):
            for r in g.rows:
                d = {"group": i, **{c: r.config[c] for c in CONFIG_COLUMNS}, "notes": r.notes, "n_runs": len(r.runs),
                     "seeds": " ".join(str(run.seed) for run in r.runs), "target_acc": g.target}
                missing = []
                for key, stat in list(r.stats.items()) + [(f"seconds_per_step_{p}", r.phases[p]) for p in g.phases]:
                    d[key] = stat.mean
                    if key in ("final_val_acc", "best_val_acc", "test_acc", "epochs_to_target", "seconds_to_target"):
                        d[key + "_std"] = stat.std
                    if stat.why:
                        missing.append(f"{key}: {stat.why}")
                d["baseline"] = "" if r.baseline is None else f"fp32 {r.baseline.config['topology']}"
                d["missing"] = "; ".join(missing)
                out.append(d)
        return out

    def run_csv_rows(self):
        out = []
        for i, g in enumerate(self.groups, 1):
            for r in g.runs:
                qv = [v for _, v in r.quant_variance()]
                out.append({"group": i, "run": str(r.path), **configuration(r), "seed": r.seed,
                            **{k: r.summary.get(k) for k in ("final_val_acc", "best_val_acc", "test_acc", "epochs",
                                                              "steps", "wall_seconds", "bytes_per_step_per_rank",
                                                              "total_bytes", "compression_vs_fp32")},
                            "quant_variance_first": qv[0] if qv else None,
                            "quant_variance_median": statistics.median_low(qv) if qv else None,
                            "quant_variance_last": qv[-1] if qv else None})
        return out


def build_report(runs, target=None, skipped=(), links=None, shared=False, link_source=None):
    """Group ``runs`` and build their tables (see the module docstring).

    Args:
        links: :class:`~mpiqsgd.linkmodel.Link` s to project communication onto (None: no projection).
        shared: the projection puts all ranks on one link.
        link_source: where the links' alpha and beta come from (said in the output).
    """
    if not runs:
        raise MpiqsgdError("no finished run directory among the paths given" +
                           "".join(f"\n  {why}" for _, why in skipped))
    groups = [build_group(g, target) for g in group_runs(runs)]
    tables = []
    for g in groups:
        notes = Footnotes()
        tables.append((config_table(g, notes), run_table(g, notes), notes))
    projection = Projection.of(runs, links, shared, link_source) if links else None
    return Report(groups, list(skipped), _group_differences([g.runs for g in groups]), tables, projection, list(runs))


def trace_lines(runs):
    """One line per run with a ``trace.json`` (``--trace-steps``): what it holds and what recording it cost."""
    out = []
    for run in runs:
        path = run.path / "trace.json"
        if not path.exists():
            continue
        try:
            other = json.loads(path.read_text()).get("otherData", {})
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            out.append(f"{run.name}: unreadable trace.json ({exc})")
            continue
        worst = max(other.get("recording_seconds_by_rank", {}).values(), default=0.0)
        wall = run.summary.get("wall_seconds")
        share = f", {100 * worst / wall:.3f}% of the run's {wall:.1f} s" if wall else ""
        per_event = other.get("recording_microseconds_per_event")
        out.append(f"{run.name}: {path} (Chrome trace: Perfetto, chrome://tracing), steps "
                   f"{run.flags.get('trace_steps')!r}, {other.get('events', '?')} events; recording cost "
                   + (f"{per_event:.2f} us per event, {worst * 1e3:.2f} ms on the busiest rank{share}"
                      if per_event is not None else "not stated"))
    return out


PROJECTION_NOTE = ("PROJECTION, not a measurement: each rank's counted messages (comm.json) serialized on "
                   "{where}, t = alpha + bytes / beta per message (an allreduce as 2 (n-1) messages); "
                   "per step, {which}. It ignores overlap with compute, congestion and waiting for slower "
                   "ranks. Measured: the run's own communicate (and wait) seconds per step, mean over ranks.")


@dataclass
class Projection:
    """Projected communication seconds per step of each run on each link (``--link``)."""

    links: list
    shared: bool
    source: Optional[str]
    rows: list  # (run, projection dict of linkmodel.project, or None when the run has no comm.json)

    @classmethod
    def of(cls, runs, links, shared, source):
        from .linkmodel import project

        return cls(links, shared, source,
                   [(r, project(r.comm, r.steps, links, shared) if r.comm and r.comm.get("per_rank") else None)
                    for r in runs])

    def table(self, notes):
        headers = ["run", "codec", "topology", "ranks", "msgs/step", "bytes/step", "measured comm s/step",
                   "measured wait s/step"] + [f"projected s/step {link.label}" for link in self.links]
        rows = []
        for run, p in self.rows:
            cfg = configuration(run)
            phases = run.summary.get("seconds_per_phase", {})
            steps = max(1, run.steps)
            measured = [f"{phases[k] / steps:.4g}" if k in phases else
                        "-" if k == "wait" and not run.flags.get("overlap") else  # no overlap, no wait phase
                        notes.mark(f"no {k} seconds in summary.json") for k in ("communicate", "wait")]
            if p is None:
                cells = [notes.mark("no comm.json with per-rank counts")] * (2 + len(self.links))
            else:
                cells = [f"{p['messages_per_step']:.4g}", f"{p['bytes_per_step']:,.0f}"]
                cells += [f"{p['seconds_per_step'][link.label]:.4g}" for link in self.links]
            rows.append([run.name, cfg["codec"] + (f" {cfg['bits']}b" if cfg["bits"] != "-" else ""),
                         cfg["topology"], cfg["ranks"]] + cells[:2] + measured + cells[2:])
        return Table(headers, rows, [False] * 3 + [True] * (len(headers) - 3))

    def note(self):
        where = "one link shared by all ranks" if self.shared else "its own link (one per rank)"
        which = "all ranks' messages" if self.shared else "the slowest rank (msgs/step, bytes/step are its own)"
        links = "; ".join(f"{link.label}: alpha {link.alpha * 1e6:.1f} us, beta {link.beta / 1e6:.3g} MB/s "
                          f"({link.beta * 8 / 1e6:.4g} Mbit/s)" for link in self.links)
        source = f" alpha/beta from {self.source}." if self.source else \
            " No --link-model: latency 0 unless given as RATE@LATENCY."
        return PROJECTION_NOTE.format(where=where, which=which) + f" Links: {links}." + source

    def sections(self, md):
        notes = Footnotes()
        table = self.table(notes)
        out = [("## " if md else "") + "Projected communication time per step (projection, alpha-beta model)",
               table.markdown() if md else table.text(), self.note()]
        if notes.notes:
            out.append("\n".join(notes.lines()) if not md else "\n".join(f"- {f}" for f in notes.lines()))
        return out

    def csv_rows(self):
        out = []
        for run, p in self.rows:
            phases = run.summary.get("seconds_per_phase", {})
            d = {"run": str(run.path), **configuration(run), "shared_link": self.shared,
                 "measured_communicate_seconds_per_step": phases.get("communicate", 0) / max(1, run.steps),
                 "measured_wait_seconds_per_step": phases.get("wait", 0) / max(1, run.steps)}
            if p is not None:
                d.update(rank=p["rank"], messages_per_step=p["messages_per_step"], bytes_per_step=p["bytes_per_step"])
                d.update({f"projected_seconds_per_step_{k}": v for k, v in p["seconds_per_step"].items()})
            out.append(d)
        return out


def _csv(rows):
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for r in rows for k in r))
    w = csv.DictWriter(buf, keys, lineterminator="\n")
    w.writeheader()
    w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    return buf.getvalue()


# ---------------------------------------------------------------- plots

def _label(row_or_run):
    cfg = row_or_run.config if isinstance(row_or_run, Row) else configuration(row_or_run)
    label = cfg["codec"]
    if cfg["codec"] not in ("fp32", "fp16", "sign"):
        label += f" {cfg['bits']}b"
    if cfg["rounding"] == "nearest":
        label += " nearest"
    if cfg["EF"] == "yes":
        label += " +EF"
    return f"{label} {cfg['topology']} ×{cfg['ranks']}"


def _legend_columns(entries):
    """Columns of a legend of ``entries``: one per 20, so that a large grid's legend is not cut
    off at the figure's height."""
    return max(1, -(-entries // 20))


def _legend(fig, ax):
    """A legend beside the panels (matplotlib 3.7+), else inside ``ax`` (see :func:`_legend_columns`)."""
    handles, labels = ax.get_legend_handles_labels()
    ncol = _legend_columns(len(labels))
    try:
        fig.legend(handles, labels, loc="outside right upper", fontsize=7, ncol=ncol)
    except (ValueError, TypeError):
        ax.legend(fontsize=7, ncol=ncol)


def plot_group(group, out_dir, prefix=""):
    """Write ``accuracy.png``, ``phases.png`` and (with diagnostics) ``variance.png`` for one group.

    Returns:
        the paths written.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out_dir = Path(out_dir)
    written = []
    # 20 colours, then the same colours dashed: every configuration keeps a distinct line.
    styles = {id(r): dict(color=plt.cm.tab20(i % 20), ls=("-", "--", ":", "-.")[i // 20 % 4])
              for i, r in enumerate(group.rows)}
    columns = _legend_columns(len(group.rows))  # one label per row: widen the figure for each extra column
    fig, axes = plt.subplots(1, 3, figsize=(15 + 3.5 * (columns - 1), 4.2), constrained_layout=True)
    for row in group.rows:
        for k, run in enumerate(row.runs):
            label = _label(row) if k == 0 else None
            acc = [m["val_acc"] for m in run.metrics]
            style = dict(marker="o", markersize=3, label=label, alpha=0.9, **styles[id(row)])
            axes[0].plot([m["epoch"] for m in run.metrics], acc, **style)
            if all(m.get("wall_seconds") is not None for m in run.metrics):
                axes[1].plot([m["wall_seconds"] for m in run.metrics], acc, **style)
            if all(m.get("bytes_sent") for m in run.metrics):
                axes[2].plot([m["bytes_sent"] / 1e6 for m in run.metrics], acc, **style)
    axes[0].set(xlabel="epoch", ylabel="validation accuracy")
    axes[1].set(xlabel="wall-clock seconds", ylabel="validation accuracy")
    sent = [m.get("bytes_sent") or 0 for run in group.runs for m in run.metrics]
    wide = min(sent) > 0 and max(sent) / min(sent) > 20
    axes[2].set(xlabel="MB sent by all ranks", ylabel="validation accuracy", xscale="log" if wide else "linear")
    axes[2].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if group.target is not None:
        for ax in axes:
            ax.axhline(group.target, color="grey", lw=0.8, ls="--")
    for ax in axes:
        ax.grid(alpha=0.3)
    _legend(fig, axes[0])
    fig.suptitle(group.description, fontsize=9, x=0.02, ha="left")
    written.append(out_dir / f"{prefix}accuracy.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(group.rows) + 2), 4.2), constrained_layout=True)
    bottom = [0.0] * len(group.rows)
    for i, p in enumerate(group.phases):
        heights = [r.phases[p].mean or 0.0 for r in group.rows]
        ax.bar(range(len(group.rows)), heights, bottom=bottom, label=p, color=plt.cm.tab10(i % 10))
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(range(len(group.rows)), [_label(r) for r in group.rows], rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="seconds per step (mean over ranks)", title="time per step by phase")
    ax.legend(fontsize=7)
    written.append(out_dir / f"{prefix}phases.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    if any(run.quant_variance() for run in group.runs):
        fig, ax = plt.subplots(figsize=(8, 4.2), constrained_layout=True)
        for row in group.rows:
            for k, run in enumerate(row.runs):
                qv = run.quant_variance()
                if qv and any(v > 0 for _, v in qv):
                    ax.plot([s for s, _ in qv], [v for _, v in qv], label=_label(row) if k == 0 else None,
                            **styles[id(row)])
        ax.set(xlabel="step", ylabel="||Q(v) - v||² / ||v||²  (rank 0)", yscale="log",
               title="quantization variance over training")
        ax.grid(alpha=0.3)
        _legend(fig, ax)
        written.append(out_dir / f"{prefix}variance.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def write_report(report, out_dir, plots=True):
    """Write ``report.md``, ``report.csv``, ``runs.csv`` and the plots into ``out_dir``.

    Returns:
        ``(paths written, message)``: message is :data:`PLOT_HINT` when matplotlib is
        missing, else None.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    files = [("report.md", "\n\n".join(report.sections("markdown")) + "\n"),
             ("report.csv", _csv(report.csv_rows())), ("runs.csv", _csv(report.run_csv_rows()))]
    if report.projection is not None:
        files.append(("projection.csv", _csv(report.projection.csv_rows())))
    for name, text in files:
        (out_dir / name).write_text(text)
        written.append(out_dir / name)
    message = None
    if plots:
        try:
            for i, g in enumerate(report.groups, 1):
                written += plot_group(g, out_dir, f"group{i}-" if len(report.groups) > 1 else "")
        except ImportError:
            message = PLOT_HINT
    return written, message


# ---------------------------------------------------------------- command line

def add_report_args(p):
    """Flags of ``mpiqsgd report``."""
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run directories (a directory holding run directories is searched one level down)")
    p.add_argument("--out", metavar="DIR", help="write report.md, report.csv, runs.csv and PNG plots here")
    p.add_argument("--target-acc", type=float,
                   help="validation accuracy for the time-to-accuracy columns (default: the runs' own --target-acc)")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="with --out: tables only")
    p.add_argument("--link", metavar="RATE,...",
                   help="project communication seconds per step onto these links: rates like 100mbit, 1gbit, "
                        "117MB/s, optionally @LATENCY (1gbit@50us), or 'model' (--link-model's own link)")
    p.add_argument("--link-model", metavar="FILE",
                   help="alpha (latency) and beta from `mpiqsgd bench exchange --sweep --out FILE`; a --link rate "
                        "replaces beta")
    p.add_argument("--link-shared", action="store_true",
                   help="project all ranks onto one shared link (a hub; the shaped loopback) instead of one each")


def _links(args):
    """``(links, source)`` of ``--link`` / ``--link-model`` (``(None, None)`` without ``--link``)."""
    from .linkmodel import parse_link

    model = source = None
    if args.link_model:
        try:
            model = json.loads(Path(args.link_model).read_text())["fit"]["pingpong"]
            model["alpha_seconds"], model["beta_bytes_per_second"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise MpiqsgdError(f"--link-model {args.link_model}: not a `bench exchange --sweep` JSON with a fit "
                               f"({exc})") from None
        source = f"{args.link_model} (ping-pong fit)"
    text = args.link or ("model" if model else None)
    if text is None:
        return None, None
    return [parse_link(t, model) for t in text.split(",") if t.strip()], source


def run_report(args):
    """``mpiqsgd report``: print the tables; with ``--out`` also write files."""
    runs, skipped = find_runs(args.runs)
    links, source = _links(args)
    report = build_report(runs, args.target_acc, skipped, links, args.link_shared, source)
    print("\n\n".join(report.sections("text")))
    if args.out:
        written, message = write_report(report, args.out, args.plots)
        print("\nwrote " + ", ".join(str(p) for p in written))
        if message:
            print(message)
