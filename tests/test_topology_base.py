"""The aggregation contract's helpers (mpiqsgd.topology.base): chunks, ordered means, reused send buffers."""


import pytest
import torch

from mpiqsgd.codecs import make_codec
from mpiqsgd.topology import chunk_bounds, make_aggregator, mean_of
from mpiqsgd.transport import LocalGroup


@pytest.mark.parametrize("topology", ["ps", "ring", "scatter", "allgather"])
def test_send_buffers_are_reused_from_step_to_step(topology):
    group = LocalGroup(3)
    transports = group.transports()
    aggs = [make_aggregator(topology, t, make_codec("qsgd"), seed=1) for t in transports]
    grads = [torch.randn(30_000, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    sizes = []
    for step in range(3):
        out = group.run(lambda t: aggs[t.rank].aggregate(grads[t.rank].clone(), step, stream=1), transports)
        assert all(torch.equal(out[0], o) for o in out)
        sizes.append([(len(a.buffers.slots), a.buffers.nbytes) for a in aggs])
    assert sizes[0] == sizes[1] == sizes[2] and all(n > 0 for n, _ in sizes[0])
    ids = {id(b) for a in aggs for b in a.buffers.slots.values()}
    group.run(lambda t: aggs[t.rank].aggregate(grads[t.rank].clone(), 3, stream=1), transports)
    assert ids == {id(b) for a in aggs for b in a.buffers.slots.values()}  # the same arrays, not new ones


def test_chunk_bounds():
    assert chunk_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert chunk_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    for n in range(1, 7):
        b = chunk_bounds(1001, n)
        assert b[0][0] == 0 and b[-1][1] == 1001 and all(b[i][1] == b[i + 1][0] for i in range(n - 1))


def test_mean_of_sums_in_order():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert torch.equal(mean_of([a, b]), torch.tensor([2.0, 4.0]))
    assert torch.equal(a, torch.tensor([1.0, 2.0]))  # inputs untouched
