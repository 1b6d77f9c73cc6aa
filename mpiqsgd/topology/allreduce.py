"""``allreduce``: MPI Allreduce of the fp32 gradient, no codec. Baseline and reference answer.

Message pattern: one ``MPI.Allreduce(SUM)`` of ``4 numel`` bytes, then divide by n.
Bytes per rank (nominal, as recorded by the transport, since MPI chooses its own
algorithm): :func:`~mpiqsgd.transport.allreduce_nbytes`, ``floor(2 (n-1) / n * 4 numel)``;
0 for n = 1.
"""

from ..codecs.fp import FP32
from ..errors import ConfigError
from ..transport import allreduce_nbytes
from .base import Aggregator

__all__ = ["Allreduce"]


class Allreduce(Aggregator):
    """fp32 allreduce; accepts only the ``fp32`` codec (or none)."""

    name = "allreduce"

    def __init__(self, transport, codec=None, seed=0):
        if codec is not None and (codec.name != "fp32" or codec.base is not codec):
            raise ConfigError("topology 'allreduce' sends plain fp32; use make_codec('fp32') (--codec fp32) "
                              "(or ps, ring, scatter, allgather, intsum for other codecs)")
        super().__init__(transport, codec or FP32(), seed)

    def _aggregate(self, flat, call):
        return self.transport.allreduce_sum(flat).div_(self.transport.size)

    def _sent_nbytes(self, numel, rank):
        return allreduce_nbytes(numel, self.transport.size)
