"""``allgather``: every rank's encoded gradient travels the ring; each rank decodes all n.

Message pattern (n ranks, right = r+1, left = r-1 mod n): each rank encodes its
gradient once; in hop k = 0..n-2 rank r sends the message of rank (r-k) mod n to the
right and receives that of rank (r-k-1) mod n from the left. Every rank then decodes
all n messages and averages them in rank order: the exact mean of the quantized
gradients, with no re-quantization (the QSGD paper's pattern).

Bytes sent per rank: ``(n-1) * E(numel)`` with ``E`` the codec's encoded size;
received the same. Decode work grows with n.
"""

from .base import Aggregator, mean_of

__all__ = ["Allgather"]


class Allgather(Aggregator):
    """Allgather of encoded gradients, decode-all, mean in fp32."""

    name = "allgather"

    def _aggregate(self, flat, call):
        t = self.transport
        n, r = t.size, t.rank
        own, own_decoded = call.encode_decode(self.codec, flat, "grad")
        messages = {r: own}
        for k in range(n - 1):
            messages[(r - k - 1) % n] = t.sendrecv(
                messages[(r - k) % n], (r + 1) % n, (r - 1) % n, "allgather", 4 * flat.numel())
        decoded = [own_decoded if src == r else call.decode(self.codec, messages[src], flat.device, flat.numel())
                   for src in range(n)]
        return mean_of(decoded)

    def _sent_nbytes(self, numel, rank):
        return (self.transport.size - 1) * self.codec.encoded_nbytes(numel)
