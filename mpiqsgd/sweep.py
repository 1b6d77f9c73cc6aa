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
      "target_acc": 0.5,                        # passed to every run and to the report
      "cluster": "10mbit"                       # optional: every point on an emulated cluster (root)
    }

Keys are :class:`~mpiqsgd.train.config.TrainConfig` fields, plus ``ranks``. A point the
training flags reject (``--rounding`` for fp32, ...) is dropped and said. Each run is one
child process (``mpiqsgd train`` with ``--simulate N``, or launched by
:mod:`mpiqsgd.launch`) writing ``<out>/<name>/`` and ``<out>/<name>.log``. Sweeping again
skips finished runs (a ``summary.json`` with the same flags and scenario) and re-runs broken
or changed ones; the sweep ends by writing ``mpiqsgd report`` into ``<out>/report``.

With ``"cluster": RATE`` (or ``--cluster RATE``, which overrides it) every point runs under
Hydra's ``mpiexec`` on an emulated switched cluster (:mod:`mpiqsgd.cluster`) built for that
point and removed after it, on success, failure, timeout or Ctrl-C: ``ranks / ranks_per_node``
nodes (``ranks_per_node`` a grid key, default 1), each with its own link at RATE each way.
A point of one node runs without a cluster (no link to emulate). Each run's ``config.json``
gets a ``scenario`` (:func:`scenario`) saying where it ran.
"""

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import MISSING, fields
from pathlib import Path

from typing import NamedTuple

from .errors import ConfigError, MpiqsgdError

__all__ = ["Point", "load_grid", "expand", "points", "run_name", "train_argv", "scenario", "check_cluster", "sweep",
           "add_sweep_args", "run_sweep"]

# Flags a sweep sets for every run itself.
OWN_FLAGS = ("run_dir", "simulate", "progress", "resume")
GRID_KEYS = {"out", "mode", "common", "axes", "variants", "seeds", "target_acc", "cluster", "cluster_burst"}


class Point(NamedTuple):
    """One run of a grid: its name, its train flags, its world size and (on a cluster) ranks per node."""

    name: str
    flags: dict
    ranks: int
    ranks_per_node: int = 1


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
    unknown = set(grid) - GRID_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown grid keys {sorted(unknown)}")
    if grid.get("mode", "simulate") not in ("simulate", "mpi"):
        raise ConfigError(f"{path}: mode must be simulate or mpi; got {grid['mode']!r}")
    if grid.get("cluster") is not None and grid.get("mode") == "simulate":
        raise ConfigError(f"{path}: \"cluster\" runs every point under mpiexec on an emulated cluster; "
                          "drop \"mode\": \"simulate\" (or the cluster)")
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
    """``(runs, dropped)``: :class:`Point` s in grid order, ``[(flags, reason)]`` rejected ones.

    On a cluster (``grid["cluster"]``) ``ranks_per_node`` places the ranks on nodes instead of
    being a train flag; a world size that is not a multiple of it is dropped.
    """
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
        per_node = flags.pop("ranks_per_node", 1) if grid.get("cluster") is not None else 1
        own = {"ranks": ranks, **({"ranks_per_node": per_node} if per_node != 1 else {})}
        if ranks % per_node:
            dropped.append(({**flags, **own}, f"{ranks} ranks do not fill nodes of {per_node}"))
            continue
        bad = sorted(set(flags) - set(known) - set(OWN_FLAGS)) or sorted(set(flags) & set(OWN_FLAGS))
        if bad:
            raise ConfigError(f"grid sets {', '.join(bad)}: not a train flag, or one the sweep sets itself")
        try:
            simulated = grid.get("mode", "simulate") == "simulate" and grid.get("cluster") is None
            with warnings.catch_warnings():  # codec warnings are the run's to give, in its log
                warnings.simplefilter("ignore")
                TrainConfig(**flags, **({"simulate": ranks} if simulated else {})).validate()  # builds the codec
        except MpiqsgdError as exc:
            dropped.append(({**flags, **own}, str(exc)))
            continue
        name = run_name({**flags, **own}, varying)
        if name in names:
            raise ConfigError(f"two grid points are both named {name}: give them different values")
        names.add(name)
        runs.append(Point(name, flags, ranks, per_node))
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


def scenario(grid, ranks, ranks_per_node=1):
    """Where a point runs, as its ``config.json`` records it (``"scenario"``) for the report to name.

    ``network`` is ``simulated`` (one process), ``one machine`` (mpiexec, shared memory) or
    ``switch`` (the emulated cluster: ``nodes`` x ``ranks_per_node``, each node's own link at
    ``link_rate`` in each direction, tbf's burst and queue latency). A cluster point of one
    node has no link: its link fields are None and ``note`` says so.
    """
    rate = grid.get("cluster")
    if rate is None:
        return {"network": "simulated" if grid.get("mode", "simulate") == "simulate" else "one machine",
                "ranks": ranks}
    spec = _spec(grid, "scenario", ranks, ranks_per_node)
    linked = spec.n_nodes > 1
    return {"network": "switch", "cluster_rate": rate, "nodes": spec.n_nodes, "ranks_per_node": ranks_per_node,
            "ranks": ranks, "link_rate": rate if linked else None,
            "link_bits_per_second": spec.rate_bps if linked else None,
            "tbf_burst_bytes": spec.burst_bytes if linked else None,
            "tbf_latency_seconds": spec.latency_seconds if linked else None,
            "note": ("emulated switched cluster: a network namespace per node, tc tbf at the rate on both "
                     "directions of its link, a Linux bridge; all nodes share this machine's cores" if linked
                     else "one node: no emulated link, its ranks share memory")}


def _finished(run_dir, flags, where):
    """True when ``run_dir`` holds a finished run with these flags, run in scenario ``where``.

    Runs from before scenarios were recorded count as run off the cluster.
    """
    try:
        config = json.loads((run_dir / "config.json").read_text())
        saved = config["flags"]
    except (OSError, ValueError, KeyError):
        return False
    same_place = config.get("scenario", None if where["network"] == "switch" else where) == where
    return (run_dir / "summary.json").exists() and same_place and all(saved.get(k) == v for k, v in flags.items())


def _record_scenario(run_dir, where):
    """Add ``scenario`` to the run's ``config.json`` (written by the run itself, if it got that far)."""
    from .fileio import atomic_write_bytes

    path = run_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    config["scenario"] = where
    atomic_write_bytes(path, json.dumps(config, indent=1).encode())


def check_cluster(grid, machine=True):
    """Refuse, in one line, a cluster sweep with a bad rate or (``machine``) one this machine cannot run.

    Returns:
        Hydra's ``mpiexec`` path; None without a cluster or without ``machine``.

    Raises:
        ClusterError: a bad rate, no root, no ``ip``/``tc``, no bridge, no network namespaces
            or no MPICH.
    """
    from . import cluster

    if grid.get("cluster") is None:
        return None
    _spec(grid, "check", 1, 1)  # the rate and burst
    if not machine:
        return None
    try:
        ip, _ = cluster.preflight()
        cluster.netns_list(ip)
        return cluster.hydra_mpiexec()
    except cluster.ClusterError as exc:
        raise cluster.ClusterError(f"cannot sweep on an emulated cluster: {exc}") from None


def _spec(grid, name, ranks, ranks_per_node):
    """The cluster of a point: ``ranks / ranks_per_node`` nodes at the grid's rate (and tbf burst)."""
    from .cluster import Spec, parse_bytes, parse_rate

    burst = grid.get("cluster_burst")
    return Spec(name, ranks // ranks_per_node, parse_rate(grid["cluster"]), ranks_per_node,
                burst_bytes=parse_bytes(burst) if burst is not None else 0)


def _cluster_run(point, program, grid, hydra, log_file, timeout):
    """Run ``program`` on a cluster built for ``point`` and removed after it; returns its exit status."""
    from .cluster import Cluster, removed_on_signals

    spec = _spec(grid, f"mpiqsgd-sweep-{os.getpid()}", point.ranks, point.ranks_per_node)
    with removed_on_signals(spec.name), Cluster(spec, hydra) as c:
        return c.run(program, timeout, stdout=log_file)


def sweep(grid, python=None, dry_run=False, timeout=None, log=print):
    """Run the grid's missing runs, then write the report.

    Returns:
        ``(done, failed, dropped)``: names run or found finished, ``[(name, why)]`` of
        the runs that failed, and the grid points the training flags rejected.
    """
    from . import launch, report

    hydra = check_cluster(grid, machine=not dry_run)
    out = Path(grid["out"])
    runs, dropped = points(grid)
    for flags, why in dropped:
        log(f"dropped {json.dumps(flags)}: {why}")
    python = python or sys.executable
    on_cluster = grid.get("cluster") is not None
    mpi = launch.mpiexec_info() if (on_cluster or grid.get("mode") == "mpi") and not dry_run else None
    done, failed = [], []
    for i, point in enumerate(runs, 1):
        name, flags, ranks = point.name, point.flags, point.ranks
        run_dir = out / name
        head = f"[{i}/{len(runs)}] {name}"
        where = scenario(grid, ranks, point.ranks_per_node)
        if _finished(run_dir, flags, where):
            log(f"{head}: finished before, skipped")
            done.append(name)
            continue
        program = ["train", *train_argv(flags), "--run-dir", str(run_dir), "--no-progress"]
        linked = where.get("link_rate") is not None
        if linked:
            argv = launch.program_argv(program, python)
        elif on_cluster or grid.get("mode") == "mpi":
            argv = (launch.build_command(ranks, program, mpi, oversubscribe=True, python=python).argv if mpi
                    else ["mpiexec", "-n", str(ranks), python, "-m", "mpi4py", "-m", "mpiqsgd", *program])
        else:
            argv = [python, "-m", "mpiqsgd", *program, "--simulate", str(ranks)]
        if dry_run:
            place = (f"on {where['nodes']} nodes x {where['ranks_per_node']} at {where['link_rate']}: mpiexec -n "
                     f"{ranks} " if linked else "")
            log(f"{head}: {place}{' '.join(argv)}")
            continue
        if run_dir.exists():
            log(f"{head}: unfinished or changed run found, running it again")
            shutil.rmtree(run_dir)
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(out / f"{name}.log", "w") as f:
            try:
                if linked:
                    code = _cluster_run(point, argv, grid, hydra, f, timeout)
                    code = f"timed out after {timeout} s" if code == 124 and timeout else code
                else:
                    code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                code = f"timed out after {timeout} s"
        seconds = time.perf_counter() - start
        _record_scenario(run_dir, where)
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
    p.add_argument("--cluster", metavar="RATE",
                   help="run every point on an emulated switched cluster (root) of ranks / ranks_per_node nodes, "
                        "each link at RATE (tc style: 10mbit, 1gbit); overrides the grid's \"cluster\"; "
                        "off: no cluster")
    p.add_argument("--cluster-burst", metavar="SIZE",
                   help="tbf bucket of each link, tc style (8kb; default 2 ms at the rate, at least 64kb); "
                        "overrides the grid's \"cluster_burst\"")


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
        if key in ("seeds", "target_acc", "mode", "cluster", "cluster_burst"):
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
    if args.cluster is not None:
        grid["cluster"] = None if args.cluster == "off" else args.cluster
    if args.cluster_burst is not None:
        grid["cluster_burst"] = args.cluster_burst
    done, failed, dropped = sweep(grid, dry_run=args.dry_run, timeout=args.timeout)
    if not args.dry_run:
        print(f"{len(done)} runs finished, {len(failed)} failed, {len(dropped)} grid points dropped")
    return 1 if failed else 0
