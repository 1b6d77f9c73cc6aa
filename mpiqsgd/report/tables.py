"""The report's tables and prose: :class:`Report` in three forms and its CSV rows.

1. ``text`` (printed by default): per comparison group a configuration table of ten
   columns (model, ranks, codec, topology, test accuracy, time to target, bytes per step,
   compression, seconds per step, speedup) and a short run table, every line within
   :data:`~mpiqsgd.report.text.WIDTH` columns, footnotes wrapped;
2. ``wide`` (``--wide``) and ``markdown`` (``report.md``, ``--format markdown``): every
   column (accuracies, epochs to target, total bytes, seconds per step by phase, warm-up
   steps, validation accuracy after each epoch...);
3. :meth:`Report.csv_rows` / :meth:`Report.run_csv_rows`: raw numbers (``report.csv``,
   ``runs.csv``, ``--format csv``).
"""

import csv
import io
import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from ..errors import MpiqsgdError
from .runs import CONFIG_COLUMNS, codec_label, configuration, group_differences, group_runs
from .stats import Stat, build_group
from .text import WIDTH, Footnotes, Table, cell, quantity, wrap

__all__ = ["Report", "build_report", "config_table", "compact_config_table", "run_table", "compact_run_table",
           "trace_lines", "to_csv", "COMPILE_NOTE", "FORMATS"]

FORMATS = ("text", "wide", "markdown")

STAT_COLUMNS = (("final val", "final_val_acc", "acc"), ("best val", "best_val_acc", "acc"),
                ("test", "test_acc", "acc"), ("epochs to target", "epochs_to_target", "count"),
                ("to target", "seconds_to_target", "seconds"),
                ("bytes/step/rank", "bytes_per_step_per_rank", "bytes"),
                ("total bytes", "total_bytes", "bytes"), ("vs fp32", "compression_vs_fp32", "ratio"))
COMPACT_COLUMNS = (("test acc", "test_acc", "acc"), ("to target", "seconds_to_target", "seconds"),
                   ("bytes/step", "bytes_per_step_per_rank", "bytes"), ("vs fp32", "compression_vs_fp32", "ratio"),
                   ("s/step", "step_seconds", "seconds"), ("speedup", "speedup", "ratio"))
COMPILE_NOTE = ("timings include kernel compilation (summary.json has no warmup_steps, or 0: the first steps' "
                "compile time is in the seconds per step)")


def _state_ref(row, notes):
    """`` [k]`` after an interrupted row's codec (footnote: which runs, at which step), else ``""``."""
    if not row.state:
        return ""
    names = ", ".join(r.name for r in row.runs)
    return " " + notes.ref(f"{row.state} ({names}): its numbers are those of its last logged evaluation"
                           + (" and of its summary.json" if row.runs[0].status == "interrupted" else ""))


def _warmup_cell(row, notes):
    if row.timings_include_compilation:
        return notes.mark(COMPILE_NOTE)
    return quantity(statistics.fmean(r.summary["warmup_steps"] for r in row.runs))


def config_table(group, notes):
    """Every column of ``group``'s configurations (``--wide``, Markdown), n/a reasons added to ``notes``."""
    has_notes = any(r.notes for r in group.rows)
    headers = list(CONFIG_COLUMNS) + (["notes"] if has_notes else []) + ["runs"]
    headers += [h for h, _, _ in STAT_COLUMNS] + [f"s/step {p}" for p in group.phases]
    headers += ["warm-up steps", "s/step wall", "speedup"]
    n_text = len(CONFIG_COLUMNS) + has_notes
    rows = []
    for r in group.rows:
        cells = [r.config[c] for c in CONFIG_COLUMNS] + ([r.notes] if has_notes else []) + [len(r.runs)]
        cells[2] += _state_ref(r, notes)
        cells += [cell(r.stats[key], kind, notes) for _, key, kind in STAT_COLUMNS]
        cells += [cell(r.phases[p], "seconds", notes) for p in group.phases]
        cells += [_warmup_cell(r, notes), cell(r.stats["wall_seconds_per_step"], "seconds", notes),
                  cell(r.stats["speedup"], "ratio", notes)]
        rows.append(cells)
    return Table(headers, rows, [False] * n_text + [True] * (len(headers) - n_text))


