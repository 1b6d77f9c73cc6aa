"""Elias-omega coding of QSGD's sparse level codes (the QSGD paper's section 3.1).

At a few levels per bucket most coordinates round to level 0, and a dense code still
spends ``bits`` on each of them. The sparse code writes only the non-zero ones::

    for each bucket (its float32 norm travels separately, before the stream):
        omega(nnz + 1)                      number of non-zero levels in the bucket
        nnz times:
            omega(gap)                      gap >= 1 from the previous non-zero position
                                            (the first gap counts from position -1)
            1 sign bit                      1 for negative
            omega(level)                    level in 1..s

Bits are written most significant first, bucket after bucket, with no padding until
the last byte (whose unused low bits are zero). ``omega(k)`` for ``k >= 1`` is Elias's
omega code: ``"0"`` ends it; while ``k > 1`` the binary form of ``k`` is prepended and
``k`` becomes its length minus one (1 -> ``0``, 2 -> ``100``, 4 -> ``101000``).

The count ``nnz + 1`` at the start of each bucket is not in the paper (which leaves
the end of a bucket implicit); it costs 1 bit for an all-zero bucket and about
``2 log2(nnz)`` bits otherwise. The paper's bound on the expected length of a bucket of
``d`` coordinates at ``s`` levels is ``(3 + 1.5 log2(2 (s^2 + d) / (s (s + sqrt d))))
* s (s + sqrt d) + 32`` bits, against ``d (1 + ceil(log2(s + 1))) + 32`` dense.

The length depends on the data, so it is known only after encoding. The encoder
(:func:`encode_parallel`) runs on numba's threads over tasks of whole buckets (about
:data:`~mpiqsgd.codecs.kernels.CHUNK` coordinates each): each task unpacks its codes, finds
the non-zero levels of each group of 8 with word operations (zero levels cost nothing) and
writes its buckets from bit 0 into its own scratch bytes (bounded by the worst case, at
most 2 bytes per coordinate); a prefix sum of the tasks' lengths places them, and a second
parallel pass copies each task's bits to its offset, the byte it shares with the previous
task merged last. It gives the bytes of the sequential reference :func:`encode_codes` (numba
when installed, else the same functions in Python), which stays beside it; a test compares
them.
Decoding validates every field against the bucket and the stream: a truncated,
overlong or corrupted stream is an error code, never a read past the buffer. An all-zero
bucket costs 1 bit, so the codec caps the bucket (:data:`mpiqsgd.wire.MAX_VARIABLE_BUCKET`,
2^16): with its 4-byte norm, every message holds a payload byte per 2^14 coordinates at
least, within what a receiver decodes without an expected size
(:data:`mpiqsgd.wire.MAX_VALUES_PER_BYTE`).
"""

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - numba is a declared dependency
    numba = None

from .kernels import CHUNK, HAVE_NUMBA, cached_jit, load_word, run_chunks

__all__ = ["omega_bits", "count_bits", "encode_codes", "encode_parallel", "decode_stream", "ERRORS"]

_jit = cached_jit() if numba is not None else (lambda f: f)

# decode_stream's error codes (0 = success)
ERRORS = {
    1: "the stream ends inside a bucket",
    2: "an omega code's value exceeds 2^40, more than any count, gap or level",
    3: "a bucket claims more non-zero levels than it has coordinates",
    4: "a gap points past the end of its bucket",
    5: "a level is outside 1..s",
    6: "bytes are left over after the last bucket",
    7: "the padding bits after the last bucket are not zero",
}


_MAX = 1 << 40  # no valid count, gap or level comes close (bucket <= 2^16, levels <= 127)


@_jit
def _bit_length(k):
    length = 0
    while k > 0:
        length += 1
        k >>= 1
    return length


@_jit
def omega_bits(k):
    """Length in bits of the omega code of ``k >= 1``."""
    n = 1
    while k > 1:
        length = _bit_length(k)
        n += length
        k = length - 1
    return n


