"""``hierarchical``: fp32 inside each node, any topology among one leader per node.

Ranks are grouped by node (:attr:`~mpiqsgd.transport.Transport.nodes`: host names under MPI,
``ranks_per_node`` in a simulation); each node's lowest rank is its leader. Message pattern per
call (W ranks on L nodes, node k holding K_k ranks, F = ``FP32().encoded_nbytes(numel)`` = 4 numel
plus one frame):

1. ``node-reduce``: every non-leader sends its gradient to its leader as one fp32 message; the
   leader sums its node's gradients in rank order (:func:`~mpiqsgd.topology.base.sum_of`, its own
   included) and divides by W / L (= K when the nodes are equal), so that the mean over leaders
   is the mean over all W ranks.
2. The leaders run the inner topology (any of :data:`~mpiqsgd.topology.TOPOLOGIES`, ``intsum``
   included) with the codec on their own sub-transport (:meth:`~mpiqsgd.transport.Transport.split`):
   leader of node k is its rank k. Codec randomness and error-feedback residuals are the leaders'
   (a non-leader's codec never encodes).
3. ``node-bcast``: each leader sends the inner topology's result, as one fp32 message, to every
   other rank of its node, so all W replicas hold the same bits.

Bytes per call: a non-leader sends F (``node-reduce``); the leader of node k sends (K_k - 1) F
(``node-bcast``) plus what rank k sends in the inner topology on L ranks. By link class
(:func:`mpiqsgd.meter.link_class`): intra-node ``2 (W - L) F`` in all, inter-node exactly the
inner topology's bytes on L ranks, that is the flat topology's with one rank per node.

Error: quantization happens only between nodes, on node means; inside a node the sum is exact
fp32. With the fp32 codec and gradients whose sums are exact in any order (small integers,
dyadic values) the result equals the flat topology's bit for bit.
"""

from ..codecs.fp import FP32
from ..errors import ConfigError
from ..transport import RankLayout
from .base import Aggregator, sum_of

__all__ = ["Hierarchical", "Nodes", "LeaderShape", "HIERARCHICAL_MODES", "wants_hierarchical"]

HIERARCHICAL_MODES = ("auto", "on", "off")


def wants_hierarchical(transport, mode="auto", dedicated=False):
    """Whether an exchange over ``transport`` should be hierarchical.

    Args:
        mode: ``on``, ``off`` or ``auto``: hierarchical when the ranks span more than one node
            and some node holds more than one rank (one node, however many ranks, stays flat).
        dedicated: a dedicated parameter server (``ps``), which ``auto`` leaves flat and ``on`` refuses.
    """
    if mode not in HIERARCHICAL_MODES:
        raise ConfigError(f"hierarchical must be one of {', '.join(HIERARCHICAL_MODES)}; got {mode!r}")
    if mode == "on" and dedicated:
        raise ConfigError("hierarchical='on': a dedicated ps server cannot be a node leader's inner topology; "
                          "use --hierarchical off (or no --dedicated-server)")
    if mode == "auto":
        return not dedicated and 1 < transport.n_nodes < transport.size
    return mode == "on"


class LeaderShape(RankLayout):
    """The leaders' transport as a non-leader sees it: its size, for byte formulas only (it moves no bytes)."""

    def __init__(self, size):
        self.size = size


class Nodes:
    """The node layout of ``transport`` and the leaders' sub-transport (collective: every rank builds it).

    Attributes:
        members: the ranks of each node, in rank order (node k's leader is ``members[k][0]``).
        node: this rank's node; ``is_leader``: whether this rank leads it.
        leaders: the leaders' sub-transport (None on a non-leader).
        shape: a transport of the leaders' size on which every rank can build the inner topology
            (its byte formula); the leaders' own on a leader.
    """

    def __init__(self, transport):
        nodes = list(transport.nodes)
        if len(nodes) != transport.size or sorted(set(nodes)) != list(range(len(set(nodes)))):
            raise ConfigError(f"transport.nodes must give each of the {transport.size} ranks a node 0, 1, ...; "
                              f"got {nodes}")
        self.transport = transport
        self.members = [[r for r in range(transport.size) if nodes[r] == k] for k in range(len(set(nodes)))]
        self.node = nodes[transport.rank]
        self.is_leader = transport.rank == self.members[self.node][0]
        self.leaders = transport.split(0 if self.is_leader else None)
        self.shape = self.leaders if self.is_leader else LeaderShape(len(self.members))

    @property
    def n_nodes(self):
        return len(self.members)

    def describe(self, topology):
        """One line for the console: the layout and what runs where."""
        counts = sorted({len(m) for m in self.members})
        per_node = f"x {counts[0]}" if len(counts) == 1 else f"of {counts[0]}-{counts[-1]}"
        return (f"hierarchical exchange: {self.n_nodes} nodes {per_node} ranks ({self.transport.size} in all); "
                f"fp32 inside each node, {topology} among the {self.n_nodes} node leaders (--hierarchical off: flat)")


class Hierarchical(Aggregator):
    """fp32 reduction inside each node, ``inner`` among the node leaders, fp32 broadcast back.

    Args:
        nodes: the :class:`Nodes` of the transport.
        inner: the leaders' aggregator, built on ``nodes.shape`` (on a non-leader it only
            gives byte formulas and codec state).
        seed: base seed (the fp32 messages draw no randomness).
    """

    name = "hierarchical"

    def __init__(self, nodes, inner, seed=0):
        super().__init__(nodes.transport, inner.codec, seed)
        self.nodes, self.inner = nodes, inner
        self.fp32 = FP32()
        self.scale = nodes.transport.size / nodes.n_nodes  # node sum / scale: the mean over leaders is the mean

    @property
    def codecs(self):
        return self.inner.codecs

    def _aggregate(self, flat, call):
        t, nodes = self.transport, self.nodes
        members = nodes.members[nodes.node]
        leader, numel = members[0], flat.numel()
        if not nodes.is_leader:
            t.send(call.encode(self.fp32, flat, "node"), leader, "node-reduce", 4 * numel)
            return call.decode(self.fp32, t.recv(leader, "node-bcast"), flat.device, numel)
        parts = {leader: flat}
        for source, message in t.recv_each(members[1:], "node-reduce"):
            parts[source] = call.decode(self.fp32, message, flat.device, numel)
        node_mean = sum_of([parts[r] for r in members]).div_(self.scale)
        mean = self.inner.aggregate(node_mean, call.step, call.stream)
        if len(members) > 1:
            message = call.encode(self.fp32, mean, "mean")
            t.wait_sends([t.isend(message, dest, "node-bcast", 4 * numel) for dest in members[1:]])
        return mean

    def sent_nbytes_by_class(self, numel, rank):
        """``{"intra": ..., "inter": ...}``: the bytes ``rank`` sends per call on each link class
        (None for a variable-length codec)."""
        nodes = self.nodes
        k = self.transport.nodes[rank]
        members = nodes.members[k]
        fp32 = self.fp32.encoded_nbytes(numel)
        if rank != members[0]:
            return {"intra": fp32, "inter": 0}
        inter = self.inner.sent_nbytes(numel, k)
        return None if inter is None else {"intra": (len(members) - 1) * fp32, "inter": inter}

    def _sent_nbytes(self, numel, rank):
        by_class = self.sent_nbytes_by_class(numel, rank)
        return None if by_class is None else by_class["intra"] + by_class["inter"]
