"""``ring`` and ``scatter`` (mpiqsgd.topology.ring). ``scatter`` in pieces (a link that never waits):
bit-identical to one message a chunk, bytes as the formula says, error feedback per piece; in simulation
(LocalGroup). Under mpiexec: tests/mpi/mpi_topologies.py."""

import pytest
import torch

from mpiqsgd.codecs import make_codec, make_generator
from mpiqsgd.codecs.kernels import SeedAt, draw_seed
from mpiqsgd.errors import ConfigError
from mpiqsgd.topology import chunk_bounds, make_aggregator, sum_of
from mpiqsgd.topology.ring import PIECE_NUMEL, Scatter
from mpiqsgd.transport import LocalGroup

from conftest import vec

CODECS = [
    ("qsgd", {"bits": 4, "bucket": 128}),
    ("qsgd-inf", {"rounding": "nearest", "bucket": 100}),
    ("qsgd-elias", {"bits": 2, "bucket": 64}),
    ("sign", {"bucket": 96, "error_feedback": True}),
    ("nuqsgd", {"bits": 3, "bucket": 256}),
    ("terngrad", {"bucket": 333}),  # odd bucket: pieces of two buckets
    ("qsgd", {"bits": 8, "bucket": 128, "error_feedback": True}),
    ("fp16", {}),
]


def unpipelined(codec, params, xs, steps, seed=3):
    """The mean each step, as scatter computed it with one message a chunk: rank s encodes chunk s,
    then chunks s+1 .. s+n-1, then the owner its mean, all from one generator per (rank, step)."""
    n, numel = len(xs), xs[0].numel()
    bounds = chunk_bounds(numel, n)
    codecs = [make_codec(codec, **params) for _ in range(n)]  # each rank's error feedback
    results = []
    for step in range(steps):
        rngs = [make_generator(seed, s, step) for s in range(n)]
        decoded = {}
        for s in range(n):
            for c in [(s + k) % n for k in range(n)]:
                x = xs[s][bounds[c][0]:bounds[c][1]]
                decoded[s, c] = codecs[s].encode_decode(x, rngs[s], key=("scatter", c))[1]
        means = [codecs[c].encode_decode(sum_of([decoded[s, c] for s in range(n)]) / n, rngs[c], key="owner")[1]
                 for c in range(n)]
        results.append(torch.cat(means))
    return results


def simulate(n, xs, codec, params, steps=1, seed=3, **options):
    group = LocalGroup(n)
    aggs = {}

    def rank(t):
        agg = aggs[t.rank] = make_aggregator("scatter", t, make_codec(codec, **params), seed=seed, **options)
        return [agg.aggregate(xs[t.rank].clone(), step) for step in range(steps)]

    return group.run(rank, group.transports()), aggs


