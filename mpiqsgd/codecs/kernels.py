"""The machinery every codec kernel shares: numba on the CPU, torch ops on other devices.

Here: the counter-based uniforms, the packing of code groups, the chunked serial/parallel
driver and its thread pool (:func:`run_chunks`, :func:`thread_pool`), the numba decorator of
a kernel (:data:`jit_kernel`), one kernel per code width (:class:`ByWidth`), the bucket norms'
kernel (:func:`write_norm`, :func:`norm_chunks`), the payload buffers (:func:`padded`,
:func:`codes_slot`, :func:`place_scales`) and the choice between numba and torch
(:func:`use_numba`). The kernels themselves live with their codecs:
:mod:`~mpiqsgd.codecs.qsgd_kernels` (QSGD's level codes), :mod:`~mpiqsgd.codecs.levelset_kernels`
(the level sets'), :mod:`~mpiqsgd.codecs.sign` (the sign decoder), :mod:`~mpiqsgd.codecs.elias`,
:mod:`~mpiqsgd.codecs.entropy` and :mod:`~mpiqsgd.codecs.summable`.

Both implementations of a kernel produce the same bytes for the same input and seed. Their
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
coordinate), then the packing of 8-code groups by shifts and masks (:func:`pack_chunk`).
"""

import hashlib
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from filelock import FileLock, Timeout

from .. import wire

try:
    import numba
except ImportError:  # pragma: no cover - numba is a declared dependency
    numba = None

__all__ = ["draw_seed", "SeedAt", "uniform", "use_numba", "parallel_ok", "run_chunks", "thread_pool", "ByWidth",
           "padded", "codes_slot", "place_scales", "one_pass", "check_spare", "host_array", "decode_target",
           "load_word", "jit_kernel", "jit_helper", "chunk_range", "bucket_segment", "fill_uniforms", "pack_chunk",
           "unpack_chunk", "write_norm", "norm_chunks", "NORM_KINDS", "CHUNK", "HAVE_NUMBA", "cached_jit",
           "compile_once_per_node", "compile_lock_path", "COMPILE_WAIT_SECONDS", "kernel_threads", "set_kernel_threads",
           "MAX_THREADS"]

HAVE_NUMBA = numba is not None

_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB

