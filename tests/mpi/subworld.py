"""Several world sizes in one job: a module's ``comm`` fixture is the communicator of the first k
ranks of ``COMM_WORLD``, once for each k the module names.

    comm = comm_fixture([2, 3, 4, 5])   # in a tests/mpi module; its ``t`` fixture takes ``comm``

Launched on ``max(sizes)`` ranks, each test runs once per size (its id says ``k-ranks``) on the
first k ranks; the other ranks skip it. They take no part in that communicator, so the skip is a
decision no participating rank waits on. A size beyond the job's ranks skips on every rank. One job
instead of one per size: python, torch and MPI start once per rank, not once per rank and size.
"""

import functools

import pytest

__all__ = ["comm_fixture", "OUTSIDE", "TOO_FEW"]

OUTSIDE = "is outside the first"  # skip reasons, which the launcher (tests/test_mpi_launch.py) reads
TOO_FEW = "ranks; the job has"


@functools.lru_cache(maxsize=None)
def _splits():
    """Every prefix communicator, made once by all ranks together at the first test."""
    from mpi4py import MPI

    from mpiqsgd.transport import MPITransport

    world = MPI.COMM_WORLD
    MPITransport(world).barrier()  # a polled barrier: ranks meet here, not spinning in the blocking Split
    return {k: world.Split(0 if world.rank < k else MPI.UNDEFINED, world.rank) for k in range(1, world.size + 1)}


def comm_fixture(sizes):
    """A module-scoped fixture giving the communicator of the first k ranks, for each k in ``sizes``."""

    @pytest.fixture(scope="module", params=sizes, ids=lambda k: f"{k}-ranks")
    def comm(request):
        from mpi4py import MPI

        k, world = request.param, MPI.COMM_WORLD
        if k > world.size:
            pytest.skip(f"needs {k} {TOO_FEW} {world.size}")
        sub = _splits()[k]
        if sub == MPI.COMM_NULL:
            pytest.skip(f"rank {world.rank} {OUTSIDE} {k} ranks")
        return sub

    return comm
