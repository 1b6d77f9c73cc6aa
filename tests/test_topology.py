"""Every topology (mpiqsgd.topology: the registry and make_aggregator): on a one-rank communicator
(MPI.COMM_SELF) and in simulation (LocalGroup), in the test process. One file a topology beside it
(test_topology_<name>.py); under mpiexec: tests/mpi/mpi_topologies.py."""

import pytest
import torch

from mpiqsgd.codecs import make_codec
from mpiqsgd.errors import ConfigError
from mpiqsgd.topology import TOPOLOGIES, make_aggregator
from mpiqsgd.transport import LocalGroup


@pytest.mark.parametrize("name", sorted(set(TOPOLOGIES) - {"intsum"}))  # intsum sums QSGD levels only
def test_one_rank_fp32_is_identity_and_sends_nothing(t, name):
    x = torch.randn(1001)
    agg = make_aggregator(name, t, make_codec("fp32"))
    t.meter.reset()
    assert torch.equal(agg.aggregate(x.clone(), step=0), x)
    assert t.meter.sent()["bytes"] == 0 == agg.sent_nbytes(1001, 0)


@pytest.mark.parametrize("name", ["ps", "ring", "allgather", "intsum"])
def test_one_rank_quantized_is_the_codec_round_trip(t, name):
    x = torch.randn(1001)
    codec = make_codec("qsgd", rounding="nearest")
    out = make_aggregator(name, t, codec).aggregate(x.clone(), step=0)
    assert torch.equal(out, codec.decode(codec.encode(x)))


@pytest.mark.parametrize("call,match", [
    (lambda t: make_aggregator("tree", t, make_codec("fp32")), "allreduce, ps, ring, scatter, allgather"),
    (lambda t: make_aggregator("allreduce", t, make_codec("qsgd")), "sends plain fp32"),
    (lambda t: make_aggregator("ring", t, make_codec("qsgd"), downlink="codec"), "ps takes downlink"),
    (lambda t: make_aggregator("ps", t, make_codec("qsgd"), downlink="int8"), "downlink must be"),
    (lambda t: make_aggregator("ps", t, make_codec("qsgd"), server_error_feedback=True), "needs downlink='codec'"),
    (lambda t: make_aggregator("ps", t, make_codec("qsgd"), dedicated=True), "at least 2 ranks"),
    (lambda t: make_aggregator("ring", t, make_codec("qsgd")).aggregate(torch.zeros(3, 3), 0), "1-D float32"),
    (lambda t: make_aggregator("ring", t, make_codec("qsgd")).aggregate(torch.zeros(3, dtype=torch.float64), 0),
     "1-D float32"),
])
def test_bad_input(t, call, match):
    with pytest.raises(ConfigError, match=match):
        call(t)


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


@pytest.mark.parametrize("topology,options", [("ps", {}), ("ps", {"downlink": "codec"}), ("ring", {}),
                                              ("scatter", {}), ("allgather", {})])
def test_a_message_of_the_wrong_length_is_refused_not_averaged(topology, options):
    from mpiqsgd.errors import DecodeError

    group = LocalGroup(2)
    transports = group.transports()
    aggs = [make_aggregator(topology, t, make_codec("qsgd", bits=4), **options) for t in transports]
    with pytest.raises(DecodeError, match="numel|values"):
        group.run(lambda t: aggs[t.rank].aggregate(torch.ones(1000 if t.rank == 0 else 1), 0), transports)