COMPILE_WAIT_SECONDS = 300  # longest wait for another process's compilation before compiling anyway
MAX_THREADS = numba.config.NUMBA_NUM_THREADS if HAVE_NUMBA else 1  # NUMBA_NUM_THREADS: the cores, unless set
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
    that may encode at the same time, and the kernels' thread pool (:func:`thread_pool`) is
    not shared among them. Under MPI, :func:`mpiqsgd.machine.share_cpus` sets how many threads a
    call uses (:func:`set_kernel_threads`) so that ranks on one node do not oversubscribe its cores.
    """
    return n >= PARALLEL_MIN_NUMEL and threading.current_thread() is threading.main_thread()


_THREADS = [MAX_THREADS]


def kernel_threads():
    """How many threads one call of a CPU kernel may use (:func:`run_chunks`)."""
    return _THREADS[0]


def set_kernel_threads(n):
    """Let one call of a CPU kernel use ``n`` threads (clipped to 1..:data:`MAX_THREADS`); return the
    previous count.

    The kernels run on this module's pool of Python threads, never on numba's threading layer,
    so this is not ``numba.set_num_threads``: that call (and ``numba.get_num_threads``) starts
    numba's layer, whose idle OpenMP workers spin: they took 85% of the CPU of 16 ranks sharing
    2 cores (``perf``, 2026-12-07), and the 16-rank soak of the tests ran in 126 s against 61 s
    without them.
    """
    previous = _THREADS[0]
    _THREADS[0] = min(max(1, int(n)), MAX_THREADS)
    return previous


def run_chunks(kernel, n, args, units=None):
    """Run a numba kernel ``kernel(c0, c1, *args) -> int`` (chunks ``c0..c1-1``) over the
    chunks of ``n`` coordinates, split into one contiguous range per thread (:func:`kernel_threads`); ``units``
    replaces the chunks by another count of equal work items (buckets, say).

    The kernels release the GIL, so a pool of Python threads runs them in parallel; unlike a
    ``prange`` driver taking the kernel as an argument, every kernel stays in numba's cache.
    Threads pay off only on large buffers; small ones (and oversubscribed ranks) run serially.

    Returns:
        the sum of the kernel's results (e.g. a count of invalid codes).
    """
    n_chunks = -(-n // CHUNK) if units is None else units
    n_threads = min(kernel_threads(), n_chunks) if parallel_ok(n) else 1
    if n_threads <= 1:
        return int(kernel(0, n_chunks, *args))
    edges = [n_chunks * t // n_threads for t in range(n_threads + 1)]
    pool = thread_pool()
    tasks = [pool.submit(kernel, edges[t], edges[t + 1], *args) for t in range(1, n_threads)]
    total = int(kernel(edges[0], edges[1], *args))  # the calling thread takes the first range
    return total + sum(int(task.result()) for task in tasks)


class ByWidth:
    """One numba kernel per code width (or other small integer constant, such as the kind of
    norm), built (compiled, or loaded from numba's cache) on first use.

    ``make(width)`` returns a kernel in which ``width`` is a closure constant: numba prunes
    the branches of the kernel's own body on it before typing (the level-set table widths),
    and LLVM, inlining the helpers it calls (:func:`pack_chunk` and the rest, see
    :data:`jit_helper`), folds the width into their loads and stores. One kernel holding every
    width, its branches inside the helpers, took 51-53 s cold (nuqsgd's encode and decode,
    2026-12-01); a run pays only for the widths it uses. The closure must capture plain
    numbers only: numba's cache keys a closure by its captured values, and a captured function
    would make every process compile again. ``kernels[bits]`` is the kernel for ``bits``.
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


class _Compiling(threading.local):
    depth = 0  # compilations under way in this thread (numba compiles a kernel's callees inside it)


_COMPILING = _Compiling()


def compile_lock_path(dispatcher, sig):
    """The lock file of one kernel, signature and closure (its widths) on this node."""
    fn = dispatcher.py_func
    cells = tuple(cell.cell_contents for cell in fn.__closure__ or ())
    key = repr((fn.__module__, fn.__qualname__, fn.__code__.co_firstlineno, cells, str(sig)))
    name = f"{fn.__module__}.{fn.__qualname__}"[:80].replace("<", "").replace(">", "")
    folder = os.path.join(tempfile.gettempdir(), f"mpiqsgd-numba-{os.getuid()}")
    return os.path.join(folder, f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.lock")


def compile_once_per_node(dispatcher):
    """Make the processes of a node compile ``dispatcher`` (a numba dispatcher with its disk cache on)
    one at a time, so that one compiles each kernel and the others load it from numba's cache.

    Ranks of one job start together and all need the same kernels at their first step: without
    this, each of N ranks on a node compiles every kernel at once, N times the CPU (seconds per
    kernel) on cores that N ranks already share. A per-kernel lock file in the node's temporary
    directory (``mpiqsgd-numba-UID/``) is held while a process compiles or loads that kernel;
    the next one then finds it in the cache. Only the outermost compilation of a thread takes a
    lock (numba compiles a kernel's callees inside it, holding its own compiler lock), and a wait
    longer than :data:`COMPILE_WAIT_SECONDS` (a holder stopped, say) compiles without the lock.
    Returns ``dispatcher``, its ``compile`` wrapped.
    """
    compile_here = dispatcher.compile

    def compile(sig):
        if _COMPILING.depth:
            return compile_here(sig)
        _COMPILING.depth += 1
        try:
            path = compile_lock_path(dispatcher, sig)
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                lock = FileLock(path, timeout=COMPILE_WAIT_SECONDS)
                lock.acquire()
            except (OSError, Timeout):  # no writable temporary directory, or a stuck holder
                return compile_here(sig)
            try:
                return compile_here(sig)
            finally:
                lock.release()
        finally:
            _COMPILING.depth -= 1

    dispatcher.compile = compile
    return dispatcher


def cached_jit(**options):
    """``numba.njit(cache=True, nogil=True, **options)``, compiled once per node
    (:func:`compile_once_per_node`): the decorator of every cached kernel."""
    def decorate(fn):
        return compile_once_per_node(numba.njit(cache=True, nogil=True, **options)(fn))
    return decorate


_POOL = []


def thread_pool():
    """The pool of Python threads that :func:`run_chunks` (and the entropy coder) run kernels on."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=max(1, MAX_THREADS - 1),
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


# -- shared numba machinery (CPU) -----------------------------------------------------------

# The decorator of the helpers that kernels call (numba's error model, as the kernels'; plain Python
# without numba, where load_word still serves). numba compiles each helper once and LLVM inlines
# it into its callers. numba's own inlining (``inline="always"``), used before, copied and typed
# each helper again at every call: the codec tests, run cold in one process, took 162 s with it
# and 127 s without (2026-12-07), and encode and decode ran at the same speed (2M coordinates,
# one thread, medians of 40: qsgd at 2, 4 and 8 bits, qsgd-inf, nuqsgd, alq, sign, terngrad, the
# Elias and entropy encodings; within the spread of repeated runs).
jit_helper = numba.njit(error_model="numpy") if HAVE_NUMBA else (lambda f: f)


@jit_helper
def load_word(packed, g, bits):
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
    jit_kernel = cached_jit(error_model="numpy")
    _G, _A, _B = np.uint64(_GOLDEN), np.uint64(_M1), np.uint64(_M2)
    _BYTE = np.uint64(255)

    @jit_helper
    def chunk_range(c, n):
        """Coordinates [start, stop) of chunk ``c``."""
        start = c * CHUNK
        return start, min(n, start + CHUNK)

    @jit_helper
    def bucket_segment(i, stop, bucket):
        """The bucket of coordinate ``i`` and the end of its run of coordinates below ``stop``."""
        b = i // bucket
        return b, min(stop, (b + 1) * bucket)

    _UNIT = np.float32(1.0 / 16777216.0)
    _LOW24 = np.uint64(0xFFFFFF)

    @jit_helper
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

    @jit_helper
    def _compress(x, bits):
        """8 codes of ``bits`` bits, one per byte of ``x`` (byte k = code k), to their packed word."""
        b = np.uint64(bits)
        x = (x & np.uint64(0x00FF00FF00FF00FF)) | ((x & np.uint64(0xFF00FF00FF00FF00)) >> (np.uint64(8) - b))
        x = (x & np.uint64(0x0000FFFF0000FFFF)) | ((x & np.uint64(0xFFFF0000FFFF0000)) >> (np.uint64(16) - b - b))
        return (x & np.uint64(0xFFFFFFFF)) | ((x >> np.uint64(32)) << (np.uint64(4) * b))

    @jit_helper
    def _expand(w, bits):
        """Inverse of :func:`_compress`."""
        b = np.uint64(bits)
        one = np.uint64(1)
        lo1 = ((one << b) - one) * np.uint64(0x0001000100010001)
        lo2 = ((one << (b + b)) - one) * np.uint64(0x0000000100000001)
        x = (w & ((one << (np.uint64(4) * b)) - one)) | ((w >> (np.uint64(4) * b)) << np.uint64(32))
        x = (x & lo2) | ((x & (lo2 << (b + b))) << (np.uint64(16) - b - b))
        return (x & lo1) | ((x & (lo1 << b)) << (np.uint64(8) - b))

    @jit_helper
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

    @jit_helper
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

    @jit_helper
    def _pack_groups(words, count, width, out):
        for g in range(count):
            _store_group(out, g * width, _compress(words[g], width), width)

    @jit_helper
    def _unpack_groups(packed, count, width, words):
        for g in range(count):
            words[g] = _expand(_load_group(packed, g * width, width), width)

    @jit_helper
    def pack_chunk(codes, start, stop, bits, out):
        """Pack the codes of coordinates [start, stop) (``codes[k]`` is coordinate ``start + k``;
        ``start`` a multiple of 8) into ``out`` (with the 8 spare bytes of :func:`padded`).

        ``bits`` must be a constant of the calling kernel (the width of a :class:`ByWidth`
        kernel), which LLVM folds in when it inlines this function: a runtime width in the
        byte loads and stores costs an order of magnitude."""
        m = stop - start
        groups = (m + 7) // 8
        for k in range(m, groups * 8):
            codes[k] = 0
        _pack_groups(codes.view(np.uint64), groups, bits, out[(start // 8) * bits:])

    @jit_helper
    def unpack_chunk(packed, start, stop, bits, codes):
        """Inverse of :func:`pack_chunk` (``bits`` a constant of the kernel too); ``packed`` may end
        inside the last group."""
        groups = (stop - start + 7) // 8
        words = codes.view(np.uint64)
        g0 = start // 8
        whole = min(groups, max(0, packed.size // bits - g0))  # groups with all their bytes present
        _unpack_groups(packed[g0 * bits:], whole, bits, words)
        for g in range(whole, groups):
            words[g] = _expand(load_word(packed, g0 + g, bits), bits)

    # -- bucket norms -----------------------------------------------------------------------

    # The norms' sums may be reordered (fastmath reassoc, nothing else), so that they vectorize;
    # in float64, a reordering moves a float32 norm by one ulp only where the sum lies within its
    # float64 rounding error of a float32 rounding boundary. The flag is on this function's
    # instructions only (numba compiles it on its own): the quantizers that call it keep
    # strict IEEE arithmetic, as their bytes must equal the torch ops'.
    @cached_jit(error_model="numpy", fastmath={"reassoc"})
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

    @jit_kernel
    def norm_chunks(b0, b1, x, bucket, kind, out):
        """Kernel of :func:`~mpiqsgd.codecs.buckets.bucket_norms`: buckets ``b0..b1-1``."""
        n = x.size
        bits, out_bits = x.view(np.int32), out.view(np.int32)
        for b in range(b0, b1):
            start = b * bucket
            stop = min(n, start + bucket)
            write_norm(x[start:stop], bits[start:stop], kind, out, out_bits, b)
        return 0


NORM_KINDS = {"l2": 0, "max": 1, "mean_abs": 2}  # the ``kind`` of write_norm


def decode_target(out, n):
    """(the tensor a numba decoder returns, the float32 array it writes): ``out`` and its numpy
    view when given, else a new array of ``n``."""
    if out is not None:
        return out, out.numpy()
    target = np.empty(n, dtype=np.float32)
    return torch.from_numpy(target), target
