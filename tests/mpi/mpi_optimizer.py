"""DistributedOptimizer under mpiexec: gradient accumulation; run by tests/test_mpi_launch.py.

Every rank runs every test in the same order, on 2 and 3 ranks (tests/mpi/subworld.py); no test
skips on some ranks of its communicator only.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mpi_overlap import same_on_all_ranks  # noqa: E402
from optimizer_cases import CASES, MODES, accumulate  # noqa: E402
from subworld import comm_fixture  # noqa: E402

from mpiqsgd.transport import MPITransport  # noqa: E402

comm = comm_fixture([2, 3])


@pytest.fixture(scope="module")
def t(comm):
    return MPITransport(comm)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{'-'.join(map(str, c[2].values()))}")
def test_accumulation_is_bit_identical_with_and_without_overlap_and_to_the_summed_gradient(t, case):
    results = {}
    for overlap in (False, True):
        for mode in MODES:
            t.meter.reset()
            results[(overlap, mode)] = accumulate(t, case, 3, overlap, mode)
    params, sent = results[(False, "summed")]
    for key, (other, other_sent) in results.items():
        assert all(torch.equal(a, b) for a, b in zip(params, other)), f"{key} differs"
        assert other_sent == sent > 0, f"{key} sent {other_sent} bytes, not {sent}"
    assert same_on_all_ranks(t, params)
