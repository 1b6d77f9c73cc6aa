"""QSGD's fused quantize-and-pack kernels: numba on the CPU, torch ops on other devices.

A coordinate ``x_i`` of bucket ``b`` becomes the code ``sign << (bits - 1) | level`` with
``r = min(|x_i| * scale_b, s)`` and ``level = floor(r) + (u_i < r - floor(r))`` (stochastic,
``u_i`` the counter-based uniform of :mod:`mpiqsgd.codecs.kernels`) or ``rint(r)`` (nearest),
``scale_b = s / norm_b``; the receiver's value is ``±level * norm_b / s``. Codes are packed
as in :mod:`mpiqsgd.codecs.bits`. Both implementations give the same bytes and values; the
machinery (chunks, threads, packing, uniforms) is :mod:`mpiqsgd.codecs.kernels`'.

Encoders write their payload in place where they can: into the send buffer the exchange
reuses (``out`` of :func:`level_encode` at :func:`~mpiqsgd.codecs.kernels.codes_slot`, the
scales by :func:`~mpiqsgd.codecs.kernels.place_scales`), so neither a payload allocation nor
the frame's copy happens on the hot path.

Where the bucket divides :data:`~mpiqsgd.codecs.kernels.CHUNK`
(:func:`~mpiqsgd.codecs.kernels.one_pass`; QSGD's 512), the bucket's norm is summed first, in
the same pass (:func:`fused_level_encode`; the level sets' likewise): the bucket is read from
memory once, then quantized from cache. Measured on the 2-core VM, 25M coordinates, 4-bit
QSGD, 2 threads: the norms' own pass took 3-7 ms of a 28 ms encode, the fused encode 18 ms.
"""

import numpy as np
import torch

from .kernels import (HAVE_NUMBA, NORM_KINDS, check_spare, decode_target, padded, run_chunks, uniform,
                      use_numba)

if HAVE_NUMBA:
    from .kernels import (CHUNK, ByWidth, bucket_segment, chunk_range, fill_uniforms, jit_helper, jit_kernel,
                          pack_chunk, unpack_chunk, write_norm)

__all__ = ["level_encode", "fused_level_encode", "level_decode"]


# -- torch implementation (any device) ----------------------------------------------------

def _encode_torch(x, scale, bucket, bits, levels, seed, stochastic):
    from .bits import pack

    n = x.numel()
    n_buckets = scale.numel()
    padded_x = torch.zeros(n_buckets * bucket, dtype=torch.float32, device=x.device)
    padded_x[:n] = x
    r = (padded_x.view(n_buckets, bucket).abs() * scale[:, None]).clamp_(max=float(levels)).view(-1)[:n]
    if stochastic:
        lower = r.floor()
        level = lower + (uniform(seed, n, x.device) < (r - lower)).to(torch.float32)
    else:
        level = r.round()
    level = level.to(torch.uint8)
    negative = x < 0
    return pack(level | (negative.to(torch.uint8) << (bits - 1)), bits), level, negative


def _values_torch(level, negative, unit, bucket):
    n = level.numel()
    values = level.to(torch.float32) * unit.repeat_interleave(bucket)[:n]
    return torch.where(negative, -values, values)


def _decode_torch(packed, unit, bucket, bits, levels, n):
    from .bits import unpack

    codes = unpack(packed, n, bits)
    level = codes & ((1 << (bits - 1)) - 1)
    bad = int((level > levels).sum()) if n else 0
    return _values_torch(level, (codes >> (bits - 1)).bool(), unit, bucket), bad


