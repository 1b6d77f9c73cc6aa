"""Topologies: how ranks combine their gradients into one mean.

=========  ===============================================  ==========================
name       pattern                                          bytes sent per rank
=========  ===============================================  ==========================
allreduce  MPI Allreduce of fp32 (baseline)                 ~2 (n-1)/n * 4 numel
ps         push to rank 0, mean, pull (fp32 or encoded)     worker E; root (n-1) F or E
ring       reduce-scatter + allgather of encoded chunks     ~2 (n-1)/n * E
scatter    direct scatter-reduce to owners + allgather      ~2 (n-1)/n * E
allgather  ring allgather of encoded gradients, decode all  (n-1) * E
=========  ===============================================  ==========================

E is the codec's encoded size of the whole gradient, F that of fp32. Each module's
docstring gives the exact formula; ``Aggregator.sent_nbytes`` computes it (None for a
variable-length codec such as ``qsgd-elias``, whose messages the meter still counts).
"""

from ..errors import ConfigError
from .allgather import Allgather
from .allreduce import Allreduce
from .base import Aggregator, chunk_bounds, mean_of, sum_of
from .ps import ParameterServer
from .ring import Ring, Scatter

__all__ = ["Aggregator", "TOPOLOGIES", "make_aggregator", "chunk_bounds", "mean_of", "sum_of"]

TOPOLOGIES = {cls.name: cls for cls in (Allreduce, ParameterServer, Ring, Scatter, Allgather)}


def make_aggregator(name, transport, codec, seed=0, **options):
    """Build a topology by name.

    Args:
        name: one of :data:`TOPOLOGIES`.
        transport: a :class:`~mpiqsgd.transport.Transport`.
        codec: the codec (ignored by nothing: ``allreduce`` insists on fp32).
        seed: base seed of codec randomness.
        **options: topology options (``ps``: ``downlink``, ``server_error_feedback``,
            ``dedicated``); ``None`` values are dropped.
    """
    if name not in TOPOLOGIES:
        raise ConfigError(f"unknown topology {name!r}; choose one of: {', '.join(TOPOLOGIES)}")
    options = {k: v for k, v in options.items() if v is not None}
    if options and name != "ps":
        raise ConfigError(f"topology {name!r} takes no options ({', '.join(sorted(options))} are for ps)")
    return TOPOLOGIES[name](transport, codec, seed=seed, **options)
