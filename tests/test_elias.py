"""QSGD's Elias-omega sparse code (codec qsgd-elias): format, equivalence with the dense code, bad streams."""

import math
import random
import struct

import msgpack
import numpy as np
import pytest
import torch

from mpiqsgd import wire
from mpiqsgd.codecs import bits as bitpack
from mpiqsgd.codecs import decode, elias, make_codec, make_generator
from mpiqsgd.errors import ConfigError, DecodeError


def omega(k):
    """Elias omega code of k >= 1 as a string of bits, straight from the definition."""
    code = "0"
    while k > 1:
        b = bin(k)[2:]
        code = b + code
        k = len(b) - 1
    return code


def reference_stream(levels, negative, bucket):
    """The documented stream layout, written bit by bit in Python."""
    bits = []
    for start in range(0, len(levels), bucket):
        idx = [i for i in range(start, min(start + bucket, len(levels))) if levels[i]]
        bits.append(omega(len(idx) + 1))
        prev = start - 1
        for i in idx:
            bits += [omega(i - prev), "1" if negative[i] else "0", omega(int(levels[i]))]
            prev = i
    s = "".join(bits)
    s += "0" * (-len(s) % 8)
    return bytes(int(s[i:i + 8], 2) for i in range(0, len(s), 8)), len("".join(bits))


def test_omega_codes_of_the_definition():
    assert [omega(k) for k in (1, 2, 3, 4, 7, 16)] == ["0", "100", "110", "101000", "101110", "10100100000"]
    for k in list(range(1, 300)) + [2**20, 2**31 + 5]:
        assert elias.omega_bits(k) == len(omega(k))


