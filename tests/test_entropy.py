"""The entropy encoding (mpiqsgd.codecs.entropy): equal to the dense code's values, size at the
entropy, fixed bytes, hostile streams."""

import hashlib
import os

import numpy as np
import pytest
import torch

from conftest import varint, vec
from mpiqsgd import wire
from mpiqsgd.codecs import bits as bitpack
from mpiqsgd.codecs import codec_for, decode, entropy, make_codec, make_generator
from mpiqsgd.errors import ConfigError, DecodeError
from mpiqsgd.options import CodecOptions

QSGD_CASES = [(name, bits, rounding) for name in ("qsgd", "qsgd-inf") for bits in (2, 3, 4, 8)
              for rounding in ("stochastic", "nearest")]
LEVELSET_CASES = [("nuqsgd", {}), ("nuqsgd", {"bits": 1, "bucket": 16}), ("nuqsgd", {"bits": 8, "bucket": 64}),
                  ("nuqsgd-zero", {}), ("terngrad", {"bucket": 50}), ("alq", {}), ("alq-n", {"bits": 2}),
                  ("amq", {"bits": 4, "bucket": 128}), ("amq-n", {})]
SIZES = [0, 1, 7, 8, 9, 513, 4099, 300_001]


def pair(name, **params):
    """The entropy codec and its dense twin."""
    return make_codec(name, encoding="entropy", **params), make_codec(name, **params)


def assert_same_values(sparse, dense, x, seed=5):
    m_entropy, d_entropy = sparse.encode_decode(x, make_generator(seed, 1, 2))
    m_dense, d_dense = dense.encode_decode(x, make_generator(seed, 1, 2))
    for y in (sparse.decode(m_entropy), decode(m_entropy)):
        assert torch.equal(y.view(torch.int32), d_entropy.view(torch.int32))  # bit for bit, +0.0 included
    assert torch.equal(d_entropy, d_dense) and torch.equal(decode(m_dense), d_entropy)
    assert len(m_entropy) >= wire.PREFIX_BYTES + sparse.min_payload_nbytes(x.numel())
    return m_entropy, m_dense


