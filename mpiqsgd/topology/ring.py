"""``ring`` and ``scatter``: bandwidth-optimal reduce-scatter + allgather over encoded chunks.

The gradient is cut into n contiguous chunks (:func:`chunk_bounds`; sizes differ by
at most one). Ranks form a ring, right = r+1, left = r-1 mod n.

1. reduce-scatter, hops k = 0..n-2: rank r encodes its running sum of chunk
   (r-k) mod n and sends it right; it receives chunk (r-k-1) mod n from the left,
   decodes it and adds its own fp32 values. Every hop after the first re-quantizes a
   partial sum, so quantization error compounds over up to n-1 hops: the price of the
   bandwidth optimum (``allgather`` avoids it for n/2 times the bytes).
2. The owner of chunk (r+1) mod n divides the full sum by n, encodes it once, and
   uses the decoded version itself (replicas stay bit-identical).
3. allgather, hops k = 0..n-2: rank r forwards the encoded chunk (r+1-k) mod n right
   and receives chunk (r-k) mod n from the left; every rank decodes every chunk.

Bytes sent by rank r: ``sum_k E(c_(r-k)) + sum_k E(c_(r+1-k))`` over k = 0..n-2, with
``E`` the codec's encoded size of a chunk: about ``2 (n-1)/n * E(numel)`` plus one
frame per message. With n = 1 nothing is sent, but the chunk is still encoded once.

``scatter`` replaces step 1 by a direct scatter-reduce (the pattern of CGX, DeepSpeed
and GRACE): in rounds k = 1..n-1 rank r encodes its own chunk (r+k) mod n for that
chunk's owner and receives its chunk r from rank (r-k) mod n (paired sends, no
deadlock); it encodes its own chunk r too and uses the decoded version, so every
contribution is quantized exactly once; the owner of chunk r sums the n decoded
contributions in rank order in fp32, then steps 2 and 3 as above with rank r owning
chunk r. Same bytes as ``ring`` (``sum_(k=1..n-1) E(c_(r+k)) + sum_k E(c_(r-k))``),
n-1 messages per phase, and two quantizations per element instead of up to n.
"""

import torch

from .base import Aggregator, chunk_bounds, sum_of

__all__ = ["Ring", "Scatter"]


class Ring(Aggregator):
    """Ring reduce-scatter + allgather of encoded chunks."""

    name = "ring"
    owner_offset = 1  # rank r ends the reduce phase owning chunk (r + owner_offset) mod n

    def _aggregate(self, flat, call):
        n = self.transport.size
        bounds = chunk_bounds(flat.numel(), n)
        owned, total = self._reduce(flat, bounds, call)
        message, decoded = call.encode_decode(self.codec, total / n, "owner")
        return self._allgather(flat, bounds, owned, message, decoded, call)

    def _reduce(self, flat, bounds, call):
        """Ring reduce-scatter; return (index of the chunk this rank owns, its fp32 sum)."""
        t = self.transport
        n, r = t.size, t.rank
        acc = _chunk(flat, bounds, r)
        for k in range(n - 1):
            message = call.encode(self.codec, acc, ("reduce_scatter", k))
            received = t.sendrecv(message, (r + 1) % n, (r - 1) % n, "reduce_scatter", 4 * acc.numel())
            own = _chunk(flat, bounds, (r - k - 1) % n)
            acc = call.decode(self.codec, received, flat.device, own.numel()).add_(own)
        return (r + 1) % n, acc

    def _allgather(self, flat, bounds, owned, message, decoded, call):
        """Pass the owners' encoded chunks around the ring; every rank decodes every chunk."""
        t = self.transport
        n, r = t.size, t.rank
        out = torch.empty_like(flat)
        out[bounds[owned][0]:bounds[owned][1]] = decoded
        for k in range(n - 1):
            sent, c = (owned - k) % n, (owned - k - 1) % n
            message = t.sendrecv(message, (r + 1) % n, (r - 1) % n, "allgather",
                                 4 * (bounds[sent][1] - bounds[sent][0]))
            out[bounds[c][0]:bounds[c][1]] = call.decode(self.codec, message, flat.device,
                                                         bounds[c][1] - bounds[c][0])
        return out

    def _reduce_nbytes(self, sizes, rank):
        n = self.transport.size
        return sum(self.codec.encoded_nbytes(sizes[(rank - k) % n]) for k in range(n - 1))

    def _sent_nbytes(self, numel, rank):
        n = self.transport.size
        sizes = [end - start for start, end in chunk_bounds(numel, n)]
        owned = (rank + self.owner_offset) % n
        gather = sum(self.codec.encoded_nbytes(sizes[(owned - k) % n]) for k in range(n - 1))
        return self._reduce_nbytes(sizes, rank) + gather


def _chunk(flat, bounds, c):
    return flat[bounds[c][0]:bounds[c][1]]


class Scatter(Ring):
    """Scatter-reduce to chunk owners (one quantization per contribution), then the ring allgather."""

    name = "scatter"
    owner_offset = 0

    def _reduce(self, flat, bounds, call):
        t = self.transport
        n, r = t.size, t.rank
        _, own = call.encode_decode(self.codec, _chunk(flat, bounds, r), ("scatter", r))
        parts = {r: own}
        for k in range(1, n):
            dest, source = (r + k) % n, (r - k) % n
            piece = _chunk(flat, bounds, dest)
            message = call.encode(self.codec, piece, ("scatter", dest))
            received = t.sendrecv(message, dest, source, "scatter", 4 * piece.numel())
            parts[source] = call.decode(self.codec, received, flat.device, own.numel())
        return r, sum_of([parts[src] for src in range(n)])

    def _reduce_nbytes(self, sizes, rank):
        n = self.transport.size
        return sum(self.codec.encoded_nbytes(sizes[(rank + k) % n]) for k in range(1, n))