def _unusual_ref(row, group, notes):
    """`` [k]`` after a row whose hidden flags differ from most rows' (footnote: the flags), else ``""``."""
    usual = {k: Counter(r.extra.get(k) for r in group.rows).most_common(1)[0][0] for k in row.extra}
    odd = [f"{k}={v}" for k, v in row.extra.items() if v != usual[k]]
    if not odd:
        return ""
    return " " + notes.ref(", ".join(odd) + " (the other rows: " +
                           ", ".join(f"{k}={usual[k]}" for k, v in row.extra.items() if v != usual[k]) + ")")


def compact_config_table(group, notes):
    """``#``, model, ranks, codec, topology and :data:`COMPACT_COLUMNS`: what fits 120 columns.

    The model column is left out when every row has the same model (the group's heading names it).
    """
    buckets = {r.config["bucket"] for r in group.rows if r.config["bucket"] != "-"}
    model = len({r.config["model"] for r in group.rows}) > 1
    headers = ["#"] + ["model"] * model + ["ranks", "codec", "topology"] + [h for h, _, _ in COMPACT_COLUMNS]
    rows = []
    for i, r in enumerate(group.rows, 1):
        codec = codec_label(r.config, bucket=len(buckets) > 1) + _unusual_ref(r, group, notes) + _state_ref(r, notes)
        cells = [i] + [r.config["model"]] * model + [r.config["ranks"], codec, r.config["topology"]]
        cells += [cell(r.stats[key], kind, notes) for _, key, kind in COMPACT_COLUMNS]
        step = r.stats["step_seconds"]
        if step.mean is not None:  # its spread over seeds is in --wide; here the column stays narrow
            cells[-2] = quantity(step.mean, kind="seconds")
            if r.timings_include_compilation:
                cells[-2] += " " + notes.ref(COMPILE_NOTE)
        rows.append(cells)
    return Table(headers, rows, [True] + [False] * (3 + model) + [True] * len(COMPACT_COLUMNS),
                 elide=[3 + model, 2 + model])


def _per_epoch(run):
    return [m for m in run.metrics if abs(m["epoch"] - round(m["epoch"])) < 1e-9 and m["epoch"] > 0]


def _qv_cell(run, notes, median=True):
    qv = [v for _, v in run.quant_variance()]
    if not qv:
        return notes.mark("no quantization variance in diagnostics.jsonl")
    return " / ".join(quantity(v) for v in (qv[0], statistics.median_low(qv), qv[-1])[::1 if median else 2])


def _run_stat(run, key, why="not in summary.json"):
    return Stat.of([run.summary.get(key)], why)


def run_table(group, notes):
    """One row per run: state, validation accuracy after each whole epoch, test, bytes, variance, wall seconds."""
    per_epoch = {id(r): _per_epoch(r) for r in group.runs}
    n_epochs = max((len(v) for v in per_epoch.values()), default=0)
    headers = ["run", "codec", "topology", "seed", "state"] + [f"val@{e + 1}" for e in range(n_epochs)]
    headers += ["test", "bytes/step/rank", "vs fp32", "Q var first / median / last", "wall"]
    rows = []
    for r in group.runs:
        cfg = configuration(r)
        codec = cfg["codec"] + (f" {cfg['bits']}b" if r.flags.get("bits") else "")
        codec += (f" d={cfg['bucket']}" if r.flags.get("bucket") else "")
        codec += (f" {cfg['rounding']}" if r.flags.get("rounding") else "") + (" +EF" if cfg["EF"] == "yes" else "")
        accs = [f"{m['val_acc']:.3f}" for m in per_epoch[id(r)]]
        if len(accs) < n_epochs:
            accs += [notes.mark("the run has fewer epochs")] * (n_epochs - len(accs))
        rows.append([r.name, codec, cfg["topology"], r.seed, r.state or "complete"] + accs + [
            cell(_run_stat(r, "test_acc"), "acc", notes), cell(_run_stat(r, "bytes_per_step_per_rank"), "bytes", notes),
            cell(_run_stat(r, "compression_vs_fp32", "no bytes sent (one rank?)"), "ratio", notes),
            _qv_cell(r, notes), cell(_run_stat(r, "wall_seconds"), "seconds", notes)])
    return Table(headers, rows, [False] * 3 + [True] + [False] + [True] * (len(headers) - 5))


