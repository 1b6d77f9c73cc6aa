"""Launch the multi-rank tests under real mpiexec, once per world size, under a timeout."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

MPIEXEC = shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec on PATH (pip install mpich)")


def launch(n, *args, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [MPIEXEC, "-n", str(n), sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_topologies_under_mpiexec(n):
    proc = launch(n, "-m", "mpi4py", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                  "tests/mpi/mpi_topologies.py")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert out.count(" passed") >= n, out[-3000:]
    assert " failed" not in out
