"""``ps``: rank-0 parameter server.

Message pattern per step (root = 0, W = the training ranks):

1. push: every training rank other than the root encodes its gradient and sends it
   to the root. A training root encodes its own gradient too (so every contribution is
   quantized alike) and uses the decoded version without sending it.
2. The root decodes all contributions and averages them in fp32 in rank order.
3. pull: the root sends every other rank either the fp32 mean (``downlink="fp32"``)
   or the mean re-encoded with the codec (``downlink="codec"``, optionally with
   server-side error feedback); all ranks, the root included, return exactly what the
   downlink message decodes to.

With ``dedicated=True`` the root does not train: W = ranks 1..n-1, the root's input
is ignored, and the mean is over n-1 workers.

Bytes per step, E the codec's encoded size and F = E_fp32(numel) = 4 numel + framing:
each worker sends ``E(numel)`` (push); the root sends ``(n-1) * F`` (fp32 downlink)
or ``(n-1) * E(numel)`` (codec downlink). Server inbound is ``(|W| - [root trains])``
pushes, outbound ``n-1`` pulls; the meter reports them as links ``r->0`` and ``0->r``.
"""

from ..codecs.fp import FP32
from ..errors import ConfigError
from .base import Aggregator, mean_of

__all__ = ["ParameterServer"]


class ParameterServer(Aggregator):
    """Rank-0 parameter server.

    Args:
        transport, codec, seed: see :class:`~mpiqsgd.topology.base.Aggregator`.
        down_codec: the codec of the server's reply (default :class:`FP32`): ``codec``'s
            base for an encoded downlink, error feedback of it for server-side EF
            (:func:`~mpiqsgd.topology.make_aggregator` builds it from ``downlink``).
        dedicated: rank 0 only serves and does not contribute a gradient.
    """

    name = "ps"
    root = 0

    def __init__(self, transport, codec, seed=0, down_codec=None, dedicated=False):
        super().__init__(transport, codec, seed)
        if dedicated and transport.size < 2:
            raise ConfigError("ps: a dedicated server needs at least 2 ranks (one server, one worker)")
        self.down_codec = FP32() if down_codec is None else down_codec
        self.dedicated = dedicated

    @property
    def codecs(self):
        return {"codec": self.codec, "down_codec": self.down_codec}

    def _check(self, flat):
        if flat is None and self.dedicated and self.transport.rank == self.root:
            return  # a dedicated server contributes nothing
        super()._check(flat)

    @property
    def workers(self):
        return list(range(1 if self.dedicated else 0, self.transport.size))

    def _aggregate(self, flat, call):
        t = self.transport
        if t.rank != self.root:
            message = call.encode(self.codec, flat, "grad")
            t.send(message, self.root, "push", 4 * flat.numel())
            return call.decode(self.down_codec, t.recv(self.root, "pull"), flat.device, flat.numel())
        decoded = {}
        if not self.dedicated:
            _, decoded[self.root] = call.encode_decode(self.codec, flat, "grad")
        # A dedicated server has no gradient to size the pushes by: it takes the first one's
        # length and holds every other worker to it.
        device, numel = ("cpu", None) if flat is None else (flat.device, flat.numel())
        for src in self.workers:
            if src != self.root:
                decoded[src] = call.decode(self.codec, t.recv(src, "push"), device, numel)
                numel = decoded[src].numel()
        mean = mean_of([decoded[src] for src in self.workers])
        reply, result = call.encode_decode(self.down_codec, mean, "pull")
        for dest in range(t.size):
            if dest != self.root:
                t.send(reply, dest, "pull", 4 * mean.numel())
        return result

    def _sent_nbytes(self, numel, rank):
        if rank != self.root:
            return self.codec.encoded_nbytes(numel)
        return (self.transport.size - 1) * self.down_codec.encoded_nbytes(numel)
