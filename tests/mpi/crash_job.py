"""A job whose rank 1 fails while the other ranks wait for it.

Run as ``mpiexec -n N python tests/mpi/crash_job.py KIND`` (no ``-m mpi4py``): the
``mpiqsgd`` entry point must abort the whole job instead of hanging. KIND is
``error`` (an mpiqsgd error) or ``crash`` (any other exception).
"""

import sys

from mpiqsgd import cli
from mpiqsgd.errors import MpiqsgdError
from mpiqsgd.transport import world


def failing(args):
    t = world()
    if t.rank == 1:
        if sys.argv[1] == "error":
            raise MpiqsgdError("deliberate failure on rank 1")
        raise RuntimeError("deliberate crash on rank 1")
    t.recv(1, "never-sent")  # would wait forever without the abort


cli.run_bench_codec = failing
sys.exit(cli.main(["bench", "codec"]))
