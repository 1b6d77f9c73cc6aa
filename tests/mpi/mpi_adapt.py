"""Adaptive levels agreed over MPI, on 2 and 3 ranks (tests/mpi/subworld.py); run under mpiexec by
tests/test_mpi_launch.py."""

import pytest
import torch

from mpiqsgd.codecs import make_codec
from mpiqsgd.errors import DecodeError
from mpiqsgd.exchange import GradientExchange
from mpiqsgd.transport import MPITransport
from subworld import comm_fixture

comm = comm_fixture([2, 3])


@pytest.fixture(scope="module")
def t(comm):
    return MPITransport(comm)


def rank_model(rank):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(200, 100), torch.nn.Linear(100, 50))
    g = torch.Generator().manual_seed(100 + rank)
    for p in model.parameters():  # each rank's gradient has its own scale and shape
        p.grad = torch.randn(p.shape, generator=g) * (1 + rank) + 0.1 * rank
    return model


def gather(t, data):
    return t.allgather_bytes(data)


@pytest.mark.parametrize("name", ["alq", "alq-n", "amq", "amq-n"])
@pytest.mark.parametrize("error_feedback", [False, True])
def test_levels_identical_on_all_ranks_after_an_update(t, name, error_feedback):
    model = rank_model(t.rank)
    codec = make_codec(name, bits=3, bucket=256, error_feedback=error_feedback)
    inner = getattr(codec, "inner", codec)
    before = inner.params["levels"]
    t.meter.reset()
    ex = GradientExchange(model.parameters(), t, codec, "allgather", adapt_at=(0,), adapt_every=0)
    ex.synchronize(0)
    after = inner.params["levels"]
    assert after != before  # the table moved away from the NUQ start
    tables = gather(t, after)
    assert all(tab == tables[0] for tab in tables)
    grads = gather(t, torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().tobytes())
    assert all(g == grads[0] for g in grads)
    adapt_bytes = t.meter.by_phase["adapt"]["bytes"]
    assert adapt_bytes > 0 and t.meter.by_phase["adapt"]["messages"] == t.size - 1
    assert not ex.adapts_at(1) and not ex.adapts_at(10000)


def test_message_with_an_old_table_is_refused(t):
    model = rank_model(t.rank)
    codec = make_codec("alq-n", bits=3, bucket=256)
    old = codec.encode(torch.randn(1000), torch.Generator().manual_seed(1))
    GradientExchange(model.parameters(), t, codec, "ring", adapt_at=(0,)).synchronize(0)
    with pytest.raises(DecodeError, match="table"):
        codec.decode(old)
