"""Reading run directories: one :class:`Run` per directory, its configuration columns and its comparison group.

A run directory is one holding ``config.json``. A finished run also holds ``summary.json``
(``"status": "complete"``, or no status: written before statuses existed); an interrupted one
either ``summary.json`` with ``"status": "interrupted"`` and ``"interrupted_at_step"``, or no
``summary.json`` at all, in which case what ``metrics.jsonl`` logged stands in for it (status
``"incomplete"``, stopped at its last logged step).
"""

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import MpiqsgdError

__all__ = ["Run", "RunError", "load_run", "find_runs", "configuration", "codec_label", "extra_flags", "group_key",
           "group_runs", "describe_group", "describe_network", "group_differences", "GROUP_FLAGS", "IGNORED_FLAGS",
           "SHOWN_FLAGS", "CONFIG_COLUMNS"]

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


class RunError(MpiqsgdError):
    """A directory that holds no run, or a run with nothing to report yet."""


def _read_jsonl(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Run:
    """One run directory, as read from its files.

    ``summary`` is the run's ``summary.json``, or for a run without one (status
    ``"incomplete"``) the same keys as far as ``metrics.jsonl`` gives them.
    """

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

    @property
    def status(self):
        """``"complete"``, ``"interrupted"`` (its summary says so) or ``"incomplete"`` (no ``summary.json``)."""
        return self.summary.get("status", "complete")

    @property
    def stopped_at(self):
        """The step an interrupted or incomplete run stopped at (None for a complete run)."""
        if self.status == "complete":
            return None
        return self.summary.get("interrupted_at_step") or self.steps

    @property
    def state(self):
        """``""`` for a complete run, else ``"interrupted at step N"`` / ``"incomplete at step N"``."""
        return "" if self.status == "complete" else f"{self.status} at step {self.stopped_at}"

    @property
    def timed_steps(self):
        """Steps whose seconds ``seconds_per_phase`` holds: all but the ``warmup_steps`` (kernel compilation)."""
        return max(1, self.steps - (self.summary.get("warmup_steps") or 0))

    @property
    def timings_include_compilation(self):
        """True when the summary excludes no warm-up step from its timings (no ``warmup_steps``, or 0)."""
        return not self.summary.get("warmup_steps")

    def reached(self, target):
        """``(epoch, wall seconds)`` of the first evaluation at or above ``target``, or None."""
        for m in self.metrics:
            if m.get("val_acc") is not None and m["val_acc"] >= target:
                return m["epoch"], m.get("wall_seconds")
        return None

    def quant_variance(self):
        """The quantization-variance samples of ``diagnostics.jsonl`` as ``[(step, value)]``."""
        return [(d["step"], d["quant_variance"]) for d in self.diagnostics if d.get("quant_variance") is not None]


def _summary_from_metrics(config, metrics):
    """What a run without ``summary.json`` can say, from its last logged evaluation."""
    last = metrics[-1]
    n = config.get("world_size") or config.get("flags", {}).get("simulate") or 1
    steps = last.get("step") or 0
    out = {"status": "incomplete", "steps": steps, "epochs": last.get("epoch"), "n_ranks": n,
           "final_val_acc": last.get("val_acc"), "test_acc": last.get("test_acc"),
           "best_val_acc": max((m["val_acc"] for m in metrics if m.get("val_acc") is not None), default=None),
           "wall_seconds": last.get("wall_seconds"), "target_acc": config.get("flags", {}).get("target_acc")}
    if last.get("bytes_sent") is not None:
        out["total_bytes"] = last["bytes_sent"]
        out["bytes_per_step_per_rank"] = last["bytes_sent"] / max(1, steps) / n
    return out


def load_run(path):
    """Read one run directory; an interrupted run is read with what it has.

    Raises:
        RunError: no ``config.json`` (not a run directory), an unreadable file, or a run
            with neither ``summary.json`` nor a logged evaluation (nothing to report yet).
    """
    path = Path(path)
    if not (path / "config.json").exists():
        raise RunError(f"{path}: no config.json (not a run directory)")
    try:
        config = json.loads((path / "config.json").read_text())
        summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").exists() else None
        metrics = _read_jsonl(path / "metrics.jsonl")
        diagnostics = _read_jsonl(path / "diagnostics.jsonl")
        comm = json.loads((path / "comm.json").read_text()) if (path / "comm.json").exists() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: unreadable run file ({exc})") from None
    if summary is None:
        if not metrics:
            raise RunError(f"{path}: no summary.json and no evaluation in metrics.jsonl (a run still starting, "
                           f"or stopped before its first evaluation: nothing to report)")
        summary = _summary_from_metrics(config, metrics)
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
    from ..options import CodecOptions

    try:
        with warnings.catch_warnings():  # the run already gave its codec's warnings
            warnings.simplefilter("ignore")
            codec = CodecOptions.of({**flags, "codec": flags.get("codec", "?"), "error_feedback": False}).build_codec()
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


def codec_label(config, bucket=False):
    """A short codec label of configuration columns: ``qsgd 4b``, ``qsgd 2b d128 nearest +EF``.

    Bits where the codec has a choice, the bucket only when ``bucket``, the rounding only
    when it is not the default stochastic one.
    """
    label = config["codec"]
    if config["codec"] not in ("fp32", "fp16", "sign") and config["bits"] != "-":
        label += f" {config['bits']}b"
    if bucket and config["bucket"] != "-":
        label += f" d{config['bucket']}"
    if config["rounding"] not in ("-", "stochastic"):
        label += f" {config['rounding']}"
    if config["EF"] == "yes":
        label += " +EF"
    return label


def extra_flags(run):
    """Flags that are neither shown, nor data/schedule, nor ignored (min_compress_numel, adapt_at ...)."""
    skip = set(GROUP_FLAGS) | set(IGNORED_FLAGS) | set(SHOWN_FLAGS)
    return tuple(sorted((k, json.dumps(v)) for k, v in run.flags.items() if k not in skip))


def group_key(run):
    """The data and schedule flags of ``run`` (:data:`GROUP_FLAGS`) as ``((name, json value), ...)``."""
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
        groups.setdefault(group_key(run), []).append(run)
    return list(groups.values())


def describe_group(runs):
    """One line of the data and schedule a group's runs share."""
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
    return f"{data}; {sched}; batch {f.get('batch_size')} per worker; {lr}" + describe_network(runs)


def describe_network(runs):
    """Where a group's runs ran, from the ``scenario`` a sweep records in ``config.json`` ("" if none did)."""
    switched = [r.config["scenario"] for r in runs if (r.config.get("scenario") or {}).get("network") == "switch"]
    if not switched:
        return ""
    linked = sorted({(sc["cluster_rate"], sc.get("tbf_burst_bytes")) for sc in switched if sc.get("link_rate")},
                    key=str)
    links = ", ".join(f"{rate} per node" + (f" (tbf burst {burst:,} B)" if burst else "") for rate, burst in linked)
    alone = any(sc.get("nodes") == 1 for sc in switched)
    return ("; emulated switched cluster, one rank per node" if all(sc.get("ranks_per_node", 1) == 1 for sc in switched)
            else "; emulated switched cluster") + (f", {links}" if links else "") + \
        ("; 1-node runs: no link" if alone else "")


def group_differences(groups):
    """The data/schedule flags whose values separate the groups, as ``name (v1 / v2 ...)``."""
    out = []
    for k in GROUP_FLAGS:
        values = []
        for g in groups:
            v = dict(group_key(g[0]))[k]
            if v not in values:
                values.append(v)
        if len(values) > 1:
            out.append(f"{k} ({' / '.join(values)})")
    return out