@_jit
def _put(out, pos, value, nbits):
    """Write the low ``nbits`` of ``value`` at bit ``pos``, most significant first, a byte at a time."""
    while nbits > 0:
        room = 8 - (pos & 7)
        take = min(room, nbits)
        chunk = (value >> (nbits - take)) & ((1 << take) - 1)
        out[pos >> 3] |= np.uint8(chunk << (room - take))
        pos += take
        nbits -= take
    return pos


@_jit
def _put_omega(out, pos, k):
    groups = np.empty(8, dtype=np.int64)  # k < 2^62 needs at most 6 groups
    sizes = np.empty(8, dtype=np.int64)
    m = 0
    while k > 1:
        length = _bit_length(k)
        groups[m] = k
        sizes[m] = length
        m += 1
        k = length - 1
    for g in range(m - 1, -1, -1):
        pos = _put(out, pos, groups[g], sizes[g])
    return pos + 1  # the terminating 0 (the buffer starts zeroed)


@_jit
def _bucket_nnz(packed, start, end, bits):
    """Non-zero levels among dense codes ``start..end-1``."""
    top = np.uint64((1 << (bits - 1)) - 1)
    nnz = 0
    g_loaded = -1
    word = np.uint64(0)
    for i in range(start, end):
        if i >> 3 != g_loaded:
            g_loaded = i >> 3
            word = load_word(packed, g_loaded, bits)
        if (word >> np.uint64((i & 7) * bits)) & top:
            nnz += 1
    return nnz


@_jit
def count_bits(packed, n, bits, bucket):
    """Exact stream length in bits for ``n`` dense QSGD codes (``sign << (bits - 1) | level``,
    packed as in :mod:`mpiqsgd.codecs.bits`)."""
    top = np.uint64((1 << (bits - 1)) - 1)
    total = 0
    g_loaded = -1
    word = np.uint64(0)
    for start in range(0, n, bucket):
        nnz = 0
        prev = start - 1
        for i in range(start, min(start + bucket, n)):
            if i >> 3 != g_loaded:
                g_loaded = i >> 3
                word = load_word(packed, g_loaded, bits)
            level = np.int64((word >> np.uint64((i & 7) * bits)) & top)
            if level != 0:
                nnz += 1
                total += omega_bits(i - prev) + 1 + omega_bits(level)
                prev = i
        total += omega_bits(nnz + 1)
    return total


