"""Messages framed into reused send buffers: same bytes, no aliasing, no growth from step to step."""

import numpy as np
import pytest
import torch

from mpiqsgd import wire
from mpiqsgd.codecs import decode, make_codec, make_generator
from mpiqsgd.errors import ConfigError, NonFiniteError
from mpiqsgd.topology import make_aggregator
from mpiqsgd.transport import LocalGroup


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


@pytest.mark.parametrize("topology", ["ps", "ring", "scatter", "allgather"])
def test_send_buffers_are_reused_from_step_to_step(topology):
    group = LocalGroup(3)
    transports = group.transports()
    aggs = [make_aggregator(topology, t, make_codec("qsgd"), seed=1) for t in transports]
    grads = [torch.randn(30_000, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    sizes = []
    for step in range(3):
        out = group.run(lambda t: aggs[t.rank].aggregate(grads[t.rank].clone(), step, stream=1), transports)
        assert all(torch.equal(out[0], o) for o in out)
        sizes.append([(len(a.buffers.slots), a.buffers.nbytes) for a in aggs])
    assert sizes[0] == sizes[1] == sizes[2] and all(n > 0 for n, _ in sizes[0])
    ids = {id(b) for a in aggs for b in a.buffers.slots.values()}
    group.run(lambda t: aggs[t.rank].aggregate(grads[t.rank].clone(), 3, stream=1), transports)
    assert ids == {id(b) for a in aggs for b in a.buffers.slots.values()}  # the same arrays, not new ones


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


def test_kernels_refuse_an_output_without_the_spare_bytes():
    from mpiqsgd.codecs.qsgd_kernels import level_encode

    x, norms = torch.randn(64), torch.ones(1)
    with pytest.raises(ValueError, match="40 bytes"):  # 32 packed + 8 spare
        level_encode(x, 7 / norms, norms / 7, 512, 4, 7, 0, False, False, out=np.empty(39, np.uint8))
    packed, _ = level_encode(x, 7 / norms, norms / 7, 512, 4, 7, 0, False, False, out=np.empty(40, np.uint8))
    assert packed.numel() == 32


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
