"""Run a command and sample the resident memory of its process tree; print the curve's slope.

    python scripts/soak_rss.py [--every 2] -- mpiqsgd train --simulate 8 --model tiny ...

Samples the summed VmRSS of the command and its descendants every ``--every`` seconds,
then prints the first and last sample after warm-up (the first fifth of the run) and the
least-squares slope in MiB per minute. Exits with the command's exit status.
"""

import argparse
import os
import subprocess
import sys
import time

import numpy as np


def tree_rss_mib(pid):
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    tree, frontier = {pid}, [pid]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier and p not in tree]
        tree.update(frontier)
    total = 0
    for p in tree:
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return total / 1024


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--every", type=float, default=2.0)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    samples = []
    while proc.poll() is None:
        samples.append((time.perf_counter() - start, tree_rss_mib(proc.pid)))
        time.sleep(args.every)
    samples = [s for s in samples if s[1] > 0]
    if len(samples) >= 5:
        steady = samples[len(samples) // 5:]
        t, rss = np.array(steady).T
        slope = np.polyfit(t / 60, rss, 1)[0]
        print(f"rss: {len(samples)} samples over {samples[-1][0]:.0f} s; after warm-up {rss[0]:.0f} -> "
              f"{rss[-1]:.0f} MiB (peak {max(s[1] for s in samples):.0f}), slope {slope:+.2f} MiB/min",
              file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
