"""Overlap with backward under mpiexec; run by tests/test_mpi_launch.py.

Every rank runs every test in the same order, once per world size (tests/mpi/subworld.py); no test
skips on some ranks of its communicator only.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from overlap_cases import CASES, train_steps  # noqa: E402

from mpiqsgd.transport import MPITransport  # noqa: E402
from subworld import comm_fixture  # noqa: E402

comm = comm_fixture([2, 3, 4, 5])


@pytest.fixture(scope="module")
def t(comm):
    return MPITransport(comm)


def same_on_all_ranks(t, tensors):
    blobs = t.allgather_bytes(b"".join(x.numpy().tobytes() for x in tensors))
    return all(b == blobs[0] for b in blobs)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{'-'.join(map(str, c[2].values()))}")
def test_overlap_equals_same_bucketing_without_overlap(t, case):
    t.meter.reset()
    plain, sent_plain, _ = train_steps(t, case, overlap=False)
    t.meter.reset()
    overlapped, sent_overlapped, early = train_steps(t, case, overlap=True)
    assert sent_plain == sent_overlapped
    assert all(torch.equal(a, b) for a, b in zip(plain, overlapped))
    assert same_on_all_ranks(t, overlapped)
    assert early == 3 * (2 if case[1] == "alq" else 4)
