"""Multi-rank tests of the topologies; run under mpiexec by tests/test_mpi_launch.py.

Every rank runs every test in the same order, once per world size (tests/mpi/subworld.py); no test
skips on some ranks of its communicator only.
"""

import numpy as np
import pytest
import torch

from mpiqsgd.codecs import make_codec, summable
from mpiqsgd.codecs.buckets import bucket_norms
from mpiqsgd.meter import Meter
from mpiqsgd.topology import make_aggregator
from mpiqsgd.transport import LocalGroup, MPITransport
from subworld import comm_fixture

comm = comm_fixture([1, 2, 3, 4, 5])
NUMELS = [1, 3, 1000, 4099]


@pytest.fixture(scope="module")
def t(comm):
    transport = MPITransport(comm)
    transport.meter = Meter(transport.rank, keep_messages=True)
    return transport


def grads(n, numel, step=0):
    return [torch.randn(numel, generator=torch.Generator().manual_seed(1000 * step + r)) * (r + 1)
            for r in range(n)]


def same_on_all_ranks(t, tensor):
    blobs = t.allgather_bytes(tensor.numpy().tobytes())
    return all(b == blobs[0] for b in blobs)


FP32_CONFIGS = [("allreduce", {}), ("ps", {}), ("ps", {"downlink": "codec"}), ("ring", {}), ("scatter", {}),
                ("allgather", {})]


@pytest.mark.parametrize("topology,options", FP32_CONFIGS)
@pytest.mark.parametrize("numel", NUMELS)
def test_fp32_equals_exact_mean(t, topology, options, numel):
    g = grads(t.size, numel)
    agg = make_aggregator(topology, t, make_codec("fp32"), **options)
    out = agg.aggregate(g[t.rank].clone(), step=0)
    exact = torch.stack([x.double() for x in g]).mean(0)
    assert out.dtype == torch.float32 and out.shape == (numel,)
    assert torch.allclose(out.double(), exact, rtol=1e-6, atol=1e-6)
    assert same_on_all_ranks(t, out)


QUANTIZED = [
    ("ps", "qsgd", {}, {}),
    ("ps", "qsgd", {}, {"downlink": "codec"}),
    ("ps", "qsgd", {"bits": 8, "error_feedback": True}, {"downlink": "codec", "server_error_feedback": True}),
    ("ps", "qsgd", {"rounding": "nearest", "error_feedback": True},
     {"downlink": "codec", "server_error_feedback": True}),
    ("ps", "sign", {"error_feedback": True}, {"dedicated": True}),
    ("ring", "qsgd", {"bits": 2, "bucket": 128}, {}),
    ("ring", "qsgd-inf", {"rounding": "nearest"}, {}),
    ("ring", "sign", {"error_feedback": True}, {}),
    ("scatter", "qsgd", {"bits": 3}, {}),
    ("scatter", "sign", {"error_feedback": True}, {}),
    ("scatter", "qsgd", {"bits": 4, "bucket": 128}, {"piece_numel": 700}),
    ("scatter", "sign", {"error_feedback": True, "bucket": 100}, {"piece_numel": 900}),
    ("allgather", "qsgd", {"bits": 3}, {}),
    ("allgather", "fp16", {}, {}),
    ("intsum", "qsgd", {}, {}),
    ("intsum", "qsgd", {"bits": 2, "bucket": 128}, {"piece_numel": 1000}),
    ("intsum", "qsgd-inf", {"rounding": "nearest", "error_feedback": True}, {}),
]


def make(t, topology, codec, params, options):
    if options.get("dedicated") and t.size < 2:
        options = {}  # same decision on every rank: it depends only on the world size
    return make_aggregator(topology, t, make_codec(codec, **params), seed=3, **options)


@pytest.mark.parametrize("topology,codec,params,options", QUANTIZED)
@pytest.mark.parametrize("numel", NUMELS)
def test_quantized_results_are_bit_identical_on_all_ranks(t, topology, codec, params, options, numel):
    agg = make(t, topology, codec, params, options)
    for step in range(3):
        out = agg.aggregate(grads(t.size, numel, step)[t.rank].clone(), step=step)
        assert out.shape == (numel,) and bool(torch.isfinite(out).all())
        assert same_on_all_ranks(t, out)


