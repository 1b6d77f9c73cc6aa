"""``mpiqsgd sweep GRID_FILE``: run an experiment grid (resumable), then write its report.

A grid file (JSON; TOML too on Python 3.11+) names the runs as a product::

    {
      "out": "runs/smoke",                      # where run directories go
      "mode": "simulate",                       # simulate (--simulate N) or mpi (mpiexec -n N)
      "common": {"dataset": "synthetic", "epochs": 2, "batch_size": 32},   # train flags of every run
      "axes": {"model": ["tiny"], "ranks": [1, 2, 4]},                     # product of these
      "variants": [                             # times the union of these (each its own product)
        {"codec": "fp32", "topology": "allreduce"},
        {"codec": "qsgd", "bits": [2, 4, 8], "rounding": ["stochastic", "nearest"], "error_feedback": [false, true]}
      ],
      "seeds": [0],
      "target_acc": 0.5                         # passed to every run and to the report
    }

Keys are :class:`~mpiqsgd.train.config.TrainConfig` fields, plus ``ranks``. A point the
training flags reject (``--rounding`` for fp32, ...) is dropped and said. Each run is one
child process (``mpiqsgd train`` with ``--simulate N``, or launched by
:mod:`mpiqsgd.launch`) writing ``<out>/<name>/`` and ``<out>/<name>.log``. Sweeping again
skips finished runs (a ``summary.json`` with the same flags) and re-runs broken or
changed ones; the sweep ends by writing ``mpiqsgd report`` into ``<out>/report``.
"""

import itertools
import json
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import MISSING, fields
from pathlib import Path

from .errors import ConfigError, MpiqsgdError

__all__ = ["load_grid", "expand", "points", "run_name", "train_argv", "sweep", "add_sweep_args", "run_sweep"]

# Flags a sweep sets for every run itself.
OWN_FLAGS = ("run_dir", "simulate", "progress", "resume")


def load_grid(path):
    """Read a grid file (``.json``, or ``.toml`` with Python 3.11+)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # pragma: no cover - Python < 3.11
            raise ConfigError("TOML grid files need Python 3.11+; write the grid as JSON") from None
        grid = tomllib.loads(text)
    else:
        try:
            grid = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    unknown = set(grid) - {"out", "mode", "common", "axes", "variants", "seeds", "target_acc"}
    if unknown:
        raise ConfigError(f"{path}: unknown grid keys {sorted(unknown)}")
    if grid.get("mode", "simulate") not in ("simulate", "mpi"):
        raise ConfigError(f"{path}: mode must be simulate or mpi; got {grid['mode']!r}")
    grid.setdefault("out", str(Path("runs") / path.stem))
    return grid


def expand(spec):
    """The product of a dict whose list values are axes: ``{"a": [1, 2], "b": 3}`` -> two dicts."""
    keys = list(spec)
    values = [v if isinstance(v, list) else [v] for v in spec.values()]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def _config_fields():
    from .train.config import TrainConfig

    return {f.name: f for f in fields(TrainConfig)}


def points(grid):
    """``(runs, dropped)``: ``[(name, flags, ranks)]`` in grid order, ``[(flags, reason)]`` rejected ones."""
    from .codecs import codec_from_flags
    from .train.config import TrainConfig

    known = _config_fields()
    axes = expand(grid.get("axes", {}))
    # A run is named by the axes that vary and its own variant's keys: adding or removing a
    # variant leaves the other runs' names (and so their finished directories) as they were.
    variants = [(list(spec), v) for spec in grid.get("variants", [{}]) for v in expand(spec)]
    axes_varying = [k for k, v in grid.get("axes", {}).items() if isinstance(v, list) and len(v) > 1]
    runs, dropped, names = [], [], set()
    for a, (own, v), seed in itertools.product(axes, variants, grid.get("seeds", [0])):
        varying = axes_varying + [k for k in own if k not in axes_varying]
        flags = {**grid.get("common", {}), **a, **v, "seed": seed}
        if grid.get("target_acc") is not None:
            flags["target_acc"] = grid["target_acc"]
        ranks = flags.pop("ranks", 1)
        bad = sorted(set(flags) - set(known) - set(OWN_FLAGS)) or sorted(set(flags) & set(OWN_FLAGS))
        if bad:
            raise ConfigError(f"grid sets {', '.join(bad)}: not a train flag, or one the sweep sets itself")
        try:
            cfg = TrainConfig(**flags).validate()
            with warnings.catch_warnings():  # codec warnings are the run's to give, in its log
                warnings.simplefilter("ignore")
                codec_from_flags(cfg.codec, cfg.bits, cfg.levels, cfg.bucket, cfg.rounding, cfg.clip_sigma,
                                 cfg.error_feedback, cfg.norm, cfg.fit, cfg.encoding)
        except MpiqsgdError as exc:
            dropped.append(({**flags, "ranks": ranks}, str(exc)))
            continue
        name = run_name({**flags, "ranks": ranks}, varying)
        if name in names:
            raise ConfigError(f"two grid points are both named {name}: give them different values")
        names.add(name)
        runs.append((name, flags, ranks))
    return runs, dropped


def run_name(flags, varying):
    """``model-tiny_ranks-2_codec-qsgd_bits-4_seed-0``: the keys that vary, in grid order, and the seed."""
    parts = []
    for k in dict.fromkeys([*varying, "seed"]):
        v = flags.get(k)
        if v is None or v is False:
            continue
        parts.append(k.replace("_", "") if v is True else f"{k.replace('_', '')}-{v}")
    return "_".join(parts) or "run"


def train_argv(flags):
    """The ``mpiqsgd train`` flags for ``flags`` (defaults left out)."""
    known = _config_fields()
    argv = []
    for k, v in flags.items():
        f = known[k]
        default = None if f.default is MISSING else f.default
        if v == default:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            argv += [flag, str(v)]
    return argv


def _finished(run_dir, flags):
    """True when ``run_dir`` holds a finished run with these flags."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())["flags"]
    except (OSError, ValueError, KeyError):
        return False
    return (run_dir / "summary.json").exists() and all(saved.get(k) == v for k, v in flags.items())


