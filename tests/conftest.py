"""Shared test helpers. Multi-rank tests live in tests/mpi (files mpi_*.py, collected only
when named explicitly) and are launched under mpiexec by tests/test_mpi_launch.py."""

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def vec(n, seed=0, dist="normal"):
    """A seeded test vector: ``normal``, ``heavy`` (normal cubed) or shifted uniform."""
    g = torch.Generator().manual_seed(seed)
    if dist == "normal":
        return torch.randn(n, generator=g)
    if dist == "heavy":
        return torch.randn(n, generator=g) ** 3
    return torch.rand(n, generator=g) - 0.3


def varint(value):
    """An unsigned LEB128 varint: how the entropy stream writes its counts."""
    out = bytearray()
    while value >= 128:
        out.append(value & 127 | 128)
        value >>= 7
    return bytes(out + bytes([value]))