if HAVE_NUMBA:
    # -- numba implementation (CPU) -----------------------------------------------------------

    @jit_helper
    def _level(v, s, top, u, stochastic, sign_shift):
        r = min(abs(v) * s, top)
        if stochastic:
            lower = np.floor(r)
            level = np.int32(lower) + np.int32(u < r - lower)
        else:
            level = np.int32(np.rint(r))
        return np.uint8(level | (np.int32(v < 0) << sign_shift))

    @jit_helper
    def _level_value(code, u, level_mask, sign_shift):
        val = np.float32(code & level_mask) * u
        return -val if code >> sign_shift else val

    @jit_helper
    def _level_segment(xs, cs, us, s, u, top, stochastic, sign_shift, ds, want_decoded):
        """Codes of one bucket's run of coordinates ``xs`` (scale ``s``, level step ``u``; uniforms
        ``us``) into ``cs``, and their decoded values into ``ds`` when wanted."""
        for k in range(xs.size):
            cs[k] = _level(xs[k], s, top, us[k] if stochastic else np.float32(0.0), stochastic, sign_shift)
        if want_decoded:
            level_mask = np.uint8((1 << sign_shift) - 1)
            for k in range(xs.size):
                ds[k] = _level_value(cs[k], u, level_mask, sign_shift)

    @jit_helper
    def _chunk_buffers(start, stop, seed, stochastic):
        """A chunk's code buffer and its uniforms (empty unless stochastic)."""
        uniforms = np.empty(CHUNK if stochastic else 0, dtype=np.float32)
        if stochastic:
            fill_uniforms(seed, start, stop - start, uniforms)
        return np.empty(CHUNK, dtype=np.uint8), uniforms

    @jit_helper
    def _level_encode_chunk_one(c, x, scale, unit, bucket, bits, levels, seed, stochastic, out, decoded,
                                want_decoded):
        start, stop = chunk_range(c, x.size)
        codes, uniforms = _chunk_buffers(start, stop, seed, stochastic)
        i = start
        while i < stop:
            b, end = bucket_segment(i, stop, bucket)
            _level_segment(x[i:end], codes[i - start:end - start],
                           uniforms[i - start:end - start] if stochastic else uniforms, scale[b], unit[b],
                           np.float32(levels), stochastic, bits - 1, decoded[i:end] if want_decoded else decoded,
                           want_decoded)
            i = end
        pack_chunk(codes, start, stop, bits, out)
        return 0

    def _level_encode_kernel(bits):
        @jit_kernel
        def kernel(c0, c1, x, scale, unit, bucket, levels, seed, stochastic, out, decoded, want_decoded):
            total = 0
            for c in range(c0, c1):
                total += _level_encode_chunk_one(c, x, scale, unit, bucket, bits,
                                                 levels, seed, stochastic, out, decoded, want_decoded)
            return total
        return kernel

    def _fused_encode_kernel(key):
        """QSGD's norms and codes in one pass over each chunk (``key`` = width | kind << 4): a
        bucket's norm is summed while its values are in cache, then they are quantized. For
        buckets that divide :data:`CHUNK`. Returns the number of buckets whose norm is not
        finite or above ``limit`` (their codes are left unset: the caller raises)."""
        bits, kind = key & 15, key >> 4

        @jit_kernel
        def kernel(c0, c1, x, bucket, levels, limit, seed, stochastic, norms, out, decoded, want_decoded):
            bad = 0
            x_bits, norms_bits = x.view(np.int32), norms.view(np.int32)
            top = np.float32(levels)
            for c in range(c0, c1):
                start, stop = chunk_range(c, x.size)
                codes, uniforms = _chunk_buffers(start, stop, seed, stochastic)
                for i in range(start, stop, bucket):
                    end = min(stop, i + bucket)
                    b = i // bucket
                    if not write_norm(x[i:end], x_bits[i:end], kind, norms, norms_bits, b) or \
                            not norms[b] <= limit:
                        bad += 1
                        continue
                    # as the torch ops compute them: levels / norm is (1 / norm) * levels there
                    s = (np.float32(1.0) / norms[b]) * top
                    s = s if s < np.float32(np.inf) else np.float32(0.0)  # a zero or tiny bucket: zeros
                    _level_segment(x[i:end], codes[i - start:end - start],
                                   uniforms[i - start:end - start] if stochastic else uniforms, s, norms[b] / top,
                                   top, stochastic, bits - 1, decoded[i:end] if want_decoded else decoded,
                                   want_decoded)
                pack_chunk(codes, start, stop, bits, out)
            return bad
        return kernel

    _fused_encode_chunks = ByWidth(_fused_encode_kernel)

    _level_encode_chunks = ByWidth(_level_encode_kernel)

    @jit_helper
    def _level_decode_chunk_one(c, packed, unit, bucket, bits, levels, out):
        start, stop = chunk_range(c, out.size)
        codes = np.empty(CHUNK, dtype=np.uint8)
        unpack_chunk(packed, start, stop, bits, codes)
        sign_shift = bits - 1
        level_mask = np.uint8((1 << sign_shift) - 1)
        bad = 0
        i = start
        while i < stop:
            b, end = bucket_segment(i, stop, bucket)
            u = unit[b]
            cs, os = codes[i - start:end - start], out[i:end]
            for k in range(cs.size):
                code = cs[k]
                bad += np.int64((code & level_mask) > levels)
                os[k] = _level_value(code, u, level_mask, sign_shift)
            i = end
        return bad

    def _level_decode_kernel(bits):
        @jit_kernel
        def kernel(c0, c1, packed, unit, bucket, levels, out):
            total = 0
            for c in range(c0, c1):
                total += _level_decode_chunk_one(c, packed, unit, bucket, bits, levels, out)
            return total
        return kernel

    _level_decode_chunks = ByWidth(_level_decode_kernel)


