"""Messages framed into reused send buffers: same bytes, no aliasing, no growth from step to step."""

import numpy as np
import pytest
import torch

from mpiqsgd import wire
from mpiqsgd.codecs import decode, make_codec, make_generator
from mpiqsgd.errors import ConfigError
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