@_jit
def encode_codes(packed, n, bits, bucket, nbits):
    """The stream (uint8, ``ceil(nbits / 8)`` bytes) of ``n`` dense QSGD codes; ``nbits`` from
    :func:`count_bits`."""
    top = np.uint64((1 << (bits - 1)) - 1)
    out = np.zeros((nbits + 7) // 8, dtype=np.uint8)
    pos = 0
    g_loaded = -1
    word = np.uint64(0)
    for start in range(0, n, bucket):
        end = min(start + bucket, n)
        pos = _put_omega(out, pos, _bucket_nnz(packed, start, end, bits) + 1)
        prev = start - 1
        for i in range(start, end):
            if i >> 3 != g_loaded:
                g_loaded = i >> 3
                word = load_word(packed, g_loaded, bits)
            code = np.int64((word >> np.uint64((i & 7) * bits)) & np.uint64((1 << bits) - 1))
            level = code & np.int64(top)
            if level:
                pos = _put_omega(out, pos, i - prev)
                pos = _put(out, pos, code >> (bits - 1), 1)
                pos = _put_omega(out, pos, level)
                prev = i
    return out


@_jit
def _get_omega(data, pos, limit, max_value):
    """(value, new pos, error): decode one omega code at bit ``pos`` of ``limit`` bits."""
    k = 1
    while True:
        if pos >= limit:
            return 0, pos, 1
        bit = (data[pos >> 3] >> (7 - (pos & 7))) & 1
        pos += 1
        if bit == 0:
            return k, pos, 0
        if k > 40:  # the next group would exceed 2^41
            return 0, pos, 2
        if pos + k > limit:
            return 0, pos, 1
        v = 1
        for _ in range(k):
            v = (v << 1) | ((data[pos >> 3] >> (7 - (pos & 7))) & 1)
            pos += 1
        k = v
        if k > max_value:
            return 0, pos, 2


@_jit
def decode_stream(data, unit, bucket, levels, n, out, zero=True):
    """Decode a stream into ``out`` (float32, ``n`` values, zeroed here unless ``zero`` is false,
    when the caller passes zeros: then only non-zero coordinates are written).

    ``unit[b]`` is the value of one level step in bucket ``b`` (``norm / s``). Returns an
    error code of :data:`ERRORS`, 0 on success. Time is linear in the stream's length and
    the number of buckets, not in ``n`` (when ``zero`` is false).
    """
    limit = data.size * 8
    pos = 0
    if zero:
        for i in range(n):
            out[i] = 0.0
    b = 0
    for start in range(0, n, bucket):
        length = min(bucket, n - start)
        count, pos, err = _get_omega(data, pos, limit, _MAX)
        if err:
            return err
        nnz = count - 1
        if nnz > length:
            return 3
        at = -1
        for _ in range(nnz):
            gap, pos, err = _get_omega(data, pos, limit, _MAX)
            if err:
                return err
            at += gap
            if at >= length:
                return 4
            if pos >= limit:
                return 1
            sign = (data[pos >> 3] >> (7 - (pos & 7))) & 1
            pos += 1
            level, pos, err = _get_omega(data, pos, limit, _MAX)
            if err:
                return err
            if level > levels:
                return 5
            val = np.float32(level) * unit[b]
            out[start + at] = -val if sign else val
        b += 1
    if (pos + 7) // 8 != data.size:
        return 6
    if pos & 7 and data[pos >> 3] & ((1 << (8 - (pos & 7))) - 1):
        return 7
    return 0


# -- the parallel encoder -------------------------------------------------------------------

OMEGA_TABLE = (1 << 16) + 2  # omega codes of 1..2^16 + 1: every count, gap and level of a bucket <= 2^16


@_jit
def _omega_tables(size):
    """The omega code of each k < size (k >= 1) as (bits, length), most significant bit first."""
    codes = np.zeros(size, dtype=np.uint32)
    lengths = np.zeros(size, dtype=np.uint8)
    for k in range(1, size):
        code, length, v = 0, 1, k  # the final "0"
        while v > 1:
            width = _bit_length(v)
            code |= v << length
            length += width
            v = width - 1
        codes[k] = code
        lengths[k] = length
    return codes, lengths


_TABLES = []


def omega_tables():
    """The cached (codes, lengths) of :func:`_omega_tables` for :data:`OMEGA_TABLE` values."""
    if not _TABLES:
        _TABLES.append(_omega_tables(OMEGA_TABLE))
    return _TABLES[0]


if HAVE_NUMBA:
    from .kernels import ByWidth, jit_helper, jit_kernel, unpack_chunk

    # The loops below are written out in each kernel: numba compiles a helper that returns a
    # tuple (position, accumulator ...) per coordinate into code 5-10x slower. The small helpers
    # below return tuples once per group or field; LLVM inlines them (encode and decode measured
    # at the same speed as with numba's own inlining, 2026-12-07; see kernels.jit_helper).

    @jit_helper
    def _task_codes(packed, n, bits, bucket, per_task, n_buckets, c, buf):
        """Unpack task ``c``'s codes into ``buf``; returns (b0, b1, base): buckets b0..b1-1, and the
        coordinate of ``buf[0]`` (a multiple of 8)."""
        b0 = c * per_task
        b1 = min(n_buckets, b0 + per_task)
        base = (b0 * bucket) & ~7
        unpack_chunk(packed, base, min(n, b1 * bucket), bits, buf)
        return b0, b1, base

    _ONES = np.uint64(0xFFFFFFFFFFFFFFFF)
    _LOW7 = np.uint64(0x7F7F7F7F7F7F7F7F)
    _HIGH = np.uint64(0x8080808080808080)
    _BYTE_ONES = np.uint64(0x0101010101010101)

    @jit_helper
    def _emit(local, at, acc, n_acc, field, width):
        """Append ``width`` bits of ``field`` to the bit accumulator and write its whole bytes
        at ``local[at:]`` (8 bytes stored, the next call overwrites the partial ones); returns
        the new (acc, n_acc, at)."""
        acc = (acc << np.uint64(width)) | field
        n_acc += width
        w = acc << np.uint64(64 - n_acc)
        for j in range(8):
            local[at + j] = np.uint8((w >> np.uint64(56 - 8 * j)) & np.uint64(255))
        at += n_acc >> 3
        n_acc &= 7
        acc &= (np.uint64(1) << np.uint64(n_acc)) - np.uint64(1)
        return acc, n_acc, at

    @jit_helper
    def _range_mask(g, start, end):
        """The bytes of group ``g`` (codes 8g..8g+7) that lie in [start, end), as a mask."""
        lo = max(start - 8 * g, 0)
        hi = min(end - 8 * g, 8)
        upper = _ONES if hi == 8 else (np.uint64(1) << np.uint64(8 * hi)) - np.uint64(1)
        return upper & ~((np.uint64(1) << np.uint64(8 * lo)) - np.uint64(1))

    @jit_helper
    def _nonzero_bytes(word, zeros):
        """The high bit of each byte of ``word`` whose level bits (``zeros``, at most 7 per byte)
        are not all 0."""
        return ((word & zeros) + _LOW7) & _HIGH

    def _write_kernel(bits):
        @jit_kernel
        def kernel(c0, c1, packed, n, bucket, per_task, codes, lengths, scratch, starts, task_bits):
            """Each task's buckets into its own bytes ``scratch[starts[c]:starts[c + 1]]`` from bit 0;
            its length in bits into ``task_bits[c]``.

            Codes are unpacked a byte each; the non-zero levels of each group of 8 are found with
            word operations and visited lowest first, so zero levels cost nothing. Bits go through a
            64-bit accumulator: after each field (at most 49 bits, fewer than 8 pending before it)
            the pending bits are stored as 8 bytes, most significant first, with no branch (each
            task's bytes end with 8 spare ones; later stores overwrite the zero bits after them).
            """
            n_buckets = -(-n // bucket)
            buf = np.empty((per_task * bucket + 23) // 8 * 8, dtype=np.uint8)  # whole words, a spare group
            words = buf.view(np.uint64)
            top = np.uint8((1 << (bits - 1)) - 1)
            zeros = np.uint64(top) * _BYTE_ONES  # the level bits of 8 codes
            shift = bits - 1
            for c in range(c0, c1):
                b0, b1, base = _task_codes(packed, n, bits, bucket, per_task, n_buckets, c, buf)
                local = scratch[starts[c]:starts[c + 1]]
                at = 0
                acc = np.uint64(0)
                n_acc = np.int64(0)
                for b in range(b0, b1):
                    start, end = b * bucket - base, min(n, (b + 1) * bucket) - base
                    g0, g1 = start >> 3, (end + 7) >> 3
                    count = 0
                    for g in range(g0, g1):
                        m = _nonzero_bytes(words[g], zeros) & _range_mask(g, start, end)
                        count += np.int64(((m >> np.uint64(7)) * _BYTE_ONES) >> np.uint64(56))
                    width = np.int64(lengths[count + 1])  # omega(nnz + 1)
                    acc, n_acc, at = _emit(local, at, acc, n_acc, np.uint64(codes[count + 1]), width)
                    prev = start - 1
                    for g in range(g0, g1):
                        m = _nonzero_bytes(words[g], zeros) & _range_mask(g, start, end)
                        while m:
                            low = m & (~m + np.uint64(1))  # the lowest non-zero code's high bit
                            m ^= low
                            k = 8 * g + np.int64(low > np.uint64(0xFF)) + np.int64(low > np.uint64(0xFFFF)) + \
                                np.int64(low > np.uint64(0xFFFFFF)) + np.int64(low > np.uint64(0xFFFFFFFF)) + \
                                np.int64(low > np.uint64(0xFFFFFFFFFF)) + np.int64(low > np.uint64(0xFFFFFFFFFFFF)) + \
                                np.int64(low > np.uint64(0xFFFFFFFFFFFFFF))
                            # omega(gap), sign, omega(level) as one field
                            level = buf[k] & top
                            tail = np.int64(lengths[level]) + 1
                            width = np.int64(lengths[k - prev]) + tail
                            field = (np.uint64(codes[k - prev]) << np.uint64(tail)) | \
                                (np.uint64(buf[k] >> shift) << np.uint64(tail - 1)) | np.uint64(codes[level])
                            acc, n_acc, at = _emit(local, at, acc, n_acc, field, width)
                            prev = k
                task_bits[c] = 8 * at + n_acc
            return 0
        return kernel

    _write_tasks = ByWidth(_write_kernel)

    @jit_kernel
    def _merge_tasks(c0, c1, scratch, starts, offsets, out, first):
        """Copy each task's bits to its bit offset in ``out``; the first byte, which it may share
        with the previous task, into ``first`` (merged after every task has run)."""
        for c in range(c0, c1):
            src = scratch[starts[c]:]
            begin, end = offsets[c], offsets[c + 1]
            shift = begin & 7
            byte0 = begin >> 3
            n_src = (end - begin + 7) >> 3
            first[c] = np.uint8(np.int64(src[0]) >> shift) if n_src else np.uint8(0)
            for j in range(1, ((end + 7) >> 3) - byte0):
                low = np.int64(src[j]) >> shift if j < n_src else np.int64(0)
                out[byte0 + j] = np.uint8(((np.int64(src[j - 1]) << (8 - shift)) | low) & 255)
        return 0


def encode_parallel(packed, n, bits, bucket):
    """The stream of :func:`encode_codes` (the same bytes), on numba's threads."""
    if not HAVE_NUMBA:
        return encode_codes(packed, n, bits, bucket, count_bits(packed, n, bits, bucket))
    codes, lengths = omega_tables()
    n_buckets = -(-n // bucket)
    per_task = max(1, CHUNK // bucket)  # about one CHUNK of coordinates per task
    n_tasks = -(-n_buckets // per_task)
    units = n_tasks * CHUNK  # run_chunks counts CHUNK units: one per task
    # Each task's bytes: at most 2 + |omega(s)| bits per coordinate (gap 1, sign, level s), plus
    # omega(nnz + 1) <= 28 bits per bucket and 8 spare bytes; under 2 bytes per coordinate at 8 bits.
    first_bucket = np.arange(n_tasks + 1) * per_task
    coords = np.minimum(first_bucket * bucket, n)
    worst = (2 + int(lengths[(1 << (bits - 1)) - 1])) * np.diff(coords) + 28 * np.diff(np.minimum(first_bucket,
                                                                                                 n_buckets))
    starts = np.zeros(n_tasks + 1, dtype=np.int64)
    np.cumsum((worst + 7) // 8 + 8, out=starts[1:])
    scratch = np.empty(int(starts[-1]), dtype=np.uint8)
    task_bits = np.empty(n_tasks, dtype=np.int64)
    run_chunks(_write_tasks[bits], units, (packed, n, bucket, per_task, codes, lengths, scratch, starts, task_bits))
    offsets = np.zeros(n_tasks + 1, dtype=np.int64)
    np.cumsum(task_bits, out=offsets[1:])
    out = np.zeros((int(offsets[-1]) + 7) // 8, dtype=np.uint8)
    first = np.zeros(n_tasks, dtype=np.uint8)
    run_chunks(_merge_tasks, units, (scratch, starts, offsets, out, first))
    np.bitwise_or.at(out, offsets[:-1] >> 3, first)
    return out
