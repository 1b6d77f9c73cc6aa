"""Fused quantize-and-pack kernels: numba on the CPU, torch ops on other devices.

This module is also the shared home of every codec kernel's machinery: the
counter-based uniforms, the packing of code groups, the chunked serial/parallel
driver, the bucket norms' kernel and the choice between numba and torch (:func:`use_numba`).

Encoders write their payload in place where they can: into the send buffer the exchange
reuses (``out`` of :func:`level_encode` at :func:`codes_slot`, the scales by :func:`place_scales`), so
neither a payload allocation nor the frame's copy happens on the hot path.

Both implementations produce the same bytes for the same input and seed. Their
randomness is counter based: coordinates ``2 j`` and ``2 j + 1`` of a message share one hash,

    z = splitmix64(seed + (j + 1) * 0x9E3779B97F4A7C15),
    u_{2j} = (z >> 40) / 2**24,   u_{2j+1} = ((z >> 16) & 0xFFFFFF) / 2**24

float32 uniforms on [0, 1) with 24 random bits each (disjoint bits of one output), where
``seed`` is one 62-bit draw from the caller's ``torch.Generator``. A counter-based stream
needs no sequential state, so the CPU kernel runs in parallel and still reproduces exactly;
one hash per two coordinates halves its cost (64-bit multiplies: a third of the QSGD
kernel's time with one hash per coordinate). The CPU kernels draw a chunk's uniforms into a
buffer first (:func:`fill_uniforms`), then quantize.

Level codes are packed as in :mod:`mpiqsgd.codecs.bits`: groups of 8 codes form one
little-endian word of ``bits`` bytes.

The CPU kernels split a message into chunks of :data:`CHUNK` coordinates (a thread's
unit of work). A chunk is processed in vectorizable passes over a small code buffer that
stays in L1: codes of each bucket segment (one scale per segment, so no division per
coordinate), then the packing of 8-code groups by shifts and masks. Where the bucket
divides :data:`CHUNK` (:func:`one_pass`; QSGD's 512, the level sets' 8192), the bucket's norm is summed
first, in the same pass (:func:`fused_level_encode`; the level sets' likewise): the
bucket is read from memory once, then quantized from cache. Measured on the 2-core VM,
25M coordinates, 4-bit QSGD, 2 threads: the norms' own pass took 3-7 ms of a 28 ms
encode, the fused encode 18 ms.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .. import wire

try:
    import numba
except ImportError:  # pragma: no cover - numba is a declared dependency
    numba = None

__all__ = ["draw_seed", "SeedAt", "uniform", "level_encode", "level_decode", "sign_decode", "use_numba", "parallel_ok",
           "run_chunks", "fill_uniforms", "ByWidth", "padded", "codes_slot", "place_scales", "one_pass",
           "check_spare", "host_array", "decode_target", "bucket_norms", "fused_level_encode", "CHUNK", "HAVE_NUMBA"]

HAVE_NUMBA = numba is not None

_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB

CHUNK = 1 << 14  # coordinates per task of the CPU kernels (a multiple of 8: whole code groups)
PARALLEL_MIN_NUMEL = 1 << 18


class SeedAt:
    """Stands in for a codec's generator when one message is encoded as pieces: the piece starting at
    coordinate ``offset`` (even) of a message whose seed is ``seed`` draws the seed whose uniforms are
    those of coordinates ``offset, offset + 1, ...`` of that message (the counter shifted by
    ``offset / 2`` pairs), so that the pieces round every coordinate as the whole message does."""

    def __init__(self, seed, offset):
        if offset % 2:
            raise ValueError(f"SeedAt: a piece starts at an even coordinate (uniforms come in pairs); got {offset}")
        self.seed = (int(seed) + (offset // 2) * _GOLDEN) % (1 << 64)


def draw_seed(rng):
    """One 62-bit seed from a torch generator (advances it), or a :class:`SeedAt`'s shifted seed."""
    if isinstance(rng, SeedAt):
        return rng.seed
    return int(torch.randint(0, 2**62, (1,), generator=rng, device=rng.device).item())


