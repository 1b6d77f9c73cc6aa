"""The numbers of a report: one :class:`Row` per configuration of a comparison group, its runs' seeds averaged.

A configuration's seeds are averaged only when they stopped alike: an interrupted run gets
a row of its own (its ``state``), never averaged with finished ones. Seconds per phase are
divided by the steps they cover (all but the run's ``warmup_steps``).
"""

import statistics
from dataclasses import dataclass, field
from typing import Optional

from .runs import configuration, describe_group, extra_flags

__all__ = ["Stat", "Row", "Group", "build_group", "PHASE_ORDER"]

PHASE_ORDER = ("compute", "encode", "communicate", "decode", "wait")
# Phases outside a training step (evaluation), and those that --overlap runs on the communication thread
# beside the training thread (the training thread's share of them is "wait").
NOT_STEP_PHASES = ("eval",)
OVERLAPPED_PHASES = ("encode", "communicate", "decode")


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


@dataclass
class Row:
    """One configuration of a comparison group, over its seeds."""

    config: dict
    runs: list
    stats: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)
    notes: str = ""  # the flags outside the shown columns that vary between rows: "k=v, ..."
    extra: dict = field(default_factory=dict)  # the same as {flag: value}
    baseline: Optional["Row"] = None
    state: str = ""  # "" when its runs finished, else "interrupted at step N" / "incomplete at step N"

    @property
    def timings_include_compilation(self):
        return any(r.timings_include_compilation for r in self.runs)


@dataclass
class Group:
    """A comparison group: runs with the same data and schedule."""

    runs: list
    rows: list
    phases: list
    target: Optional[float]
    description: str


def _phase_names(rows):
    names = {p for r in rows for run in r.runs for p in run.summary.get("seconds_per_phase", {})}
    return [p for p in PHASE_ORDER if p in names] + sorted(names - set(PHASE_ORDER))


def _step_seconds(run):
    """Seconds of one training step from the meter's phases (evaluation left out), or None without phases."""
    phases = run.summary.get("seconds_per_phase")
    if not phases:
        return None
    skip = NOT_STEP_PHASES + (OVERLAPPED_PHASES if run.flags.get("overlap") else ())
    return sum(v for k, v in phases.items() if k not in skip) / run.timed_steps


def _row_stats(row, target, phases):
    runs = row.runs
    s = row.stats
    missing = "no summary.json (the run did not finish)" if any(r.status == "incomplete" for r in runs) else \
        "not in summary.json"
    s["final_val_acc"] = Stat.of([r.summary.get("final_val_acc") for r in runs], missing)
    s["best_val_acc"] = Stat.of([r.summary.get("best_val_acc") for r in runs], missing)
    s["test_acc"] = Stat.of([r.summary.get("test_acc") for r in runs], missing)
    if target is None:
        s["epochs_to_target"] = s["seconds_to_target"] = Stat(None, why="no --target-acc given")
    else:
        hits = [r.reached(target) for r in runs]
        why = f"validation accuracy never reached {target:g}"
        s["epochs_to_target"] = Stat.of([h and h[0] for h in hits], why)
        s["seconds_to_target"] = Stat.of([h and h[1] for h in hits], why)
    s["bytes_per_step_per_rank"] = Stat.of([r.summary.get("bytes_per_step_per_rank") for r in runs], missing)
    s["total_bytes"] = Stat.of([r.summary.get("total_bytes") for r in runs], missing)
    ratios = []
    for r in runs:
        sent = (r.comm or {}).get("sent") or {}
        ratios.append(sent["fp32_bytes"] / sent["bytes"] if sent.get("bytes") else r.summary.get("compression_vs_fp32"))
    s["compression_vs_fp32"] = Stat.of(ratios, missing if "did not finish" in missing else "no bytes sent (one rank?)")
    for p in phases:
        row.phases[p] = Stat.of([r.summary.get("seconds_per_phase", {}).get(p, 0.0) / r.timed_steps
                                 if "seconds_per_phase" in r.summary else None for r in runs],
                                "no seconds per phase in summary.json")
    s["step_seconds"] = Stat.of([_step_seconds(r) for r in runs], "no seconds per phase in summary.json")
    s["wall_seconds_per_step"] = Stat.of([r.summary.get("wall_seconds") and r.summary["wall_seconds"] / max(1, r.steps)
                                          for r in runs], missing)


def _pick_baseline(row, rows):
    """The fp32 row with the same model and ranks (allreduce first, finished runs first), or None."""
    same = [r for r in rows if r.config["codec"] == "fp32" and r.config["EF"] == "no"
            and r.config["model"] == row.config["model"] and r.config["ranks"] == row.config["ranks"]]
    same.sort(key=lambda r: (r.state != "", r.config["topology"] != "allreduce"))
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


def _target_of(runs, target):
    if target is not None:
        return target
    own = {r.summary.get("target_acc") for r in runs}
    return own.pop() if len(own) == 1 else None


def build_group(runs, target=None):
    """The configuration rows of one comparison group.

    Args:
        runs: runs sharing data and schedule (one element of :func:`~mpiqsgd.report.runs.group_runs`).
        target: validation accuracy for the time-to-accuracy columns; default: the runs'
            own ``--target-acc`` when they all share one.
    """
    target = _target_of(runs, target)
    by_key = {}
    for run in runs:
        cfg = configuration(run)
        key = (tuple(cfg.values()), extra_flags(run), run.state)
        by_key.setdefault(key, Row(cfg, [], state=run.state)).runs.append(run)
    # Per model and rank count, the fp32 rows first; otherwise in the order the runs came.
    rows = sorted(by_key.values(), key=lambda r: (r.config["model"], int(r.config["ranks"].split()[0]),
                                                  r.config["ranks"], r.config["codec"] != "fp32"))
    # Flags outside the shown columns that vary between rows go into a notes column.
    extras = [dict(extra_flags(r.runs[0])) for r in rows]
    varying = sorted(k for k in set().union(*extras) if len({e.get(k) for e in extras}) > 1)
    phases = _phase_names(rows)
    for row, extra in zip(rows, extras):
        row.extra = {k: extra.get(k, "-") for k in varying}
        row.notes = ", ".join(f"{k}={v}" for k, v in row.extra.items())
        _row_stats(row, target, phases)
    for row in rows:
        row.baseline = _pick_baseline(row, rows)
        row.stats["speedup"] = _speedup(row)
    return Group(runs, rows, phases, target, describe_group(runs))
