"""The in-process LocalGroup transport behind --simulate."""

import numba
import pytest
import torch

from mpiqsgd.codecs import make_codec
from mpiqsgd.machine import share_cpus
from mpiqsgd.topology import make_aggregator
from mpiqsgd.transport import LocalGroup


@pytest.mark.parametrize("topology", ["allreduce", "ps", "ring", "scatter", "allgather"])
def test_all_ranks_agree_and_bytes_match_the_formula(topology):
    group = LocalGroup(3)
    transports = group.transports()
    grads = [torch.randn(300_000, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    codec = make_codec("fp32" if topology == "allreduce" else "qsgd")  # large: kernels run in threads
    aggs = [make_aggregator(topology, t, codec, seed=2) for t in transports]
    out = group.run(lambda t: aggs[t.rank].aggregate(grads[t.rank].clone(), 0), transports)
    assert all(torch.equal(out[0], o) for o in out)
    assert [t.meter.sent()["bytes"] for t in transports] == [aggs[0].sent_nbytes(300_000, r) for r in range(3)]
    exact = torch.stack(grads).mean(0)
    assert float((out[0] - exact).norm() / exact.norm()) < (1e-6 if topology == "allreduce" else 4)


@pytest.mark.parametrize("topology,options", [("ps", {"downlink": "codec"}), ("ring", {}), ("scatter", {}),
                                              ("allgather", {})])
def test_variable_length_codec_agrees_and_is_counted(topology, options):
    group = LocalGroup(3)
    transports = group.transports()
    for t in transports:
        t.meter.keep_messages = True
    grads = [torch.randn(20_000, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    codec = make_codec("qsgd-elias", bits=2, bucket=256)
    aggs = [make_aggregator(topology, t, codec, seed=2, **options) for t in transports]
    out = group.run(lambda t: aggs[t.rank].aggregate(grads[t.rank].clone(), 0), transports)
    assert all(torch.equal(out[0], o) for o in out)
    assert aggs[0].sent_nbytes(20_000, 0) is None  # no formula: the length depends on the data
    dense = make_aggregator(topology, transports[0], make_codec("qsgd", bits=2, bucket=256), **options)
    for t in transports:
        sent = t.meter.sent()["bytes"]
        assert sent == sum(m.bytes for m in t.meter.messages if m.source == t.rank)
        assert 0 < sent < dense.sent_nbytes(20_000, t.rank) / 2  # the sparse code's saving


def test_failure_in_one_rank_releases_the_others():
    group = LocalGroup(3)

    def work(t):
        if t.rank == 2:
            raise ValueError("rank 2 broke")
        if t.rank == 0:
            t.recv(2, "never")
        t.barrier()

    with pytest.raises(ValueError, match="rank 2 broke"):
        group.run(work, group.transports())


def test_collectives():
    group = LocalGroup(3)
    out = group.run(lambda t: (t.allgather_bytes(bytes([t.rank])), t.bcast_bytes(b"x" * (t.rank + 1), root=1),
                               t.allreduce_sum(torch.full((2,), float(t.rank)))), group.transports())
    for gathered, bcast, total in out:
        assert gathered == [b"\x00", b"\x01", b"\x02"] and bcast == b"xx" and torch.equal(total, torch.full((2,), 3.0))


def test_share_cpus_divides_the_cores_among_local_ranks():
    before = numba.get_num_threads()
    try:
        assert share_cpus(10**6) == 1 and numba.get_num_threads() == 1
        assert share_cpus(1) >= 1
    finally:
        numba.set_num_threads(before)


def test_ps_with_encoded_downlink_stays_unbiased():
    # Uplink and downlink roundings must use independent uniforms, else they correlate.
    group = LocalGroup(1)
    t = group.transports()[0]
    agg = make_aggregator("ps", t, make_codec("qsgd", bits=2, bucket=64), downlink="codec")
    g = torch.tensor([0.3, -0.5, 0.1, 0.9] * 16)
    steps = 2000
    mean = sum(agg.aggregate(g.clone(), s).double() for s in range(steps)) / steps
    # per-coordinate variance of two 1-level roundings is at most 2 * (norm^2 / 4)
    stderr = (2 * float(g.norm()) ** 2 / 4 / steps) ** 0.5
    assert float((mean - g.double()).abs().max()) < 4.5 * stderr


@pytest.mark.parametrize("topology,options", [("ps", {}), ("ps", {"downlink": "codec"}), ("ring", {}),
                                              ("scatter", {}), ("allgather", {})])
def test_a_message_of_the_wrong_length_is_refused_not_averaged(topology, options):
    from mpiqsgd.errors import DecodeError

    group = LocalGroup(2)
    transports = group.transports()
    aggs = [make_aggregator(topology, t, make_codec("qsgd", bits=4), **options) for t in transports]
    with pytest.raises(DecodeError, match="numel|values"):
        group.run(lambda t: aggs[t.rank].aggregate(torch.ones(1000 if t.rank == 0 else 1), 0), transports)
