"""Message framing (mpiqsgd.wire): frame, frame_into and seal write the same bytes; unframe refuses
what is not a message. Hostile bytes through every decoder: tests/test_decode_fuzz.py."""

import math
import struct

import msgpack
import numpy as np
import pytest

from conftest import vec
from mpiqsgd import wire
from mpiqsgd.codecs import make_codec
from mpiqsgd.errors import ConfigError, DecodeError


def test_header_is_self_describing():
    codec = make_codec("qsgd-inf", bits=3, bucket=100, rounding="nearest")
    header, payload = wire.unframe(codec.encode(vec(250)))
    assert header == {"codec": "qsgd", "numel": 250,
                      "params": {"bits": 3, "levels": 3, "bucket": 100, "norm": "max", "rounding": "nearest"}}
    assert len(payload) == 4 * 3 + math.ceil(250 * 3 / 8)


def test_frame_into_writes_the_same_message_as_frame():
    header, payload = wire.pack_header("fp32", 3, {}), np.arange(12, dtype=np.uint8)
    out = np.full(64, 7, dtype=np.uint8)
    view = wire.frame_into(out, header, payload)
    assert bytes(view) == wire.frame(header, payload) and view.readonly
    assert np.shares_memory(np.frombuffer(view, np.uint8), out)
    with pytest.raises(ConfigError, match="needs a writable buffer of"):
        wire.frame_into(np.empty(10, np.uint8), header, payload)
    with pytest.raises(ConfigError, match="read-only"):
        wire.frame_into(bytes(64), header, payload)


def test_frame_and_unframe_round_trip_any_bytes_like_payload():
    header = wire.pack_header("qsgd", 5, {"bits": 4, "norm": "l2", "scale": 0.5, "flag": None, "raw": b"\x01"})
    assert header == wire.pack_header("qsgd", 5, {"bits": 4, "norm": "l2", "scale": 0.5, "flag": None, "raw": b"\x01"})
    data = bytes(range(40))
    for payload in (data, bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        message = wire.frame(header, payload)
        assert len(message) == wire.PREFIX_BYTES + len(header) + 40 and message[:4] == wire.MAGIC
        assert wire.header_nbytes(message) == wire.PREFIX_BYTES + len(header)
        got, body = wire.unframe(message, numel=5)
        assert got == {"codec": "qsgd", "numel": 5,
                       "params": {"bits": 4, "norm": "l2", "scale": 0.5, "flag": None, "raw": b"\x01"}}
        assert bytes(body) == data
    assert wire.header_nbytes(message[:5]) == 5  # shorter than the prefix: all of it is framing


def test_seal_frames_a_payload_written_in_place():
    header, payload = wire.pack_header("fp32", 2, {}), np.arange(8, dtype=np.uint8)
    out = bytearray(64)
    start = wire.PREFIX_BYTES + len(header)
    out[start:start + 8] = payload.tobytes()
    view = wire.seal(out, header, 8)
    assert bytes(view) == wire.frame(header, payload) and view.readonly
    with pytest.raises(ConfigError, match="seal: needs a writable buffer of"):
        wire.seal(bytearray(start + 7), header, 8)


def test_every_flipped_bit_is_a_checksum_mismatch():
    message = wire.frame(wire.pack_header("fp32", 3, {}), np.arange(12, dtype=np.uint8))
    for i in range(9 * 8, len(message) * 8):  # the checksum and all it covers (header and payload)
        bad = bytearray(message)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(DecodeError, match="checksum mismatch"):
            wire.unframe(bytes(bad))


@pytest.mark.parametrize("message,match", [
    (b"MQSG\x02", "shorter than the 13-byte prefix"),
    (b"MQSX" + bytes(9), "not an mpiqsgd message"),
    (struct.pack("<4sBII", wire.MAGIC, 1, 0, 0), "unsupported wire format version 1"),
    (struct.pack("<4sBII", wire.MAGIC, wire.VERSION, 20, 0) + bytes(19), "header length 20 does not fit"),
    (12345, "expected a bytes-like message, got int"),
])
def test_unframe_refuses_what_is_not_a_message(message, match):
    with pytest.raises(DecodeError, match=match):
        wire.unframe(message)


def _framed(header):
    return wire.frame(msgpack.packb(header, use_bin_type=True), b"\0" * 4)


@pytest.mark.parametrize("header,match", [
    ([1, 2], "malformed message header"),
    ({"codec": "fp32", "numel": 1}, "malformed message header"),
    ({"codec": "fp32", "numel": 1, "params": {}, "extra": 0}, "malformed message header"),
    ({"codec": 3, "numel": 1, "params": {}}, "expected codec a str"),
    ({"codec": "fp32", "numel": 1.0, "params": {}}, "expected codec a str"),
    ({"codec": "fp32", "numel": 1, "params": {"bits": [4]}}, "is not a named scalar"),
    ({"codec": "fp32", "numel": -1, "params": {}}, "negative numel -1"),
])
def test_unframe_refuses_a_header_pack_header_cannot_write(header, match):
    with pytest.raises(DecodeError, match=match):
        wire.unframe(_framed(header))


def test_expected_numel_and_describe():
    message = wire.frame(wire.pack_header("fp32", 3, {}), bytes(12))
    with pytest.raises(DecodeError, match="holds 3 values, the receiver expects 4"):
        wire.unframe(message, numel=4)
    assert len(wire.describe({"codec": "x" * 10_000, "nest": [[[[[1]]]]]})) < 200  # bounded however large
