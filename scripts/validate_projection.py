"""Compare `mpiqsgd project` with measured `mpiqsgd bench exchange --json` outputs.

    python scripts/validate_projection.py DIR [DIR ...] [--link 1gbit@200us] [--cores N] [--codec-rate SPEC] [--json]

Reads every ``*.json`` under the directories that is a ``bench exchange`` result (others are
skipped), and projects the same exchange: the candidate's topology and codec (parsed from its
``codec`` field), its node count and ranks per node, ``numel``; a job with one node and several
ranks ran on the shared loopback (``scripts/shaped_link.sh``) and is projected as a hub. The link
defaults to the emulated cluster's: 1 Gbit/s through ``tc tbf`` (payload 1448 of 1514 bytes a
frame) with 200 us a message (``bench exchange --sweep`` on 2 emulated nodes, docs/cluster.md).
All ranks share the machine's ``cpu_count`` cores (``--cores``): CPU phases slow by max(1, ranks /
cores); the column ``no share`` is the projection with a core per rank. Each job's fp32
``MPI_Allreduce`` baseline is projected too. Error = projected / measured - 1, measured being the
median over repeats of the slowest rank (range: the repeats).
"""

import argparse
import ast
import json
import re
import sys
from pathlib import Path

from mpiqsgd.codecs import make_codec
from mpiqsgd.errors import MpiqsgdError
from mpiqsgd.linkmodel import parse_link
from mpiqsgd.project import TBF_PAYLOAD, Scenario, builtin_rates, exchange, measure_rates, rates_from_bench

TARGET = 0.20  # the tolerance at 2, 4 and 8 nodes


def codec_of(text):
    """The codec a result's ``codec`` field (its repr) names: QSGD, Sign, FP32, under ErrorFeedback or not."""
    m = re.fullmatch(r"(ErrorFeedback\()?(\w+)\((.*?)\)\)?", text.strip())
    if not m:
        raise MpiqsgdError(f"cannot read codec {text!r}")
    call = ast.parse(f"f({m.group(3)})", mode="eval").body
    params = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    cls = m.group(2)
    if cls == "QSGD":
        name = "qsgd-inf" if params.get("norm") == "max" else "qsgd"
        keep = ("bits", "bucket", "rounding")
    elif cls in ("Sign", "FP32"):
        name, keep = cls.lower(), ("bucket",)
    else:
        raise MpiqsgdError(f"codec {text!r}: only QSGD, Sign and FP32 are read")
    return make_codec(name, error_feedback=bool(m.group(1)), **{k: v for k, v in params.items() if k in keep})