def level_encode(x, scale, unit, bucket, bits, levels, seed, stochastic, want_decoded, force_torch=False,
                 out=None):
    """Quantize ``x`` to sign + level codes and pack them.

    Args:
        x: flat float32 tensor.
        scale: float32 per bucket, ``levels / norm`` (0 for a zero bucket).
        unit: float32 per bucket, ``norm / levels``: the value of one level step.
        bucket, bits, levels: codec parameters.
        seed: counter-based RNG seed (ignored when not stochastic).
        stochastic: unbiased stochastic rounding, else nearest (half to even).
        want_decoded: also return the values a receiver decodes.
        force_torch: use the torch implementation on the CPU too (tests).
        out: where the numba kernel packs the codes (a uint8 ndarray of at least the packed
            bytes plus 8; see :func:`~mpiqsgd.codecs.kernels.padded`), or None for a new buffer.

    Returns:
        (packed uint8 tensor, decoded float32 tensor or None), on ``x``'s device.
    """
    if not use_numba(x.device, force_torch):
        packed, level, negative = _encode_torch(x, scale, bucket, bits, levels, seed, stochastic)
        return packed, (_values_torch(level, negative, unit, bucket) if want_decoded else None)
    n = x.numel()
    nbytes = (n * bits + 7) // 8
    out = padded(nbytes) if out is None else check_spare(out, nbytes)
    decoded = np.empty(n if want_decoded else 0, dtype=np.float32)
    run_chunks(_level_encode_chunks[bits], n, (x.numpy(), scale.numpy(), unit.numpy(), bucket, levels,
                                              np.uint64(seed), bool(stochastic), out, decoded, bool(want_decoded)))
    return torch.from_numpy(out[:nbytes]), (torch.from_numpy(decoded) if want_decoded else None)


def fused_level_encode(x, bucket, norm, bits, levels, limit, seed, stochastic, want_decoded, out=None):
    """:func:`level_encode` with QSGD's bucket norms computed in the same pass (numba, CPU), for a
    ``bucket`` that divides :data:`~mpiqsgd.codecs.kernels.CHUNK`: the norms are
    :func:`~mpiqsgd.codecs.buckets.bucket_norms`' and the scales
    those of :class:`~mpiqsgd.codecs.qsgd.QSGD`'s torch ops (``levels / norm``, 0 where that
    overflows), so the bytes are the same; ``limit`` bounds a norm.

    Returns:
        (float32 norms tensor, packed uint8 tensor, decoded tensor or None, number of buckets with a
        NaN/Inf value or a norm above ``limit``: when not 0, the codes are not all written).
    """
    n = x.numel()
    nbytes = (n * bits + 7) // 8
    out = padded(nbytes) if out is None else check_spare(out, nbytes)
    norms = np.empty(-(-n // bucket), dtype=np.float32)
    decoded = np.empty(n if want_decoded else 0, dtype=np.float32)
    bad = run_chunks(_fused_encode_chunks[bits | NORM_KINDS[norm] << 4], n,
                     (x.numpy(), bucket, levels, np.float32(limit), np.uint64(seed), bool(stochastic), norms, out,
                      decoded, bool(want_decoded)))
    return (torch.from_numpy(norms), torch.from_numpy(out[:nbytes]),
            torch.from_numpy(decoded) if want_decoded else None, bad)


def level_decode(packed, unit, bucket, bits, levels, n, force_torch=False, out=None):
    """Unpack codes and return (float32 values, number of codes with a level above ``levels``);
    the values are ``out`` (a float32 CPU tensor of ``n``), when given, on the numba path."""
    if not use_numba(packed.device, force_torch):
        return _decode_torch(packed, unit, bucket, bits, levels, n)
    values, target = decode_target(out, n)
    bad = run_chunks(_level_decode_chunks[bits], n, (packed.numpy(), unit.numpy(), bucket, levels, target))
    return values, bad
