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

``scatter`` is the direct pattern of CGX, DeepSpeed and GRACE, without hops:

1. scatter-reduce: rank r encodes its own chunk r (and uses the decoded version) and, for
   k = 1..n-1, chunk (r+k) mod n, starting each message to that chunk's owner as soon as
   it is encoded (non-blocking sends: encoding the next piece overlaps the transfer of
   the last); it decodes the n-1 contributions to chunk r as they arrive and sums the n
   decoded contributions in rank order in fp32. Every contribution is quantized once.
2. The owner divides by n, encodes the mean once and uses the decoded version itself.
3. allgather: the owner sends that message to every other rank directly; every rank
   decodes each chunk as it arrives.

Bytes sent by rank r: ``sum_(k=1..n-1) E(c_(r+k)) + (n-1) E(c_r)``, about
``2 (n-1)/n * E(numel)`` like ``ring``; 2 (n-1) messages per rank, none of which waits
for another rank's forwarding, and two quantizations per element instead of up to n.
"""


from .base import Aggregator, chunk_bounds, empty_like, sum_of

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
        out = empty_like(flat)
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
    """Direct scatter-reduce to chunk owners (one quantization per contribution), then a direct allgather."""

    name = "scatter"
    owner_offset = 0

    def _aggregate(self, flat, call):
        t = self.transport
        n, r = t.size, t.rank
        bounds = chunk_bounds(flat.numel(), n)
        others = [(r + k) % n for k in range(1, n)]
        _, own = call.encode_decode(self.codec, _chunk(flat, bounds, r), ("scatter", r))
        sends = []
        for dest in others:  # each piece leaves as soon as it is encoded, while the next is encoded
            piece = _chunk(flat, bounds, dest)
            sends.append(t.isend(call.encode(self.codec, piece, ("scatter", dest)), dest, "scatter", 4 * piece.numel()))
        parts = {r: own}
        for source, message in t.recv_each([(r - k) % n for k in range(1, n)], "scatter"):
            parts[source] = call.decode(self.codec, message, flat.device, own.numel())  # as they arrive
        t.wait_sends(sends)
        message, decoded = call.encode_decode(self.codec, sum_of([parts[src] for src in range(n)]) / n, "owner")
        sends = [t.isend(message, dest, "allgather", 4 * own.numel()) for dest in others]
        out = empty_like(flat)
        out[bounds[r][0]:bounds[r][1]] = decoded
        for source, message in t.recv_each([(r - k) % n for k in range(1, n)], "allgather"):
            start, end = bounds[source]
            out[start:end] = call.decode(self.codec, message, flat.device, end - start)
        t.wait_sends(sends)
        return out

    def _sent_nbytes(self, numel, rank):
        n = self.transport.size
        sizes = [end - start for start, end in chunk_bounds(numel, n)]
        scatter = sum(self.codec.encoded_nbytes(sizes[(rank + k) % n]) for k in range(1, n))
        return scatter + (n - 1) * self.codec.encoded_nbytes(sizes[rank])