@pytest.mark.parametrize("n,bucket,top", [(1, 4, 1), (37, 8, 3), (300, 64, 7), (1000, 1000, 127), (513, 512, 1)])
def test_stream_matches_the_documented_layout(n, bucket, top):
    rng = np.random.default_rng(n)
    levels = np.where(rng.random(n) < 0.3, rng.integers(1, top + 1, n), 0).astype(np.uint8)
    negative = (rng.random(n) < 0.5).astype(np.uint8)
    expected, nbits = reference_stream(levels, negative, bucket)
    bits = 1 + max(1, int(top).bit_length())
    packed = bitpack.pack(torch.from_numpy(negative << (bits - 1) | levels), bits).numpy()
    assert elias.count_bits(packed, n, bits, bucket) == nbits
    got = elias.encode_codes(packed, n, bits, bucket, nbits)
    assert bytes(got) == expected
    unit = np.full(-(-n // bucket), 0.5, dtype=np.float32)
    out = np.empty(n, dtype=np.float32)
    assert elias.decode_stream(got, unit, bucket, top, n, out) == 0
    assert np.array_equal(out, np.where(negative == 1, -0.5, 0.5) * levels)


@pytest.mark.parametrize("params", [{"bits": 2, "bucket": 128}, {"bits": 4}, {"bits": 8, "bucket": 100},
                                    {"levels": 5, "bucket": 33}, {"bits": 3, "rounding": "nearest"}])
@pytest.mark.parametrize("n", [0, 1, 127, 128, 129, 4099, 300_000])
def test_decodes_to_exactly_what_the_dense_code_decodes(params, n):
    sparse, dense = make_codec("qsgd-elias", **params), make_codec("qsgd", **params)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) ** 3
    x[: n // 4] = 0.0  # whole zero buckets
    m_sparse, d_sparse = sparse.encode_decode(x, make_generator(5, 1, 2))
    m_dense, d_dense = dense.encode_decode(x, make_generator(5, 1, 2))
    for y in (sparse.decode(m_sparse), decode(m_sparse)):
        assert torch.equal(y.view(torch.int32), d_sparse.view(torch.int32))  # bit for bit, +0.0 included
    assert torch.equal(d_sparse, d_dense)
    assert torch.equal(decode(m_dense), d_sparse)
    assert len(m_sparse) >= wire.PREFIX_BYTES + sparse.min_payload_nbytes(n)


@pytest.mark.parametrize("n,bucket,bits,density", [
    (1, 4, 2, 0.5), (37, 8, 3, 0.3), (300, 64, 4, 0.3), (1000, 1000, 8, 0.9), (513, 512, 2, 0.01),
    (100_000, 7, 4, 0.2), (99, 1, 2, 0.5), (1000, 3, 8, 0.7), (40_000, 13, 5, 1.0), (300_001, 512, 2, 0.0),
    (2_000_000, 512, 2, 0.1), (1_000_000, 65536, 8, 0.5), (600_000, 100, 3, 0.3),
])
def test_parallel_encoder_writes_the_sequential_bytes(n, bucket, bits, density):
    """encode_parallel (tasks of buckets on numba's threads) against the sequential reference."""
    rng = np.random.default_rng(n + bits)
    top = (1 << (bits - 1)) - 1
    levels = np.where(rng.random(n) < density, rng.integers(1, top + 1, n), 0).astype(np.uint8)
    negative = (rng.random(n) < 0.5).astype(np.uint8)
    packed = bitpack.pack(torch.from_numpy(negative << (bits - 1) | levels), bits).numpy()
    reference = elias.encode_codes(packed, n, bits, bucket, elias.count_bits(packed, n, bits, bucket))
    assert np.array_equal(elias.encode_parallel(packed, n, bits, bucket), reference)


def test_codec_uses_the_parallel_encoder_and_its_bytes_are_the_reference(monkeypatch):
    codec = make_codec("qsgd-elias", bits=3, bucket=256)
    x = torch.randn(700_000, generator=torch.Generator().manual_seed(3))
    fast = codec.encode(x, make_generator(1))
    calls = []
    monkeypatch.setattr(elias, "encode_parallel", lambda packed, n, bits, bucket: calls.append(n) or
                        elias.encode_codes(packed, n, bits, bucket, elias.count_bits(packed, n, bits, bucket)))
    assert codec.encode(x, make_generator(1)) == fast and calls == [700_000]


def test_variable_length_is_declared():
    codec = make_codec("qsgd-elias")
    assert codec.payload_nbytes(10) is None and codec.encoded_nbytes(10) is None and not codec.fixed_size
    assert make_codec("qsgd").fixed_size
    assert codec.params["encoding"] == "elias" and "encoding" not in make_codec("qsgd").params


@pytest.mark.parametrize("levels,bucket", [(1, 512), (1, 2048), (3, 512), (16, 512)])
def test_length_within_the_papers_bound(levels, bucket):
    """Theorem 3.2 bounds the expected bits per bucket; ours adds the count omega(nnz + 1)."""
    codec = make_codec("qsgd-elias", levels=levels, bucket=bucket)
    n_buckets = 40
    x = torch.randn(n_buckets * bucket, generator=torch.Generator().manual_seed(levels))
    s, d = levels, bucket
    nnz = s * (s + math.sqrt(d))
    bound = (3 + 1.5 * math.log2(2 * (s * s + d) / nnz)) * nnz + 32
    count = 2 * math.log2(nnz + 1) + 1
    sizes = [len(codec.encode(x, make_generator(0, 0, k))) for k in range(5)]
    header = wire.PREFIX_BYTES + len(codec.header_bytes(x.numel()))
    bits_per_bucket = 8 * (np.mean(sizes) - header) / n_buckets
    assert bits_per_bucket <= bound + count
    assert bits_per_bucket < d * codec.bits + 32  # and below the dense code at these settings


def reframe(params, numel, payload):
    header = msgpack.packb({"codec": "qsgd", "numel": numel, "params": params}, use_bin_type=True)
    return wire.frame(header, payload)


def test_bad_streams_are_decode_errors():
    codec = make_codec("qsgd-elias", bits=3, bucket=16)
    params = codec.params
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    message = codec.encode(x, make_generator(0))
    header, payload = wire.unframe(message)
    payload = bytes(payload)
    norms = 4 * 7
    for cut in range(len(payload)):  # every truncation, re-checksummed
        with pytest.raises(DecodeError):
            decode(reframe(params, 100, payload[:cut]))
    with pytest.raises(DecodeError, match="left over"):
        decode(reframe(params, 100, payload + b"\0"))
    def stream(*codes, pad="0"):
        bits = "".join(codes)
        bits += pad * (-len(bits) % 8)
        return struct.pack("<f", 1.0) + bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8))

    cases = [  # (numel, bucket, payload, error); bits 3: levels 1..3
        (1, 16, stream(omega(4)), "more non-zero levels"),                     # 3 non-zeros in 1 coordinate
        (4, 4, stream(omega(3), omega(3), "0", omega(1), omega(2), "0"), "past the end"),  # positions 2, 4
        (1, 16, stream(omega(2), omega(1), "0", omega(4)), "outside 1..s"),  # level 4 > 3
        (1, 16, stream(omega(1), pad="1"), "padding"),
        (1, 16, stream("1", "1" * 38, "1" * 6), "exceeds 2\\^40"),  # groups 1 -> 3 -> 15 -> 65535: too long
        (1, 16, stream("11111111"), "ends inside"),
    ]
    for numel, bucket, payload_, match in cases:
        with pytest.raises(DecodeError, match=match):
            decode(reframe({**params, "bucket": bucket}, numel, payload_))
    with pytest.raises(DecodeError, match="payload bytes for numel=0"):
        decode(reframe(params, 0, b"\0"))
    with pytest.raises(DecodeError, match="needs at least"):  # the receiver's count: the codec's minimum applies
        decode(reframe(params, 10**9, payload[:norms]), numel=10**9)
    with pytest.raises(DecodeError, match="MAX_VALUES_PER_BYTE"):  # no count: more values per byte than allowed
        decode(reframe(params, 10**9, payload[:norms]))


def test_random_streams_never_crash():
    codec = make_codec("qsgd-elias", bits=4, bucket=8)
    params = codec.params
    x = torch.randn(64, generator=torch.Generator().manual_seed(1))
    _, payload = wire.unframe(codec.encode(x, make_generator(0)))
    payload = bytes(payload)
    rnd = random.Random(0)
    decoded = 0
    for _ in range(3000):
        p = bytearray(payload)
        for _ in range(rnd.randint(1, 4)):
            i = rnd.randrange(32, len(p))  # the stream, after 8 norms
            p[i] ^= 1 << rnd.randrange(8)
        try:
            y = decode(reframe(params, 64, bytes(p)))
        except DecodeError:
            continue
        decoded += 1  # another valid stream: values must still be well formed
        assert y.shape == (64,) and bool(torch.isfinite(y).all())
        assert float(y.abs().max()) <= float(x.norm()) * 1.0001
    assert decoded < 3000


def test_invalid_parameters():
    with pytest.raises(ConfigError, match="bucket <= 65536"):
        make_codec("qsgd-elias", bucket=1 << 17)
    with pytest.raises(ConfigError, match="encoding must be one of dense, elias"):
        make_codec("qsgd", encoding="huffman")