def compact_run_table(group, notes):
    """One row per run, by configuration (``#`` of the configuration table): what fits 120 columns."""
    stopped = any(r.state for r in group.runs)
    headers = ["#", "run", "seed"] + (["state"] if stopped else [])
    headers += ["epochs", "final val", "test", "bytes/step", "Q var first / last", "wall"]
    rows = []
    for i, row in enumerate(group.rows, 1):
        for r in row.runs:
            rows.append([i, r.name, r.seed] + ([r.state or "complete"] if stopped else []) + [
                cell(_run_stat(r, "epochs"), "count", notes), cell(_run_stat(r, "final_val_acc"), "acc", notes),
                cell(_run_stat(r, "test_acc"), "acc", notes),
                cell(_run_stat(r, "bytes_per_step_per_rank"), "bytes", notes),
                _qv_cell(r, notes, median=False), cell(_run_stat(r, "wall_seconds"), "seconds", notes)])
    return Table(headers, rows, [True, False, True] + [False] * stopped + [True] * 6, elide=[1])


LEGEND = ("Rows: one per configuration, seeds averaged (mean ± sample std), an interrupted run apart. "
          "Codec: bits, rounding when not stochastic, +EF: error feedback. Test acc: at the end. "
          "To target: wall-clock seconds until validation accuracy first reached the target. "
          "Bytes/step: sent by each rank per step, headers included; vs fp32: compression against fp32. "
          "S/step: one training step by the meter (mean over ranks; evaluation and warm-up steps left out). "
          "Speedup: fp32's time to target (same model and ranks; allreduce first) over this row's. "
          "--wide: every column.")
WIDE_LEGEND = ("Rows: one per configuration; runs differing only in --seed are averaged (mean ± sample std); an "
               "interrupted run has a row of its own. bits/bucket/rounding as the codec resolved them (\"-\": does "
               "not apply). Accuracy: validation (final, best) and test at the end. To target: first evaluation "
               "whose validation accuracy reached the target (evaluations happen each epoch, or every --eval-every "
               "steps). Bytes: sent on the wire by all ranks, headers included; vs fp32: the fp32 bytes the "
               "messages stand for over the bytes sent. s/step: meter seconds per phase averaged over ranks, per "
               "training step, warm-up steps (kernel compilation) excluded; s/step wall: the run's wall-clock "
               "seconds over its steps, evaluation and compilation included. Speedup: seconds to target of the "
               "fp32 row with the same model and ranks (allreduce when there is one) over this row's.")
SIM_NOTE = ("\"sim\": --simulate N workers as threads of one process; phase seconds include waits for other "
            "workers.")


