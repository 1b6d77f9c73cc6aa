"""Fused level-set quantize-and-pack kernels: numba on the CPU, torch ops on other devices.

Coordinate ``i`` of bucket ``b`` is normalized in float32, ``r = x_i / norm_b`` (``r = 0``
in a zero bucket), clamped to [-1, 1], and placed in the interval ``L_j <= r < L_{j+1}``
(``j <= K - 2``): the torch code by ``searchsorted``, the CPU kernel by a binary search
narrowed by a uniform grid of cells over [-1, 1] (the same ``j``). With the counter-based
uniform ``u_i`` of :mod:`mpiqsgd.codecs.kernels` the code is ``j + 1`` when
``u_i < (r - L_j) / (L_{j+1} - L_j)``, else ``j`` (all float32). The receiver's value is
``norm_b * L[code]``. Codes are packed as in :mod:`mpiqsgd.codecs.bits`. Both
implementations give the same bytes and values.
"""

import numpy as np
import torch

from .kernels import HAVE_NUMBA, parallel_ok, uniform

if HAVE_NUMBA:
    import numba

    from .kernels import _load_word, _store_word, _u

__all__ = ["levelset_encode", "levelset_decode", "search_table", "CELLS"]


# -- torch implementation (any device) ----------------------------------------------------

def _encode_torch(x, norms, levels, bucket, bits, seed, want_decoded):
    from .bits import pack

    n = x.numel()
    K = levels.numel()
    scale = norms.repeat_interleave(bucket)[:n]
    r = torch.where(scale > 0, x / scale, torch.zeros((), dtype=x.dtype, device=x.device)).clamp_(-1.0, 1.0)
    j = (torch.searchsorted(levels, r, right=True) - 1).clamp_(0, K - 2)
    low = levels[j]
    p = (r - low) / (levels[j + 1] - low)
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
    @numba.njit(inline="always")
    def _encode_group(g, x, norms, levels, first, count, bucket, bits, seed, out, decoded, want_decoded):
        n = x.size
        one = np.float32(1.0)
        half_cells = np.float32(first.size // 2)
        last_cell = first.size - 1
        word = np.uint64(0)
        for k in range(8):
            i = g * 8 + k
            if i >= n:
                break
            scale = norms[i // bucket]
            r = np.float32(0.0)
            if scale > 0:
                r = x[i] / scale
            if r > one:
                r = one
            elif r < -one:
                r = -one
            # The last of levels[0..K-2] that is <= r: the cell of r in a uniform grid over
            # [-1, 1] bounds it to levels[first..first+count-1] (usually one or two), then a
            # branchless binary search over those few.
            c = np.int64((r + one) * half_cells)
            if c > last_cell:
                c = last_cell
            lo = np.int64(first[c])
            m = np.int64(count[c])
            while m > 1:
                half = m >> 1
                lo = lo + half if levels[lo + half] <= r else lo
                m -= half
            low = levels[lo]
            p = (r - low) / (levels[lo + 1] - low)
            code = lo + (1 if _u(seed, i) < p else 0)
            word |= np.uint64(code) << np.uint64(k * bits)
            if want_decoded:
                decoded[i] = scale * levels[code]
        _store_word(out, g, bits, word)

    @numba.njit(inline="always")
    def _decode_group(g, packed, norms, levels, bucket, bits, n, out):
        word = _load_word(packed, g, bits)
        K = levels.size
        bad = 0
        for k in range(8):
            i = g * 8 + k
            if i >= n:
                break
            code = np.int64((word >> np.uint64(k * bits)) & np.uint64((1 << bits) - 1))
            if code >= K:
                bad += 1
                code = K - 1
            out[i] = norms[i // bucket] * levels[code]
        return bad

    # Threads pay off only on large buffers; small ones (and oversubscribed ranks) run serially.
    @numba.njit(parallel=True, cache=True, nogil=True)
    def _encode_parallel(x, norms, levels, first, count, bucket, bits, seed, out, decoded, want_decoded):
        for g in numba.prange((x.size + 7) // 8):
            _encode_group(g, x, norms, levels, first, count, bucket, bits, seed, out, decoded, want_decoded)

    @numba.njit(cache=True, nogil=True)
    def _encode_serial(x, norms, levels, first, count, bucket, bits, seed, out, decoded, want_decoded):
        for g in range((x.size + 7) // 8):
            _encode_group(g, x, norms, levels, first, count, bucket, bits, seed, out, decoded, want_decoded)

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _decode_parallel(packed, norms, levels, bucket, bits, n, out):
        bad = 0
        for g in numba.prange((n + 7) // 8):
            bad += _decode_group(g, packed, norms, levels, bucket, bits, n, out)
        return bad

    @numba.njit(cache=True, nogil=True)
    def _decode_serial(packed, norms, levels, bucket, bits, n, out):
        bad = 0
        for g in range((n + 7) // 8):
            bad += _decode_group(g, packed, norms, levels, bucket, bits, n, out)
        return bad


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


def _use_numba(device, force_torch):
    return HAVE_NUMBA and not force_torch and torch.device(device).type == "cpu"


def levelset_encode(x, norms, levels, bucket, bits, seed, want_decoded, force_torch=False, table=None):
    """Round ``x`` stochastically to a level set and pack the level indices.

    Args:
        x: flat float32 tensor.
        norms: float32 per bucket, finite and >= 0.
        levels: float32 tensor of K strictly increasing levels, ``L_0 = -1``, ``L_{K-1} = 1``.
        bucket, bits: codec parameters (``K <= 2**bits``).
        seed: counter-based RNG seed.
        want_decoded: also return the values a receiver decodes.
        force_torch: use the torch implementation on the CPU too (tests).
        table: :func:`search_table` of ``levels`` (computed when not given).

    Returns:
        (packed uint8 tensor, decoded float32 tensor or None), on ``x``'s device.
    """
    if not _use_numba(x.device, force_torch):
        return _encode_torch(x, norms, levels, bucket, bits, seed, want_decoded)
    n = x.numel()
    out = np.empty((n * bits + 7) // 8, dtype=np.uint8)
    decoded = np.empty(n if want_decoded else 0, dtype=np.float32)
    kernel = _encode_parallel if parallel_ok(n) else _encode_serial
    first, count = search_table(levels.numpy()) if table is None else table
    kernel(x.numpy(), norms.numpy(), levels.numpy(), first, count, bucket, bits, np.uint64(seed), out, decoded,
           want_decoded)
    return torch.from_numpy(out), (torch.from_numpy(decoded) if want_decoded else None)


def levelset_decode(packed, norms, levels, bucket, bits, n, force_torch=False):
    """Unpack codes; return (float32 values, number of codes >= K)."""
    if not _use_numba(packed.device, force_torch):
        return _decode_torch(packed, norms, levels, bucket, bits, n)
    out = np.empty(n, dtype=np.float32)
    kernel = _decode_parallel if parallel_ok(n) else _decode_serial
    bad = kernel(packed.numpy(), norms.numpy(), levels.numpy(), bucket, bits, n, out)
    return torch.from_numpy(out), int(bad)