@pytest.mark.parametrize("topology,codec,params,options", QUANTIZED)
def test_quantized_mean_converges_to_exact_mean(t, topology, codec, params, options):
    # Unbiased codecs, and biased ones with error feedback, average to the exact mean over steps.
    numel, steps = 5000, 16
    agg = make(t, topology, codec, params, options)
    g = grads(t.size, numel)
    workers = range(1, t.size) if getattr(agg, "dedicated", False) else range(t.size)
    exact = torch.stack([g[r].double() for r in workers]).mean(0)
    one = agg.aggregate(g[t.rank].clone(), step=0).double()
    avg = one.clone()
    for step in range(1, steps):
        avg += agg.aggregate(g[t.rank].clone(), step=step).double()
    avg /= steps
    err_one = float((one - exact).norm() / exact.norm())
    err_avg = float((avg - exact).norm() / exact.norm())
    if agg.codec.stochastic or params.get("error_feedback"):
        # independent errors shrink like 1/sqrt(steps) = 0.25; error feedback cancels faster
        assert err_avg < 0.45 * err_one
    else:  # deterministic without feedback: every step is the same, and close
        assert err_avg == pytest.approx(err_one) and err_one < 0.3


@pytest.mark.parametrize("codec,params", [("qsgd", {}), ("qsgd", {"bits": 2, "bucket": 64}), ("fp32", {})])
def test_ps_and_allgather_agree_given_the_same_payloads(t, codec, params):
    g = grads(t.size, 3001)
    ps = make_aggregator("ps", t, make_codec(codec, **params), seed=11).aggregate(g[t.rank].clone(), step=4)
    ag = make_aggregator("allgather", t, make_codec(codec, **params), seed=11).aggregate(g[t.rank].clone(), step=4)
    assert torch.equal(ps, ag)


def test_dedicated_server_averages_workers_only(t):
    if t.size < 2:
        return  # nothing to test with one rank (same on every rank)
    g = grads(t.size, 777)
    agg = make_aggregator("ps", t, make_codec("fp32"), dedicated=True)
    out = agg.aggregate(g[t.rank].clone() if t.rank else None, step=0)
    exact = torch.stack([x.double() for x in g[1:]]).mean(0)
    assert torch.allclose(out.double(), exact, rtol=1e-6, atol=1e-6)
    assert same_on_all_ranks(t, out)


BYTE_CONFIGS = QUANTIZED + [("allreduce", "fp32", {}, {}), ("ring", "fp32", {}, {}), ("allgather", "qsgd", {}, {})]