@dataclass
class Report:
    """Everything :func:`~mpiqsgd.report.write_report` and the printed output need."""

    groups: list
    skipped: list
    differences: list
    projection: Optional[object] = None  # a Projection (--link)
    runs: list = field(default_factory=list)

    def sections(self, fmt="text"):
        """The report as text blocks; ``fmt`` is one of :data:`FORMATS`."""
        if fmt not in FORMATS:
            raise MpiqsgdError(f"report format {fmt!r}: one of {', '.join(FORMATS)}")
        md, width = fmt == "markdown", (WIDTH if fmt != "markdown" else None)
        out = []
        if len(self.groups) > 1:
            out.append(wrap(f"{len(self.groups)} comparison groups: the runs differ in data or schedule "
                            f"({'; '.join(self.differences)}), so each group is compared on its own.", width))
        for i, g in enumerate(self.groups, 1):
            notes = Footnotes()
            if fmt == "text":
                ct, rt = compact_config_table(g, notes), compact_run_table(g, notes)
            else:
                ct, rt = config_table(g, notes), run_table(g, notes)
            title = f"Group {i}: " if len(self.groups) > 1 else ""
            target = f"target validation accuracy {g.target:g}" if g.target is not None else "no target accuracy"
            models = {r.config["model"] for r in g.rows}
            model = f"model {models.pop()}; " if fmt == "text" and len(models) == 1 else ""
            out.append(("## " if md else "") + wrap(f"{title}{model}{g.description}; {target}", width))
            out.append(ct.markdown() if md else ct.text(width if fmt == "text" else None))
            out.append(("### " if md else "") + "Runs")
            out.append(rt.markdown() if md else rt.text(width if fmt == "text" else None))
            foot = notes.text(md, width)
            if any(r.config["ranks"].endswith("sim") for r in g.rows):
                foot += ("\n" if foot else "") + ("- " if md else "") + wrap(SIM_NOTE, width)
            if foot:
                out.append(foot)
        out.append(wrap(LEGEND if fmt == "text" else WIDE_LEGEND, width))
        if self.projection is not None:
            out += self.projection.sections(fmt, width)
        timelines = trace_lines(self.runs)
        if timelines:
            out.append(("## " if md else "") + "Timelines")
            out.append("\n".join(("- " if md else "") + wrap(line, width, "  ") for line in timelines))
        if self.skipped:
            out.append("Skipped:\n" + "\n".join(wrap(f"- {why}", width, "  ") for _, why in self.skipped))
        return out

    def csv_rows(self):
        """Configuration rows as flat dicts with raw numbers (empty where missing)."""
        out = []
        for i, g in enumerate(self.groups, 1):
            for r in g.rows:
                d = {"group": i, **{c: r.config[c] for c in CONFIG_COLUMNS}, "notes": r.notes, "n_runs": len(r.runs),
                     "seeds": " ".join(str(run.seed) for run in r.runs), "target_acc": g.target,
                     "state": r.state or "complete", "timings_include_compilation": r.timings_include_compilation}
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
                            "status": r.status, "stopped_at_step": r.stopped_at,
                            **{k: r.summary.get(k) for k in ("final_val_acc", "best_val_acc", "test_acc", "epochs",
                                                              "steps", "warmup_steps", "wall_seconds",
                                                              "bytes_per_step_per_rank", "total_bytes",
                                                              "compression_vs_fp32")},
                            "quant_variance_first": qv[0] if qv else None,
                            "quant_variance_median": statistics.median_low(qv) if qv else None,
                            "quant_variance_last": qv[-1] if qv else None})
        return out


def build_report(runs, target=None, skipped=(), links=None, shared=False, link_source=None, intra=None):
    """Group ``runs`` and build their rows (see :mod:`mpiqsgd.report`).

    Args:
        links: :class:`~mpiqsgd.linkmodel.Link` s to project communication onto (None: no projection).
        shared: the projection puts all ranks on one link.
        link_source: where the links' alpha and beta come from (said in the output).
        intra: the :class:`~mpiqsgd.linkmodel.Link` of bytes inside a node (None: on ``links`` too).
    """
    from .projection import Projection

    if not runs:
        raise MpiqsgdError("no run directory with anything to report among the paths given" +
                           "".join(f"\n  {why}" for _, why in skipped))
    groups = [build_group(g, target) for g in group_runs(runs)]
    projection = Projection.of(runs, links, shared, link_source, intra) if links else None
    return Report(groups, list(skipped), group_differences([g.runs for g in groups]), projection, list(runs))


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


def to_csv(rows):
    """Dicts as CSV text, columns in order of first appearance, None as empty."""
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for r in rows for k in r))
    w = csv.DictWriter(buf, keys, lineterminator="\n")
    w.writeheader()
    w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    return buf.getvalue()
