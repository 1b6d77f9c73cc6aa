"""``intsum``: decode-free aggregation over MPI's own allreduce (QSGD levels on shared scales,
summed as integers; THC's and Global-QSGD's idea, over MPI).

Message pattern (n ranks, one call of ``numel`` coordinates):

1. Scales: every rank computes its float32 bucket norms; one ``MPI_Allreduce(MAX)`` of the
   ``ceil(numel / bucket)`` norms (phase ``scales``) gives every rank the same norm ``N_b`` of each
   bucket, at least every rank's own.
2. Every rank quantizes its gradient once to QSGD levels of those norms (stochastic and unbiased,
   or nearest) and packs ``level + s`` into fields with headroom for the sum over n ranks
   (:mod:`mpiqsgd.codecs.summable`: ``w = ceil(log2(2 s n + 1))`` bits, ``K = floor(64 / w)``
   fields a uint64 word).
3. The words are summed by ``MPI_Allreduce(SUM)`` on uint64 (phase ``intsum``), in pieces of
   about ``piece_numel`` coordinates: piece k goes on the wire as soon as it is encoded, while
   piece k+1 is encoded (:class:`~mpiqsgd.transport.AllreducePipeline`). MPI's own algorithm does
   every hop; no rank decodes or re-quantizes anything in between.
4. Every rank unpacks each summed piece as it completes, checks each field against ``2 s n``, and
   scales it: ``mean_i = (S_i - s n) * (N_b / s / n)``, the same bits on every rank.

Bytes per rank, nominal as for the fp32 allreduce (MPI chooses its algorithm; a
bandwidth-optimal one sends ``2 (n-1) / n`` of the buffer): ``floor(2 (n-1)/n * 4 ceil(numel /
bucket))`` for the scales plus ``floor(2 (n-1)/n * 8 W_k)`` for each piece of ``W_k`` words (``W =
ceil(numel / K)`` words in all, ``8 / K`` bytes a coordinate): with 4-bit QSGD (s = 7) a buffer of
0.67 bytes a coordinate at 2 ranks (5-bit fields, K = 12), 0.8 at 4 (6-bit, K = 10), 0.89 at 8
(7-bit, K = 9), against 4 for fp32. Nothing is sent with one rank.

Error: every contribution is quantized once (like ``allgather``, not ``scatter``'s twice or
``ring``'s up to n times), with the shared norm, which is at least the rank's own: QSGD's
variance bound holds with ``N_b`` in place of a rank's own norm.

Trust: a sum of codes cannot be checked code by code. Every field of the result is checked
against ``2 s n`` and every word's unused top bits against 0, and a violation stops every rank
(they all hold the same sums) with :class:`~mpiqsgd.errors.DecodeError` naming the bucket; a
rank that sends fields above ``2 s`` without overflowing the sum goes unnoticed.

Error feedback: the residual is the compensated gradient minus this rank's own quantized
contribution (levels times ``N_b / s``), kept by the codec's
:class:`~mpiqsgd.codecs.feedback.ErrorFeedback` under the key ``grad`` (its bucket's stream).
"""

import numpy as np
import torch

from ..codecs import summable
from ..codecs.kernels import draw_seed
from ..codecs.buckets import checked_norms
from ..codecs.qsgd import max_norm
from ..errors import ConfigError, DecodeError
from ..transport import allreduce_nbytes
from .base import Aggregator, empty_like

__all__ = ["IntSum", "PIECE_NUMEL"]

PIECE_NUMEL = 1 << 21  # coordinates a piece of the pipeline holds (rounded to whole kernel chunks)


