"""Shared test helpers. Multi-rank tests live in tests/mpi (files mpi_*.py, collected only
when named explicitly) and are launched under mpiexec by tests/test_mpi_launch.py."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def root():
    return ROOT