def _signed(c):
    return c - (1 << 64) if c >= 1 << 63 else c


def _lsr(z, k):
    """Logical right shift of int64 tensors holding uint64 bit patterns."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def uniform(seed, n, device="cpu"):
    """The counter-based uniforms u_0..u_{n-1} of ``seed`` as a float32 tensor (torch ops)."""
    z = torch.arange(1, (n + 1) // 2 + 1, dtype=torch.int64, device=device) * _signed(_GOLDEN) + _signed(seed)
    z = (z ^ _lsr(z, 30)) * _signed(_M1)
    z = (z ^ _lsr(z, 27)) * _signed(_M2)
    z = z ^ _lsr(z, 31)
    pairs = torch.stack([_lsr(z, 40), _lsr(z, 16) & 0xFFFFFF], dim=1).view(-1)[:n]
    return pairs.to(torch.float32) * (1.0 / 16777216.0)


def use_numba(device, force_torch=False):
    """Run the numba kernels (CPU tensors, numba present, not forced onto the torch ops)?"""
    return HAVE_NUMBA and not force_torch and torch.device(device).type == "cpu"


def parallel_ok(n):
    """Use the threaded kernel for ``n`` coordinates?

    Only for large buffers, and only from the main thread: simulated ranks are threads
    that may encode at the same time, and numba's thread pool must not be entered by
    several of them at once. Under MPI, :func:`mpiqsgd.machine.share_cpus` sizes the pool
    so that ranks on one node do not oversubscribe its cores.
    """
    return n >= PARALLEL_MIN_NUMEL and threading.current_thread() is threading.main_thread()


def run_chunks(kernel, n, args, units=None):
    """Run a numba kernel ``kernel(c0, c1, *args) -> int`` (chunks ``c0..c1-1``) over the
    chunks of ``n`` coordinates, split into one contiguous range per numba thread; ``units``
    replaces the chunks by another count of equal work items (buckets, say).

    The kernels release the GIL, so a pool of Python threads runs them in parallel; unlike a
    ``prange`` driver taking the kernel as an argument, every kernel stays in numba's cache.
    Threads pay off only on large buffers; small ones (and oversubscribed ranks) run serially.

    Returns:
        the sum of the kernel's results (e.g. a count of invalid codes).
    """
    n_chunks = -(-n // CHUNK) if units is None else units
    n_threads = min(numba.get_num_threads(), n_chunks) if parallel_ok(n) else 1
    if n_threads <= 1:
        return int(kernel(0, n_chunks, *args))
    edges = [n_chunks * t // n_threads for t in range(n_threads + 1)]
    pool = _pool()
    tasks = [pool.submit(kernel, edges[t], edges[t + 1], *args) for t in range(1, n_threads)]
    total = int(kernel(edges[0], edges[1], *args))  # the calling thread takes the first range
    return total + sum(int(task.result()) for task in tasks)


class ByWidth:
    """One numba kernel per code width (or other small integer constant, such as the kind of
    norm), built (compiled, or loaded from numba's cache) on first use.

    ``make(width)`` returns a kernel in which ``width`` is a closure constant: numba prunes
    the branches of the kernel's own body on it before typing (the level-set table widths),
    and the packing (:func:`pack_chunk`) compiles for that one width. Each width compiles in
    1-3 s; one kernel holding every width, with the branches inside inlined helpers (which
    are not pruned), took 51-53 s cold (nuqsgd's encode and decode, 2026-12-01), and a run
    pays only for the widths it uses. The closure must capture plain numbers only: numba's
    cache keys a closure by its captured values, and a captured function would make every
    process compile again. ``kernels[bits]`` is the kernel for ``bits``.
    """

    def __init__(self, make):
        self._make, self._kernels, self._lock = make, {}, threading.Lock()

    def __getitem__(self, width):
        kernel = self._kernels.get(width)
        if kernel is None:
            with self._lock:  # simulated ranks are threads
                kernel = self._kernels.get(width)
                if kernel is None:
                    kernel = self._kernels[width] = self._make(width)
        return kernel


_POOL = []


def _pool():
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=max(1, numba.config.NUMBA_NUM_THREADS - 1),
                                        thread_name_prefix="mpiqsgd-kernel"))
    return _POOL[0]


def padded(nbytes):
    """An uninitialized uint8 buffer of ``nbytes`` plus :data:`mpiqsgd.wire.SLACK` bytes: the CPU
    kernels store whole groups, so the last group may spill past the packed length (callers cut
    it off)."""
    return np.empty(nbytes + wire.SLACK, dtype=np.uint8)


def host_array(out):
    """The numpy view of ``out`` when it is a CPU tensor for a numba kernel to write into, else None."""
    return out.numpy() if out is not None and out.device.type == "cpu" and HAVE_NUMBA else None


def codes_slot(into, numel, bucket):
    """Where the packed codes go inside a payload buffer ``into`` (a uint8 ndarray of float32
    bucket scales, then codes; see :meth:`~mpiqsgd.codecs.base.Codec._quantize`), or None."""
    return None if into is None else into[4 * (-(-numel // bucket)):]


def place_scales(into, scales):
    """Write the float32 bucket ``scales`` at the start of a payload buffer ``into`` (a uint8
    ndarray), before the codes of :func:`codes_slot`."""
    into[:4 * scales.numel()].view(np.float32)[:] = scales.numpy()


def one_pass(bucket):
    """Whether the CPU kernels compute ``bucket``'s norms in the same pass as its codes: buckets
    that divide :data:`CHUNK` (a chunk holds whole buckets)."""
    return CHUNK % bucket == 0


def check_spare(out, nbytes):
    """``out`` checked to hold ``nbytes`` plus the spare bytes (numba does not check bounds)."""
    if out.dtype != np.uint8 or out.ndim != 1 or not out.flags.c_contiguous or out.size < nbytes + wire.SLACK:
        raise ValueError(f"kernel output needs a flat contiguous uint8 array of {nbytes + wire.SLACK} bytes; "
                         f"got {out.dtype} of shape {out.shape}")
    return out


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


# -- shared numba machinery (CPU) -----------------------------------------------------------

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
    # Kernels never divide by zero on valid input; the numpy error model keeps checks out of
    # the loops so that they vectorize. No fastmath: bytes must equal the torch ops'.
    _kernel = numba.njit(cache=True, nogil=True, error_model="numpy")
    _G, _A, _B = np.uint64(_GOLDEN), np.uint64(_M1), np.uint64(_M2)
    _BYTE = np.uint64(255)

    @numba.njit(inline="always")
    def chunk_range(c, n):
        """Coordinates [start, stop) of chunk ``c``."""
        start = c * CHUNK
        return start, min(n, start + CHUNK)

    @numba.njit(inline="always")
    def bucket_segment(i, stop, bucket):
        """The bucket of coordinate ``i`` and the end of its run of coordinates below ``stop``."""
        b = i // bucket
        return b, min(stop, (b + 1) * bucket)

    _UNIT = np.float32(1.0 / 16777216.0)
    _LOW24 = np.uint64(0xFFFFFF)

    @numba.njit(inline="always")
    def fill_uniforms(seed, start, m, u):
        """``u[k]`` = the uniform of coordinate ``start + k`` for ``k < m`` (``start`` even; ``u``
        holds at least ``m`` rounded up to even values, and that many are written): one
        splitmix64 hash per pair of coordinates."""
        pair = np.uint64(start // 2 + 1)
        for j in range((m + 1) // 2):
            z = seed + (pair + np.uint64(j)) * _G
            z = (z ^ (z >> np.uint64(30))) * _A
            z = (z ^ (z >> np.uint64(27))) * _B
            z = z ^ (z >> np.uint64(31))
            # both values < 2**24: the signed conversions are exact and vectorize everywhere
            u[2 * j] = np.float32(np.int64(z >> np.uint64(40))) * _UNIT
            u[2 * j + 1] = np.float32(np.int64((z >> np.uint64(16)) & _LOW24)) * _UNIT

    @numba.njit(inline="always")
    def _compress(x, bits):
        """8 codes of ``bits`` bits, one per byte of ``x`` (byte k = code k), to their packed word."""
        b = np.uint64(bits)
        x = (x & np.uint64(0x00FF00FF00FF00FF)) | ((x & np.uint64(0xFF00FF00FF00FF00)) >> (np.uint64(8) - b))
        x = (x & np.uint64(0x0000FFFF0000FFFF)) | ((x & np.uint64(0xFFFF0000FFFF0000)) >> (np.uint64(16) - b - b))
        return (x & np.uint64(0xFFFFFFFF)) | ((x >> np.uint64(32)) << (np.uint64(4) * b))

    @numba.njit(inline="always")
    def _expand(w, bits):
        """Inverse of :func:`_compress`."""
        b = np.uint64(bits)
        one = np.uint64(1)
        lo1 = ((one << b) - one) * np.uint64(0x0001000100010001)
        lo2 = ((one << (b + b)) - one) * np.uint64(0x0000000100000001)
        x = (w & ((one << (np.uint64(4) * b)) - one)) | ((w >> (np.uint64(4) * b)) << np.uint64(32))
        x = (x & lo2) | ((x & (lo2 << (b + b))) << (np.uint64(16) - b - b))
        return (x & lo1) | ((x & (lo1 << b)) << (np.uint64(8) - b))

    @numba.njit(inline="always")
    def _store_group(out, base, w, bits):
        """Write the ``bits`` bytes of a packed word at ``out[base:]``, one unrolled case per width
        so that the compiler merges the byte stores."""
        out[base] = np.uint8(w & _BYTE)
        if bits >= 2:
            out[base + 1] = np.uint8((w >> np.uint64(8)) & _BYTE)
        if bits >= 3:
            out[base + 2] = np.uint8((w >> np.uint64(16)) & _BYTE)
        if bits >= 4:
            out[base + 3] = np.uint8((w >> np.uint64(24)) & _BYTE)
        if bits >= 5:
            out[base + 4] = np.uint8((w >> np.uint64(32)) & _BYTE)
        if bits >= 6:
            out[base + 5] = np.uint8((w >> np.uint64(40)) & _BYTE)
        if bits >= 7:
            out[base + 6] = np.uint8((w >> np.uint64(48)) & _BYTE)
        if bits >= 8:
            out[base + 7] = np.uint8(w >> np.uint64(56))

    @numba.njit(inline="always")
    def _load_group(packed, base, bits):
        """The packed word of ``bits`` bytes at ``packed[base:]`` (all of them present)."""
        w = np.uint64(packed[base])
        if bits >= 2:
            w |= np.uint64(packed[base + 1]) << np.uint64(8)
        if bits >= 3:
            w |= np.uint64(packed[base + 2]) << np.uint64(16)
        if bits >= 4:
            w |= np.uint64(packed[base + 3]) << np.uint64(24)
        if bits >= 5:
            w |= np.uint64(packed[base + 4]) << np.uint64(32)
        if bits >= 6:
            w |= np.uint64(packed[base + 5]) << np.uint64(40)
        if bits >= 7:
            w |= np.uint64(packed[base + 6]) << np.uint64(48)
        if bits >= 8:
            w |= np.uint64(packed[base + 7]) << np.uint64(56)
        return w

    @numba.njit(inline="always")
    def _pack_groups(words, count, width, out):
        for g in range(count):
            _store_group(out, g * width, _compress(words[g], width), width)

    @numba.njit(inline="always")
    def _unpack_groups(packed, count, width, words):
        for g in range(count):
            words[g] = _expand(_load_group(packed, g * width, width), width)

    @numba.njit(inline="always")
    def pack_chunk(codes, start, stop, bits, out):
        """Pack the codes of coordinates [start, stop) (``codes[k]`` is coordinate ``start + k``;
        ``start`` a multiple of 8) into ``out`` (with the 8 spare bytes of :func:`padded`).

        ``bits`` must be a compile-time constant (the width of a :class:`ByWidth` kernel): a
        runtime width in the byte loads and stores costs an order of magnitude."""
        m = stop - start
        groups = (m + 7) // 8
        for k in range(m, groups * 8):
            codes[k] = 0
        _pack_groups(codes.view(np.uint64), groups, bits, out[(start // 8) * bits:])

    @numba.njit(inline="always")
    def unpack_chunk(packed, start, stop, bits, codes):
        """Inverse of :func:`pack_chunk` (``bits`` a compile-time constant too); ``packed`` may end
        inside the last group."""
        groups = (stop - start + 7) // 8
        words = codes.view(np.uint64)
        g0 = start // 8
        whole = min(groups, max(0, packed.size // bits - g0))  # groups with all their bytes present
        _unpack_groups(packed[g0 * bits:], whole, bits, words)
        for g in range(whole, groups):
            words[g] = _expand(_load_word(packed, g0 + g, bits), bits)

    # -- bucket norms -----------------------------------------------------------------------

    # The norms' sums may be reordered (fastmath reassoc, nothing else), so that they vectorize;
    # in float64, a reordering moves a float32 norm by one ulp only where the sum lies within its
    # float64 rounding error of a float32 rounding boundary. The flag is on this function's
    # instructions only (it is called, not inlined, by numba): the quantizers that call it keep
    # strict IEEE arithmetic, as their bytes must equal the torch ops'.
    @numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
    def write_norm(seg, seg_bits, kind, norms, norms_bits, b):
        """Write bucket ``b``'s float32 norm of ``seg`` (``seg_bits``: the same values as int32) for
        ``kind`` (:data:`NORM_KINDS`) into ``norms`` (``norms_bits``: its int32 view); return whether
        the bucket is finite (its float64 sum, or its maximum's bits)."""
        if kind == 1:
            # |x| as the bits without the sign: integers ordered as the floats, NaN and Inf above
            # every finite value, so the maximum is exact, vectorizes, and keeps them.
            top = np.int32(0)
            for k in range(seg_bits.size):  # indices from 0: no negative-index wraparound (gathers)
                a = seg_bits[k] & np.int32(0x7FFFFFFF)
                top = a if a > top else top
            norms_bits[b] = top
            return top < np.int32(0x7F800000)
        total = 0.0
        if kind == 0:
            for k in range(seg.size):
                v = np.float64(seg[k])
                total += v * v
            norms[b] = np.float32(np.sqrt(total))
        else:
            for k in range(seg.size):
                total += np.float64(abs(seg[k]))
            norms[b] = np.float32(total / seg.size)
        return total < np.inf  # finite float32 values never overflow a float64 sum; NaN fails too

    @_kernel
    def _norm_chunks(b0, b1, x, bucket, kind, out):
        """Kernel of :func:`bucket_norms`: buckets ``b0..b1-1``."""
        n = x.size
        bits, out_bits = x.view(np.int32), out.view(np.int32)
        for b in range(b0, b1):
            start = b * bucket
            stop = min(n, start + bucket)
            write_norm(x[start:stop], bits[start:stop], kind, out, out_bits, b)
        return 0


    # -- QSGD: sign and level ---------------------------------------------------------------

    @numba.njit(inline="always")
    def _level(v, s, top, u, stochastic, sign_shift):
        r = min(abs(v) * s, top)
        if stochastic:
            lower = np.floor(r)
            level = np.int32(lower) + np.int32(u < r - lower)
        else:
            level = np.int32(np.rint(r))
        return np.uint8(level | (np.int32(v < 0) << sign_shift))

    @numba.njit(inline="always")
    def _level_value(code, u, level_mask, sign_shift):
        val = np.float32(code & level_mask) * u
        return -val if code >> sign_shift else val

    @numba.njit(inline="always")
    def _level_segment(xs, cs, us, s, u, top, stochastic, sign_shift, ds, want_decoded):
        """Codes of one bucket's run of coordinates ``xs`` (scale ``s``, level step ``u``; uniforms
        ``us``) into ``cs``, and their decoded values into ``ds`` when wanted."""
        for k in range(xs.size):
            cs[k] = _level(xs[k], s, top, us[k] if stochastic else np.float32(0.0), stochastic, sign_shift)
        if want_decoded:
            level_mask = np.uint8((1 << sign_shift) - 1)
            for k in range(xs.size):
                ds[k] = _level_value(cs[k], u, level_mask, sign_shift)

    @numba.njit(inline="always")
    def _chunk_buffers(start, stop, seed, stochastic):
        """A chunk's code buffer and its uniforms (empty unless stochastic)."""
        uniforms = np.empty(CHUNK if stochastic else 0, dtype=np.float32)
        if stochastic:
            fill_uniforms(seed, start, stop - start, uniforms)
        return np.empty(CHUNK, dtype=np.uint8), uniforms

    @numba.njit(inline="always")
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
        @_kernel
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

        @_kernel
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

    @numba.njit(inline="always")
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
        @_kernel
        def kernel(c0, c1, packed, unit, bucket, levels, out):
            total = 0
            for c in range(c0, c1):
                total += _level_decode_chunk_one(c, packed, unit, bucket, bits, levels, out)
            return total
        return kernel

    _level_decode_chunks = ByWidth(_level_decode_kernel)

    @numba.njit(inline="always")
    def _sign_chunk_one(c, packed, scales, bucket, out):
        start, stop = chunk_range(c, out.size)
        codes = np.empty(CHUNK, dtype=np.uint8)
        unpack_chunk(packed, start, stop, 1, codes)
        i = start
        while i < stop:
            b, end = bucket_segment(i, stop, bucket)
            s = scales[b]
            cs, os = codes[i - start:end - start], out[i:end]
            for k in range(cs.size):
                os[k] = -s if cs[k] else s
            i = end
        return 0

    @_kernel
    def _sign_chunks(c0, c1, packed, scales, bucket, out):
        total = 0
        for c in range(c0, c1):
            total += _sign_chunk_one(c, packed, scales, bucket, out)
        return total

NORM_KINDS = {"l2": 0, "max": 1, "mean_abs": 2}


def bucket_norms(x, bucket, norm):
    """The float32 norm of each bucket of a flat contiguous float32 CPU ``x`` (numba kernel):
    ``"l2"`` the float64 sum of squares' square root, ``"max"`` max |x_i|, ``"mean_abs"`` the
    float64 sum of |x_i| over the bucket's length, each rounded once to float32; NaN or Inf
    where the bucket holds one (Inf also where the norm exceeds float32). Callers use
    :func:`mpiqsgd.codecs.buckets.bucket_norms`, which also covers other devices."""
    n = x.numel()
    count = -(-n // bucket)
    out = np.empty(count, dtype=np.float32)
    run_chunks(_norm_chunks, n, (x.numpy(), bucket, NORM_KINDS[norm], out), units=count)
    return torch.from_numpy(out)


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
            bytes plus 8; see :func:`padded`), or None for a new buffer.

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
    ``bucket`` that divides :data:`CHUNK`: the norms are :func:`bucket_norms`' and the scales
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


def sign_decode(packed, scales, bucket, n, force_torch=False, out=None):
    """Values of ``n`` packed sign bits (1 = negative) times their bucket's scale (``out`` as for
    :func:`level_decode`)."""
    if not use_numba(packed.device, force_torch):
        from .bits import unpack

        values = scales.repeat_interleave(bucket)[:n]
        return torch.where(unpack(packed, n, 1).bool(), -values, values)
    values, target = decode_target(out, n)
    run_chunks(_sign_chunks, n, (packed.numpy(), scales.numpy(), bucket, target))
    return values


def decode_target(out, n):
    """(the tensor a numba decoder returns, the float32 array it writes): ``out`` and its numpy
    view when given, else a new array of ``n``."""
    if out is not None:
        return out, out.numpy()
    target = np.empty(n, dtype=np.float32)
    return torch.from_numpy(target), target