class IntSum(Aggregator):
    """Decode-free allreduce of QSGD levels on shared scales (codec: ``qsgd`` or ``qsgd-inf``,
    dense encoding, error feedback optional).

    Args:
        piece_numel: coordinates per pipelined allreduce (whole kernel chunks; 0: one piece).
    """

    name = "intsum"

    def __init__(self, transport, codec, seed=0, piece_numel=PIECE_NUMEL):
        try:
            base = summable.check_codec(codec, "topology 'intsum'")
        except ConfigError as exc:
            raise ConfigError(f"{exc}. Use scatter, ring or allgather for other codecs") from None
        super().__init__(transport, codec, seed)
        self.layout = summable.SummableLayout(base.levels, transport.size)
        self.piece_numel = int(piece_numel)
        self._words = {}  # stream -> uint64 words, reused from step to step

    def pieces(self, numel):
        """Chunk ranges [(c0, c1), ...] of the pipeline's pieces."""
        n_chunks = self.layout.n_chunks(numel)
        per_chunk = self.layout.n_chunk_words * self.layout.per_word
        step = n_chunks if self.piece_numel <= 0 else max(1, round(self.piece_numel / per_chunk))
        return [(c, min(n_chunks, c + step)) for c in range(0, n_chunks, step)] or [(0, 0)]

    def _aggregate(self, flat, call):
        t, base, layout = self.transport, self.codec.base, self.layout
        feedback = self.codec if self.codec is not base else None
        numel, key = flat.numel(), call.key("grad")
        x = flat.detach().to("cpu", torch.float32).contiguous()
        with t.timed("encode", bucket=call.stream, numel=numel, name="scales"):
            p = feedback.compensate(x, key).contiguous() if feedback else x
            norms = checked_norms(p, base.bucket, base.norm, base.name, max_norm(base.levels)).contiguous()
        t.allreduce_array(norms.numpy(), "max", "scales")
        scale, unit = summable.bucket_scales(norms, base.levels)
        mean_unit = (unit / t.size).numpy()
        seed = draw_seed(call.rng) if base.stochastic else 0
        words = self._buffer(call.stream, layout.n_words(numel))
        own = np.empty(numel, dtype=np.float32) if feedback else None
        out = empty_like(x)
        pieces = self.pieces(numel)
        pipeline = t.pipeline("sum", self.name)
        try:
            for c0, c1 in pieces:
                start, stop = layout.chunk_coords(c0, c1, numel)
                with t.timed("encode", bucket=call.stream, numel=stop - start):
                    summable.encode_words(p, scale, unit, base.bucket, layout, seed, base.stochastic, words, c0, c1,
                                          own)
                w0, w1 = layout.chunk_words(c0, c1, numel)
                pipeline.put(words[w0:w1], stop - start)
        finally:
            pipeline.close()  # the driver thread ends once what was put is done
        for k in pipeline.done():
            c0, c1 = pieces[k]
            start, stop = layout.chunk_coords(c0, c1, numel)
            with t.timed("decode", bucket=call.stream, numel=stop - start):
                bad = summable.unpack_mean(words, mean_unit, base.bucket, layout, out.numpy(), c0, c1)
            if bad:
                self._refuse(words, c0, c1, numel, call.step)
        if feedback:
            feedback.update(key, p, torch.from_numpy(own), x)
        return out.to(flat.device)

    def _buffer(self, stream, n_words):
        words = self._words.get(stream)
        if words is None or words.size != n_words:
            words = self._words[stream] = np.empty(n_words, dtype=np.uint64)
        return words

    def _refuse(self, words, c0, c1, numel, step):
        layout = self.layout
        w0, w1 = layout.chunk_words(c0, c1, numel)
        start, stop = layout.chunk_coords(c0, c1, numel)
        i = summable.first_bad_field(words[w0:w1], layout, stop - start)
        where = f"bucket {(start + (i or 0)) // self.codec.base.bucket}"
        raise DecodeError(
            f"intsum: the summed levels of {where} (coordinate {start + (i or 0)}, step {step}) exceed what "
            f"{layout.ranks} ranks can send ({layout.top} in {layout.width}-bit fields): a rank sent codes no "
            "encoder of this job writes (a different mpiqsgd version or codec settings on some rank, or corrupted "
            "memory)")

    def _sent_nbytes(self, numel, rank):
        n = self.transport.size
        scales = allreduce_nbytes(-(-numel // self.codec.base.bucket), n)
        words = 0
        for c0, c1 in self.pieces(numel):
            w0, w1 = self.layout.chunk_words(c0, c1, numel)
            words += allreduce_nbytes(w1 - w0, n, itemsize=8)
        return scales + words