@pytest.mark.parametrize("codec,params", CODECS)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("piece_numel", [0, 400, 700])
def test_pieces_give_the_bits_of_one_message_a_chunk(codec, params, n, piece_numel):
    numel = 6_007
    xs = [vec(numel, seed=r) * (r + 1) for r in range(n)]
    results, aggs = simulate(n, xs, codec, params, steps=2, piece_numel=piece_numel)
    if piece_numel:
        assert len(aggs[0].pieces(numel // n)) > 1  # really in pieces
    for step, expected in enumerate(unpipelined(codec, params, xs, steps=2)):
        for r in range(n):
            assert torch.equal(results[r][step], expected), (r, step)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_many_pieces_of_a_larger_gradient(n):
    numel = 300_001
    xs = [vec(numel, seed=r, dist="heavy") for r in range(n)]
    params = {"bits": 4}
    results, aggs = simulate(n, xs, "qsgd", params, steps=2, piece_numel=10_000)
    assert len(aggs[0].pieces(numel // n)) >= 7
    for step, expected in enumerate(unpipelined("qsgd", params, xs, steps=2)):
        assert all(torch.equal(results[r][step], expected) for r in range(n))


def test_seed_at_shifts_the_uniforms_to_the_piece():
    codec = make_codec("qsgd", bits=2, bucket=64)
    x = vec(4096, seed=1)
    seed = draw_seed(make_generator(5, 0, 0))
    whole = codec.encode_decode(x, SeedAt(seed, 0))[1]
    assert torch.equal(whole, codec.encode_decode(x, make_generator(5, 0, 0))[1])
    piece = codec.encode_decode(x[1024:2048], SeedAt(seed, 1024))[1]
    assert torch.equal(piece, whole[1024:2048])
    assert not torch.equal(piece, codec.encode_decode(x[1024:2048], SeedAt(seed, 0))[1])
    with pytest.raises(ValueError, match="even"):
        SeedAt(seed, 3)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("piece_numel", [0, 700, 5000])
@pytest.mark.parametrize("codec,params", [("qsgd", {"bits": 3, "bucket": 128}), ("fp32", {})])
def test_bytes_counted_equal_the_formula(n, piece_numel, codec, params):
    numel = 30_011
    group = LocalGroup(n)

    def rank(t):
        agg = make_aggregator("scatter", t, make_codec(codec, **params), piece_numel=piece_numel)
        agg.aggregate(vec(numel, seed=t.rank), 0)
        sent = t.meter.sent()
        return sent["bytes"], agg.sent_nbytes(numel, t.rank), sent["messages"], agg.pieces

    for r, (counted, formula, messages, pieces) in enumerate(group.run(rank, group.transports())):
        assert counted == formula
        sizes = [e - s for s, e in chunk_bounds(numel, n)]
        assert messages == sum(len(pieces(sizes[c])) for c in range(n) if c != r) + (n - 1) * len(pieces(sizes[r]))


@pytest.mark.parametrize("bucket", [512, 333, 1])
def test_pieces_cover_the_chunk_on_bucket_boundaries(bucket):
    group = LocalGroup(1)
    (t,) = group.transports()
    agg = Scatter(t, make_codec("qsgd", bucket=bucket), piece_numel=10_000)
    align = bucket if bucket % 2 == 0 else 2 * bucket
    for numel in [0, 1, 9_999, 10_000, 10_001, 14_999, 15_001, 123_457, 1_000_000]:
        pieces = agg.pieces(numel)
        assert pieces[0][0] == 0 and pieces[-1][1] == numel
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
        assert all(start % align == 0 for start, _ in pieces)
        if numel <= 10_000:
            assert pieces == [(0, numel)]  # small chunks: one message
        else:
            sizes = {end - start for start, end in pieces[:-1]} or {pieces[0][1]}
            assert len(sizes) == 1 and 10_000 / 1.5 <= sizes.pop() <= 10_000 * 1.5 + align  # the last one may be less
    assert Scatter(t, make_codec("qsgd"), piece_numel=0).pieces(10 ** 8) == [(0, 10 ** 8)]
    assert Scatter(t, make_codec("qsgd")).piece_numel == PIECE_NUMEL


def test_error_feedback_keeps_one_residual_a_piece():
    n, numel = 2, 8_000
    xs = [vec(numel, seed=r) for r in range(n)]
    params = {"bits": 4, "bucket": 64, "rounding": "nearest", "error_feedback": True}
    _, aggs = simulate(n, xs, "qsgd", params, steps=2, piece_numel=1500)
    for r in range(n):
        pieces = aggs[r].pieces(numel // n)
        residuals = aggs[r].codec.residuals
        expected = {("scatter", c, start): end - start for c in range(n) for start, end in pieces}
        expected.update({("owner", start): end - start for start, end in pieces})
        assert {k: v.numel() for k, v in residuals.items()} == expected
        assert all(float(v.abs().max()) > 0 for v in residuals.values())
    _, whole = simulate(n, xs, "qsgd", params, steps=2, piece_numel=0)
    assert set(whole[0].codec.residuals) == {("scatter", 0), ("scatter", 1), "owner"}  # as before pieces


def test_bad_piece_numel_is_refused():
    (t,) = LocalGroup(1).transports()
    for bad in (-1, 1.5, True, "2M"):
        with pytest.raises(ConfigError, match="piece_numel"):
            make_aggregator("scatter", t, make_codec("qsgd"), piece_numel=bad)
    with pytest.raises(ConfigError, match="ring"):
        make_aggregator("ring", t, make_codec("qsgd"), piece_numel=1000)
