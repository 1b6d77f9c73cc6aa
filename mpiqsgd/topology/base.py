"""The aggregation contract shared by all topologies.

An aggregator takes each rank's flat float32 gradient and returns the mean over
ranks, bit-identical on every rank. It is a message pattern over a
:class:`~mpiqsgd.transport.Transport`: the transport sends, receives, counts every
message and times ``communicate``; the aggregator encodes and decodes through a
:class:`Round`, which times ``encode`` and ``decode``.

Codec randomness comes from ``make_generator(seed, rank, step, stream=stream)`` (one
generator per call, shared by all encodes of that call), so a run is reproducible and a
payload depends only on (gradient, seed, rank, step, stream). ``stream`` tells apart
the calls of one step (gradient buckets); stream 0 is the whole-gradient call. Sums are
taken in rank order by :func:`mean_of` so that topologies that see the same payloads
return the same bits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Hashable, Sequence, Tuple

import numpy as np
import numpy.typing as npt
import torch

from .. import wire
from ..codecs import make_generator
from ..errors import ConfigError
from ..transport import sum_of

if TYPE_CHECKING:
    from ..codecs.base import Codec, Device, Rng
    from ..transport import Transport

__all__ = ["Aggregator", "Round", "MessageBuffers", "mean_of", "sum_of", "chunk_bounds", "empty_like"]


def empty_like(flat: torch.Tensor) -> torch.Tensor:
    """An uninitialized float32 tensor shaped like the 1-D ``flat`` (a topology's result).

    On the CPU from numpy, which asks the kernel for huge pages on large arrays (``madvise``):
    filling a fresh 100 MB result then costs 13-15 ms of CPU instead of torch.empty's 50-58 ms
    of page faults (measured on the project's 2-core VM, 2026-12-06)."""
    if flat.device.type == "cpu":
        return torch.from_numpy(np.empty(flat.numel(), dtype=np.float32))
    return torch.empty_like(flat, dtype=torch.float32)


def mean_of(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean of equally shaped tensors, summed one after another in the given order."""
    return sum_of(tensors).div_(len(tensors))


def chunk_bounds(numel: int, n: int) -> list[tuple[int, int]]:
    """(start, end) of ``n`` contiguous chunks of ``numel``; the first ``numel % n`` get one more."""
    base, extra = divmod(numel, n)
    bounds, start = [], 0
    for c in range(n):
        end = start + base + (c < extra)
        bounds.append((start, end))
        start = end
    return bounds


# A send buffer's slot in MessageBuffers: (stream, index of the encode in the call).
Slot = Tuple[int, int]


class MessageBuffers:
    """Send buffers reused from step to step: the ``i``-th encode of a stream's call frames its
    message into slot ``(stream, i)`` (:func:`mpiqsgd.wire.frame_into`), so the hot path neither
    joins nor allocates (a fresh buffer of a large message costs a page fault per 4 KiB).

    A message lives until the same slot is encoded again, one step later: every aggregator
    waits for its sends before :meth:`Aggregator.aggregate` returns, and the transports
    copy or finish with a buffer by then. Slots are sized by the codec's
    ``encoded_nbytes`` plus :data:`mpiqsgd.wire.SLACK`, so that fixed-length codecs write their
    payload in place (no payload copy); a variable-length code gets the length of its last
    message plus a quarter (a longer message falls back to new bytes and resizes the slot).
    """

    def __init__(self) -> None:
        self.slots: dict[Slot, npt.NDArray[np.uint8]] = {}

    def get(self, slot: Slot, nbytes: int | None) -> npt.NDArray[np.uint8] | None:
        """A writable buffer of at least ``nbytes`` for ``slot`` (None: whatever it holds, if anything)."""
        buf = self.slots.get(slot)
        if nbytes is not None and (buf is None or buf.size < nbytes + wire.SLACK):
            buf = self.slots[slot] = np.empty(nbytes + wire.SLACK, dtype=np.uint8)
        return buf

    def seen(self, slot: Slot, message: wire.BytesLike) -> None:
        """Grow a variable-length code's slot after a message that did not fit."""
        buf = self.slots.get(slot)
        if buf is None or buf.size < len(message):
            self.slots[slot] = np.empty(len(message) + len(message) // 4, dtype=np.uint8)

    @property
    def nbytes(self) -> int:
        return sum(b.size for b in self.slots.values())


class Round:
    """One :meth:`Aggregator.aggregate` call: its step, stream and generator; timed codec calls
    that frame their messages into the aggregator's :class:`MessageBuffers`.

    Error-feedback residuals are kept per key; a bucket's keys carry its stream, so the
    buckets of one step keep separate residuals.
    """

    def __init__(self, aggregator: Aggregator, step: int, stream: int) -> None:
        self.transport = aggregator.transport
        self.step, self.stream = step, stream
        # On the CPU whatever the tensors' device: the kernels only need its seeds, so
        # CPU and GPU ranks produce the same bytes. One generator for all encodes of the
        # call: separate generators with one seed would draw the same uniforms twice.
        self.rng = make_generator(aggregator.seed, self.transport.rank, step, stream=stream)
        self.buffers = aggregator.buffers
        self.encodes = 0

    def key(self, key: Hashable) -> Hashable:
        return key if self.stream == 0 else (self.stream, key)

    def encode(self, codec: Codec, x: torch.Tensor, key: Hashable, rng: Rng | None = None) -> bytes | memoryview:
        return self.encode_decode(codec, x, key, want_decoded=False, rng=rng)[0]

    def encode_decode(self, codec: Codec, x: torch.Tensor, key: Hashable, want_decoded: bool = True,
                      rng: Rng | None = None) -> tuple[bytes | memoryview, torch.Tensor | None]:
        """Encode ``x`` (and decode it, where ``want_decoded``) with the call's generator, or with ``rng``
        (a :class:`~mpiqsgd.codecs.kernels.SeedAt`: one piece of a message); return (message, decoded)."""
        rng = self.rng if rng is None else rng
        slot = (self.stream, self.encodes)
        self.encodes += 1
        out = self.buffers.get(slot, codec.encoded_nbytes(x.numel()))
        with self.transport.timed("encode", bucket=self.stream, numel=x.numel()):
            if want_decoded:
                message, decoded = codec.encode_decode(x, rng, key=self.key(key), out=out)
            else:
                message, decoded = codec.encode(x, rng, key=self.key(key), out=out), None
        if isinstance(message, bytes):  # it did not fit: a variable-length code's longer message
            self.buffers.seen(slot, message)
        return message, decoded

    def decode(self, codec: Codec, message: wire.BytesLike, device: Device, numel: int | None) -> torch.Tensor:
        """Decode ``message``, refusing one of another length than the ``numel`` values expected."""
        with self.transport.timed("decode", bucket=self.stream, bytes=len(message), numel=numel):
            return codec.decode(message, device, numel)


class Aggregator:
    """Base class of the topologies: ``aggregate`` returns the mean over ranks of ``flat``.

    Contract:

    - Input: this rank's 1-D float32 gradient, the same length on every rank; it is not
      modified. Output: a new tensor holding the mean, bit-identical on every rank.
    - Side effects: messages through the transport (each counted by its meter, with the
      step stamped by :meth:`aggregate`); seconds added to the meter's ``encode``,
      ``decode`` and ``communicate``; the codec's error-feedback residuals updated.
    - Collective: every rank calls ``aggregate`` with the same ``step`` and ``stream`` in
      the same order.
    - Byte cost: :meth:`sent_nbytes` gives the exact bytes a rank sends per call; each
      topology module's docstring gives its formula.

    Args:
        transport: a :class:`~mpiqsgd.transport.Transport`.
        codec: a :class:`~mpiqsgd.codecs.base.Codec` (error feedback included).
        seed: base seed of codec randomness.
    """

    name: str = "aggregator"

    def __init__(self, transport: Transport, codec: Codec, seed: int = 0) -> None:
        self.transport = transport
        self.codec = codec
        self.seed = seed
        self.buffers = MessageBuffers()

    @property
    def codecs(self) -> dict[str, Codec]:
        """Every codec whose state a checkpoint keeps, by role."""
        return {"codec": self.codec}

    def _check(self, flat: torch.Tensor | None) -> None:
        if not isinstance(flat, torch.Tensor) or flat.dim() != 1 or flat.dtype != torch.float32:
            raise ConfigError(f"{self.name}: expected a 1-D float32 tensor, got "
                              f"{getattr(flat, 'dtype', type(flat).__name__)} {tuple(getattr(flat, 'shape', ()))}")

    def aggregate(self, flat: torch.Tensor | None, step: int, stream: int = 0) -> torch.Tensor:
        """Return the mean of ``flat`` over ranks (identical on all ranks).

        Args:
            flat: this rank's 1-D float32 gradient (same length on every rank).
            step: the training step; seeds the codec and stamps the meter's records.
            stream: which call of the step this is (a gradient bucket's index).
        """
        self._check(flat)
        self.transport.begin_step(step)
        numel = 0 if flat is None else flat.numel()  # a dedicated ps server has no gradient
        with self.transport.traced(f"bucket {stream}", topology=self.name, codec=self.codec.name, numel=numel):
            return self._aggregate(flat, Round(self, step, stream))

    def _aggregate(self, flat: torch.Tensor | None, call: Round) -> torch.Tensor:
        raise NotImplementedError

    def sent_nbytes(self, numel: int, rank: int) -> int | None:
        """Exact bytes ``rank`` sends in one :meth:`aggregate` of ``numel`` coordinates.

        None when a codec's message length depends on the data (``qsgd-elias``): the
        meter still counts every message as sent.
        """
        if not all(codec.fixed_size for codec in self.codecs.values()):
            return None
        return self._sent_nbytes(numel, rank)

    def _sent_nbytes(self, numel: int, rank: int) -> int:
        raise NotImplementedError