def load(dirs):
    for d in dirs:
        for path in sorted(Path(d).rglob("*.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and data.get("benchmark") == "exchange":
                yield path, data


# scripts/bench_cluster.py's configurations that set --piece-numel, by their file-name suffix
PIECE_SUFFIXES = {"whole": 0, "512k": 1 << 19, "2m": 1 << 21, "4m": 1 << 22}


def piece_numel(path, run, default):
    """Scatter's and intsum's piece size of a job: its JSON's ``options`` (bench exchange writes them since
    2026-12-07), else the file name's ``-whole``/``-4m``... suffix of scripts/bench_cluster.py, else ``default``
    for scatter (JSONs from before the pipelined scatter: 0, one message a chunk) and intsum's own default."""
    if "options" in run:
        return run["options"].get("piece_numel")
    suffix = Path(path).stem.rsplit("-", 1)[-1]
    if suffix in PIECE_SUFFIXES:
        return PIECE_SUFFIXES[suffix]
    return default if run["topology"] == "scatter" else None


def rows(dirs, link, cores, rate_spec, skipped=None, default_pieces=0):
    """Projected against measured, one row per job and role (candidate, fp32 baseline); jobs whose codec
    has no rates are listed in ``skipped`` with the reason."""
    out = []
    for path, d in load(dirs):
        codec = codec_of(d["candidate"]["codec"])
        hub = d["n_nodes"] == 1 and d["n_ranks"] > 1
        p = d["n_ranks"] if hub else d["n_nodes"]
        per_node = 1 if hub else max(d["ranks_per_node"])
        n_cores = cores or d["machine"]["cpu_count"]
        try:
            rates = (measure_rates(codec) if rate_spec == "measure" else
                     rates_from_bench(rate_spec, codec) if rate_spec else builtin_rates(codec))
        except MpiqsgdError as exc:
            if skipped is None:
                raise
            skipped.append(f"{path}: {exc}")
            continue
        for role in ("candidate", "baseline"):
            run = d[role]
            pieces = piece_numel(path, run, default_pieces)
            shared = Scenario(d["numel"], codec, link, rates, TBF_PAYLOAD, hub, per_node, cores=n_cores,
                              piece_numel=pieces)
            alone = Scenario(d["numel"], codec, link, rates, TBF_PAYLOAD, hub, per_node, piece_numel=pieces)
            proj = exchange(run["topology"], p, shared)
            if proj is None:
                continue
            measured = run["median_seconds"]
            out.append({"file": str(path), "scenario": "hub" if hub else "switch", "nodes": p,
                        "ranks_per_node": per_node, "topology": run["topology"],
                        "codec": "fp32" if role == "baseline" else d["candidate"]["codec"],
                        "projected_seconds": proj["exchange_seconds"],
                        "projected_no_share_seconds": exchange(run["topology"], p, alone)["exchange_seconds"],
                        "cpu_slowdown": proj["cpu_slowdown"], "measured_seconds": measured,
                        "measured_range": [min(run["seconds_per_repeat"]), max(run["seconds_per_repeat"])],
                        "error": proj["exchange_seconds"] / measured - 1})
    return out


def short(codec):
    m = re.match(r"(ErrorFeedback\()?(\w+)\(bits=(\d+)", codec)
    if codec == "fp32":
        return "fp32"
    return (f"qsgd {m.group(3)}b" if m else codec.split("(")[1 if codec.startswith("Error") else 0].lower()) + \
        (" EF" if codec.startswith("ErrorFeedback") else "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--link", default="1gbit@200us", help="each node's link (default 1gbit@200us)")
    ap.add_argument("--cores", type=float, help="cores of the machine that ran the ranks (default: each JSON's "
                                                "cpu_count)")
    ap.add_argument("--codec-rate", help="FILE (bench codec --json) or measure (default: built-in rates)")
    ap.add_argument("--piece-numel", type=int, default=0,
                    help="scatter's piece size for JSONs that do not say it (neither options nor a file-name suffix): "
                         "0 (default) before the pipelined scatter, 1048576 for docs/bench-2026-12-07")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        skipped = []
        table = rows(args.dirs, parse_link(args.link), args.cores, args.codec_rate, skipped, args.piece_numel)
    except MpiqsgdError as exc:
        print(f"validate_projection: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    print(f"link {args.link}, payload {TBF_PAYLOAD:.3f} of the rate (tc tbf); CPU share: all ranks on each job's "
          "cores; error = projected / measured - 1")
    print(f"{'scenario':<8} {'p':>3} {'R':>2} {'topology':<10} {'codec':<12} {'projected':>9} {'measured (range)':>22} "
          f"{'error':>7} {'slow':>5} {'no share':>8}  file")
    def key(r):
        return r["scenario"], r["ranks_per_node"], r["topology"] == "allreduce", r["topology"], r["nodes"], r["file"]

    for r in sorted(table, key=key):
        lo, hi = r["measured_range"]
        flag = "" if abs(r["error"]) <= TARGET else " *"
        print(f"{r['scenario']:<8} {r['nodes']:>3} {r['ranks_per_node']:>2} {r['topology']:<10} "
              f"{short(r['codec']):<12} {r['projected_seconds']:9.3f} {r['measured_seconds']:8.3f} "
              f"({lo:.3f}-{hi:.3f}) {100 * r['error']:+6.1f}%{flag:<2}"
              f"{r['cpu_slowdown']:4.0f}x {r['projected_no_share_seconds']:8.3f}  "
              f"{'/'.join(Path(r['file']).parts[-2:])}")
    print(f"* outside +-{100 * TARGET:.0f}%")
    for line in skipped:
        print(f"skipped {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
