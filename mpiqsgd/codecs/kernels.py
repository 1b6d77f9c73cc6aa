"""Fused quantize-and-pack kernels: numba on the CPU, torch ops on other devices.

Both implementations produce the same bytes for the same input and seed. Their
randomness is counter based: coordinate ``i`` of a message uses

    z = splitmix64(seed + (i + 1) * 0x9E3779B97F4A7C15),   u_i = (z >> 40) / 2**24

a float32 uniform on [0, 1) with 24 random bits, where ``seed`` is one 62-bit draw
from the caller's ``torch.Generator``. A counter-based stream needs no sequential
state, so the CPU kernel runs in parallel and still reproduces exactly.

Level codes are packed as in :mod:`mpiqsgd.codecs.bits`: groups of 8 codes form one
little-endian word of ``bits`` bytes.
"""

import threading

import numpy as np
import torch

try:
    import numba
except ImportError:  # pragma: no cover - numba is a declared dependency
    numba = None

__all__ = ["draw_seed", "uniform", "level_encode", "level_decode", "sign_decode", "HAVE_NUMBA"]

HAVE_NUMBA = numba is not None

_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def draw_seed(rng):
    """One 62-bit seed from a torch generator (advances it)."""
    return int(torch.randint(0, 2**62, (1,), generator=rng, device=rng.device).item())


def _signed(c):
    return c - (1 << 64) if c >= 1 << 63 else c


