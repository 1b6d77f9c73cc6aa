"""The aggregation contract shared by all topologies.

An aggregator takes each rank's flat float32 gradient and returns the mean over
ranks, bit-identical on every rank. Codec randomness comes from
``make_generator(seed, rank, step)`` (one generator per call, shared by all encodes of
that call), so a run is reproducible and a payload depends only on (gradient, seed,
rank, step). Sums are taken in rank order by :func:`mean_of`
so that topologies that see the same payloads return the same bits.
"""

import torch

from ..codecs import make_generator
from ..errors import ConfigError

__all__ = ["Aggregator", "mean_of", "sum_of", "chunk_bounds"]


def sum_of(tensors):
    """Sum of equally shaped tensors, added one after another in the given order."""
    acc = tensors[0].clone()
    for t in tensors[1:]:
        acc += t
    return acc


def mean_of(tensors):
    """Mean of equally shaped tensors, summed one after another in the given order."""
    return sum_of(tensors).div_(len(tensors))


def chunk_bounds(numel, n):
    """(start, end) of ``n`` contiguous chunks of ``numel``; the first ``numel % n`` get one more."""
    base, extra = divmod(numel, n)
    bounds, start = [], 0
    for c in range(n):
        end = start + base + (c < extra)
        bounds.append((start, end))
        start = end
    return bounds


class Aggregator:
    """Base class: holds the transport, the codec and the seed.

    Args:
        transport: a :class:`~mpiqsgd.transport.Transport` (its meter counts the bytes).
        codec: a codec or an error-feedback-wrapped codec.
        seed: base seed of codec randomness.
    """

    name = "aggregator"

    def __init__(self, transport, codec, seed=0):
        self.transport = transport
        self.codec = codec
        self.seed = seed

    @property
    def meter(self):
        return self.transport.meter

    def _rng(self, step):
        """This rank's codec generator for ``step``: one per aggregate call, shared by all its encodes
        (separate generators with one seed would draw the same uniforms twice: correlated
        rounding). On the CPU whatever the tensors' device: the kernels only need its seeds,
        so CPU and GPU ranks produce the same bytes."""
        return make_generator(self.seed, self.transport.rank, step)

    def _check(self, flat):
        if not isinstance(flat, torch.Tensor) or flat.dim() != 1 or flat.dtype != torch.float32:
            raise ConfigError(f"{self.name}: expected a 1-D float32 tensor, got "
                              f"{getattr(flat, 'dtype', type(flat).__name__)} {tuple(getattr(flat, 'shape', ()))}")

    def aggregate(self, flat, step):
        """Return the mean of ``flat`` over ranks (identical on all ranks).

        Args:
            flat: this rank's 1-D float32 gradient (same length on every rank).
            step: the training step; seeds the codec and stamps the meter's records.
        """
        raise NotImplementedError

    def sent_nbytes(self, numel, rank):
        """Exact bytes ``rank`` sends in one :meth:`aggregate` of ``numel`` coordinates.

        None when a codec's message length depends on the data (``qsgd-elias``): the
        meter still counts every message as sent.
        """
        codecs = (self.codec, getattr(self, "down_codec", self.codec))
        if not all(codec.fixed_size for codec in codecs):
            return None
        return self._sent_nbytes(numel, rank)

    def _sent_nbytes(self, numel, rank):
        raise NotImplementedError