@pytest.mark.parametrize("name,bits,rounding", QSGD_CASES)
@pytest.mark.parametrize("n", SIZES)
def test_qsgd_decodes_to_exactly_the_dense_values(name, bits, rounding, n):
    x = vec(n, seed=n, dist="heavy")
    x[: n // 4] = 0.0  # whole zero buckets
    assert_same_values(*pair(name, bits=bits, rounding=rounding, bucket=128), x)


@pytest.mark.parametrize("name,params", LEVELSET_CASES)
@pytest.mark.parametrize("n", SIZES)
def test_level_sets_decode_to_exactly_the_dense_values(name, params, n):
    sparse, dense = pair(name, **params)
    if sparse.adaptive:
        stats = sparse.local_stats(vec(20_000, seed=1))
        sparse.fit(stats)
        dense.fit(stats)
        assert sparse.levels_bytes == dense.levels_bytes
    assert_same_values(sparse, dense, vec(n, seed=n))


@pytest.mark.parametrize("params", [{"bits": 2}, {"bits": 4}, {"bits": 8, "rounding": "nearest"}])
def test_chunked_and_overlapped_coding(monkeypatch, params):
    """Small chunks: many coder calls, each overlapped with the next chunk's tuple or value kernel;
    the same bytes as one call."""
    sparse, dense = pair("qsgd", **params)
    x = vec(600_000, seed=3)
    whole = sparse.encode(x, make_generator(4))
    monkeypatch.setattr(entropy, "DECODE_CHUNK", 1000)
    monkeypatch.setattr(entropy, "ENCODE_CHUNK", 2 * entropy.TUPLE_CHUNK)
    assert sparse.encode(x, make_generator(4)) == whole
    assert_same_values(sparse, dense, x)


def test_torch_kernels_give_the_same_stream():
    sparse, _ = pair("qsgd", bits=3, bucket=64)
    x = vec(5000, seed=2)
    fast = sparse.encode(x, make_generator(1))
    sparse.force_torch = True
    assert sparse.encode(x, make_generator(1)) == fast


def symbols_of(message, codec, n):
    """Symbol counts of a dense message (QSGD or level set)."""
    _, payload = wire.unframe(message)
    packed = np.frombuffer(payload, dtype=np.uint8)[4 * -(-n // codec.bucket):].copy()
    if codec.name == "qsgd":
        code_symbol, table = entropy.qsgd_symbols(codec.bits, codec.levels)
    else:
        code_symbol, table = entropy.levelset_symbols(codec.bits, codec.table)
    return entropy.symbol_counts(packed, n, codec.bits, code_symbol, table.size)


SIZE_CASES = [("qsgd", {"bits": b, "rounding": r}) for b in (2, 3, 4, 8) for r in ("stochastic", "nearest")] + \
    [("qsgd", {"bits": 2, "bucket": 8192}), ("nuqsgd", {}), ("nuqsgd-zero", {}), ("terngrad", {}),
     ("alq", {"bits": 4})]


@pytest.mark.parametrize("name,params", SIZE_CASES)
def test_size_within_3_percent_of_the_entropy(name, params):
    """1M normal coordinates: message <= 1.03 n H / 8 + model + header + scales, and not below n H / 8."""
    n = 1_000_000
    x = vec(n, seed=11)
    sparse, dense = pair(name, **params)
    if sparse.adaptive:
        stats = sparse.local_stats(x)
        sparse.fit(stats)
        dense.fit(stats)
    m_entropy, m_dense = assert_same_values(sparse, dense, x)
    counts = symbols_of(m_dense, dense, n)
    h = entropy.entropy_bits(counts)
    _, payload = wire.unframe(m_entropy)
    scale_bytes = 4 * -(-n // sparse.bucket)
    parts = entropy.describe(np.frombuffer(payload, np.uint8)[scale_bytes:], n, counts.size)
    side = len(m_entropy) - len(payload) + scale_bytes + parts["model_bytes"]
    ideal = n * h / 8
    assert parts["ans_bytes"] <= 1.03 * ideal + 8, (parts, ideal)  # + the coder's final state word
    assert parts["ans_bytes"] >= 0.999 * ideal - 4, (parts, ideal)  # a memoryless code cannot beat it
    assert len(m_entropy) == side + parts["ans_bytes"]
    assert parts["model_bytes"] <= 2 + 6 * parts["symbols_used"]


def test_fixed_bytes():
    """The coder's bytes for fixed codes: a new constriction (or a change here) that changes them
    breaks every message in flight between versions, so it must show up here."""
    n, bits = 100_003, 4
    i = np.arange(n, dtype=np.uint64)
    level = ((i * np.uint64(2654435761)) % np.uint64(2**32) >> np.uint64(27)) % np.uint64(7)
    level = np.where(level > 2, 0, level)  # mostly 0, then 1, 2
    codes = (level | ((i % np.uint64(3) == 0) << np.uint64(3))).astype(np.uint8)
    packed = bitpack.pack(torch.from_numpy(codes), bits).numpy()
    code_symbol, table = entropy.qsgd_symbols(bits, 7)
    stream = entropy.encode(packed, n, bits, code_symbol, table.size)
    assert stream[:2].tolist() == [4, 4]  # g = 5 coordinates per tuple, m = 5 symbols
    assert hashlib.sha256(stream.tobytes()).hexdigest()[:16] == GOLDEN


GOLDEN = "f5c81d397904485d"  # constriction 0.4.1 and 0.5.0


# -- configuration ------------------------------------------------------------------------

def test_params_round_trip_and_headers():
    for name in ("qsgd", "qsgd-inf", "nuqsgd", "alq"):
        codec = make_codec(name, encoding="entropy")
        assert codec.params["encoding"] == "entropy" and not codec.fixed_size
        message = codec.encode(vec(100), make_generator(0))
        header, _ = wire.unframe(message)
        assert codec_for(header).params == codec.params
    assert "encoding" not in make_codec("nuqsgd").params  # dense headers unchanged


@pytest.mark.parametrize("name", ["qsgd", "qsgd-inf", "nuqsgd", "alq"])
def test_bucket_is_capped_so_messages_stay_within_the_decode_ratio(name):
    assert make_codec(name, bucket=wire.MAX_VARIABLE_BUCKET, encoding="entropy").bucket == 2**16
    with pytest.raises(ConfigError, match="entropy encoding takes bucket <= 65536 .*MAX_VALUES_PER_BYTE"):
        make_codec(name, bucket=wire.MAX_VARIABLE_BUCKET + 1, encoding="entropy")
    assert make_codec(name, bucket=wire.MAX_BUCKET).bucket == 2**30  # the dense code keeps its range


@pytest.mark.parametrize("codec,encoding,match", [
    ("sign", "entropy", "applies only to"), ("fp32", "dense", "applies only to"),
    ("nuqsgd", "elias", "elias applies only to"), ("qsgd-elias", "entropy", "fixes the encoding"),
])
def test_flag_errors(codec, encoding, match):
    with pytest.raises(ConfigError, match=match):
        CodecOptions(codec=codec, encoding=encoding).build_codec()


def test_flag_builds_each_encoding():
    assert CodecOptions(codec="qsgd", encoding="elias").build_codec().params == make_codec("qsgd-elias").params
    assert CodecOptions(codec="terngrad", encoding="entropy").build_codec().encoding == "entropy"
    assert CodecOptions(codec="qsgd-inf", encoding="dense").build_codec().params == make_codec("qsgd-inf").params


# -- hostile streams ----------------------------------------------------------------------

def stream_message(codec, numel, stream, scale=1.0):
    scales = np.full(-(-numel // codec.bucket), scale, dtype="<f4").tobytes()
    return wire.frame(codec.header_bytes(numel), scales + bytes(stream))


def valid_stream(codec, x, seed=0):
    _, payload = wire.unframe(codec.encode(x, make_generator(seed)))
    return bytearray(payload[4 * -(-x.numel() // codec.bucket):])


QSGD4 = make_codec("qsgd", bits=4, bucket=64, encoding="entropy")  # 15 symbols, zero is symbol 7
X = vec(500, seed=4)


@pytest.mark.parametrize("stream,match", [
    (b"", "needs at least"), (b"\x00\x00\x07", "needs at least"),
    (b"\x08\x00\x07" + varint(10), "coordinates per tuple"),
    (b"\x00\x0f" + bytes(16) + b"\x01" * 16, "symbols used"),
    (b"\x00\x02\x07\x03", "ends inside its list"),
    (b"\x00\x01\x07\x07" + varint(5) + varint(5), "strictly increasing"),
    (b"\x00\x01\x07\x0f" + varint(5) + varint(5), "strictly increasing"),
    (b"\x05\x04\x01\x02\x03\x04\x05" + varint(2) * 5, "tuples, more than"),
    (b"\x00\x00\x07" + varint(9), "do not sum"),
    (b"\x00\x00\x07" + varint(11), "exceeds"),
    (b"\x00\x00\x07\x8a", "ends inside its model"),
    (b"\x00\x00\x07" + b"\x80" * 6 + b"\x00", "exceeds"),  # overlong varint
    (b"\x00\x00\x07" + varint(10) + b"\x00", "bytes after"),
    (b"\x00\x01\x07\x08" + varint(10) + varint(0), "count of 0"),
    (b"\x00\x01\x07\x08" + varint(5) + varint(5) + b"\x01\x00\x00", "whole number"),
    (b"\x00\x01\x07\x08" + varint(5) + varint(5) + b"\x01\x00\x00\x00\x00\x00\x00\x00", "zero word"),
])
def test_invalid_streams(stream, match):
    message = stream_message(QSGD4, 10, stream)
    for decoder in (decode, QSGD4.decode):
        with pytest.raises(DecodeError, match=match):
            decoder(message)


def test_stream_with_words_left_over_or_other_counts():
    stream = valid_stream(QSGD4, X)
    m = stream[1] + 1
    assert m >= 2
    words = stream + bytes([1, 0, 0, 0])  # one more word: the coder does not end empty, or decodes other symbols
    with pytest.raises(DecodeError, match="left after|do not match"):
        decode(stream_message(QSGD4, 500, words))
    # the same model, the counts of two symbols swapped: the ANS words decode to other counts
    pos = 2 + m
    counts = []
    for _ in range(m):
        v, shift = 0, 0
        while True:
            byte = stream[pos]
            pos += 1
            v |= (byte & 127) << shift
            shift += 7
            if byte < 128:
                break
        counts.append(v)
    swapped = [counts[1], counts[0]] + counts[2:]
    assert swapped != counts
    model = bytes(stream[:2 + m]) + b"".join(varint(c) for c in swapped)
    with pytest.raises(DecodeError, match="do not match|left after"):
        decode(stream_message(QSGD4, 500, model + bytes(stream[pos:])))


def test_padding_coordinates_must_be_index_zero():
    """Coordinates past numel in the last tuple must be index 0, even when the counts agree."""
    counts = np.array([2, 1])  # symbols 7 (level 0) and 8 (+1) of QSGD4 at indices 0, 1
    coder = entropy.constriction.stream.stack.AnsCoder()
    tids = np.array([0b01, 0b01], dtype=np.int32)  # (0, 1), (0, padding 1): g = 2
    coder.encode_reverse(tids, entropy._model(counts, 2))
    words = coder.get_compressed().astype("<u4").tobytes()
    model = b"\x01\x01\x07\x08" + varint(2) + varint(1)
    with pytest.raises(DecodeError, match="do not match"):
        decode(stream_message(QSGD4, 3, model + words))
    tids[1] = 0b00  # padding 0: valid
    coder = entropy.constriction.stream.stack.AnsCoder()
    coder.encode_reverse(tids, entropy._model(counts, 2))
    out = decode(stream_message(QSGD4, 3, model + coder.get_compressed().astype("<u4").tobytes(), scale=7.0))
    assert out.tolist() == [0.0, 1.0, 0.0]


def test_one_symbol_model_decodes_without_words():
    codec = make_codec("qsgd", bits=2, bucket=8, encoding="entropy")
    assert decode(stream_message(codec, 10, b"\x00\x00\x01" + varint(10))).eq(0).all()  # level 0: symbol s = 1
    out = decode(stream_message(codec, 10, b"\x00\x00\x02" + varint(10), scale=2.0))  # level +1 everywhere
    assert out.eq(2.0).all()


def _resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_short_stream_of_zeros_does_not_commit_its_claimed_length():
    codec = make_codec("qsgd", bits=2, bucket=2**16, encoding="entropy")
    numel = 2**26
    message = stream_message(codec, numel, b"\x00\x00\x01" + varint(numel), scale=0.5)
    assert len(message) < 4400
    before = _resident_bytes()
    out = decode(message)
    grown = _resident_bytes() - before
    assert out.numel() == numel and float(out[:: 2**16].abs().sum()) == 0.0
    assert grown < 32 << 20, f"decoding a {len(message)}-byte message made {grown >> 20} MiB resident"


def test_bucket_above_numel_sizes_nothing():
    for name in ("qsgd", "nuqsgd"):
        codec = make_codec(name, bucket=wire.MAX_VARIABLE_BUCKET, encoding="entropy")
        message = codec.encode(torch.tensor([0.5, -2.0, 1.0]), make_generator(0))
        out = decode(message)
        assert out.numel() == 3 and bool(torch.isfinite(out).all())
