"""Summable codes: QSGD levels on scales shared by every rank, packed so that plain integer
addition of the words adds every coordinate at once (the decode-free allreduce of
:mod:`mpiqsgd.topology.intsum`).

Quantization (QSGD's, :mod:`mpiqsgd.codecs.qsgd`, with a shared norm): every rank scales bucket
``b`` by the same norm ``N_b`` (the maximum over ranks of the ranks' own bucket norms, so
``|v_i| <= N_b`` everywhere) and rounds ``r_i = |v_i| s / N_b`` to a level in ``0..s``,
stochastically (unbiased) or to the nearest. The signed level plus ``s`` is the field value,
in ``0..2s``.

Layout of one rank's contribution (``numel`` coordinates, ``p`` ranks)::

    field width  w = ceil(log2(2 s p + 1))  bits: the sum of p fields fits without a carry
    per word     K = floor(64 / w)          fields per little-endian uint64 word
    coordinate i is field i % K of word i // K, at bits (i % K) w .. (i % K + 1) w - 1;
    fields past numel in the last word are 0; the top 64 - K w bits of every word are 0.

Bytes: ``8 ceil(numel / K)`` words, plus the float32 bucket norms ``4 ceil(numel / bucket)``
that the ranks agree on first. With s = 7 (4-bit QSGD): 2 ranks w = 5, K = 12 (5.33 bits a
coordinate); 4 ranks w = 6, K = 10 (6.4); 8 ranks w = 7, K = 9 (7.1); 16 ranks w = 8, K = 8.

Summing the p contributions word by word (``MPI_SUM`` on uint64) gives every field's sum
``S_i`` in ``0..2 s p``; the mean is ``(S_i - s p) * (N_b / s / p)``, the same float32 bits on
every rank. A sum cannot be checked contribution by contribution, so :func:`unpack_mean` checks
every field of the result against ``2 s p`` and every word's unused top bits against 0: a rank
that sent a field above ``2 s`` shows up there when the sum overflows (not when it does not).

The kernels work on whole chunks of about :data:`CHUNK_NUMEL` coordinates (an even number of
words: :func:`words_per_chunk`), the unit of the pipeline's pieces and of the kernels' threads;
a chunk's fields stay in L1 between quantizing and packing. Uniforms are :mod:`mpiqsgd.codecs.kernels`' counter-based
ones (coordinate i draws the uniform i of the seed), so a piece encodes the same wherever it
starts. The torch reference (:func:`encode_reference`, :func:`sum_reference`) defines the same
values and serves tests and hosts without numba.
"""

import math

import numpy as np
import torch

from ..errors import ConfigError
from . import kernels
from .kernels import HAVE_NUMBA

__all__ = ["SummableLayout", "check_codec", "field_width", "encode_words", "unpack_mean", "bucket_scales",
           "encode_reference",
           "sum_reference", "words_per_chunk", "CHUNK_NUMEL"]

CHUNK_NUMEL = 1 << 14  # coordinates a kernel chunk holds, about (kernels.CHUNK, for the same reasons)


