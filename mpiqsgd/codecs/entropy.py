"""Entropy coding of quantized symbols (``encoding="entropy"``): rANS from ``constriction``.

QSGD's codes and the level-set indices are first quantized exactly as for the dense code
(the same kernels, the same random draws), then transcoded: each coordinate becomes a
*symbol* and the symbols are coded with a memoryless model whose counts travel in the
message, by the asymmetric numeral system coder of the ``constriction`` package
(``constriction.stream.stack.AnsCoder``: 32-bit words, 24-bit fixed-point probabilities,
``Categorical(counts, perfect=False)``; versions 0.4.1 and 0.5.0 give identical bytes).

Symbols: QSGD's signed level ``level`` or ``-level`` as ``s + level`` / ``s - level``
(``2 s + 1`` symbols; level 0 is one symbol whatever its sign, so it decodes to +0.0 as in
the Elias code); a level set's code ``0..K-1`` as itself. The receiver's value is the
bucket's scale times ``table[symbol]`` (``float32(symbol - s)`` times ``norm / s``; ``norm *
L[code]``), the same float32 products as the dense decoder.

To cut the coder's per-symbol cost (it dominates), ``g`` consecutive coordinates form one
*tuple*, coded as one symbol of the ``m^g`` tuples of the ``m`` symbols the message uses,
with the product model ``p(tuple) = p(d_1) ... p(d_g)`` of the symbols' frequencies in the
message (:func:`choose_group` picks ``g``). A memoryless model of the symbols, so the coded
tuples cost ``numel * H`` bits, ``H`` the empirical entropy of the message's symbols, up
to the coder's fixed-point rounding (measured: within 0.2%, ``tests/test_entropy.py``).
The model is just ``m`` counts, per message: measured with qsgd (2, 4, 8 bits, bucket 512)
on 1M normal coordinates and on a ResNet-20 gradient, a model per group of 8, 64 or 512
buckets codes at most 0.5% fewer bytes (the buckets' norms already take out the scale) and
costs more than that in counts (ResNet-20 at 8 bits, groups of 8 buckets: 0.53% of 153 KB
saved, 10.8 KB of models).

Stream format (after the codec's float32 bucket scales)::

    u8       g - 1                      coordinates per tuple, g in 1..8
    u8       m - 1                      symbols used, m in 1..256, m^g <= 4096
    m  x u8  the used symbols           strictly increasing, below the codec's symbol count
    m        counts, LEB128 varints     of each used symbol among the numel coordinates:
                                        each at least 1, summing to numel
    4 W      ANS words, uint32 LE       the T = ceil(numel / g) tuple ids t = sum_k d_k
                                        m^(g-1-k), d_k the index in the used symbols of the
                                        tuple's coordinate k, coordinates past numel index 0;
                                        absent when m = 1

Cost: ``2 + m + (1..5) m`` bytes of model (at most 1.5 KiB, typically 10-30 bytes), then the
coded tuples. The length depends on the data; the payload is at least 4 bytes after the
scales.

Decoding validates every field, the counts' sum, and, after decoding, that the symbols'
counts are those sent, that the coder ends empty and that the padding indices are 0: a
stream that fails any of these is a :class:`DecodeError`. Memory: the tables are at most
4096 tuples, the coder works in chunks of :data:`DECODE_CHUNK` tuples, the values go into
lazily zeroed memory and tuples whose coordinates all decode to +0.0 are not written (a
short stream of a near-certain zero symbol commits no pages for them). A one-symbol model
codes any number of coordinates in a few bytes, so the codecs cap the bucket of this
encoding (:data:`mpiqsgd.wire.MAX_VARIABLE_BUCKET`): their 4-byte scales keep a message at
a payload byte per :data:`mpiqsgd.wire.MAX_VALUES_PER_BYTE` values, the most a receiver
decodes without an expected size.

Speed: ``constriction`` holds the GIL while it codes, so the coding is one thread per
process. The histogram runs on numba's threads; encoding overlaps the coder of one chunk
with the tuple kernel of the next, decoding the coder of one chunk with the value kernel of
the previous one (on the kernels' pool, from the main thread only, as
:func:`~mpiqsgd.codecs.kernels.parallel_ok` allows).
"""

import numpy as np

try:
    import constriction
except ImportError:  # pragma: no cover - a declared dependency
    constriction = None

from ..errors import ConfigError, DecodeError
from .kernels import CHUNK, HAVE_NUMBA, parallel_ok, run_chunks, thread_pool

