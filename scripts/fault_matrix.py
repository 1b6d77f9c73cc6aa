"""Fault matrix: signal one rank, or mpiexec itself, at a random moment of a small MPI training job.

For each (target, signal) pair, starts ``mpiexec -n RANKS python -m mpi4py -m mpiqsgd train
--model tiny --dataset synthetic ...`` in a fresh session, waits until rank 0 has written
``config.json`` plus a random delay, sends the signal to one rank (a random one) or to mpiexec,
then measures:

    seconds   from the signal until mpiexec exits ("hangs" past --timeout)
    exit      mpiexec's exit status (negative: killed by that signal)
    names     whether the output names the signalled rank: "rank" ("rank N"), "pid" (only its
              process id, as mpiexec's own report does), "no"; "-" for mpiexec
    orphans   processes of the job still alive 2 s after mpiexec ended

Only processes this script started are signalled, each by its id; a job that hangs is
killed (SIGCONT then SIGKILL to each of its processes) after --timeout. Prints a fixed-width
table (and JSON with --json)::

    python scripts/fault_matrix.py --ranks 4 --timeout 30 --seed 1
    python scripts/fault_matrix.py -- --comm-timeout 10     # extra flags for train
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIGNALS = ("SIGKILL", "SIGTERM", "SIGINT", "SIGSTOP")
TRAIN = ["train", "--model", "tiny", "--dataset", "synthetic", "--synthetic-size", "2000", "--epochs", "500",
         "--batch-size", "32", "--no-progress", "--threads", "1", "--checkpoint-every", "20"]


def _children():
    """{pid: parent pid} of every process visible in /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def descendants(pid):
    """The processes below ``pid`` (children, their children, ...)."""
    parents = _children()
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parents.items() if parent in frontier]
        found += kids
        frontier = kids
    return found


def rank_of(pid):
    """The MPI rank of ``pid`` from its environment (MPICH's PMI_RANK, Open MPI's), or None."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        for key in (b"PMI_RANK=", b"OMPI_COMM_WORLD_RANK="):
            if item.startswith(key):
                return int(item[len(key):])
    return None


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def one_case(target, signame, args, rng, work):
    run_dir = work / f"{target}-{signame}"
    cmd = [shutil.which("mpiexec") or "mpiexec", "-n", str(args.ranks), sys.executable, "-m", "mpi4py", "-m",
           "mpiqsgd", *TRAIN, "--run-dir", str(run_dir), *args.train_args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    log = open(work / f"{target}-{signame}.log", "w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started = time.perf_counter()
    while not (run_dir / "config.json").exists() and proc.poll() is None and time.perf_counter() - started < 120:
        time.sleep(0.05)
    time.sleep(rng.uniform(0, args.latest))
    job = descendants(proc.pid)
    ranks = {rank_of(p): p for p in job if rank_of(p) is not None}
    row = {"target": target, "signal": signame, "at_seconds": round(time.perf_counter() - started, 1)}
    if proc.poll() is not None or len(ranks) < args.ranks:
        row.update(seconds="no job", exit=proc.poll(), names="-", orphans="-")
        return row
    rank = rng.randrange(args.ranks)
    victim = proc.pid if target == "mpiexec" else ranks[rank]
    row["target"] = "mpiexec" if target == "mpiexec" else f"rank {rank}"
    row["pid"] = victim
    os.kill(victim, getattr(signal, signame))
    sent = time.perf_counter()
    try:
        proc.wait(timeout=args.timeout)
        row["seconds"] = round(time.perf_counter() - sent, 2)
    except subprocess.TimeoutExpired:
        row["seconds"] = f"hangs (>{args.timeout:g} s)"
    row["exit"] = proc.poll()
    time.sleep(2)
    row["orphans"] = sum(alive(p) for p in job) if row["exit"] is not None else "-"
    for pid in [proc.pid, *job]:  # ours only, each by its id: a stopped one needs SIGCONT to die cleanly
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    proc.wait()
    if row["exit"] is None:
        row["exit"] = "-"
    log.seek(0)
    out = log.read()
    log.close()
    row["names"] = ("-" if target == "mpiexec" else "rank" if re.search(rf"\brank {rank}\b", out)
                    else "pid" if re.search(rf"\b{victim}\b", out) else "no")
    row["last_line"] = next((line for line in reversed(out.splitlines()) if line.strip()), "")[:100]
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before a job counts as hung (default 30)")
    p.add_argument("--latest", type=float, default=4.0, help="signal up to this many seconds after start-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--signals", default=",".join(SIGNALS))
    p.add_argument("--targets", default="rank,mpiexec")
    p.add_argument("--json", action="store_true")
    p.add_argument("--logs", help="keep each job's output and run directory here (default: a temporary directory)")
    p.add_argument("train_args", nargs="*", help="extra flags for mpiqsgd train (after --)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fault-matrix-") as tmp:
        work = Path(args.logs or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for target in args.targets.split(","):
            for signame in args.signals.split(","):
                rows.append(one_case(target, signame, args, rng, work))
                print(f"# {rows[-1]}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'target':<8} {'signal':<8} {'at s':>5} {'ends after s':>15} {'exit':>5} {'names rank':>10} "
          f"{'orphans':>7}  last line")
    for r in rows:
        print(f"{r['target']:<8} {r['signal']:<8} {r['at_seconds']:>5} {str(r['seconds']):>15} {str(r['exit']):>5} "
              f"{r['names']:>10} {str(r['orphans']):>7}  {r.get('last_line', '')}")


if __name__ == "__main__":
    main()
