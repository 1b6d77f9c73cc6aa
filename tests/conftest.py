"""Shared test helpers. Multi-rank tests live in tests/mpi (files mpi_*.py, collected only
when named explicitly) and are launched under mpiexec by tests/test_mpi_launch.py."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
