"""Is the emulated cluster a switch? Rates of point-to-point flows, alone and at once.

    python -m mpiqsgd cluster run --nodes 4 --rate 1gbit -- python scripts/cluster_check.py [MB] [--json]

Needs 4 ranks, one per node. Each pattern sends MB megabytes (default 25) per flow, all
flows of a pattern at once after a barrier; a flow's rate is its bytes over the time its
receiver took (median of 3). On a switch with RATE per node and direction:

    pair       0->1              one flow: RATE
    two pairs  0->1, 2->3        disjoint links: RATE each (a hub would give RATE/2)
    fan-out    0->1, 0->2        node 0's upload shared: RATE/2 each
    incast     1->0, 2->0        node 0's download shared: RATE/2 each

Rank 0 prints one line per flow (or one JSON object with --json).
"""

import json
import statistics
import sys

import numpy as np
from mpi4py import MPI

PATTERNS = {"pair": [(0, 1)], "two pairs": [(0, 1), (2, 3)], "fan-out": [(0, 1), (0, 2)],
            "incast": [(1, 0), (2, 0)]}


def flow_seconds(comm, flows, buf, out):
    """Seconds each receiver of ``flows`` waited, on every rank (the receivers' numbers)."""
    comm.Barrier()
    start = MPI.Wtime()
    reqs, mine = [], []
    for i, (src, dst) in enumerate(flows):
        if comm.rank == src:
            reqs.append(comm.Isend([buf, MPI.BYTE], dst, tag=i))
        if comm.rank == dst:
            mine.append((i, comm.Irecv([out[i], MPI.BYTE], src, tag=i)))
    times = np.zeros(len(flows))
    for i, req in mine:
        req.Wait()
        times[i] = MPI.Wtime() - start
    MPI.Request.Waitall(reqs)
    total = np.zeros_like(times)
    comm.Allreduce(times, total)  # one receiver per flow: the sum is its time
    return total


def main():
    comm = MPI.COMM_WORLD
    n_bytes = int(float(next((a for a in sys.argv[1:] if not a.startswith("-")), 25)) * 1e6)
    if comm.size != 4:
        if comm.rank == 0:
            print(f"cluster_check needs 4 ranks (one per node); got {comm.size}", file=sys.stderr)
        return 2
    buf = np.ones(n_bytes, dtype=np.uint8)
    out = [np.empty(n_bytes, dtype=np.uint8) for _ in range(2)]
    names = comm.allgather(MPI.Get_processor_name())
    flow_seconds(comm, PATTERNS["pair"], buf, out)  # warm-up: connections
    rows = []
    for name, flows in PATTERNS.items():
        runs = [flow_seconds(comm, flows, buf, out) for _ in range(3)]
        for i, (src, dst) in enumerate(flows):
            s = statistics.median(r[i] for r in runs)
            rows.append({"pattern": name, "flow": f"{src}->{dst}", "bytes": n_bytes, "seconds": s,
                         "Gbit_per_s": n_bytes * 8 / s / 1e9,
                         "hosts": f"{names[src]}->{names[dst]}"})
    if comm.rank == 0:
        if "--json" in sys.argv:
            print(json.dumps(rows))
        else:
            for r in rows:
                print(f"{r['pattern']:<10} {r['flow']} ({r['hosts']}): {r['Gbit_per_s']:6.3f} Gbit/s "
                      f"({r['seconds'] * 1e3:.0f} ms for {r['bytes'] / 1e6:g} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
