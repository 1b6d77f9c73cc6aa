"""Fused level-set quantize-and-pack kernels: numba on the CPU, torch ops on other devices.

Coordinate ``i`` of bucket ``b`` is normalized in float32, ``r = x_i / norm_b`` (``r = 0``
in a zero bucket), clamped to [-1, 1], and placed in the interval ``L_j <= r < L_{j+1}``
(``j <= K - 2``): the torch code by ``searchsorted``; the CPU kernel, up to
``2**UNROLL_BITS`` levels, by comparing ``r`` with every level in straight-line code that
vectorizes, and above that by a binary search narrowed by a uniform grid of cells over
[-1, 1] (the same ``j`` either way). With the counter-based
uniform ``u_i`` of :mod:`mpiqsgd.codecs.kernels` the code is ``j + 1`` when
``u_i < (r - L_j) / (L_{j+1} - L_j)``, else ``j`` (all float32). The receiver's value is
``norm_b * L[code]``. Codes are packed as in :mod:`mpiqsgd.codecs.bits`. Both
implementations give the same bytes and values.
"""

import numpy as np
import torch

from .kernels import NORM_KINDS, HAVE_NUMBA, check_spare, decode_target, padded, run_chunks, uniform, use_numba

if HAVE_NUMBA:
    from .kernels import (CHUNK, ByWidth, bucket_segment, chunk_range, fill_uniforms, jit_helper, jit_kernel,
                          pack_chunk, unpack_chunk, write_norm)

__all__ = ["levelset_encode", "fused_levelset_encode", "levelset_decode", "search_table", "normalized",
           "inverse_norms", "inverse_widths", "CELLS"]

UNROLL_BITS = 4  # up to 2**4 levels the CPU kernels compare with each level in turn (vectorized)


# -- torch implementation (any device) ----------------------------------------------------

def inverse_norms(norms):
    """float32 ``1 / norm`` per bucket, 0 for a zero norm (torch or numpy): the kernels multiply by
    it rather than divide. It overflows only for a subnormal norm (below 2.9e-39), whose bucket
    the kernels divide by its norm instead."""
    if isinstance(norms, torch.Tensor):
        return torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(norms > 0, np.float32(1.0) / norms, np.float32(0.0)).astype(np.float32)


def inverse_widths(levels):
    """float32 ``1 / (L_{j+1} - L_j)`` of each interval (torch or numpy float32 levels)."""
    return 1.0 / (levels[1:] - levels[:-1])


def normalized(x, norms, bucket):
    """The normalized coordinates ``r`` of a flat float32 tensor, clamped to [-1, 1], as every
    kernel computes them: ``x * (1 / norm)`` (``x / norm`` where that inverse overflows); 0 in
    zero buckets. Returns (r, each coordinate's norm)."""
    n = x.numel()
    scale = norms.repeat_interleave(bucket)[:n]
    inv = inverse_norms(norms).repeat_interleave(bucket)[:n]
    r = torch.where(torch.isinf(inv), x / scale, x * inv).clamp_(-1.0, 1.0)
    return r, scale


def _encode_torch(x, norms, levels, bucket, bits, seed, want_decoded):
    from .bits import pack

    n = x.numel()
    K = levels.numel()
    r, scale = normalized(x, norms, bucket)
    j = (torch.searchsorted(levels, r, right=True) - 1).clamp_(0, K - 2)
    p = (r - levels[j]) * inverse_widths(levels)[j]
    code = j + (uniform(seed, n, x.device) < p).to(j.dtype)
    decoded = scale * levels[code] if want_decoded else None
    return pack(code.to(torch.uint8), bits), decoded


def _decode_torch(packed, norms, levels, bucket, bits, n):
    from .bits import unpack

    codes = unpack(packed, n, bits).long()
    K = levels.numel()
    bad = int((codes >= K).sum())
    values = norms.repeat_interleave(bucket)[:n] * levels[codes.clamp(max=K - 1)]
    return values, bad


