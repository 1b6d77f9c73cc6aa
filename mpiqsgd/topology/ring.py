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

``scatter`` is the direct pattern of CGX, DeepSpeed and GRACE, without hops, pipelined in pieces:
each chunk is cut into pieces of about ``piece_numel`` coordinates (:data:`PIECE_NUMEL`; whole codec
buckets, so every bucket's scale is the whole chunk's; a chunk of at most ``piece_numel`` is one piece),
and every piece is a message of its own.

1. scatter-reduce: rank r encodes the pieces of chunks r+1 .. r+n-1 (mod n), piece by piece across
   peers (piece 0 for every peer, then piece 1, ...), starting each message to the chunk's owner as
   soon as it is encoded, so that piece k+1 is encoded while piece k is on the wire. It then receives
   the n-1 contributions to chunk r piece by piece as they arrive (MPI keeps each source's order),
   decodes each, and encodes its own piece k of chunk r (and keeps the decoded version) when the
   first contribution to piece k arrives. Every contribution is quantized once.
2. As soon as piece k has all n contributions, the owner sums them in rank order in fp32, divides
   by n, encodes that piece of the mean once (using the decoded version itself) and sends it to every
   other rank: the allgather starts while later pieces of the scatter-reduce are still arriving.
3. allgather: every rank decodes each piece of each chunk as it arrives.

Bits: the same as one message a chunk. The codecs' uniforms are counter based (coordinate i of a
message draws u_i from the message's seed), so each chunk's seed is drawn from the call's generator in
the order of one message a chunk (own chunk, chunks r+1 .. r+n-1, the mean; stochastic codecs only),
and the piece at offset o of its chunk encodes with :class:`~mpiqsgd.codecs.kernels.SeedAt` (seed, o):
the uniforms of coordinates o, o+1, ... Sums are elementwise in rank order. So any ``piece_numel`` (0:
one message a chunk) gives the same bits on every rank. Error feedback keeps one residual per piece,
keyed ``("scatter", c, o)`` and ``("owner", o)`` (the keys of one message a chunk, ``("scatter", c)``
and ``"owner"``, where a chunk is one piece): each key covers the same coordinates every step.

Bytes sent by rank r: ``sum_(k=1..n-1) P(c_(r+k)) + (n-1) P(c_r)``, with ``P(c) = sum over the
pieces of c of E(piece)``: about ``2 (n-1)/n * E(numel)`` like ``ring``, plus one frame (prefix
and header, a few dozen bytes) per piece; ``p_(r+1) + ... + p_(r+n-1) + (n-1) p_r`` messages where
chunk c has p_c pieces (2 (n-1) with one piece a chunk). None waits for another rank's forwarding, and every
element is quantized twice instead of up to n times.
"""


from ..codecs.kernels import SeedAt, draw_seed
from ..errors import ConfigError
from .base import Aggregator, chunk_bounds, empty_like, sum_of

__all__ = ["Ring", "Scatter", "PIECE_NUMEL", "piece_major"]

# scatter: about how many coordinates a message holds (whole buckets). By measurement (scripts/piece_sizes.py,
# 12.5M coordinates of 4-bit QSGD, one thread): pieces of 256K-4M encode and decode a chunk within the noise
# of one message, 128K pieces cost 40% more; the pipeline's fill and drain (a piece's encode and decode,
# 4 ms at 1M, 9 ms at 2M) and its wire time (0.53 MB, 4 ms at 1 Gbit/s) halve with the piece.
PIECE_NUMEL = 1 << 20


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
    """Direct scatter-reduce to chunk owners (one quantization per contribution), then a direct allgather;
    each chunk travels as pieces that are encoded, sent, decoded and summed one after another.

    Args:
        piece_numel: about how many coordinates one message holds (whole codec buckets); a chunk of
            at most this many is one message; 0: one message a chunk. The same on every rank.
    """

    name = "scatter"
    owner_offset = 0

    def __init__(self, transport, codec, seed=0, piece_numel=PIECE_NUMEL):
        if isinstance(piece_numel, bool) or not isinstance(piece_numel, int) or piece_numel < 0:
            raise ConfigError(f"scatter: piece_numel must be an integer >= 0 (0: one message a chunk); "
                              f"got {piece_numel!r}")
        super().__init__(transport, codec, seed)
        self.piece_numel = piece_numel
        bucket = codec.base.bucket or 1
        self.align = bucket if bucket % 2 == 0 else 2 * bucket  # whole buckets, even: uniforms come in pairs

    def pieces(self, numel):
        """(start, end) of the pieces of a chunk of ``numel`` coordinates, relative to the chunk."""
        if self.piece_numel == 0 or numel <= self.piece_numel:
            return [(0, numel)]
        count = max(1, round(numel / self.piece_numel))
        per = -(-numel // count)
        step = -(-per // self.align) * self.align
        return [(start, min(numel, start + step)) for start in range(0, numel, step)]

    def _encode(self, call, x, key, layout, start, seed, want_decoded=False):
        """Encode the piece of a chunk (cut as ``layout``) at ``start``: a residual key of its own when
        the chunk has several pieces, and the uniforms the whole chunk's message would give it."""
        if len(layout) > 1:
            key = (*key, start) if isinstance(key, tuple) else (key, start)
        return call.encode_decode(self.codec, x, key, want_decoded, None if seed is None else SeedAt(seed, start))

    def _aggregate(self, flat, call):
        t, codec = self.transport, self.codec
        n, r = t.size, t.rank
        bounds = chunk_bounds(flat.numel(), n)
        pieces = [self.pieces(end - start) for start, end in bounds]
        others, sources = [(r + k) % n for k in range(1, n)], [(r - k) % n for k in range(1, n)]
        # One seed per chunk's message, drawn in the order of one message a chunk (own chunk, chunks
        # r+1 .. r+n-1, the mean): with SeedAt every piece rounds its coordinates as that message did.
        seeds = [draw_seed(call.rng) for _ in range(n + 1)] if codec.stochastic else [None] * (n + 1)
        sends, counts = [], dict.fromkeys(range(n), 0)
        for dest in piece_major(pieces, others):  # every peer's first piece early; the wire never waits
            start, end = pieces[dest][counts[dest]]
            counts[dest] += 1
            x = _chunk(flat, bounds, dest)[start:end]
            message = self._encode(call, x, ("scatter", dest), pieces[dest], start, seeds[(dest - r) % n])[0]
            sends.append(t.isend(message, dest, "scatter", 4 * (end - start)))

        mine, own, at = pieces[r], _chunk(flat, bounds, r), bounds[r][0]
        parts = [{} for _ in mine]  # piece -> source -> decoded contribution, until the piece's sum is done
        out = empty_like(flat)
        counts, encoded = dict.fromkeys(range(n), 0), 0

        def arrived(k):
            """Encode own pieces up to k (lazily: receives in between keep MPI moving); once piece k's n
            contributions are in, sum them in rank order and send that piece of the mean to every peer."""
            nonlocal encoded
            while encoded <= k:
                start, end = mine[encoded]
                parts[encoded][r] = self._encode(call, own[start:end], ("scatter", r), mine, start, seeds[0], True)[1]
                encoded += 1
            if len(parts[k]) < n:
                return
            start, end = mine[k]
            total = sum_of([parts[k][src] for src in range(n)]) / n
            parts[k] = None
            message, out[at + start:at + end] = self._encode(call, total, "owner", mine, start, seeds[n], True)
            sends.extend(t.isend(message, dest, "allgather", 4 * (end - start)) for dest in others)

        for source, message in t.recv_each(piece_major([mine] * n, sources), "scatter"):
            k = counts[source]  # MPI keeps the order of one source's messages of one tag
            counts[source] += 1
            parts[k][source] = call.decode(codec, message, flat.device, mine[k][1] - mine[k][0])  # as they arrive
            arrived(k)
        for k in range(encoded, len(mine)):  # one rank: nothing arrives
            arrived(k)

        counts = dict.fromkeys(range(n), 0)
        for source, message in t.recv_each(piece_major(pieces, sources), "allgather"):
            start, end = pieces[source][counts[source]]
            counts[source] += 1
            base = bounds[source][0]
            out[base + start:base + end] = call.decode(codec, message, flat.device, end - start)
        t.wait_sends(sends)
        return out

    def _sent_nbytes(self, numel, rank):
        n = self.transport.size
        sizes = [end - start for start, end in chunk_bounds(numel, n)]

        def chunk_nbytes(c):
            return sum(self.codec.encoded_nbytes(end - start) for start, end in self.pieces(sizes[c]))

        return sum(chunk_nbytes((rank + k) % n) for k in range(1, n)) + (n - 1) * chunk_nbytes(rank)


def piece_major(pieces, ranks):
    """``ranks`` repeated once for each piece of their chunk, piece by piece: [c for piece 0, c for piece 1, ...]."""
    most = max((len(pieces[c]) for c in ranks), default=0)
    return [c for k in range(most) for c in ranks if k < len(pieces[c])]