def words_per_chunk(width):
    """Words a chunk of ``width``-bit fields holds: an even number (a chunk starts at an even
    coordinate, as the uniforms' pairs need) near :data:`CHUNK_NUMEL` coordinates."""
    per_word = 64 // width
    return 2 * -(-CHUNK_NUMEL // (2 * per_word))


def check_codec(codec, who):
    """The QSGD codec (dense encoding) under ``codec``'s error feedback, whose levels a summable code
    adds; a :class:`~mpiqsgd.errors.ConfigError` naming ``who`` for any other codec."""
    from .qsgd import QSGD

    base = codec.base
    if not isinstance(base, QSGD) or base.encoding != "dense":
        raise ConfigError(f"{who} sums QSGD levels as integers: it takes codec qsgd or qsgd-inf with the dense "
                          f"encoding (error feedback allowed); got {codec!r}")
    return base


def field_width(levels, ranks):
    """Bits of a field holding the sum of ``ranks`` values in ``0..2 levels``."""
    return max(1, math.ceil(math.log2(2 * levels * ranks + 1)))


class SummableLayout:
    """Where the coordinates of ``numel`` sit in the words of ``ranks`` ranks' summable code.

    Attributes:
        levels: QSGD's s. ranks: p. width: bits a field. per_word: fields a word.
        n_chunk_words: words a kernel chunk holds.
        top: the largest valid field of a sum, ``2 s p``.
    """

    def __init__(self, levels, ranks):
        self.levels, self.ranks = int(levels), int(ranks)
        self.width = field_width(self.levels, self.ranks)
        if self.width > 32:
            raise ValueError(f"summable code: {ranks} ranks at s={levels} need {self.width}-bit fields (at most 32)")
        self.per_word = 64 // self.width
        self.n_chunk_words = words_per_chunk(self.width)
        self.top = 2 * self.levels * self.ranks

    def n_words(self, numel):
        return -(-numel // self.per_word)

    def n_chunks(self, numel):
        return -(-self.n_words(numel) // self.n_chunk_words)

    def chunk_coords(self, c0, c1, numel):
        """Coordinates [start, stop) of chunks ``c0..c1-1``."""
        per_chunk = self.n_chunk_words * self.per_word
        return min(numel, c0 * per_chunk), min(numel, c1 * per_chunk)

    def chunk_words(self, c0, c1, numel):
        """Words [start, stop) of chunks ``c0..c1-1``."""
        n = self.n_words(numel)
        return min(n, c0 * self.n_chunk_words), min(n, c1 * self.n_chunk_words)

    def __repr__(self):
        return f"SummableLayout(levels={self.levels}, ranks={self.ranks}, width={self.width}, per_word={self.per_word})"


def bucket_scales(norms, levels):
    """(scale, unit) float32 per bucket from shared norms, as QSGD computes them: ``scale =
    (1 / N) * s`` (0 where that overflows: a zero or tiny bucket is sent as zeros), ``unit = N / s``."""
    norms = torch.as_tensor(norms, dtype=torch.float32)
    s = torch.tensor(float(levels), dtype=torch.float32)
    scale = (1.0 / norms) * s
    scale = torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale))
    return scale, norms / s


def encode_words(x, scale, unit, bucket, layout, seed, stochastic, words, c0, c1, decoded=None):
    """Quantize chunks ``c0..c1-1`` of the flat float32 CPU tensor ``x`` into ``words`` (a uint64
    array of ``layout.n_words(x.numel())``), writing this rank's decoded contribution (signed
    level times unit) into ``decoded`` (a float32 array of ``x.numel()``) when given."""
    n = x.numel()
    if not HAVE_NUMBA:
        start, stop = layout.chunk_coords(c0, c1, n)
        w0, w1 = layout.chunk_words(c0, c1, n)
        fields, own = _levels_torch(x, scale, unit, bucket, layout.levels, seed, stochastic, start, stop)
        words[w0:w1] = _pack_torch(fields, layout, w1 - w0)
        if decoded is not None:
            decoded[start:stop] = own.numpy()
        return
    want = decoded is not None
    _run(_encode_chunks[layout.width], n, c0, c1,
         (x.numpy(), scale.numpy(), unit.numpy(), bucket, layout.levels, np.uint64(seed), bool(stochastic), words,
          decoded if want else np.empty(0, np.float32), want))


def unpack_mean(words, mean_unit, bucket, layout, out, c0, c1):
    """Chunks ``c0..c1-1`` of summed ``words`` into ``out`` (a float32 array of numel): the mean
    ``(S_i - s p) * mean_unit[b]``. Returns the number of fields above ``2 s p`` or words with a
    top bit set (0 for a valid sum)."""
    n = out.size
    if not HAVE_NUMBA:
        start, stop = layout.chunk_coords(c0, c1, n)
        w0, w1 = layout.chunk_words(c0, c1, n)
        fields, bad = _unpack_torch(words[w0:w1], layout, stop - start)
        b = torch.arange(start, stop) // bucket
        out[start:stop] = ((fields - layout.levels * layout.ranks).to(torch.float32)
                           * torch.from_numpy(mean_unit)[b]).numpy()
        return bad
    return _run(_unpack_chunks[layout.width], n, c0, c1,
                (words, mean_unit, bucket, layout.levels * layout.ranks, layout.top, out))


def first_bad_field(words, layout, numel):
    """Index of the first coordinate whose summed field is invalid (or of a word's first field
    when its top bits are set); None if all are valid. For error messages: a plain numpy pass."""
    fields, _ = _unpack_torch(words, layout, numel)
    bad = (fields > layout.top).nonzero()
    tops = (torch.from_numpy(words.view(np.int64)) >> (layout.width * layout.per_word)) if \
        layout.width * layout.per_word < 64 else torch.zeros(words.size, dtype=torch.int64)
    top_bad = (tops != 0).nonzero()
    found = [int(bad[0, 0])] if bad.numel() else []
    found += [int(top_bad[0, 0]) * layout.per_word] if top_bad.numel() else []
    return min(found) if found else None


def _run(kernel, n, c0, c1, args):
    """Run a chunk kernel ``kernel(c0, c1, *args)`` over chunks ``c0..c1-1`` (threads where
    :func:`kernels.run_chunks` uses them)."""
    return kernels.run_chunks(lambda a, b, *rest: kernel(c0 + a, c0 + b, *rest), n, args, units=c1 - c0)


# -- torch reference -------------------------------------------------------------------------

def _levels_torch(x, scale, unit, bucket, levels, seed, stochastic, start, stop):
    """Field values (int64) and decoded own values (float32) of coordinates [start, stop)."""
    v = x[start:stop]
    b = torch.arange(start, stop) // bucket
    top = torch.tensor(float(levels), dtype=torch.float32)
    r = torch.minimum(v.abs() * scale[b], top)
    if stochastic:
        u = kernels.uniform(seed, stop)[start:stop] if stop > start else torch.zeros(0)
        lower = torch.floor(r)
        level = lower.to(torch.int64) + (u < r - lower).to(torch.int64)
    else:
        level = torch.round(r).to(torch.int64)  # half to even, as np.rint
    signed = torch.where(v < 0, -level, level)
    return signed + levels, signed.to(torch.float32) * unit[b]


def _pack_torch(fields, layout, n_words):
    padded = torch.zeros(n_words * layout.per_word, dtype=torch.int64)
    padded[:fields.numel()] = fields
    shifts = torch.arange(layout.per_word, dtype=torch.int64) * layout.width
    # fields < 2^w and K w <= 64: the shifted fields are disjoint, so their sum is their OR;
    # int64 wraparound keeps the uint64 bit pattern
    return (padded.view(n_words, layout.per_word) << shifts).sum(dim=1).numpy().view(np.uint64)


def _unpack_torch(words, layout, numel):
    w = torch.from_numpy(np.ascontiguousarray(words).view(np.int64))
    shifts = torch.arange(layout.per_word, dtype=torch.int64) * layout.width
    mask = (1 << layout.width) - 1
    fields = ((w[:, None] >> shifts) & mask).reshape(-1)[:numel]  # arithmetic shift: masked after
    used = layout.width * layout.per_word
    tops = (w >> used) if used < 64 else torch.zeros_like(w)
    return fields, int((fields > layout.top).sum()) + int((tops != 0).sum())


def encode_reference(x, norms, bucket, layout, seed, stochastic):
    """(uint64 words, decoded own float32 tensor) of the whole ``x`` by torch ops."""
    scale, unit = bucket_scales(norms, layout.levels)
    fields, own = _levels_torch(x, scale, unit, bucket, layout.levels, seed, stochastic, 0, x.numel())
    return _pack_torch(fields, layout, layout.n_words(x.numel())), own


def sum_reference(words, norms, bucket, layout, numel):
    """(mean float32 tensor, invalid count) of summed ``words`` by torch ops."""
    _, unit = bucket_scales(norms, layout.levels)
    mean_unit = unit / layout.ranks
    fields, bad = _unpack_torch(words, layout, numel)
    b = torch.arange(numel) // bucket
    return (fields - layout.levels * layout.ranks).to(torch.float32) * mean_unit[b], bad


# -- numba kernels -----------------------------------------------------------------------------

if HAVE_NUMBA:
    def _encode_kernel(width):
        """Quantize-and-pack chunks; ``width`` (and so the fields a word) a closure constant, so the
        packing unrolls with immediate shifts. Fields are bytes (2 s <= 254) until packed."""
        per_word = 64 // width
        chunk_words = words_per_chunk(width)
        per_chunk = chunk_words * per_word

        @kernels.jit_kernel
        def kernel(c0, c1, x, scale, unit, bucket, levels, seed, stochastic, words, decoded, want):
            n = x.size
            n_words = words.size
            top = np.float32(levels)
            offset = np.int32(levels)
            fields = np.zeros(per_chunk, dtype=np.uint8)
            u = np.zeros(per_chunk, dtype=np.float32)
            zero = np.float32(0.0)
            for c in range(c0, c1):
                start = c * per_chunk
                stop = min(n, start + per_chunk)
                if stochastic:
                    kernels.fill_uniforms(seed, start, stop - start, u)
                i = start
                while i < stop:
                    b, end = kernels.bucket_segment(i, stop, bucket)
                    s = scale[b]
                    xs, fs, us = x[i:end], fields[i - start:end - start], u[i - start:end - start]
                    for k in range(xs.size):
                        v = xs[k]
                        r = min(abs(v) * s, top)
                        if stochastic:
                            lower = np.floor(r)
                            level = np.int32(lower) + np.int32(us[k] < r - lower)
                        else:
                            level = np.int32(np.rint(r))
                        fs[k] = np.uint8(offset - level if v < zero else offset + level)
                    if want:
                        un = unit[b]
                        ds = decoded[i:end]
                        for k in range(xs.size):
                            ds[k] = np.float32(np.int32(fs[k]) - offset) * un
                    i = end
                g0 = c * chunk_words
                g1 = min(n_words, g0 + chunk_words)
                for k in range(stop - start, (g1 - g0) * per_word):
                    fields[k] = np.uint8(0)
                for g in range(g1 - g0):
                    acc = np.uint64(0)
                    for f in range(per_word):
                        acc |= np.uint64(fields[g * per_word + f]) << np.uint64(f * width)
                    words[g0 + g] = acc
            return 0
        return kernel

    def _unpack_kernel(width):
        """Unpack, check and scale chunks of summed words; ``width`` a closure constant."""
        per_word = 64 // width
        chunk_words = words_per_chunk(width)
        per_chunk = chunk_words * per_word
        used = width * per_word

        @kernels.jit_kernel
        def kernel(c0, c1, words, mean_unit, bucket, offset, top, out):
            n = out.size
            n_words = words.size
            mask = np.uint64((1 << width) - 1)
            fields = np.zeros(per_chunk, dtype=np.int32)
            off = np.int32(offset)
            bad = 0
            for c in range(c0, c1):
                g0 = c * chunk_words
                g1 = min(n_words, g0 + chunk_words)
                high = np.uint64(0)
                for g in range(g1 - g0):
                    w = words[g0 + g]
                    if used < 64:
                        high |= w >> np.uint64(used)
                    for f in range(per_word):
                        fields[g * per_word + f] = np.int32((w >> np.uint64(f * width)) & mask)
                bad += np.int64(high != np.uint64(0))
                start = c * per_chunk
                stop = min(n, start + per_chunk)
                most = np.int32(0)
                for k in range(stop - start):
                    most = max(most, fields[k])
                bad += np.int64(most > top)
                i = start
                while i < stop:
                    b, end = kernels.bucket_segment(i, stop, bucket)
                    mu = mean_unit[b]
                    fs, os = fields[i - start:end - start], out[i:end]
                    for k in range(fs.size):
                        os[k] = np.float32(fs[k] - off) * mu
                    i = end
            return bad
        return kernel

    _encode_chunks = kernels.ByWidth(_encode_kernel)
    _unpack_chunks = kernels.ByWidth(_unpack_kernel)
