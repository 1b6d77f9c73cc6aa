"""The decode-free allreduce: the summable code (mpiqsgd.codecs.summable) and the intsum topology,
in simulation (LocalGroup) and on a one-rank communicator. Under mpiexec: tests/mpi/mpi_topologies.py."""

import numpy as np
import pytest
import torch

from mpiqsgd.codecs import make_codec, make_generator, summable
from mpiqsgd.codecs.buckets import bucket_norms
from mpiqsgd.errors import ConfigError, DecodeError, NonFiniteError
from mpiqsgd.topology import make_aggregator
from mpiqsgd.topology.intsum import IntSum
from mpiqsgd.transport import LocalGroup, LocalTransport

from conftest import vec


@pytest.mark.parametrize("levels,ranks,width,per_word", [
    (7, 1, 4, 16), (7, 2, 5, 12), (7, 4, 6, 10), (7, 8, 7, 9), (7, 16, 8, 8), (1, 1, 2, 32), (1, 2, 3, 21),
    (127, 16, 12, 5), (15, 8, 8, 8)])
def test_layout_has_headroom_for_the_sum(levels, ranks, width, per_word):
    layout = summable.SummableLayout(levels, ranks)
    assert (layout.width, layout.per_word) == (width, per_word)
    assert 2 * levels * ranks < 2 ** width and width * per_word <= 64


def shared_norms(xs, bucket, norm="l2"):
    return torch.stack([bucket_norms(x, bucket, norm) for x in xs]).max(0).values


def encode_all(xs, layout, bucket, stochastic, seeds, norm="l2"):
    """Each rank's words and own decoded values by the numba kernels (whole vector, one call)."""
    norms = shared_norms(xs, bucket, norm)
    scale, unit = summable.bucket_scales(norms, layout.levels)
    out = []
    for x, seed in zip(xs, seeds):
        words = np.empty(layout.n_words(x.numel()), np.uint64)
        own = np.empty(x.numel(), np.float32)
        summable.encode_words(x, scale, unit, bucket, layout, seed, stochastic, words, 0,
                              layout.n_chunks(x.numel()), own)
        out.append((words, torch.from_numpy(own)))
    return norms, out


def fields_of(words, layout, numel):
    shifts = np.arange(layout.per_word, dtype=np.uint64) * np.uint64(layout.width)
    mask = np.uint64((1 << layout.width) - 1)
    return ((words[:, None] >> shifts) & mask).reshape(-1)[:numel].astype(np.int64)


