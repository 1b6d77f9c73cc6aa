"""``allreduce`` (mpiqsgd.topology.allreduce): the fp32 baseline. Under mpiexec: tests/mpi/mpi_topologies.py."""

import pytest
import torch

from conftest import vec
from mpiqsgd.codecs import make_codec
from mpiqsgd.errors import ConfigError
from mpiqsgd.topology import make_aggregator
from mpiqsgd.transport import LocalGroup, allreduce_nbytes, sum_of


def test_the_mean_is_the_sum_over_n_counted_as_one_nominal_allreduce():
    group = LocalGroup(4)
    transports = group.transports(keep_messages=True)
    grads = [vec(1001, seed=r) for r in range(4)]
    aggs = [make_aggregator("allreduce", t, make_codec("fp32")) for t in transports]
    out = group.run(lambda t: aggs[t.rank].aggregate(grads[t.rank].clone(), 0), transports)
    expected = sum_of(grads) / 4  # a simulated allreduce sums in rank order
    assert all(torch.equal(o, expected) for o in out)
    for t in transports:
        (m,) = t.meter.messages
        assert (m.phase, m.dest, m.bytes, m.fp32_bytes) == ("allreduce", -1, 6006, 6006)
        assert m.bytes == allreduce_nbytes(1001, 4) == aggs[t.rank].sent_nbytes(1001, t.rank)


def test_refuses_a_codec_other_than_fp32():
    (t,) = LocalGroup(1).transports()
    with pytest.raises(ConfigError, match="topology 'allreduce' sends plain fp32"):
        make_aggregator("allreduce", t, make_codec("fp16"))
