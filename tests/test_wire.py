"""Message framing (mpiqsgd.wire): frame, frame_into and seal write the same bytes; unframe refuses
what is not a message. Hostile bytes through every decoder: tests/test_decode_fuzz.py."""

import math

import numpy as np
import pytest

from conftest import vec
from mpiqsgd import wire
from mpiqsgd.codecs import make_codec
from mpiqsgd.errors import ConfigError


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
