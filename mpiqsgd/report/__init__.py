"""Communication-cost reports: tables and plots from ``mpiqsgd train`` run directories.

``mpiqsgd report RUN_DIR... [--out DIR] [--wide | --format markdown|csv]`` reads each run's
``config.json``, ``summary.json``, ``metrics.jsonl``, ``diagnostics.jsonl`` and
``comm.json`` and gives:

1. the configuration table: one row per configuration (model, ranks, codec, bits, bucket,
   rounding, error feedback, topology), runs that differ only in their seed averaged
   (mean ± sample std), with accuracy, time to a target accuracy, bytes, compression,
   seconds per step and speedup in time-to-accuracy against the fp32 row of the same model
   and ranks. Printed, it fits 120 columns; ``--wide``, Markdown and CSV keep every column;
2. the run table: one row per run (its state: complete, or interrupted at step N),
   accuracy, bytes, quantization variance (first / median / last sample), wall seconds;
3. with ``--link RATE,...`` (and ``--link-model FILE`` from ``mpiqsgd bench exchange
   --sweep``): each run's communication seconds per step projected onto those links by
   the alpha-beta model of :mod:`mpiqsgd.linkmodel`, beside the measured ones;
4. for runs with a ``trace.json`` (``--trace-steps``): what the timeline holds and what
   recording it cost (from the file's ``otherData``);
5. with ``--out``: ``report.md``, ``report.csv`` (configurations), ``runs.csv``,
   ``projection.csv`` (with ``--link``) and ``accuracy.png``, ``results.png``,
   ``phases.png``, ``variance.png``.

Runs whose data or schedule differ (dataset, subset, epochs, batch size, learning-rate
schedule...) are never compared: each such comparison group gets its own tables, and
the report says which flags separate the groups. A cell a run cannot fill reads
``n/a [k]``, footnote k saying why; a run whose timings include kernel compilation (no
``warmup_steps`` in its summary) is flagged by a footnote. Nothing here needs MPI.

Modules: :mod:`~mpiqsgd.report.runs` reads run directories and groups them;
:mod:`~mpiqsgd.report.stats` averages seeds into configuration rows;
:mod:`~mpiqsgd.report.text` formats numbers and fixed-width tables;
:mod:`~mpiqsgd.report.tables` builds the report's tables and CSV rows;
:mod:`~mpiqsgd.report.projection` the ``--link`` projection;
:mod:`~mpiqsgd.report.plots` the PNG figures; this module writes files and runs the command.
"""

import json
import sys
from pathlib import Path

from ..errors import MpiqsgdError
from ..fileio import atomic_write_text
from .projection import Projection
from .runs import Run, RunError, find_runs, group_runs, load_run
from .stats import build_group
from .tables import Report, build_report, to_csv, trace_lines
from .text import wrap

__all__ = ["Run", "RunError", "load_run", "find_runs", "group_runs", "build_group", "build_report", "Report",
           "write_report", "add_report_args", "run_report", "PLOT_HINT", "Projection", "trace_lines"]

PLOT_HINT = 'plots need matplotlib (a dependency of mpiqsgd, missing here): pip install "matplotlib>=3.7" ' \
            "(tables were written)"


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
             ("report.csv", to_csv(report.csv_rows())), ("runs.csv", to_csv(report.run_csv_rows()))]
    if report.projection is not None:
        files.append(("projection.csv", to_csv(report.projection.csv_rows())))
    for name, text in files:
        atomic_write_text(out_dir / name, text, plain_mode=True)
        written.append(out_dir / name)
    message = None
    if plots:
        try:
            from .plots import plot_group

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
    p.add_argument("--wide", action="store_true",
                   help="print every column (accuracies, phases, per-epoch accuracy...), not only what fits 120 "
                        "columns")
    p.add_argument("--format", choices=("text", "markdown", "csv"), default="text",
                   help="what to print: fixed-width text (default), Markdown (every column, as report.md) or CSV "
                        "(the configuration rows, raw numbers, as report.csv)")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="with --out: tables only")
    p.add_argument("--link", metavar="RATE,...",
                   help="project communication seconds per step onto these links: rates like 100mbit, 1gbit, "
                        "117MB/s, optionally @LATENCY (1gbit@50us), or 'model' (--link-model's own link)")
    p.add_argument("--link-model", metavar="FILE",
                   help="alpha (latency) and beta from `mpiqsgd bench exchange --sweep --out FILE`; a --link rate "
                        "replaces beta")
    p.add_argument("--link-shared", action="store_true",
                   help="project all ranks onto one shared link (a hub; the shaped loopback) instead of one each")
    p.add_argument("--intra-link", metavar="RATE|shm", default="shm",
                   help="with --link: the link of the bytes that stay inside a node (a hierarchical run's node-* "
                        "phases); shm (default): shared memory at the memory-copy rate of `mpiqsgd project`'s "
                        "built-in rates; or a rate like --link's")


def _links(args):
    """``(links, source)`` of ``--link`` / ``--link-model`` (``(None, None)`` without ``--link``)."""
    from ..linkmodel import parse_link

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


def _intra_link(text):
    """The :class:`~mpiqsgd.linkmodel.Link` of ``--intra-link``: ``shm`` (memory copy) or a rate."""
    from ..linkmodel import Link, parse_link
    from ..project import BUILTIN_RATES

    if text.strip() == "shm":
        return Link("shm", 0.0, BUILTIN_RATES["copy"][0] * 4)  # fp32 coordinates per second -> bytes
    return parse_link(text)


def run_report(args):
    """``mpiqsgd report``: print the report (text, Markdown or CSV); with ``--out`` also write files."""
    runs, skipped = find_runs(args.runs)
    links, source = _links(args)
    intra = _intra_link(args.intra_link) if links else None
    report = build_report(runs, args.target_acc, skipped, links, args.link_shared, source, intra)
    if args.format == "csv":
        print(to_csv(report.csv_rows()), end="")
    else:
        fmt = "markdown" if args.format == "markdown" else "wide" if args.wide else "text"
        print("\n\n".join(report.sections(fmt)))
    if args.out:
        written, message = write_report(report, args.out, args.plots)
        log = sys.stderr if args.format == "csv" else sys.stdout  # keep printed CSV clean
        print("\n" + wrap(f"wrote {args.out}: " + ", ".join(p.name for p in written), indent="  "), file=log)
        if message:
            print(message, file=log)