def _lsr(z, k):
    """Logical right shift of int64 tensors holding uint64 bit patterns."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def uniform(seed, n, device="cpu"):
    """The counter-based uniforms u_0..u_{n-1} of ``seed`` as a float32 tensor (torch ops)."""
    z = torch.arange(1, n + 1, dtype=torch.int64, device=device) * _signed(_GOLDEN) + _signed(seed)
    z = (z ^ _lsr(z, 30)) * _signed(_M1)
    z = (z ^ _lsr(z, 27)) * _signed(_M2)
    z = z ^ _lsr(z, 31)
    return _lsr(z, 40).to(torch.float32) * (1.0 / 16777216.0)


# -- torch implementation (any device) ----------------------------------------------------

def _encode_torch(x, scale, bucket, bits, levels, seed, stochastic):
    from .bits import pack

    n = x.numel()
    n_buckets = scale.numel()
    padded = torch.zeros(n_buckets * bucket, dtype=torch.float32, device=x.device)
    padded[:n] = x
    r = (padded.view(n_buckets, bucket).abs() * scale[:, None]).clamp_(max=float(levels)).view(-1)[:n]
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


# -- numba implementation (CPU) -----------------------------------------------------------

_inline = numba.njit(inline="always") if HAVE_NUMBA else (lambda f: f)


@_inline
def _load_word(packed, g, bits):
    """Read group ``g``'s packed word (missing bytes past the end read as zero); also used by
    :mod:`mpiqsgd.codecs.elias`, in plain Python where numba is absent."""
    word = np.uint64(0)
    base = g * bits
    for j in range(bits):
        if base + j < packed.size:
            word |= np.uint64(packed[base + j]) << np.uint64(8 * j)
    return word


if HAVE_NUMBA:
    _G, _A, _B = np.uint64(_GOLDEN), np.uint64(_M1), np.uint64(_M2)

    @numba.njit(inline="always")
    def _u(seed, i):
        z = seed + np.uint64(i + 1) * _G
        z = (z ^ (z >> np.uint64(30))) * _A
        z = (z ^ (z >> np.uint64(27))) * _B
        z = z ^ (z >> np.uint64(31))
        return np.float32(z >> np.uint64(40)) * np.float32(1.0 / 16777216.0)

    @numba.njit(inline="always")
    def _store_word(out, g, bits, word):
        """Write group ``g``'s packed word: its first ``bits`` bytes, cut at the end of ``out``."""
        base = g * bits
        for j in range(bits):
            if base + j < out.size:
                out[base + j] = np.uint8((word >> np.uint64(8 * j)) & np.uint64(255))

    @numba.njit(inline="always")
    def _encode_group(g, x, scale, unit, bucket, bits, top, seed, stochastic, out, decoded, want_decoded):
        n = x.size
        word = np.uint64(0)
        for k in range(8):
            i = g * 8 + k
            if i >= n:
                break
            v = x[i]
            b = i // bucket
            r = abs(v) * scale[b]
            if r > top:
                r = top
            if stochastic:
                lower = np.floor(r)
                level = np.int64(lower) + (1 if _u(seed, i) < r - lower else 0)
            else:
                level = np.int64(np.rint(r))
            neg = v < 0
            word |= np.uint64(level | (np.int64(neg) << (bits - 1))) << np.uint64(k * bits)
            if want_decoded:
                val = np.float32(level) * unit[b]
                decoded[i] = -val if neg else val
        _store_word(out, g, bits, word)

    @numba.njit(inline="always")
    def _decode_group(g, packed, unit, bucket, bits, levels, n, out):
        word = _load_word(packed, g, bits)
        bad = 0
        for k in range(8):
            i = g * 8 + k
            if i >= n:
                break
            code = np.int64((word >> np.uint64(k * bits)) & np.uint64((1 << bits) - 1))
            level = code & np.int64((1 << (bits - 1)) - 1)
            if level > levels:
                bad += 1
            val = np.float32(level) * unit[i // bucket]
            out[i] = -val if (code >> (bits - 1)) & 1 else val
        return bad

    # Threads pay off only on large buffers; small ones (and oversubscribed ranks) run serially.
    @numba.njit(parallel=True, cache=True, nogil=True)
    def _encode_parallel(x, scale, unit, bucket, bits, levels, seed, stochastic, out, decoded, want_decoded):
        top = np.float32(levels)
        for g in numba.prange((x.size + 7) // 8):
            _encode_group(g, x, scale, unit, bucket, bits, top, seed, stochastic, out, decoded, want_decoded)

    @numba.njit(cache=True, nogil=True)
    def _encode_serial(x, scale, unit, bucket, bits, levels, seed, stochastic, out, decoded, want_decoded):
        top = np.float32(levels)
        for g in range((x.size + 7) // 8):
            _encode_group(g, x, scale, unit, bucket, bits, top, seed, stochastic, out, decoded, want_decoded)

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _decode_parallel(packed, unit, bucket, bits, levels, n, out):
        bad = 0
        for g in numba.prange((n + 7) // 8):
            bad += _decode_group(g, packed, unit, bucket, bits, levels, n, out)
        return bad

    @numba.njit(cache=True, nogil=True)
    def _decode_serial(packed, unit, bucket, bits, levels, n, out):
        bad = 0
        for g in range((n + 7) // 8):
            bad += _decode_group(g, packed, unit, bucket, bits, levels, n, out)
        return bad


    @numba.njit(inline="always")
    def _sign_group(g, packed, scales, bucket, n, out):
        byte = packed[g]
        for k in range(8):
            i = g * 8 + k
            if i >= n:
                break
            s = scales[i // bucket]
            out[i] = -s if (byte >> k) & 1 else s

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _sign_parallel(packed, scales, bucket, n, out):
        for g in numba.prange((n + 7) // 8):
            _sign_group(g, packed, scales, bucket, n, out)

    @numba.njit(cache=True, nogil=True)
    def _sign_serial(packed, scales, bucket, n, out):
        for g in range((n + 7) // 8):
            _sign_group(g, packed, scales, bucket, n, out)


PARALLEL_MIN_NUMEL = 1 << 18


def parallel_ok(n):
    """Use the threaded kernel for ``n`` coordinates?

    Only for large buffers, and only from the main thread: simulated ranks are threads
    that may encode at the same time, and numba's thread pool must not be entered by
    several of them at once. Under MPI, :func:`mpiqsgd.machine.share_cpus` sizes the pool
    so that ranks on one node do not oversubscribe its cores.
    """
    return n >= PARALLEL_MIN_NUMEL and threading.current_thread() is threading.main_thread()


def _use_numba(device, force_torch):
    return HAVE_NUMBA and not force_torch and torch.device(device).type == "cpu"


def level_encode(x, scale, unit, bucket, bits, levels, seed, stochastic, want_decoded, force_torch=False):
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

    Returns:
        (packed uint8 tensor, decoded float32 tensor or None), on ``x``'s device.
    """
    if not _use_numba(x.device, force_torch):
        packed, level, negative = _encode_torch(x, scale, bucket, bits, levels, seed, stochastic)
        return packed, (_values_torch(level, negative, unit, bucket) if want_decoded else None)
    n = x.numel()
    out = np.empty((n * bits + 7) // 8, dtype=np.uint8)
    decoded = np.empty(n if want_decoded else 0, dtype=np.float32)
    kernel = _encode_parallel if parallel_ok(n) else _encode_serial
    kernel(x.numpy(), scale.numpy(), unit.numpy(), bucket, bits, levels, np.uint64(seed),
                  stochastic, out, decoded, want_decoded)
    return torch.from_numpy(out), (torch.from_numpy(decoded) if want_decoded else None)


def level_decode(packed, unit, bucket, bits, levels, n, force_torch=False):
    """Unpack codes and return (float32 values, number of codes with a level above ``levels``)."""
    if not _use_numba(packed.device, force_torch):
        return _decode_torch(packed, unit, bucket, bits, levels, n)
    out = np.empty(n, dtype=np.float32)
    kernel = _decode_parallel if parallel_ok(n) else _decode_serial
    bad = kernel(packed.numpy(), unit.numpy(), bucket, bits, levels, n, out)
    return torch.from_numpy(out), int(bad)


def sign_decode(packed, scales, bucket, n, force_torch=False):
    """Values of ``n`` packed sign bits (1 = negative) times their bucket's scale."""
    if not _use_numba(packed.device, force_torch):
        from .bits import unpack

        values = scales.repeat_interleave(bucket)[:n]
        return torch.where(unpack(packed, n, 1).bool(), -values, values)
    out = np.empty(n, dtype=np.float32)
    kernel = _sign_parallel if parallel_ok(n) else _sign_serial
    kernel(packed.numpy(), scales.numpy(), bucket, n, out)
    return torch.from_numpy(out)