@pytest.mark.parametrize("topology,codec,params,options", BYTE_CONFIGS)
@pytest.mark.parametrize("numel", [3, 1000, 4099])
def test_meter_bytes_equal_the_topology_formula(t, topology, codec, params, options, numel):
    agg = make(t, topology, codec, params, options)
    t.meter.reset()
    agg.aggregate(grads(t.size, numel)[t.rank].clone(), step=0)
    sent = t.meter.sent()
    assert sent["bytes"] == agg.sent_nbytes(numel, t.rank)
    assert sent["bytes"] == sent["header_bytes"] + sent["payload_bytes"]
    for msg in t.meter.messages:
        assert msg.source == t.rank
        if msg.dest >= 0:  # framed point-to-point message: its size is the codec's formula
            down = getattr(agg, "down_codec", agg.codec) if msg.phase == "pull" else agg.codec
            assert msg.bytes == down.encoded_nbytes(msg.fp32_bytes // 4)
    job = t.meter.job_totals(t)
    assert job["sent"]["bytes"] == sum(agg.sent_nbytes(numel, r) for r in range(t.size))
    assert job["sent_by_rank"] == {r: agg.sent_nbytes(numel, r) for r in range(t.size)}
    if topology == "ps" and t.size > 1:
        n_push = t.size - 1
        assert job["received_by_rank"][0] == n_push * agg.codec.encoded_nbytes(numel)
        assert job["by_phase"]["pull"]["bytes"] == (t.size - 1) * agg.down_codec.encoded_nbytes(numel)
        assert all(job["received_by_rank"][r] == agg.down_codec.encoded_nbytes(numel) for r in range(1, t.size))


@pytest.mark.parametrize("topology,options", [("ps", {"downlink": "codec"}), ("ring", {}), ("allgather", {})])
def test_variable_length_codec_is_bit_identical_and_counted(t, topology, options):
    agg = make(t, topology, "qsgd-elias", {"bits": 2, "bucket": 128}, options)
    t.meter.reset()
    for step in range(2):
        out = agg.aggregate(grads(t.size, 4099, step)[t.rank].clone(), step=step)
        assert same_on_all_ranks(t, out)
    assert agg.sent_nbytes(4099, t.rank) is None
    sent = t.meter.sent()
    assert sent["bytes"] == sum(m.bytes for m in t.meter.messages if m.source == t.rank)
    job = t.meter.job_totals(t)
    assert job["sent"]["bytes"] == sum(job["sent_by_rank"].values())
    assert sum(job["received_by_rank"].values()) == job["sent"]["bytes"]


@pytest.mark.parametrize("levels", [1, 7, 15, 127])
def test_integer_allreduce_sums_every_field_exactly(t, levels):
    layout = summable.SummableLayout(levels, t.size)
    numel, bucket = 7001, 256
    g = grads(t.size, numel)
    norms = torch.stack([bucket_norms(x, bucket) for x in g]).max(0).values
    scale, unit = summable.bucket_scales(norms, levels)
    words = [np.empty(layout.n_words(numel), np.uint64) for _ in range(t.size)]
    for r in range(t.size):  # every rank's contribution, to know the exact sum
        summable.encode_words(g[r], scale, unit, bucket, layout, 100 + r, True, words[r], 0, layout.n_chunks(numel))
    total = t.allreduce_array(words[t.rank].copy(), "sum", "test")
    shifts = np.arange(layout.per_word, dtype=np.uint64) * np.uint64(layout.width)
    mask = np.uint64((1 << layout.width) - 1)
    fields = [((w[:, None] >> shifts) & mask).reshape(-1)[:numel].astype(np.int64) for w in words + [total]]
    assert np.array_equal(fields[-1], sum(fields[:-1]))


@pytest.mark.parametrize("piece_numel", [0, 3000])
def test_intsum_equals_its_simulation_bitwise(t, piece_numel):
    numel = 20_011
    g = grads(t.size, numel)
    codec = dict(bits=3, error_feedback=True, rounding="nearest")
    agg = make_aggregator("intsum", t, make_codec("qsgd", **codec), seed=9, piece_numel=piece_numel)
    real = [agg.aggregate(g[t.rank].clone(), step=s) for s in range(2)]
    group = LocalGroup(t.size)
    sim = group.run(lambda lt: [a.aggregate(g[lt.rank].clone(), step=s) for a in
                                [make_aggregator("intsum", lt, make_codec("qsgd", **codec), seed=9)] for s in range(2)],
                    group.transports())
    assert all(torch.equal(a, b) for a, b in zip(real, sim[t.rank]))


def test_ring_sends_about_two_n_minus_one_over_n_of_the_encoded_size(t):
    codec = make_codec("qsgd")
    agg = make_aggregator("ring", t, codec)
    numel = 100_000
    full = codec.payload_nbytes(numel)
    assert agg.sent_nbytes(numel, t.rank) == pytest.approx(2 * (t.size - 1) / t.size * full, rel=0.01, abs=200)


def test_scatter_quantizes_once_so_its_error_stays_below_the_rings(t):
    if t.size < 3:
        return  # with 1 or 2 ranks both quantize about as often (same decision on every rank)
    g = grads(t.size, 50_000)
    exact = torch.stack([x.double() for x in g]).mean(0)
    errors = {}
    for name in ("ring", "scatter"):
        agg = make_aggregator(name, t, make_codec("qsgd", bits=3, bucket=128), seed=5)
        err = [float((agg.aggregate(g[t.rank].clone(), s).double() - exact).norm() / exact.norm()) for s in range(4)]
        errors[name] = sum(err) / len(err)
    assert errors["scatter"] < errors["ring"]


@pytest.mark.parametrize("codec,params", [("qsgd", {"bits": 4, "bucket": 128}),
                                          ("qsgd", {"bits": 8, "error_feedback": True, "bucket": 64})])
def test_scatter_in_pieces_equals_one_message_a_chunk_and_its_simulation_bitwise(t, codec, params):
    numel = 20_011
    g = grads(t.size, numel)

    def run(transport, piece_numel):
        agg = make_aggregator("scatter", transport, make_codec(codec, **params), seed=9, piece_numel=piece_numel)
        return [agg.aggregate(g[transport.rank].clone(), step=s) for s in range(2)]

    pieces, whole = run(t, 1000), run(t, 0)
    group = LocalGroup(t.size)
    sim = group.run(lambda lt: run(lt, 1000), group.transports())
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(pieces, whole, sim[t.rank]))
    assert all(same_on_all_ranks(t, a) for a in pieces)