@pytest.mark.parametrize("ranks", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("levels", [1, 7, 15, 127])
def test_sum_of_words_is_the_exact_sum_of_the_codes(ranks, levels):
    layout = summable.SummableLayout(levels, ranks)
    numel = 5000 + ranks  # not a multiple of the fields a word
    xs = [vec(numel, seed=r, dist="heavy") for r in range(ranks)]
    _, encoded = encode_all(xs, layout, 128, True, range(ranks))
    total = np.zeros(layout.n_words(numel), np.uint64)
    for words, _ in encoded:
        total += words
    expected = sum(fields_of(w, layout, numel) for w, _ in encoded)
    assert np.array_equal(fields_of(total, layout, numel), expected)
    assert expected.max() <= layout.top and expected.min() >= 0


@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("bucket", [512, 100, 1 << 20])
@pytest.mark.parametrize("numel", [1, 11, 12, 24577, 100003])
def test_numba_kernels_equal_the_torch_reference(stochastic, bucket, numel):
    layout = summable.SummableLayout(7, 3)
    xs = [vec(numel, seed=r) for r in range(3)]
    norms, encoded = encode_all(xs, layout, bucket, stochastic, [11, 12, 13])
    total = np.zeros(layout.n_words(numel), np.uint64)
    for x, seed, (words, own) in zip(xs, [11, 12, 13], encoded):
        ref_words, ref_own = summable.encode_reference(x, norms, bucket, layout, seed, stochastic)
        assert np.array_equal(words, ref_words) and torch.equal(own, ref_own)
        total += words
    _, unit = summable.bucket_scales(norms, 7)
    out = np.empty(numel, np.float32)
    assert summable.unpack_mean(total, (unit / 3).numpy(), bucket, layout, out, 0, layout.n_chunks(numel)) == 0
    ref, bad = summable.sum_reference(total, norms, bucket, layout, numel)
    assert bad == 0 and torch.equal(torch.from_numpy(out), ref)
    # the mean of the three contributions, up to float32 rounding of the mean
    assert torch.allclose(ref, sum(own for _, own in encoded) / 3, rtol=1e-6, atol=1e-6)


def test_pieces_encode_what_the_whole_encodes():
    layout = summable.SummableLayout(7, 2)
    x = vec(200_000)
    norms = bucket_norms(x, 512)
    scale, unit = summable.bucket_scales(norms, 7)
    whole = np.empty(layout.n_words(x.numel()), np.uint64)
    summable.encode_words(x, scale, unit, 512, layout, 5, True, whole, 0, layout.n_chunks(x.numel()))
    parts = np.empty_like(whole)
    for c in range(layout.n_chunks(x.numel())):
        summable.encode_words(x, scale, unit, 512, layout, 5, True, parts, c, c + 1)
    assert np.array_equal(whole, parts)


@pytest.mark.parametrize("corrupt", ["field", "top bits"])
def test_an_overflowing_sum_is_caught(corrupt):
    layout = summable.SummableLayout(7, 2)  # 5-bit fields, 12 a word, 4 top bits unused
    numel = 3000
    xs = [vec(numel, seed=r) for r in range(2)]
    norms, encoded = encode_all(xs, layout, 512, True, [1, 2])
    total = encoded[0][0] + encoded[1][0]
    if corrupt == "field":
        total[100] |= np.uint64(31) << np.uint64(5 * 3)  # field 3 of word 100: 31 > 2 s p = 28
    else:
        total[200] |= np.uint64(1) << np.uint64(62)
    _, unit = summable.bucket_scales(norms, 7)
    out = np.empty(numel, np.float32)
    assert summable.unpack_mean(total, (unit / 2).numpy(), 512, layout, out, 0, layout.n_chunks(numel)) > 0
    assert summable.sum_reference(total, norms, 512, layout, numel)[1] > 0
    assert summable.first_bad_field(total, layout, numel) == (1203 if corrupt == "field" else 2400)


def simulate(n, xs, steps=1, codec=None, **options):
    """Each rank's results of ``steps`` intsum calls in a LocalGroup of ``n``; the aggregators too."""
    group = LocalGroup(n)
    aggs = {}

    def rank(t):
        agg = aggs[t.rank] = IntSum(t, codec(t.rank) if codec else make_codec("qsgd"), seed=7, **options)
        return [agg.aggregate(xs[t.rank], step) for step in range(steps)]

    return group.run(rank, group.transports()), aggs


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_simulated_intsum_is_bit_identical_on_ranks_and_unbiased_around_the_mean(n):
    numel = 40_000
    xs = [vec(numel, seed=r) * (r + 1) for r in range(n)]
    results, _ = simulate(n, xs, steps=2, piece_numel=10_000)
    for r in range(1, n):
        assert all(torch.equal(a, b) for a, b in zip(results[0], results[r]))
    exact = sum(xs) / n
    err = float((results[0][0] - exact).norm() / exact.norm())
    # 4-bit QSGD, buckets of 512: allgather's own norms give about 1.26; the shared norm is the
    # largest rank's (here up to 8x the smallest's), so the small ranks' levels are coarser
    assert 0 < err < 2.0
    assert not torch.equal(results[0][0], results[0][1])  # each step draws new uniforms


def test_pipelined_equals_unpipelined_bitwise():
    numel = 300_001
    xs = [vec(numel, seed=r) for r in range(3)]
    whole, _ = simulate(3, xs, steps=2, piece_numel=0)
    pieces, _ = simulate(3, xs, steps=2, piece_numel=30_000)
    assert all(torch.equal(a, b) for a, b in zip(whole[0], pieces[0]))


def test_the_mean_is_the_mean_of_each_ranks_quantized_contribution():
    numel = 10_000
    xs = [vec(numel, seed=r) for r in range(3)]
    results, _ = simulate(3, xs, codec=lambda r: make_codec("qsgd", rounding="nearest"))
    layout = summable.SummableLayout(7, 3)
    norms = shared_norms(xs, 512)
    own = [summable.encode_reference(x, norms, 512, layout, 0, False)[1] for x in xs]
    assert torch.allclose(results[0][0], sum(own) / 3, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("codec", ["qsgd", "qsgd-inf"])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_one_rank_is_the_qsgd_round_trip(codec, rounding):
    x = vec(30_001, dist="heavy")
    c = make_codec(codec, rounding=rounding)
    (results,), _ = simulate(1, [x], codec=lambda r: make_codec(codec, rounding=rounding))
    assert torch.equal(results[0], c.decode(c.encode(x, make_generator(7, 0, 0))))


def test_error_feedback_keeps_the_residual_of_the_own_contribution():
    numel = 20_000
    xs = [vec(numel, seed=r) for r in range(2)]
    results, aggs = simulate(2, xs, steps=3, codec=lambda r: make_codec("qsgd", rounding="nearest",
                                                                        error_feedback=True))
    for r in range(2):
        residual = aggs[r].codec.residuals["grad"]
        assert residual.shape == (numel,) and float(residual.abs().max()) > 0
        assert aggs[r].codecs["codec"].state_dict()["residuals"]["grad"].shape == (numel,)
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1]))


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("piece_numel", [0, 25_000])
def test_bytes_counted_equal_the_formula(n, piece_numel):
    numel = 100_003
    group = LocalGroup(n)

    def rank(t):
        agg = IntSum(t, make_codec("qsgd", bits=3), piece_numel=piece_numel)
        agg.aggregate(vec(numel, seed=t.rank), 0)
        return t.meter.sent()["bytes"], agg.sent_nbytes(numel, t.rank)

    for counted, formula in group.run(rank, group.transports()):
        assert counted == formula
        if n > 1:  # scales and words at the nominal allreduce cost
            layout = summable.SummableLayout(3, n)
            assert formula >= 2 * (n - 1) * (8 * layout.n_words(numel) + 4 * 196) // n - 2 * n


