"""Many ranks on few cores: every topology, overlapped buckets, no deadlock, identical replicas.

    mpiexec -n 16 python -m mpi4py tests/mpi/mpi_soak.py [STEPS]

Prints one line per topology (seconds, whether replicas are identical, and the largest
resident set of a rank at the start and at the end with its slope over the run, from
/proc/self/statm every 10% of the steps); exits non-zero if replicas differ. Run by
tests/test_mpi_launch.py under a timeout, which bounds each slope.
"""

import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from overlap_cases import train_steps  # noqa: E402

from mpiqsgd.transport import exit_now, world  # noqa: E402

SOAK = [("allreduce", "fp32", {}, {}), ("ps", "qsgd", {"bits": 4}, {"downlink": "codec"}),
        ("ring", "qsgd", {"bits": 4}, {}), ("scatter", "qsgd", {"bits": 4}, {}),
        ("allgather", "sign", {"error_feedback": True}, {})]


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main():
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    t = world()
    chunk = max(1, steps // 10)
    for case in SOAK:
        t.meter.reset()
        start = time.perf_counter()
        samples = []

        def sample(i):
            if (i + 1) % chunk == 0:
                samples.append((i + 1, rss_mib()))

        params, _, _ = train_steps(t, case, overlap=True, steps=steps, bucket_mb=0.006, on_step=sample)  # 2 buckets
        blobs = t.allgather_bytes(b"".join(p.numpy().tobytes() for p in params))
        same = all(b == blobs[0] for b in blobs)
        rss = np.array([np.frombuffer(b, np.float64) for b in
                        t.allgather_bytes(np.array([s[1] for s in samples], np.float64).tobytes())])
        peak = rss.max(axis=0)  # the largest rank at each sample
        slope = np.polyfit([s[0] for s in samples], peak, 1)[0] * 1000 if len(samples) > 1 else 0.0
        if t.rank == 0:
            print(f"soak {case[0]:9s} {steps} steps on {t.size} ranks: {time.perf_counter() - start:.1f} s, "
                  f"replicas {'identical' if same else 'DIFFER'}, largest RSS {peak[0]:.0f} -> {peak[-1]:.0f} MiB "
                  f"({slope:+.1f} MiB per 1000 steps)", flush=True)
        if not same:
            raise SystemExit(f"replicas differ after {case[0]}")


if __name__ == "__main__":
    main()
    exit_now(0)  # as the command line ends: without the interpreter's teardown (a second of CPU a rank)
