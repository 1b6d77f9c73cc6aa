"""``ring``: bandwidth-optimal ring reduce-scatter + allgather over encoded chunks.

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
"""

import torch

from .base import Aggregator, chunk_bounds

__all__ = ["Ring"]


class Ring(Aggregator):
    """Ring reduce-scatter + allgather of encoded chunks."""

    name = "ring"

    def aggregate(self, flat, step):
        self._check(flat)
        t, meter = self.transport, self.meter
        meter.step = step
        n, r = t.size, t.rank
        right, left = (r + 1) % n, (r - 1) % n
        bounds = chunk_bounds(flat.numel(), n)
        rng = self._rng(step)

        def chunk(c):
            return flat[bounds[c][0]:bounds[c][1]]

        acc = chunk(r)
        for k in range(n - 1):
            with meter.time("encode"):
                message = self.codec.encode(acc, rng, key=("reduce_scatter", k))
            with meter.time("communicate"):
                received = t.sendrecv(message, right, left, "reduce_scatter", 4 * acc.numel())
            with meter.time("decode"):
                acc = self.codec.decode(received, flat.device).add_(chunk((r - k - 1) % n))

        out = torch.empty_like(flat)
        owned = (r + 1) % n
        with meter.time("encode"):
            message, decoded = self.codec.encode_decode(acc / n, rng, key="owner")
        out[bounds[owned][0]:bounds[owned][1]] = decoded
        for k in range(n - 1):
            sent, c = (r + 1 - k) % n, (r - k) % n
            with meter.time("communicate"):
                message = t.sendrecv(message, right, left, "allgather", 4 * chunk(sent).numel())
            with meter.time("decode"):
                out[bounds[c][0]:bounds[c][1]] = self.codec.decode(message, flat.device)
        return out

    def sent_nbytes(self, numel, rank):
        n = self.transport.size
        sizes = [end - start for start, end in chunk_bounds(numel, n)]
        enc = self.codec.encoded_nbytes
        return sum(enc(sizes[(rank - k) % n]) + enc(sizes[(rank + 1 - k) % n]) for k in range(n - 1))
