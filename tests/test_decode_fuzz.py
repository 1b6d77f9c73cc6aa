"""Bad bytes: every truncated, corrupted or foreign message gives a DecodeError."""

import random
import struct

import msgpack
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mpiqsgd import wire
from mpiqsgd.codecs import decode, make_codec, make_generator
from mpiqsgd.errors import DecodeError, MpiqsgdError

CODECS = [make_codec("fp32"), make_codec("fp16"), make_codec("qsgd", bits=3, bucket=16),
          make_codec("qsgd", levels=5, bucket=8), make_codec("qsgd-inf"), make_codec("sign", bucket=10),
          make_codec("qsgd-elias", bits=2, bucket=16)]


def valid_messages():
    out = []
    for i, codec in enumerate(CODECS):
        for n in (0, 1, 37, 300):
            x = torch.randn(n, generator=torch.Generator().manual_seed(i * 100 + n))
            out.append(codec.encode(x, make_generator(i)))
    return out


MESSAGES = valid_messages()


def assert_decode_error(message):
    with pytest.raises(DecodeError):
        decode(message)


def reframe(header, payload):
    """A message with a valid prefix and checksum around arbitrary header and payload."""
    return wire.frame(msgpack.packb(header, use_bin_type=True), payload)


def test_error_is_an_mpiqsgd_error():
    assert issubclass(DecodeError, MpiqsgdError) and issubclass(DecodeError, ValueError)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes(data):
    assert_decode_error(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_after_a_valid_prefix(data):
    assert_decode_error(wire.MAGIC + bytes([wire.VERSION]) + data)


def test_every_truncation():
    for message in MESSAGES:
        for cut in range(len(message)):
            assert_decode_error(message[:cut])


def test_seeded_mutations():
    rng = random.Random(1234)
    for trial in range(3000):
        original = rng.choice(MESSAGES)
        message = bytearray(original)
        kind = rng.randrange(4)
        if kind == 0:  # flip bits
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(message))
                message[i] ^= 1 << rng.randrange(8)
        elif kind == 1:  # overwrite a byte
            i = rng.randrange(len(message))
            old = message[i]
            message[i] = (old + rng.randint(1, 255)) % 256
        elif kind == 2:  # insert bytes
            i = rng.randrange(len(message) + 1)
            message[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:  # delete bytes
            i = rng.randrange(len(message))
            del message[i:i + rng.randint(1, 8)]
        if bytes(message) != original:  # two flips of one bit restore it
            assert_decode_error(bytes(message))


def test_appended_bytes():
    for message in MESSAGES:
        assert_decode_error(message + b"\x00")


@pytest.mark.parametrize("header,payload,match", [
    ({"codec": "lz4", "numel": 1, "params": {}}, b"", "unknown codec"),
    ({"codec": "qsgd", "numel": 10, "params": {"bits": 0, "levels": 0, "bucket": 8, "norm": "l2",
                                              "rounding": "stochastic"}}, b"", "invalid qsgd parameters"),
    ({"codec": "qsgd", "numel": 10, "params": {"bits": 4}}, b"", "invalid qsgd parameters"),
    ({"codec": "qsgd", "numel": 10, "params": {"bogus": 1}}, b"", "invalid qsgd parameters"),
    ({"codec": "fp32", "numel": 2**62, "params": {}}, b"\0" * 8, "needs"),
    ({"codec": "fp32", "numel": 3, "params": {}}, b"\0" * 8, "payload of 8 bytes"),
    ({"codec": "fp32", "numel": -1, "params": {}}, b"", "negative numel"),
    ({"codec": "fp32", "numel": "3", "params": {}}, b"", "malformed"),
    ([1, 2, 3], b"", "malformed"),
    ({"codec": "fp32", "numel": 1, "params": {}}, struct.pack("<f", float("nan")), "NaN"),
    ({"codec": "fp16", "numel": 1, "params": {}}, b"\x00\x7c", "NaN or Inf"),
    ({"codec": "sign", "numel": 1, "params": {"bucket": 4}}, struct.pack("<f", -1.0) + b"\0", "scale"),
    ({"codec": "qsgd", "numel": 1, "params": {"bits": 4, "levels": 5, "bucket": 4, "norm": "l2",
                                             "rounding": "stochastic"}},
     struct.pack("<f", 1.0) + bytes([7]), "above s=5"),
    ({"codec": "qsgd", "numel": 1, "params": {"bits": 4, "levels": 7, "bucket": 4, "norm": "l2",
                                             "rounding": "stochastic"}},
     struct.pack("<f", float("inf")) + bytes([1]), "scale"),
])
def test_checksummed_but_invalid_content(header, payload, match):
    with pytest.raises(DecodeError, match=match):
        decode(reframe(header, payload))


def test_foreign_and_wrong_version():
    with pytest.raises(DecodeError, match="magic"):
        decode(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    message = bytearray(MESSAGES[5])
    message[4] = 2
    with pytest.raises(DecodeError, match="version 2"):
        decode(bytes(message))
    with pytest.raises(DecodeError, match="bytes-like"):
        decode(12345)


def test_huge_header_length_does_not_allocate():
    message = struct.pack("<4sBII", wire.MAGIC, wire.VERSION, 2**32 - 1, 0) + b"\0" * 10
    with pytest.raises(DecodeError, match="header length"):
        decode(message)


def test_valid_messages_still_decode():
    for message in MESSAGES:
        decode(message)
        decode(bytearray(message))
        decode(memoryview(message))