# -- numba implementation (CPU) -----------------------------------------------------------

if HAVE_NUMBA:
    _INF = np.float32(np.inf)
    _FLT_MAX = np.float32(np.finfo(np.float32).max)

    @jit_helper
    def _normalized(v, scale, inv):
        """:func:`normalized` of one coordinate (``inv`` from :func:`inverse_norms`; the test on it
        is the same for the whole bucket, so the compiler keeps it out of the loop)."""
        r = v * inv if inv < _INF else v / scale
        return min(max(r, np.float32(-1.0)), np.float32(1.0))

    @jit_helper
    def _interval_by_compares(r, first, lows, highs, invs):
        """The interval ``L_j <= r < L_{j+1}`` as (j, L_j, L_{j+1}, 1 / (L_{j+1} - L_j)) by comparing
        ``r`` with each of ``L_1..L_{K-2}`` (the tuple ``lows``; ``highs`` holds ``L_2..L_{K-1}``
        and ``invs`` the intervals' inverse widths; ``first`` is (L_0, L_1, its inverse width);
        padded with 2.0, above every r): straight-line code, the tuples' length being known when
        compiling. Tuples, not arrays: selects between loaded table entries would be compiled
        into slow gathers."""
        j = np.int32(0)
        low, high, inv = first[0], first[1], first[2]
        for t in range(len(lows)):
            above = lows[t] <= r
            j += np.int32(above)
            low = lows[t] if above else low
            high = highs[t] if above else high
            inv = invs[t] if above else inv
        return j, low, high, inv

    @jit_helper
    def _interval_by_search(r, levels, invs, first, count):
        """The same interval by a binary search narrowed by a uniform grid of cells over [-1, 1]
        (:func:`search_table`): the cell bounds it to levels[first..first+count-1] (usually one
        or two), then a branchless binary search over those few."""
        half_cells = np.float32(first.size // 2)
        c = min(np.int64((r + np.float32(1.0)) * half_cells), first.size - 1)
        lo = np.int64(first[c])
        m = np.int64(count[c])
        while m > 1:
            half = m >> 1
            lo = lo + half if levels[lo + half] <= r else lo
            m -= half
        return lo, levels[lo], levels[lo + 1], invs[lo]

    @jit_helper
    def _round(r, j, low, high, inv, u):
        """Code and value (in units of the norm) of the stochastic rounding of ``r`` (``inv``:
        the interval's inverse width; ``u`` the coordinate's uniform)."""
        up = u < (r - low) * inv
        return np.uint8(j + np.int32(up)), high if up else low

    @jit_helper
    def _small_segment(xs, cs, us, scale, inv_norm, head, lows, highs, invs, ds, want_decoded):
        """Codes (and decoded values, when wanted) of one bucket's run of coordinates."""
        if want_decoded:
            for k in range(xs.size):
                r = _normalized(xs[k], scale, inv_norm)
                j, low, high, inv = _interval_by_compares(r, head, lows, highs, invs)
                cs[k], value = _round(r, j, low, high, inv, us[k])
                ds[k] = scale * value
        else:
            for k in range(xs.size):
                r = _normalized(xs[k], scale, inv_norm)
                j, low, high, inv = _interval_by_compares(r, head, lows, highs, invs)
                cs[k] = _round(r, j, low, high, inv, us[k])[0]

    @jit_helper
    def _chunk_start(c, n, seed):
        start, stop = chunk_range(c, n)
        uniforms = np.empty(CHUNK, dtype=np.float32)
        fill_uniforms(seed, start, stop - start, uniforms)
        return start, stop, np.empty(CHUNK, dtype=np.uint8), uniforms

    @jit_helper
    def _encode_small(c, x, norms, inv_norms, first, lows, highs, invs, bucket, bits, seed, out, decoded,
                      want_decoded):
        start, stop, codes, uniforms = _chunk_start(c, x.size, seed)
        head = (first[0], first[1], first[2])  # scalars, loaded once
        i = start
        while i < stop:
            b, end = bucket_segment(i, stop, bucket)
            _small_segment(x[i:end], codes[i - start:end - start], uniforms[i - start:end - start], norms[b],
                           inv_norms[b], head, lows, highs, invs, decoded[i:end] if want_decoded else decoded,
                           want_decoded)
            i = end
        pack_chunk(codes, start, stop, bits, out)
        return 0

    @jit_helper
    def _encode_small_fused(c, x, x_bits, kind, first, lows, highs, invs, bucket, bits, seed, norms, norms_bits,
                            out, decoded, want_decoded):
        """:func:`_encode_small` computing each bucket's norm (as
        :func:`~mpiqsgd.codecs.buckets.checked_norms`) while the bucket is in cache; ``bucket``
        divides :data:`CHUNK`. Returns the number of buckets holding NaN or Inf or whose norm
        leaves the float32 range (their codes are left unset: the caller raises)."""
        start, stop, codes, uniforms = _chunk_start(c, x.size, seed)
        head = (first[0], first[1], first[2])
        bad = 0
        for i in range(start, stop, bucket):
            end = min(stop, i + bucket)
            b = i // bucket
            if not write_norm(x[i:end], x_bits[i:end], kind, norms, norms_bits, b) or not norms[b] <= _FLT_MAX:
                bad += 1
                continue
            scale = norms[b]
            inv_norm = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)  # inverse_norms
            _small_segment(x[i:end], codes[i - start:end - start], uniforms[i - start:end - start], scale, inv_norm,
                           head, lows, highs, invs, decoded[i:end] if want_decoded else decoded, want_decoded)
        pack_chunk(codes, start, stop, bits, out)
        return bad

    @jit_helper
    def _t1(a):
        return (a[0],)

    @jit_helper
    def _t2(a):
        return (a[0], a[1])

    @jit_helper
    def _t4(a):
        return (a[0], a[1], a[2], a[3])

    @jit_helper
    def _t6(a):
        return (a[0], a[1], a[2], a[3], a[4], a[5])

    @jit_helper
    def _t8(a):
        return (a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7])

    @jit_helper
    def _t14(a):
        return (a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13])

    @jit_helper
    def _t16(a):
        return (a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13],
                a[14], a[15])

    # The tables reach the kernels as arrays (the parallel driver takes no nested tuples) and
    # become tuples of the width's length inside them: L_1..L_{K-2} and L_2..L_{K-1} (padded)
    # to encode, the 2**bits values to decode. The branches on ``bits`` (a closure constant)
    # are pruned when compiling: one loop per kernel.

    def _encode_small_kernel(bits):
        @jit_kernel
        def kernel(c0, c1, x, norms, inv_norms, first, lows, highs, invs, bucket, seed, out, decoded, want_decoded):
            for c in range(c0, c1):
                if bits == 1:
                    _encode_small(c, x, norms, inv_norms, first, _t1(lows), _t1(highs), _t1(invs), bucket, bits, seed,
                                  out, decoded, want_decoded)
                elif bits == 2:
                    _encode_small(c, x, norms, inv_norms, first, _t2(lows), _t2(highs), _t2(invs), bucket, bits, seed,
                                  out, decoded, want_decoded)
                elif bits == 3:
                    _encode_small(c, x, norms, inv_norms, first, _t6(lows), _t6(highs), _t6(invs), bucket, bits, seed,
                                  out, decoded, want_decoded)
                else:
                    _encode_small(c, x, norms, inv_norms, first, _t14(lows), _t14(highs), _t14(invs), bucket, bits,
                                  seed, out, decoded, want_decoded)
            return 0
        return kernel

    _encode_small_chunks = ByWidth(_encode_small_kernel)

    def _encode_fused_kernel(bits):
        @jit_kernel
        def kernel(c0, c1, x, kind, first, lows, highs, invs, bucket, seed, norms, out, decoded, want_decoded):
            x_bits, norms_bits = x.view(np.int32), norms.view(np.int32)
            bad = 0
            for c in range(c0, c1):
                if bits == 1:
                    bad += _encode_small_fused(c, x, x_bits, kind, first, _t1(lows), _t1(highs), _t1(invs), bucket,
                                               bits, seed, norms, norms_bits, out, decoded, want_decoded)
                elif bits == 2:
                    bad += _encode_small_fused(c, x, x_bits, kind, first, _t2(lows), _t2(highs), _t2(invs), bucket,
                                               bits, seed, norms, norms_bits, out, decoded, want_decoded)
                elif bits == 3:
                    bad += _encode_small_fused(c, x, x_bits, kind, first, _t6(lows), _t6(highs), _t6(invs), bucket,
                                               bits, seed, norms, norms_bits, out, decoded, want_decoded)
                else:
                    bad += _encode_small_fused(c, x, x_bits, kind, first, _t14(lows), _t14(highs), _t14(invs),
                                               bucket, bits, seed, norms, norms_bits, out, decoded, want_decoded)
            return bad
        return kernel

    _encode_fused_chunks = ByWidth(_encode_fused_kernel)

    @jit_helper
    def _encode_search_chunk_one(c, x, norms, inv_norms, levels, invs, first, count, bucket, bits, seed, out, decoded,
                                 want_decoded):
        start, stop = chunk_range(c, x.size)
        codes = np.empty(CHUNK, dtype=np.uint8)
        uniforms = np.empty(CHUNK, dtype=np.float32)
        fill_uniforms(seed, start, stop - start, uniforms)
        i = start
        while i < stop:
            b, end = bucket_segment(i, stop, bucket)
            scale, inv_norm = norms[b], inv_norms[b]
            for k in range(i, end):
                r = _normalized(x[k], scale, inv_norm)
                j, low, high, inv = _interval_by_search(r, levels, invs, first, count)
                codes[k - start], value = _round(r, j, low, high, inv, uniforms[k - start])
                if want_decoded:
                    decoded[k] = scale * value
            i = end
        pack_chunk(codes, start, stop, bits, out)
        return 0

    def _encode_search_kernel(bits):
        @jit_kernel
        def kernel(c0, c1, x, norms, inv_norms, levels, invs, first, count, bucket, seed, out, decoded, want_decoded):
            total = 0
            for c in range(c0, c1):
                total += _encode_search_chunk_one(c, x, norms, inv_norms, levels, invs, first, count,
                                                  bucket, bits, seed, out, decoded, want_decoded)
            return total
        return kernel

    _encode_search_chunks = ByWidth(_encode_search_kernel)

    @jit_helper
    def _decode_small(c, packed, norms, values, n_levels, bucket, bits, out):
        n_levels = np.int32(n_levels)
        start, stop = chunk_range(c, out.size)
        codes = np.empty(CHUNK, dtype=np.uint8)
        unpack_chunk(packed, start, stop, bits, codes)
        bad = 0
        i = start
        while i < stop:
            b, end = bucket_segment(i, stop, bucket)
            cs, os, scale = codes[i - start:end - start], out[i:end], norms[b]
            segment_bad = np.int32(0)  # 32-bit lanes throughout: twice the vector width of int64
            for k in range(cs.size):
                code = np.int32(cs[k])
                segment_bad += np.int32(code >= n_levels)
                value = values[0]
                for t in range(1, len(values)):  # a select per level, no gather
                    value = values[t] if code == np.int32(t) else value
                os[k] = scale * value
            bad += segment_bad
            i = end
        return bad

    def _decode_small_kernel(bits):
        @jit_kernel
        def kernel(c0, c1, packed, norms, values, n_levels, bucket, out):
            total = 0
            for c in range(c0, c1):
                if bits == 1:
                    total += _decode_small(c, packed, norms, _t2(values), n_levels, bucket, bits, out)
                elif bits == 2:
                    total += _decode_small(c, packed, norms, _t4(values), n_levels, bucket, bits, out)
                elif bits == 3:
                    total += _decode_small(c, packed, norms, _t8(values), n_levels, bucket, bits, out)
                else:
                    total += _decode_small(c, packed, norms, _t16(values), n_levels, bucket, bits, out)
            return total
        return kernel

    _decode_small_chunks = ByWidth(_decode_small_kernel)

    @jit_helper
    def _decode_search_chunk_one(c, packed, norms, levels, bucket, bits, out):
        start, stop = chunk_range(c, out.size)
        codes = np.empty(CHUNK, dtype=np.uint8)
        unpack_chunk(packed, start, stop, bits, codes)
        top = levels.size - 1
        bad = 0
        i = start
        while i < stop:
            b, end = bucket_segment(i, stop, bucket)
            scale = norms[b]
            for k in range(i, end):
                code = np.int64(codes[k - start])
                if code > top:
                    bad += 1
                    code = top
                out[k] = scale * levels[code]
            i = end
        return bad

    def _decode_search_kernel(bits):
        @jit_kernel
        def kernel(c0, c1, packed, norms, levels, bucket, out):
            total = 0
            for c in range(c0, c1):
                total += _decode_search_chunk_one(c, packed, norms, levels, bucket, bits, out)
            return total
        return kernel

    _decode_search_chunks = ByWidth(_decode_search_kernel)