def sweep(grid, python=None, dry_run=False, timeout=None, log=print):
    """Run the grid's missing runs, then write the report.

    Returns:
        ``(done, failed, dropped)``: names run or found finished, ``[(name, why)]`` of
        the runs that failed, and the grid points the training flags rejected.
    """
    from . import launch, report

    out = Path(grid["out"])
    runs, dropped = points(grid)
    for flags, why in dropped:
        log(f"dropped {json.dumps(flags)}: {why}")
    python = python or sys.executable
    mpi = launch.mpiexec_info() if grid.get("mode") == "mpi" and not dry_run else None
    done, failed = [], []
    for i, (name, flags, ranks) in enumerate(runs, 1):
        run_dir = out / name
        head = f"[{i}/{len(runs)}] {name}"
        if _finished(run_dir, flags):
            log(f"{head}: finished before, skipped")
            done.append(name)
            continue
        program = ["train", *train_argv(flags), "--run-dir", str(run_dir), "--no-progress"]
        if grid.get("mode") == "mpi":
            argv = (launch.build_command(ranks, program, mpi, oversubscribe=True, python=python).argv if mpi
                    else ["mpiexec", "-n", str(ranks), python, "-m", "mpi4py", "-m", "mpiqsgd", *program])
        else:
            argv = [python, "-m", "mpiqsgd", *program, "--simulate", str(ranks)]
        if dry_run:
            log(f"{head}: {' '.join(argv)}")
            continue
        if run_dir.exists():
            log(f"{head}: unfinished or changed run found, running it again")
            shutil.rmtree(run_dir)
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(out / f"{name}.log", "w") as f:
            try:
                code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                code = f"timed out after {timeout} s"
        seconds = time.perf_counter() - start
        if code == 0 and (run_dir / "summary.json").exists():
            s = json.loads((run_dir / "summary.json").read_text())
            log(f"{head}: done in {seconds:.1f} s, final validation accuracy {s['final_val_acc']:.3f}")
            done.append(name)
        else:
            lines = (out / f"{name}.log").read_text().strip().splitlines()
            why = f"FAILED ({code}) after {seconds:.1f} s: {lines[-1] if lines else 'no output'}"
            log(f"{head}: {why} (log: {out / (name + '.log')})")
            failed.append((name, why))
    if not dry_run and done:
        found, skipped = report.find_runs([out / n for n in done])
        skipped += [(out / n, f"{out / n}: {why}") for n, why in failed]
        rep = report.build_report(found, grid.get("target_acc"), skipped)
        written, message = report.write_report(rep, out / "report")
        log("\n\n".join(rep.sections("text")))
        log(f"report: {out / 'report' / 'report.md'}" + (f"; {message}" if message else ""))
    return done, failed, dropped


def add_sweep_args(p):
    """Flags of ``mpiqsgd sweep``."""
    p.add_argument("grid", metavar="GRID_FILE", help="grid file (JSON, or TOML on Python 3.11+)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a common flag or an axis for every run (JSON value; repeatable), "
                        "e.g. --set epochs=1 --set 'ranks=[2]' --set model=tiny")
    p.add_argument("--out", help="run directories go here (default: the grid's out)")
    p.add_argument("--timeout", type=float, help="seconds one run may take before it counts as failed")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their commands; run nothing")


def _apply_sets(grid, sets):
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set wants KEY=VALUE; got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        for spec in [grid.get("axes", {})] + grid.get("variants", []):
            spec.pop(key, None)
        if key in ("seeds", "target_acc", "mode"):
            grid[key] = value
        elif isinstance(value, list):
            grid.setdefault("axes", {})[key] = value
        else:
            grid.setdefault("common", {})[key] = value
    return grid


def run_sweep(args):
    """``mpiqsgd sweep``: exit status 1 when a run failed."""
    grid = _apply_sets(load_grid(args.grid), args.set)
    if args.out:
        grid["out"] = args.out
    done, failed, dropped = sweep(grid, dry_run=args.dry_run, timeout=args.timeout)
    if not args.dry_run:
        print(f"{len(done)} runs finished, {len(failed)} failed, {len(dropped)} grid points dropped")
    return 1 if failed else 0
