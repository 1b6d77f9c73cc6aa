"""The codec contract (mpiqsgd.codecs, mpiqsgd.codecs.base) for every codec: exact sizes, bit-identical
decodes, shapes and dtypes, refusals, the registry, and encoding into and decoding into reused buffers.
One file a codec family beside it: test_fp, test_qsgd, test_sign, test_levelset, test_elias, test_entropy,
test_feedback (error feedback)."""

import numpy as np
import pytest
import torch

from conftest import vec
from mpiqsgd import wire
from mpiqsgd.codecs import CODECS, ErrorFeedback, decode, make_codec, make_generator
from mpiqsgd.errors import ConfigError, DecodeError, NonFiniteError

ALL = [
    ("fp32", {}), ("fp16", {}), ("sign", {}), ("sign", {"bucket": 7}),
    ("qsgd", {}), ("qsgd", {"bits": 2, "bucket": 128}), ("qsgd", {"bits": 8}),
    ("qsgd", {"levels": 5, "bucket": 33}), ("qsgd", {"rounding": "nearest"}),
    ("qsgd-inf", {"bits": 3}), ("qsgd-inf", {"rounding": "nearest", "bucket": 100}),
]


@pytest.mark.parametrize("name,params", ALL)
@pytest.mark.parametrize("n", [0, 1, 5, 127, 128, 129, 511, 512, 513, 1000, 4099])
def test_roundtrip_exact_size_and_bit_identical_decode(name, params, n):
    codec = make_codec(name, **params)
    x = vec(n, seed=n)
    message, decoded = codec.encode_decode(x, make_generator(1, 2, 3))
    assert isinstance(message, bytes)
    assert len(message) == codec.encoded_nbytes(n)
    assert decoded.shape == (n,) and decoded.dtype == torch.float32
    for y in (codec.decode(message), decode(message)):
        assert y.dtype == torch.float32 and y.shape == (n,)
        assert torch.equal(y, decoded)


@pytest.mark.parametrize("name,params", ALL)
def test_accepts_shapes_and_dtypes(name, params):
    codec = make_codec(name, **params)
    x = vec(60).view(3, 4, 5)
    for t in (x, x.double(), x.half(), x.transpose(0, 2)):
        y = codec.decode(codec.encode(t, make_generator(0)))
        assert y.shape == (60,) and y.dtype == torch.float32


@pytest.mark.parametrize("name,params", ALL)
def test_zero_vector(name, params):
    codec = make_codec(name, **params)
    y = codec.decode(codec.encode(torch.zeros(1000), make_generator(0)))
    assert torch.equal(y, torch.zeros(1000))


@pytest.mark.parametrize("name,params", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_refused_before_encoding(name, params, bad):
    codec = make_codec(name, **params)
    x = vec(100)
    x[17] = bad
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        codec.encode(x, make_generator(0))


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="qsgd", bits=0), "bits must be between 2 and 8"),
    (dict(name="qsgd", bits=1), "use the 'sign' codec"),
    (dict(name="qsgd", bits=9), "between 2 and 8"),
    (dict(name="qsgd", bucket=0), "bucket must be"),
    (dict(name="sign", bucket=0), "bucket must be"),
    (dict(name="qsgd", levels=0), "levels must be"),
    (dict(name="qsgd", rounding="up"), "stochastic, nearest"),
    (dict(name="nope"), "fp32, fp16, qsgd, qsgd-inf, qsgd-elias, sign"),
    (dict(name="fp32", bits=4), "takes no parameter bits"),
    (dict(name="qsgd-inf", norm="l2"), "fixes norm"),
    (dict(name="qsgd", bits=2.5), "integer"),
])
def test_invalid_parameters_fail_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_codec(**kwargs)


def test_stochastic_codec_requires_generator():
    with pytest.raises(ConfigError, match="Generator"):
        make_codec("qsgd").encode(vec(10))


def test_decode_refuses_message_of_other_parameters():
    message = make_codec("qsgd", bits=4).encode(vec(100), make_generator(0))
    with pytest.raises(DecodeError, match="encoded with qsgd"):
        make_codec("qsgd", bits=3).decode(message)
    with pytest.raises(DecodeError, match="this codec is fp32"):
        make_codec("fp32").decode(message)


@pytest.mark.filterwarnings("ignore:error feedback with")
def test_registry_names():
    assert set(CODECS) == {"fp32", "fp16", "qsgd", "qsgd-inf", "qsgd-elias", "sign", "nuqsgd", "nuqsgd-zero",
                           "terngrad", "alq", "alq-n", "amq", "amq-n"}
    assert isinstance(make_codec("qsgd", error_feedback=True), ErrorFeedback)


@pytest.mark.parametrize("name,params", [("fp32", {}), ("qsgd", {}), ("nuqsgd", {}), ("qsgd-elias", {}), ("sign", {}),
                                         ("qsgd", {"encoding": "entropy"}), ("alq", {"encoding": "entropy"})])
