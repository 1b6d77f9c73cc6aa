"""The summable code (mpiqsgd.codecs.summable): integer addition of packed words adds every level
exactly; the numba kernels against the torch reference. Its topology: tests/test_topology_intsum.py."""


import numpy as np
import pytest
import torch

from conftest import shared_norms, vec
from mpiqsgd.codecs import summable
from mpiqsgd.codecs.buckets import bucket_norms


@pytest.mark.parametrize("levels,ranks,width,per_word", [
    (7, 1, 4, 16), (7, 2, 5, 12), (7, 4, 6, 10), (7, 8, 7, 9), (7, 16, 8, 8), (1, 1, 2, 32), (1, 2, 3, 21),
    (127, 16, 12, 5), (15, 8, 8, 8)])
def test_layout_has_headroom_for_the_sum(levels, ranks, width, per_word):
    layout = summable.SummableLayout(levels, ranks)
    assert (layout.width, layout.per_word) == (width, per_word)
    assert 2 * levels * ranks < 2 ** width and width * per_word <= 64


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
