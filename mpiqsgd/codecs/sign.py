"""Scaled sign: one scale per bucket and one bit per coordinate.

``C(v) = (||v||_1 / d) * sgn(v)`` per bucket of ``d`` coordinates (the last bucket
uses its own length); ``sgn(0) = +1``. Biased and deterministic: pair it with
``--error-feedback`` (EF-SignSGD, Karimireddy et al. 2019).

Wire format (payload after the frame of :mod:`mpiqsgd.wire`)::

    n_buckets float32 scales, n_buckets = ceil(numel / bucket)
    numel sign bits, densely packed, 1 = negative

Payload bytes: ``4 * ceil(numel / bucket) + ceil(numel / 8)``.

The decoder (:func:`sign_decode`) is a numba kernel on the CPU (the machinery of
:mod:`mpiqsgd.codecs.kernels`), torch ops elsewhere, with the same values.
"""

import numpy as np
import torch

from .. import wire
from . import bits as bitpack
from .base import Codec, check_int
from .buckets import checked_norms, finite_scales
from .kernels import HAVE_NUMBA, decode_target, run_chunks, use_numba

if HAVE_NUMBA:
    from .kernels import CHUNK, bucket_segment, chunk_range, jit_helper, jit_kernel, unpack_chunk

__all__ = ["Sign", "sign_decode"]


class Sign(Codec):
    """Scaled sign compressor.

    Args:
        bucket: coordinates per scale. Default 512.
    """

    name = "sign"
    bits = 1
    checks_finite = True  # through checked_norms

    def __init__(self, bucket=512):
        self.bucket = check_int(self.name, "bucket", bucket, 1, wire.MAX_BUCKET)
        self.force_torch = False  # tests: run the torch implementation on the CPU too

    @property
    def params(self):
        return {"bucket": self.bucket}

    def payload_nbytes(self, numel):
        return 4 * (-(-numel // self.bucket)) + bitpack.packed_nbytes(numel, 1)

    def _quantize(self, x, rng, want_decoded, into=None):
        # a mean of |x| never overflows; NaN or Inf in x makes it non-finite (checks_finite)
        scales = checked_norms(x, self.bucket, "mean_abs", self.name, force_torch=self.force_torch)
        packed = bitpack.pack((x < 0).to(torch.uint8), 1)
        decoded = None
        if want_decoded:
            decoded = sign_decode(packed, scales, self.bucket, x.numel(), self.force_torch)
        return torch.cat([scales.view(torch.uint8), packed]), decoded

    def _dequantize(self, payload, numel, out=None):
        n_buckets = -(-numel // self.bucket)
        scales = finite_scales(payload, n_buckets, self.name)
        # min(): the same buckets; nothing is sized by a bucket larger than the message
        return sign_decode(payload[4 * n_buckets:], scales, min(self.bucket, numel), numel, self.force_torch, out)


if HAVE_NUMBA:
    @jit_helper
    def _sign_chunk_one(c, packed, scales, bucket, out):
        start, stop = chunk_range(c, out.size)
        codes = np.empty(CHUNK, dtype=np.uint8)
        unpack_chunk(packed, start, stop, 1, codes)
        i = start
        while i < stop:
            b, end = bucket_segment(i, stop, bucket)
            s = scales[b]
            cs, os = codes[i - start:end - start], out[i:end]
            for k in range(cs.size):
                os[k] = -s if cs[k] else s
            i = end
        return 0

    @jit_kernel
    def _sign_chunks(c0, c1, packed, scales, bucket, out):
        total = 0
        for c in range(c0, c1):
            total += _sign_chunk_one(c, packed, scales, bucket, out)
        return total


def sign_decode(packed, scales, bucket, n, force_torch=False, out=None):
    """Values of ``n`` packed sign bits (1 = negative) times their bucket's scale (``out`` as for
    :func:`~mpiqsgd.codecs.qsgd_kernels.level_decode`)."""
    if not use_numba(packed.device, force_torch):
        values = scales.repeat_interleave(bucket)[:n]
        return torch.where(bitpack.unpack(packed, n, 1).bool(), -values, values)
    values, target = decode_target(out, n)
    run_chunks(_sign_chunks, n, (packed.numpy(), scales.numpy(), bucket, target))
    return values