def test_encoding_into_a_buffer_gives_the_same_bytes_and_no_aliased_values(name, params):
    codec = make_codec(name, **params)
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    fresh = codec.encode(x, make_generator(1))
    out = np.empty(codec.encoded_nbytes(x.numel()) or 2 * len(fresh), dtype=np.uint8)
    into = codec.encode(x, make_generator(1), out=out)
    assert not isinstance(into, bytes) and bytes(into) == fresh
    values = decode(into)
    before = values.clone()
    out[:] = 0  # the slot is reused: decoded values must not change with it
    assert torch.equal(values, before)
    small = codec.encode(x, make_generator(1), out=np.empty(8, np.uint8))  # too small: new bytes
    assert isinstance(small, bytes) and small == fresh


@pytest.mark.parametrize("name,params", [("qsgd", {}), ("qsgd", {"bits": 3, "rounding": "nearest"}),
                                         ("qsgd-inf", {"bits": 8}), ("nuqsgd", {}), ("terngrad", {}),
                                         ("alq", {"bits": 4})])
@pytest.mark.parametrize("numel", [1, 4099, 70_001])
def test_dense_codes_are_written_in_place_with_the_same_bytes(monkeypatch, name, params, numel):
    """With room for the slack, the payload is encoded straight into the send buffer: no frame copy."""
    codec = make_codec(name, bucket=1000, **params)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    fresh, fresh_values = codec.encode_decode(x, make_generator(2))
    out = np.full(codec.encoded_nbytes(numel) + wire.SLACK, 0xAB, dtype=np.uint8)

    def no_copy(*args):
        raise AssertionError("the payload was copied into the frame, not written in place")

    monkeypatch.setattr(wire, "frame_into", no_copy)
    message, values = codec.encode_decode(x, make_generator(2), out=out)
    assert bytes(message) == fresh and torch.equal(values, fresh_values)
    assert np.shares_memory(np.frombuffer(message, np.uint8), out) and message.readonly
    assert torch.equal(decode(message), fresh_values)


@pytest.mark.parametrize("name", ["qsgd", "qsgd-inf", "nuqsgd", "terngrad", "amq", "sign"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_codecs_checking_through_their_norms_refuse_non_finite_values_into_a_buffer(name, bad):
    """The norms are the finiteness check: every NaN/Inf is found and counted, even beside a bucket
    whose float32 sum of squares would overflow (the buffer may hold codes of the other buckets:
    QSGD computes norms and codes in one pass; no message is returned)."""
    codec = make_codec(name, bucket=64)
    x = torch.randn(1000)
    x[3] = 3e30  # bucket 0's squares overflow float32 (the norms sum in float64)
    x[500], x[999] = bad, bad
    out = np.full((codec.encoded_nbytes(x.numel()) or 4096) + wire.SLACK, 0x5A, dtype=np.uint8)
    with pytest.raises(NonFiniteError, match="refusing to encode a gradient with 2 NaN/Inf value"):
        codec.encode(x, make_generator(0), out=out)


DECODE_INTO = [("fp32", {}), ("fp16", {}), ("sign", {}), ("qsgd", {}), ("qsgd", {"bits": 8, "bucket": 100}),
               ("qsgd-elias", {}), ("qsgd", {"encoding": "entropy"}), ("nuqsgd", {}), ("terngrad", {}),
               ("alq", {"bits": 6}), ("amq", {"encoding": "entropy"}),
               ("qsgd", {"rounding": "nearest", "error_feedback": True})]


@pytest.mark.parametrize("name,params", DECODE_INTO)
@pytest.mark.parametrize("force_torch", [False, True])
def test_decoding_into_a_buffer_gives_the_same_values_in_that_buffer(name, params, force_torch):
    codec = make_codec(name, **params)
    x = torch.randn(70_001, generator=torch.Generator().manual_seed(3))
    message = codec.encode(x, make_generator(1))
    codec.base.force_torch = force_torch  # the torch ops decode elsewhere, and are copied in
    expect = codec.decode(message)
    out = torch.full((x.numel(),), float("nan"))  # stale contents: every value must be written
    for _ in range(2):
        got = codec.decode(message, out=out)
        assert got is out and torch.equal(out, expect)
    assert torch.equal(decode(message, out=torch.empty(x.numel())), expect)  # the module-level decode


def test_decode_into_a_wrong_buffer_is_refused():
    codec = make_codec("qsgd")
    message = codec.encode(torch.randn(100), make_generator(0))
    for bad in (torch.empty(99), torch.empty(100, dtype=torch.float64), torch.empty(200)[::2], np.empty(100),
                torch.empty(10, 10), torch.empty(100, requires_grad=True)):
        with pytest.raises(ConfigError, match="decode\\(out=\\) needs a flat contiguous float32 tensor of 100"):
            codec.decode(message, out=bad)
