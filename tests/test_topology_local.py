"""Topologies on a one-rank communicator (MPI.COMM_SELF), in the test process."""

import pytest
import torch

from mpiqsgd.codecs import make_codec, make_generator
from mpiqsgd.errors import ConfigError
from mpiqsgd.topology import TOPOLOGIES, chunk_bounds, make_aggregator, mean_of
from mpiqsgd.transport import MPITransport


@pytest.fixture(scope="module")
def t():
    from mpi4py import MPI
    return MPITransport(MPI.COMM_SELF)


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


def test_one_rank_stochastic_is_seeded_by_seed_rank_and_step(t):
    x = torch.randn(1001)
    codec = make_codec("qsgd")
    out = make_aggregator("allgather", t, codec, seed=5).aggregate(x.clone(), step=9)
    assert torch.equal(out, codec.decode(codec.encode(x, make_generator(5, 0, 9))))


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


def test_bench_step_times_the_step_against_compute_alone():
    from mpiqsgd.bench import bench_step
    from mpiqsgd.transport import LocalGroup

    group = LocalGroup(2)
    results = group.run(lambda t: bench_step(t, "tiny", make_codec("qsgd", bits=4), "scatter", batch_size=4,
                                             repeats=2, warmup=1, bucket_mb=0.01, overlap=True), group.transports())
    r = results[0]
    assert r["n_ranks"] == 2 and r["n_buckets"] > 1 and r["overlap"]
    assert len(r["step_seconds_per_repeat"]) == len(r["compute_seconds_per_repeat"]) == 2
    assert r["overhead_seconds"] == pytest.approx(r["step_seconds"] - r["compute_seconds"])
    assert r["bytes_per_step_per_rank"] > 0 and "encode" in r["phase_seconds_per_step"]