CELLS = 1 << 14  # grid cells over [-1, 1] for the CPU kernel's search (2 x 32 KiB of int16)
_MARGIN = 1e-6  # covers the float32 rounding of the cell index (below 2.4e-7 in r)


def search_table(levels):
    """Per grid cell ``c`` of [-1, 1] (width ``2 / CELLS``): the first candidate interval
    index and the number of candidates for any ``r`` whose cell is ``c``.

    The search result ``j(r)`` (the last of ``levels[0..K-2]`` that is <= r) is monotone
    in ``r``, so ``j`` of the cell's ends widened by a margin bounds every ``j(r)`` in it.
    """
    L = np.asarray(levels, dtype=np.float32).astype(np.float64)
    edges = -1.0 + np.arange(CELLS + 1) * (2.0 / CELLS)
    def j(r):
        return np.clip(np.searchsorted(L, r, side="right") - 1, 0, L.size - 2)
    first = j(edges[:-1] - _MARGIN)
    last = j(edges[1:] + _MARGIN)
    return first.astype(np.int16), (last - first + 1).astype(np.int16)


def _compare_tables(levels, bits):
    """The arrays of :func:`_interval_by_compares` (``first`` = L_0, L_1 and the first interval's
    inverse width; ``lows``, ``highs``, ``invs``) and of the decode kernel's selects, padded to
    ``2**bits`` levels."""
    L = np.asarray(levels, dtype=np.float32)
    inv = inverse_widths(L)
    size = 2**bits
    lows = np.full(max(size - 2, 2), 2.0, dtype=np.float32)  # 2.0 is above every r: never counted
    highs, invs = lows.copy(), lows.copy()
    lows[: L.size - 2] = L[1:-1]
    highs[: L.size - 2] = L[2:]
    invs[: L.size - 2] = inv[1:]
    values = np.full(size, L[-1], dtype=np.float32)
    values[: L.size] = L
    return np.array([L[0], L[1], inv[0]], dtype=np.float32), lows, highs, invs, values


