"""Topologies: how ranks combine their gradients into one mean.

=========  ===============================================  ==========================
name       pattern                                          bytes sent per rank
=========  ===============================================  ==========================
allreduce  MPI Allreduce of fp32 (baseline)                 ~2 (n-1)/n * 4 numel
ps         push to rank 0, mean, pull (fp32 or encoded)     worker E; root (n-1) F or E
ring       reduce-scatter + allgather of encoded chunks     ~2 (n-1)/n * E
scatter    direct scatter-reduce + direct allgather         ~2 (n-1)/n * E
allgather  ring allgather of encoded gradients, decode all  (n-1) * E
intsum     MPI Allreduce of QSGD levels on shared scales,   ~2 (n-1)/n * I
           summed as packed integers (no rank decodes)
=========  ===============================================  ==========================

Hierarchical exchange (:mod:`~mpiqsgd.topology.hierarchical`, ``nodes=`` of :func:`make_aggregator`):
any of these among one leader per node, fp32 inside the node (``node-reduce``, ``node-bcast``):
a non-leader sends F, a leader (K - 1) F plus the topology's bytes on n_nodes ranks.

E is the codec's encoded size of the whole gradient, F that of fp32, I that of the summable
code (:mod:`mpiqsgd.codecs.summable`: fields wide enough for the sum over n ranks). Each module's
docstring gives the exact formula; ``Aggregator.sent_nbytes`` computes it (None for a
variable-length codec such as ``qsgd-elias``, whose messages the meter still counts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from ..codecs import ErrorFeedback, summable
from ..codecs.fp import FP32
from ..errors import ConfigError
from .allgather import Allgather
from .allreduce import Allreduce
from .base import Aggregator, chunk_bounds, mean_of, sum_of
from .hierarchical import HIERARCHICAL_MODES, Hierarchical, Nodes, wants_hierarchical
from .intsum import IntSum
from .ps import ParameterServer
from .ring import Ring, Scatter

if TYPE_CHECKING:
    from ..codecs.base import Codec
    from ..transport import Transport

__all__ = ["Aggregator", "TOPOLOGIES", "CHOICES", "DOWNLINKS", "make_aggregator", "make_fp32_aggregator",
           "resolve_topology", "chunk_bounds", "mean_of", "sum_of", "Hierarchical", "Nodes", "HIERARCHICAL_MODES",
           "wants_hierarchical"]

TOPOLOGIES = {cls.name: cls for cls in (Allreduce, ParameterServer, Ring, Scatter, Allgather, IntSum)}
CHOICES = ("auto", *TOPOLOGIES)  # what --topology takes
DOWNLINKS = ("fp32", "codec")


def _downlink_codec(codec: Codec, downlink: str = "fp32", server_error_feedback: bool = False) -> Codec | None:
    """The ps server's reply codec: None (fp32), the codec's base, or error feedback of it."""
    if downlink not in DOWNLINKS:
        raise ConfigError(f"ps: downlink must be one of {', '.join(DOWNLINKS)}; got {downlink!r}")
    if server_error_feedback and downlink != "codec":
        raise ConfigError("ps: server_error_feedback=True needs downlink='codec' (--server-error-feedback needs "
                          "--downlink codec)")
    if downlink == "fp32":
        return None
    return ErrorFeedback(codec.base) if server_error_feedback else codec.base


def resolve_topology(name: str, codec: Codec) -> str:
    """The topology ``"auto"`` stands for with ``codec`` (other names are returned as they are).

    By measurement on the emulated switched cluster (docs/benchmarks.md): ``intsum`` for QSGD
    (qsgd, qsgd-inf, dense; error feedback or not), whose levels add without decoding;
    ``allreduce`` for plain fp32; ``scatter`` for every other codec.
    """
    if name != "auto":
        return name
    if codec.name == "fp32" and codec.base is codec:
        return "allreduce"
    try:
        summable.check_codec(codec, "auto")
        return "intsum"
    except ConfigError:
        return "scatter"


def make_aggregator(name: str, transport: Transport, codec: Codec | None, seed: int = 0, nodes: Nodes | None = None,
                    **options: Any) -> Aggregator:
    """Build a topology by name.

    Args:
        name: one of :data:`TOPOLOGIES`, or ``"auto"`` (:func:`resolve_topology`).
        transport: a :class:`~mpiqsgd.transport.Transport`.
        codec: the codec (ignored by nothing: ``allreduce`` insists on fp32).
        seed: base seed of codec randomness.
        nodes: a :class:`Nodes` of ``transport``: the topology runs among the node leaders inside a
            :class:`Hierarchical` exchange (None: flat, every rank alike).
        **options: topology options (``ps``: ``downlink``, ``server_error_feedback``,
            ``dedicated``; ``intsum`` and ``scatter``: ``piece_numel``); ``None`` values are dropped.
    """
    name = resolve_topology(name, codec) if name == "auto" and codec is not None else name
    if nodes is not None:
        if nodes.transport is not transport:
            raise ConfigError("make_aggregator: nodes must be the Nodes of this transport")
        wants_hierarchical(transport, "on", dedicated=bool(options.get("dedicated")))  # refuses a dedicated server
        # On a non-leader nodes.shape is a LeaderShape standing in for the leaders' transport: the inner
        # aggregator reads only its size for byte formulas and codec state, and moves no bytes through it.
        shape = cast("Transport", nodes.shape)
        return Hierarchical(nodes, make_aggregator(name, shape, codec, seed=seed, **options), seed=seed)
    if name not in TOPOLOGIES:
        raise ConfigError(f"unknown topology {name!r}; choose one of: {', '.join(CHOICES)}")
    options = {k: v for k, v in options.items() if v is not None}
    # Only allreduce (fp32, which it builds itself) takes codec=None; the constructors are typed for the
    # others, which need a codec (None is not refused here: as before, such an aggregator fails when it first
    # reads the codec).
    coded = cast("Codec", codec)
    if name in ("intsum", "scatter"):
        unknown = sorted(set(options) - {"piece_numel"})
        if unknown:
            raise ConfigError(f"topology {name!r} takes no option {', '.join(unknown)} (only piece_numel)")
        return TOPOLOGIES[name](transport, coded, seed=seed, **options)
    if options and name != "ps":
        raise ConfigError(f"topology {name!r} takes no options (got {', '.join(sorted(options))}; ps takes downlink, "
                          "server_error_feedback and dedicated, scatter and intsum piece_numel)")
    if name == "ps":
        unknown = sorted(set(options) - {"downlink", "server_error_feedback", "dedicated"})
        if unknown:
            raise ConfigError(f"topology 'ps' takes no option {', '.join(unknown)}")
        down = _downlink_codec(coded, options.pop("downlink", "fp32"), options.pop("server_error_feedback", False))
        return ParameterServer(transport, coded, seed=seed, down_codec=down, **options)
    return TOPOLOGIES[name](transport, coded, seed=seed, **options)


def make_fp32_aggregator(name: str, transport: Transport, seed: int = 0, nodes: Nodes | None = None,
                         **options: Any) -> Aggregator:
    """The aggregator of the fp32 buffers that travel beside a codec's (small tensors such as biases):
    the same topology with the fp32 codec, or MPI's fp32 allreduce beside ``intsum`` (whose integer
    sum takes QSGD codecs only)."""
    if name == "intsum":
        return make_aggregator("allreduce", transport, FP32(), seed=seed, nodes=nodes)
    return make_aggregator(name, transport, FP32(), seed=seed, nodes=nodes, **options)