class CorruptingTransport(LocalTransport):
    """Rank 1 adds to a field of the words it contributes: the sum overflows."""

    def allreduce_array(self, array, op="sum", phase="allreduce", fp32_numel=0):
        if phase == "intsum" and self.rank == 1:
            array[5] = np.uint64(0xFFFFFFFFFFFFFFF)
        return super().allreduce_array(array, op, phase, fp32_numel)


def test_a_rank_sending_impossible_codes_stops_every_rank_naming_the_bucket():
    group = LocalGroup(2)
    transports = [CorruptingTransport(group, r) for r in range(2)]
    with pytest.raises(DecodeError, match=r"intsum: the summed levels of bucket 0 .*exceed what 2 ranks"):
        group.run(lambda t: IntSum(t, make_codec("qsgd")).aggregate(vec(5000, seed=t.rank), 0), transports)


@pytest.mark.parametrize("codec", [make_codec("fp32"), make_codec("sign"), make_codec("nuqsgd"),
                                   make_codec("qsgd", encoding="entropy")])
def test_refuses_codecs_whose_levels_do_not_add(codec):
    with pytest.raises(ConfigError, match="topology 'intsum' sums QSGD levels"):
        make_aggregator("intsum", LocalGroup(1).transports()[0], codec)


def test_refuses_a_non_finite_gradient():
    x = vec(3000)
    x[1234] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        simulate(1, [x])