def levelset_encode(x, norms, levels, bucket, bits, seed, want_decoded, force_torch=False, table=None, out=None):
    """Round ``x`` stochastically to a level set and pack the level indices.

    Args:
        x: flat float32 tensor.
        norms: float32 per bucket, finite and >= 0.
        levels: float32 tensor of K strictly increasing levels, ``L_0 = -1``, ``L_{K-1} = 1``.
        bucket, bits: codec parameters (``K <= 2**bits``).
        seed: counter-based RNG seed.
        want_decoded: also return the values a receiver decodes.
        force_torch: use the torch implementation on the CPU too (tests).
        table: :func:`search_table` of ``levels`` (computed when not given; used above
            :data:`UNROLL_BITS` bits).
        out: where the numba kernel packs the codes (as :func:`~mpiqsgd.codecs.qsgd_kernels.level_encode`).

    Returns:
        (packed uint8 tensor, decoded float32 tensor or None), on ``x``'s device.
    """
    if not use_numba(x.device, force_torch):
        return _encode_torch(x, norms, levels, bucket, bits, seed, want_decoded)
    n = x.numel()
    nbytes = (n * bits + 7) // 8
    out = padded(nbytes) if out is None else check_spare(out, nbytes)
    decoded = np.empty(n if want_decoded else 0, dtype=np.float32)
    tail = (bucket, np.uint64(seed), out, decoded, bool(want_decoded))
    head = (x.numpy(), norms.numpy(), inverse_norms(norms.numpy()))
    if bits <= UNROLL_BITS:
        first, lows, highs, invs, _ = _compare_tables(levels.numpy(), bits)
        run_chunks(_encode_small_chunks[bits], n, head + (first, lows, highs, invs) + tail)
    else:
        first, count = search_table(levels.numpy()) if table is None else table
        L = levels.numpy()
        run_chunks(_encode_search_chunks[bits], n, head + (L, inverse_widths(L), first, count) + tail)
    return torch.from_numpy(out[:nbytes]), (torch.from_numpy(decoded) if want_decoded else None)


