"""Exchange benchmark on the emulated switched cluster (and, labelled, the shared-loopback hub).

    python scripts/bench_cluster.py [--nodes 2,4,8] [--ranks-per-node 1] [--rate 1gbit] [--numel 25000000]
                                    [--repeats 3] [--configs intsum,scatter,...] [--scenarios cluster,hub]
                                    [--out runs/bench-cluster]

For each node count and configuration, one `mpiqsgd bench exchange` job (--ranks-per-node ranks
on each node; several make the exchange hierarchical: fp32 inside a node)
times the configuration against fp32 MPI_Allreduce in the same job, median of --repeats; the
JSON of each job goes to OUT/<scenario>-<nodes>x<ranks>-<config>.json and a Markdown table of
speedups (median, with the range over repeats as the fastest and slowest ratio), bytes and
relative error to OUT/table-<scenarios>-<ranks>.md. Scenario ``hub`` runs the same jobs with all ranks on one
shaped loopback (scripts/shaped_link.sh), the scenario earlier figures were measured in.
Needs root (network namespaces, tc).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = {  # name: bench exchange flags
    "intsum": ["--topology", "intsum", "--codec", "qsgd", "--bits", "4"],
    "intsum-5bit": ["--topology", "intsum", "--codec", "qsgd", "--bits", "5"],
    "scatter": ["--topology", "scatter", "--codec", "qsgd", "--bits", "4"],
    "ring": ["--topology", "ring", "--codec", "qsgd", "--bits", "4"],
    "allgather": ["--topology", "allgather", "--codec", "qsgd", "--bits", "4"],
    "sign": ["--topology", "scatter", "--codec", "sign", "--error-feedback"],
    # scatter's piece size (--piece-numel; default 1M coordinates): 0 is one message a chunk
    **{f"scatter-{name}": ["--topology", "scatter", "--codec", "qsgd", "--bits", "4", "--piece-numel", str(numel)]
       for name, numel in (("whole", 0), ("512k", 1 << 19), ("2m", 1 << 21), ("4m", 1 << 22))},
    "sign-whole": ["--topology", "scatter", "--codec", "sign", "--error-feedback", "--piece-numel", "0"],
}


def run(scenario, nodes, rate, numel, repeats, config, out, threads=1, per_node=1):
    bench = ["bench", "exchange", "--numel", str(numel), "--repeats", str(repeats), "--json", *CONFIGS[config]]
    if scenario == "cluster":
        cmd = [sys.executable, "-m", "mpiqsgd", "cluster", "run", "--nodes", str(nodes), "--ranks-per-node",
               str(per_node), "--rate", rate, "--", *bench]
    else:
        inner = " ".join(["mpiexec", "-n", str(nodes * per_node), sys.executable, "-m", "mpi4py", "-m", "mpiqsgd",
                          *bench])
        cmd = ["bash", "-c", f"rate={rate}; source scripts/shaped_link.sh; in_ns {inner}"]
    # One thread a rank: the emulated nodes share this machine's cores (a rank alone on a real
    # node would have its own); the ranks would otherwise each size their pool to the machine.
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env=dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS=str(threads)))
    text = proc.stdout
    if proc.returncode != 0 or "{" not in text:
        raise SystemExit(f"{scenario} {nodes} {config} failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                         f"{proc.stderr[-3000:]}")
    result = json.loads(text[text.index("{"):])
    (out / f"{scenario}-{nodes}x{per_node}-{config}.json").write_text(json.dumps(result, indent=1))
    return result


def row(result):
    base, cand = result["baseline"], result["candidate"]
    ratios = [b / c for b, c in zip(base["seconds_per_repeat"], cand["seconds_per_repeat"])]
    phases = {k: round(v * 1e3) for k, v in cand["phase_seconds_this_rank"].items()}  # the last repeat's
    return (f"{result['speedup_vs_allreduce']:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})",
            f"{base['median_seconds']:.3f} s", f"{cand['median_seconds']:.3f} s", f"{result['bytes_vs_allreduce']:.3f}",
            f"{result['relative_error_vs_exact_mean']:.3f}", " ".join(f"{k} {v}" for k, v in sorted(phases.items())))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="2,4,8")
    ap.add_argument("--ranks-per-node", type=int, default=1)
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--numel", type=int, default=25_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", default="intsum,scatter,ring,allgather,sign")
    ap.add_argument("--scenarios", default="cluster", help="cluster (switched, one link per node) and/or hub "
                    "(one shared loopback, labelled)")
    ap.add_argument("--out", default="runs/bench-cluster")
    args = ap.parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"rate {args.rate} per node, {args.numel:,} coordinates, median of {args.repeats} (range over repeats), "
             "each row timed against fp32 MPI_Allreduce in the same job; phases: rank 0's ms in the last repeat "
             "(intsum's overlap: their sum exceeds the exchange's time)",
             "", "| scenario | nodes x ranks | config | speedup vs fp32 | fp32 allreduce | config | bytes vs fp32 "
             "| rel. error "
             "| rank 0 phases (ms) |", "|---|---|---|---|---|---|---|---|---|"]
    for scenario in args.scenarios.split(","):
        for nodes in [int(n) for n in args.nodes.split(",")]:
            for config in args.configs.split(","):
                cells = row(run(scenario, nodes, args.rate, args.numel, args.repeats, config, out,
                                per_node=args.ranks_per_node))
                lines.append(f"| {scenario} | {nodes}x{args.ranks_per_node} | {config} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    (out / f"table-{args.scenarios.replace(',', '-')}-{args.ranks_per_node}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
