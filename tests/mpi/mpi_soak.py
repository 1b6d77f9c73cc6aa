"""Many ranks on few cores: every topology, overlapped buckets, no deadlock, identical replicas.

    mpiexec -n 16 python -m mpi4py tests/mpi/mpi_soak.py [STEPS]

Prints one line per topology; exits non-zero if replicas differ (run by tests/test_mpi_launch.py
under a timeout).
"""

import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from overlap_cases import train_steps  # noqa: E402

from mpiqsgd.transport import world  # noqa: E402

SOAK = [("allreduce", "fp32", {}, {}), ("ps", "qsgd", {"bits": 4}, {"downlink": "codec"}),
        ("ring", "qsgd", {"bits": 4}, {}), ("scatter", "qsgd", {"bits": 4}, {}),
        ("allgather", "sign", {"error_feedback": True}, {})]


def main():
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    t = world()
    for case in SOAK:
        t.meter.reset()
        start = time.perf_counter()
        params, _, _ = train_steps(t, case, overlap=True, steps=steps, bucket_mb=0.006)  # 2 buckets
        blobs = t.allgather_bytes(b"".join(p.numpy().tobytes() for p in params))
        same = all(b == blobs[0] for b in blobs)
        if t.rank == 0:
            print(f"soak {case[0]:9s} {steps} steps on {t.size} ranks: {time.perf_counter() - start:.1f} s, "
                  f"replicas {'identical' if same else 'DIFFER'}", flush=True)
        if not same:
            raise SystemExit(f"replicas differ after {case[0]}")


if __name__ == "__main__":
    main()