def fused_levelset_encode(x, norm, levels, bucket, bits, seed, want_decoded, out=None):
    """:func:`levelset_encode` with the bucket norms (:func:`~mpiqsgd.codecs.buckets.checked_norms`)
    computed in the same pass: numba, CPU, ``bits <= UNROLL_BITS`` and a ``bucket`` dividing
    :data:`~mpiqsgd.codecs.kernels.CHUNK`; the same bytes.

    Returns:
        (float32 norms tensor, packed uint8 tensor, decoded tensor or None, number of buckets holding
        NaN or Inf or with a norm beyond float32: when not 0, the codes are not all written).
    """
    n = x.numel()
    nbytes = (n * bits + 7) // 8
    out = padded(nbytes) if out is None else check_spare(out, nbytes)
    norms = np.empty(-(-n // bucket), dtype=np.float32)
    decoded = np.empty(n if want_decoded else 0, dtype=np.float32)
    first, lows, highs, invs, _ = _compare_tables(levels.numpy(), bits)
    bad = run_chunks(_encode_fused_chunks[bits], n, (x.numpy(), NORM_KINDS[norm], first, lows, highs, invs, bucket,
                                                    np.uint64(seed), norms, out, decoded, bool(want_decoded)))
    return (torch.from_numpy(norms), torch.from_numpy(out[:nbytes]),
            torch.from_numpy(decoded) if want_decoded else None, bad)


def levelset_decode(packed, norms, levels, bucket, bits, n, force_torch=False, out=None):
    """Unpack codes; return (float32 values, number of codes >= K); the values are ``out`` when
    given, on the numba path (:func:`~mpiqsgd.codecs.qsgd_kernels.level_decode`)."""
    if not use_numba(packed.device, force_torch):
        return _decode_torch(packed, norms, levels, bucket, bits, n)
    result, out = decode_target(out, n)
    if bits <= UNROLL_BITS:
        values = _compare_tables(levels.numpy(), bits)[4]
        bad = run_chunks(_decode_small_chunks[bits], n, (packed.numpy(), norms.numpy(), values, levels.numel(),
                                                        bucket, out))
    else:
        bad = run_chunks(_decode_search_chunks[bits], n, (packed.numpy(), norms.numpy(), levels.numpy(), bucket,
                                                         out))
    return result, bad