if HAVE_NUMBA:
    from .kernels import ByWidth, cached_jit, chunk_range, jit_kernel, unpack_chunk

__all__ = ["encode", "decode", "symbol_counts", "entropy_bits", "describe", "qsgd_symbols", "levelset_symbols",
           "check_available", "MAX_GROUP", "MAX_ALPHABET", "MIN_STREAM_BYTES", "DECODE_CHUNK"]

MAX_GROUP = 8  # coordinates per tuple
MAX_ALPHABET = 4096  # tuples in the model: bounds what a stream can make a receiver allocate
FLOOR_SHARE = 58000  # m^g <= FLOOR_SHARE g H: the coder's probability floor costs < 0.5%
MIN_STREAM_BYTES = 4  # g, m, one symbol, one count
DECODE_CHUNK = 1 << 18  # tuples per call of the coder's decode
SPARSE_SHARE = 0.9  # decoding skips the writes of +0.0 values when more than this share are +0.0
ENCODE_CHUNK = 1 << 19  # tuples per call of the coder's encode (a multiple of TUPLE_CHUNK)
TUPLE_CHUNK = CHUNK // MAX_GROUP  # tuples per task of the tuple kernel: at most one CHUNK of codes

ERRORS = {
    1: "the stream ends inside its model",
    2: "a count exceeds the number of coordinates",
    3: "the counts do not sum to the number of coordinates",
}


def check_available(codec):
    """Raise :class:`ConfigError` unless the entropy coder can run here."""
    if constriction is None:
        raise ConfigError(f"{codec}: encoding='entropy' needs the constriction package (pip install constriction)")
    if not HAVE_NUMBA:
        raise ConfigError(f"{codec}: encoding='entropy' needs numba")


def qsgd_symbols(bits, levels):
    """(symbol of each ``bits``-bit QSGD code, -1 for invalid ones; float32 level of each symbol)."""
    codes = np.arange(1 << bits)
    level = codes & ((1 << (bits - 1)) - 1)
    signed = np.where(codes >> (bits - 1), -level, level)
    symbol = np.where(level <= levels, signed + levels, -1).astype(np.int32)
    return symbol, np.arange(-levels, levels + 1).astype(np.float32)


def levelset_symbols(bits, table):
    """(symbol of each ``bits``-bit level-set code, -1 for codes >= K; the float32 table)."""
    codes = np.arange(1 << bits)
    table = np.ascontiguousarray(table, dtype=np.float32)
    return np.where(codes < table.size, codes, -1).astype(np.int32), table


# -- kernels (CPU) ----------------------------------------------------------------------------

