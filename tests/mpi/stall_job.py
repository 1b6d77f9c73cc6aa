"""A job whose rank 1 stops (SIGSTOP) in the middle of an exchange.

Run as ``mpiexec -n N python tests/mpi/stall_job.py TIMEOUT``: the other ranks must give up
after TIMEOUT seconds, name rank 1 and the phase, and end the job (they would hang forever
without the deadline).
"""

import os
import signal
import sys

import torch

from mpiqsgd import cli
from mpiqsgd.codecs import make_codec
from mpiqsgd.topology import make_aggregator
from mpiqsgd.transport import world


def stalling(args):
    t = world(comm_timeout=float(sys.argv[1]))
    agg = make_aggregator("ring", t, make_codec("qsgd", bits=4))
    for step in range(1, 6):
        if step == 3 and t.rank == 1:
            os.kill(os.getpid(), signal.SIGSTOP)
        agg.aggregate(torch.ones(10000), step)


cli.run_bench_codec = stalling
sys.exit(cli.main(["bench", "codec"]))
