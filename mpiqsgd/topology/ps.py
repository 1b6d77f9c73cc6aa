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

from ..codecs import ErrorFeedback
from ..codecs.fp import FP32
from ..errors import ConfigError
from .base import Aggregator, mean_of

__all__ = ["ParameterServer"]

DOWNLINKS = ("fp32", "codec")


class ParameterServer(Aggregator):
    """Rank-0 parameter server.

    Args:
        transport, codec, seed: see :class:`~mpiqsgd.topology.base.Aggregator`.
        downlink: ``"fp32"`` (default) or ``"codec"``: what the server sends back.
        server_error_feedback: with ``downlink="codec"``, keep a server-side residual.
        dedicated: rank 0 only serves and does not contribute a gradient.
    """

    name = "ps"
    root = 0

    def __init__(self, transport, codec, seed=0, downlink="fp32", server_error_feedback=False, dedicated=False):
        super().__init__(transport, codec, seed)
        if downlink not in DOWNLINKS:
            raise ConfigError(f"ps: downlink must be one of {', '.join(DOWNLINKS)}; got {downlink!r}")
        if server_error_feedback and downlink != "codec":
            raise ConfigError("ps: server-side error feedback needs --downlink codec")
        if dedicated and transport.size < 2:
            raise ConfigError("ps: a dedicated server needs at least 2 ranks (one server, one worker)")
        self.downlink = downlink
        self.dedicated = dedicated
        base = getattr(codec, "inner", codec)
        if downlink == "fp32":
            self.down_codec = FP32()
        else:
            self.down_codec = ErrorFeedback(base) if server_error_feedback else base

    @property
    def workers(self):
        return list(range(1 if self.dedicated else 0, self.transport.size))

    def aggregate(self, flat, step):
        t, meter = self.transport, self.meter
        meter.step = step
        if t.rank != self.root:
            self._check(flat)
            with meter.time("encode"):
                message = self.codec.encode(flat, self._rng(step), key="grad")
            with meter.time("communicate"):
                t.send(message, self.root, "push", 4 * flat.numel())
                reply = t.recv(self.root, "pull")
            with meter.time("decode"):
                return self.down_codec.decode(reply, flat.device if flat is not None else "cpu")
        return self._serve(flat, step)

    def _serve(self, flat, step):
        t, meter = self.transport, self.meter
        rng = self._rng(step)
        decoded = {}
        if not self.dedicated:
            self._check(flat)
            with meter.time("encode"):
                _, decoded[self.root] = self.codec.encode_decode(flat, rng, key="grad")
        device = flat.device if flat is not None else "cpu"
        for src in self.workers:
            if src == self.root:
                continue
            with meter.time("communicate"):
                message = t.recv(src, "push")
            with meter.time("decode"):
                decoded[src] = self.codec.decode(message, device)
        mean = mean_of([decoded[src] for src in self.workers])
        with meter.time("encode"):
            reply, result = self.down_codec.encode_decode(mean, rng, key="pull")
        with meter.time("communicate"):
            for dest in range(t.size):
                if dest != self.root:
                    t.send(reply, dest, "pull", 4 * mean.numel())
        return result

    def _sent_nbytes(self, numel, rank):
        if rank != self.root:
            return self.codec.encoded_nbytes(numel)
        return (self.transport.size - 1) * self.down_codec.encoded_nbytes(numel)