if HAVE_NUMBA:
    _jit = cached_jit()

    def _code_hist_kernel(bits):
        @jit_kernel
        def kernel(c0, c1, packed, n, hist):
            codes = np.empty(CHUNK, dtype=np.uint8)
            part = np.zeros((4, hist.shape[1]), dtype=np.int32)  # 4 interleaved counts: no store-to-load chain
            for c in range(c0, c1):
                start, stop = chunk_range(c, n)
                unpack_chunk(packed, start, stop, bits, codes)
                part[:] = 0
                m = stop - start
                for k in range(0, m - 3, 4):
                    part[0, codes[k]] += 1
                    part[1, codes[k + 1]] += 1
                    part[2, codes[k + 2]] += 1
                    part[3, codes[k + 3]] += 1
                for k in range(m - m % 4, m):
                    part[0, codes[k]] += 1
                row = hist[c]
                for j in range(row.size):
                    row[j] = part[0, j] + part[1, j] + part[2, j] + part[3, j]
            return 0
        return kernel

    _code_hist_chunks = ByWidth(_code_hist_kernel)

    def _tuple_kernel(bits):
        @jit_kernel
        def kernel(c0, c1, packed, n, g, m, digit, tids):
            codes = np.empty(CHUNK, dtype=np.uint8)
            n_tuples = tids.size
            for c in range(c0, c1):
                t0 = c * TUPLE_CHUNK
                t1 = min(n_tuples, t0 + TUPLE_CHUNK)
                start = t0 * g  # a multiple of 8: whole code groups
                stop = min(n, t1 * g)
                unpack_chunk(packed, start, stop, bits, codes)
                valid = stop - start
                for t in range(t1 - t0):
                    v = np.int32(0)
                    for k in range(t * g, t * g + g):
                        v = v * np.int32(m) + (digit[codes[k]] if k < valid else np.int32(0))
                    tids[t0 + t] = v
            return 0
        return kernel

    _tuple_chunks = ByWidth(_tuple_kernel)

    @_jit
    def _put_varints(counts, out):
        pos = 0
        for c in counts:
            v = np.uint64(c)
            while v >= 128:
                out[pos] = np.uint8((v & np.uint64(127)) | np.uint64(128))
                v >>= np.uint64(7)
                pos += 1
            out[pos] = np.uint8(v)
            pos += 1
        return pos

    @_jit
    def _get_varints(data, pos, counts, total):
        """Read ``counts.size`` varints from ``data[pos:]``; each at most ``total``, summing to it.
        Returns (new pos, error code)."""
        acc = 0
        for j in range(counts.size):
            v = 0
            shift = 0
            while True:
                if pos >= data.size:
                    return pos, 1
                byte = np.int64(data[pos])
                pos += 1
                v |= (byte & 127) << shift
                if v > total:
                    return pos, 2
                if byte < 128:
                    break
                shift += 7
                if shift > 35:  # counts are below 2^32: at most 5 bytes
                    return pos, 2
            counts[j] = v
            acc += v
        if acc != total:
            return pos, 3
        return pos, 0

    @_jit
    def _values(tids, t0, n, g, symbols, skip_tuple, scales, bucket, table, skip, sparse, out, tuple_hist, tail_hist):
        """Write the values of tuples ``t0..`` (ids ``tids``) into ``out``; count whole tuples by id in
        ``tuple_hist`` and the coordinates of a last tuple that ends past ``n`` by index in
        ``tail_hist``. ``sparse``: +0.0 coordinates are rare writes worth a branch. Returns how
        many of the last tuple's padding coordinates are not index 0."""
        i = t0 * g
        b = i // bucket  # bucket of coordinate i: b * bucket <= i < edge
        edge = (b + 1) * bucket
        whole = tids.size if (t0 + tids.size) * g <= n else tids.size - 1
        for t in range(whole):
            v = tids[t]
            tuple_hist[v] += 1
            if skip_tuple[v]:  # every coordinate +0.0, already in `out`
                i += g
                while i >= edge:
                    b += 1
                    edge += bucket
                continue
            for k in range(g):
                if i >= edge:
                    b += 1
                    edge += bucket
                s = symbols[v, k]
                if not (sparse and skip[s]):  # dense: no branch on the symbol, +0.0 written (scale * +0.0)
                    out[i] = scales[b] * table[s]
                i += 1
        bad = 0
        for t in range(whole, tids.size):  # the last tuple, past n
            v = tids[t]
            for k in range(g):
                s = symbols[v, k]
                if i < n:
                    tail_hist[s] += 1
                    if i >= edge:
                        b += 1
                        edge += bucket
                    if not skip[s]:
                        out[i] = scales[b] * table[s]
                elif s != 0:
                    bad += 1
                i += 1
        return bad

    @_jit
    def _fill(n, bucket, scales, value, out):
        for i in range(n):
            out[i] = scales[i // bucket] * value


# -- encoding -----------------------------------------------------------------------------

def symbol_counts(packed, n, bits, code_symbol, n_symbols):
    """Count of each symbol among ``n`` packed codes (int64, ``n_symbols``); raises ValueError on
    a code whose symbol is -1 (no encoder writes one)."""
    n_chunks = -(-n // CHUNK)
    hist = np.zeros((n_chunks, 1 << bits), dtype=np.int32)
    run_chunks(_code_hist_chunks[bits], n, (packed, n, hist))
    by_code = hist.sum(axis=0, dtype=np.int64)
    if by_code[code_symbol < 0].any():
        raise ValueError("packed codes include codes outside the symbol table")
    return np.bincount(code_symbol[code_symbol >= 0], weights=by_code[code_symbol >= 0],
                       minlength=n_symbols).astype(np.int64)


def entropy_bits(counts):
    """Empirical entropy of a histogram, in bits per symbol (0 for an empty one)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum()) + 0.0  # never -0.0


def choose_group(m, entropy):
    """Coordinates per tuple for ``m`` used symbols of ``entropy`` bits per coordinate.

    The largest ``g <= 8`` with ``m^g <= 4096`` and ``m^g <= 58000 g H``: every tuple gets at least
    ``2^-24`` of the coder's probability mass, and that floor costs about ``1.44 m^g 2^-24``
    bits per tuple, which this keeps below 0.5% of the tuple's ``g H`` bits.
    """
    if m <= 1:
        return 1
    g = 1
    while g < MAX_GROUP and m ** (g + 1) <= min(MAX_ALPHABET, FLOOR_SHARE * (g + 1) * entropy):
        g += 1
    return g


def encode(packed, n, bits, code_symbol, n_symbols):
    """The stream (uint8 ndarray) of ``n >= 1`` packed codes (:mod:`mpiqsgd.codecs.bits`).

    Args:
        packed: uint8 ndarray of the dense codes (with or without the kernels' spare bytes).
        n, bits: number of codes and bits per code.
        code_symbol: int32 symbol of each code (:func:`qsgd_symbols`, :func:`levelset_symbols`).
        n_symbols: size of the symbol alphabet (at most 256).
    """
    counts = symbol_counts(packed, n, bits, code_symbol, n_symbols)
    used = np.flatnonzero(counts)
    m = used.size
    g = choose_group(m, entropy_bits(counts))
    model = np.empty(2 + m + 5 * m, dtype=np.uint8)
    model[0], model[1] = g - 1, m - 1
    model[2:2 + m] = used
    end = 2 + m + _put_varints(counts[used], model[2 + m:])
    if m == 1:
        return model[:end].copy()
    n_tuples = -(-n // g)
    digit = np.zeros(1 << bits, dtype=np.int32)
    valid = code_symbol >= 0
    digit[valid] = np.searchsorted(used, code_symbol[valid]).clip(max=m - 1)
    tids = np.empty(n_tuples, dtype=np.int32)
    kernel, args = _tuple_chunks[bits], (packed, n, g, m, digit, tids)
    coder = constriction.stream.stack.AnsCoder()
    tuple_model = _model(counts[used], g)
    n_steps = -(-n_tuples // ENCODE_CHUNK)
    if n_steps > 1 and parallel_ok(n):
        # The coder holds the GIL; the tuple kernel does not: it computes the next (earlier) chunk's
        # tuples on a pool thread while the coder codes this one. A stack: the last chunk goes first.
        per_step = ENCODE_CHUNK // TUPLE_CHUNK
        n_task_chunks = -(-n_tuples // TUPLE_CHUNK)
        steps = [(s * per_step, min(n_task_chunks, (s + 1) * per_step)) for s in range(n_steps)][::-1]
        pending = thread_pool().submit(kernel, *steps[0], *args)
        for i, (c0, c1) in enumerate(steps):
            pending.result()
            if i + 1 < len(steps):
                pending = thread_pool().submit(kernel, *steps[i + 1], *args)
            coder.encode_reverse(tids[c0 * TUPLE_CHUNK:min(n_tuples, c1 * TUPLE_CHUNK)], tuple_model)
    else:
        run_chunks(kernel, 8 * n_tuples, args)  # 8 units per tuple: a chunk is TUPLE_CHUNK tuples
        coder.encode_reverse(tids, tuple_model)
    words = coder.get_compressed()
    return np.concatenate([model[:end], words.astype("<u4", copy=False).view(np.uint8)])


def _model(counts, g):
    """The coder's model of ``g``-tuples: products of the symbols' frequencies, in float64 (the
    same IEEE operations on both sides, so the same model)."""
    p = counts.astype(np.float64) / float(counts.sum())
    tuples = p
    for _ in range(g - 1):
        tuples = np.multiply.outer(tuples, p).ravel()
    return constriction.stream.model.Categorical(tuples, perfect=False)


# -- decoding -----------------------------------------------------------------------------

def _parse(data, n, n_symbols, codec):
    """(g, used symbols, their counts, position of the ANS words) of a stream, validated."""
    def fail(why):
        raise DecodeError(f"{codec}: invalid entropy stream: {why}")

    if data.size < MIN_STREAM_BYTES:
        fail(f"{data.size} bytes, fewer than the {MIN_STREAM_BYTES} of the smallest model")
    g, m = int(data[0]) + 1, int(data[1]) + 1
    if g > MAX_GROUP:
        fail(f"{g} coordinates per tuple (at most {MAX_GROUP})")
    if m > n_symbols:
        fail(f"{m} symbols used, but the codec has {n_symbols}")
    if data.size < 2 + m:
        fail("the stream ends inside its list of symbols")
    used = data[2:2 + m].astype(np.int64)
    if used[-1] >= n_symbols or (m > 1 and not (np.diff(used) > 0).all()):
        fail(f"the used symbols are not strictly increasing below {n_symbols}")
    if m ** g > MAX_ALPHABET:
        fail(f"{m}^{g} = {m ** g} tuples, more than the {MAX_ALPHABET} a model may have")
    counts = np.empty(m, dtype=np.int64)
    pos, err = _get_varints(data, 2 + m, counts, n)
    if err:
        fail(ERRORS[err])
    if not counts.all():
        fail("a used symbol has a count of 0")
    return g, used, counts, pos


def decode(stream, n, n_symbols, scales, bucket, table, codec, out=None):
    """Decode a stream of ``n >= 1`` coordinates into float32 values.

    Args:
        stream: uint8 ndarray (everything after the scales).
        n_symbols, table: the codec's symbol count and float32 value of each symbol.
        scales: float32 ndarray, one finite non-negative scale per bucket of ``bucket``.
        codec: name for error messages.
        out: a float32 ndarray of ``n`` to decode into (zeroed here first), or None for new,
            lazily zeroed memory. Returned either way.

    Raises:
        DecodeError: any field, count or word that no encoder writes.
    """
    data = np.asarray(stream, dtype=np.uint8)
    g, used, counts, pos = _parse(data, n, n_symbols, codec)
    m = used.size
    table = np.ascontiguousarray(table, dtype=np.float32)
    values = table[used]
    if out is None:
        out = np.zeros(n, dtype=np.float32)  # lazily zeroed: +0.0 values are not written
    else:
        out.fill(0.0)
    if m == 1:
        if pos != data.size:
            raise DecodeError(f"{codec}: invalid entropy stream: bytes after a one-symbol model")
        if values[0].view(np.int32) != 0:
            _fill(n, bucket, scales, values[0], out)
        return out
    if (data.size - pos) % 4:
        raise DecodeError(f"{codec}: invalid entropy stream: {data.size - pos} bytes of ANS words, "
                          "not a whole number of 32-bit words")
    words = np.frombuffer(data[pos:].tobytes(), dtype="<u4").astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
    except ValueError as exc:
        raise DecodeError(f"{codec}: invalid entropy stream: {exc}") from None
    model = _model(counts, g)
    digits = np.arange(m ** g)[:, None] // (m ** np.arange(g - 1, -1, -1))[None, :] % m
    symbols = np.ascontiguousarray(digits, dtype=np.uint8)  # index into `values` of each tuple coordinate
    skip = values.view(np.int32) == 0  # +0.0: already in `out`
    skip_tuple = skip[symbols].all(axis=1)
    sparse = bool(counts[skip].sum() > SPARSE_SHARE * n)  # most values +0.0: skip them, branch well predicted
    tuple_hist = np.zeros(m ** g, dtype=np.int64)
    tail_hist = np.zeros(m, dtype=np.int64)
    n_tuples = -(-n // g)
    bad = 0
    pending = None
    overlap = parallel_ok(n) and n_tuples > DECODE_CHUNK
    for t0 in range(0, n_tuples, DECODE_CHUNK):
        tids = coder.decode(model, min(DECODE_CHUNK, n_tuples - t0))
        args = (tids, t0, n, g, symbols, skip_tuple, scales, bucket, values, skip, sparse, out, tuple_hist,
                tail_hist)
        if pending is not None:
            bad += pending.result()
        if overlap:  # the value kernel releases the GIL: it runs while the coder decodes the next chunk
            pending = thread_pool().submit(_values, *args)
        else:
            bad += _values(*args)
    if pending is not None:
        bad += pending.result()
    hist = tail_hist  # each index's count: its occurrences in each tuple times the tuple's (exact in float64)
    for k in range(g):
        hist = hist + np.bincount(symbols[:, k], weights=tuple_hist, minlength=m).astype(np.int64)
    if not coder.is_empty():
        raise DecodeError(f"{codec}: invalid entropy stream: ANS words are left after the last tuple")
    if bad or not np.array_equal(hist, counts):
        raise DecodeError(f"{codec}: invalid entropy stream: the decoded symbols do not match the model's counts")
    return out


def describe(stream, n, n_symbols):
    """Sizes of a valid stream's parts: ``{"group", "symbols_used", "model_bytes", "ans_bytes"}``."""
    data = np.asarray(stream, dtype=np.uint8)
    g, used, _, pos = _parse(data, n, n_symbols, "entropy")
    return {"group": g, "symbols_used": int(used.size), "model_bytes": int(pos), "ans_bytes": int(data.size - pos)}
