"""Shared test helpers. Multi-rank tests live in tests/mpi (files mpi_*.py, collected only
when named explicitly) and are launched under mpiexec by tests/test_mpi_launch.py.

Every launched job goes through :func:`mpi_run`, that is through ``mpiqsgd.launch`` (the
MPI it finds, root and oversubscription flags as that MPI needs them), so the same tests
run under MPICH, Open MPI 4/5 and Intel MPI with no environment to set. Such tests carry
:func:`mpiexec_marks` (or :func:`launches_jobs`): ``pytest -m mpiexec`` runs only them. With
``MPIQSGD_TEST_MPI=openmpi`` (or ``mpich``, ``intel``) they fail, instead of skipping, unless
that MPI is the one found.

The suite runs on parallel workers (``-n auto`` in ``pyproject.toml``, pytest-xdist), one test
at a time each (``--maxschedchunk 1``): tests marked ``slow`` are collected first, so that the
longest start at once and the workers finish together. Torch runs one intra-op thread in the
tests (:func:`pytest_configure`): the workers and the ranks of launched jobs share the cores,
and OpenMP threads that outnumber cores spin while they wait. ``-n 0`` runs the suite in one
process."""

import functools
import os
import subprocess
from pathlib import Path

import pytest
import torch

from mpiqsgd.launch import LaunchError, job_command, launched_world, mpiexec_info

ROOT = Path(__file__).resolve().parent.parent
REQUIRED_MPI = os.environ.get("MPIQSGD_TEST_MPI")  # set by a CI leg that must run under that MPI


def pytest_configure(config):
    torch.set_num_threads(1)


_EXIT_STATUS = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """A pytest in the ranks of an mpiexec job (the files of tests/mpi) ends, once it has said everything,
    as the command line does (:func:`mpiqsgd.transport.exit_now`): without the interpreter's teardown,
    about 2 s of CPU a rank."""
    if _EXIT_STATUS and launched_world(os.environ) is not None:
        from mpiqsgd.transport import exit_now
        exit_now(_EXIT_STATUS[-1])


def pytest_collection_modifyitems(config, items):
    """The ``slow`` tests first, longest first by the seconds a mark gives (``slow(150)``; 10 by default),
    then every other test in file order."""
    def seconds(item):
        mark = item.get_closest_marker("slow")
        return 0 if mark is None else mark.args[0] if mark.args else 10
    items.sort(key=lambda item: -seconds(item))


@functools.lru_cache(maxsize=None)
def site_mpi():
    """The :class:`mpiqsgd.launch.MPIInfo` that ``mpiqsgd launch`` would use here, or None."""
    try:
        return mpiexec_info()
    except LaunchError:
        return None


def check_site_mpi():
    """The MPI found, after failing the test where ``MPIQSGD_TEST_MPI`` names another (or there is none)."""
    mpi = site_mpi()
    if REQUIRED_MPI:
        found = f"{mpi.implementation} {mpi.version} ({mpi.path})" if mpi else "no mpiexec"
        assert mpi is not None and mpi.implementation == REQUIRED_MPI, \
            f"MPIQSGD_TEST_MPI={REQUIRED_MPI} but mpiqsgd.launch found {found}"
    return mpi


def mpiexec_marks():
    """Marks of a test that launches jobs: ``mpiexec``, and a skip where no MPI is found (unless one is required)."""
    return [pytest.mark.mpiexec, pytest.mark.skipif(not REQUIRED_MPI and site_mpi() is None,
                                                    reason="no mpiexec found (pip install mpich, or a site MPI)")]


def launches_jobs(test):
    """Decorator form of :func:`mpiexec_marks` for a single test."""
    for mark in mpiexec_marks():
        test = mark(test)
    return test


def _job(n, argv, contexts=()):
    """The mpiexec argv of ``n`` ranks of ``argv`` (and ``contexts``), and its environment."""
    launch = job_command(n, argv, check_site_mpi(), contexts)
    return launch.argv, dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def mpi_run(n, argv, timeout, contexts=()):
    """Run ``argv`` on ``n`` ranks (and ``contexts``, ``[(n, argv)]`` for MPMD) from the repository root."""
    command, env = _job(n, argv, contexts)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def mpi_start(n, argv):
    """Start ``argv`` on ``n`` ranks as :func:`mpi_run` does, without waiting, in a session (and process
    group) of its own, as a terminal's Ctrl-C or a batch system's signal would reach it."""
    command, env = _job(n, argv)
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.fixture(scope="module")
def t():
    """A transport over ``MPI.COMM_SELF``: a one-rank job in the test process (tests taking ``t``)."""
    from mpi4py import MPI

    from mpiqsgd.transport import MPITransport
    return MPITransport(MPI.COMM_SELF)


def vec(n, seed=0, dist="normal"):
    """A seeded test vector: ``normal``, ``heavy`` (normal cubed) or shifted uniform."""
    g = torch.Generator().manual_seed(seed)
    if dist == "normal":
        return torch.randn(n, generator=g)
    if dist == "heavy":
        return torch.randn(n, generator=g) ** 3
    return torch.rand(n, generator=g) - 0.3


def draws(codec, x, t):
    """``t`` decoded encodings of ``x`` (float64 rows), with the seeds ``(7, 0, i)``: samples of a stochastic codec."""
    from mpiqsgd.codecs import make_generator
    return torch.stack([codec.decode(codec.encode(x, make_generator(7, 0, i))) for i in range(t)]).double()


def shared_norms(xs, bucket, norm="l2"):
    """The largest of every rank's bucket norms: the scales all ranks of the decode-free allreduce share."""
    from mpiqsgd.codecs.buckets import bucket_norms
    return torch.stack([bucket_norms(x, bucket, norm) for x in xs]).max(0).values


def varint(value):
    """An unsigned LEB128 varint: how the entropy stream writes its counts."""
    out = bytearray()
    while value >= 128:
        out.append(value & 127 | 128)
        value >>= 7
    return bytes(out + bytes([value]))
