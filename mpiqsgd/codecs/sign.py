"""Scaled sign: one scale per bucket and one bit per coordinate.

``C(v) = (||v||_1 / d) * sgn(v)`` per bucket of ``d`` coordinates (the last bucket
uses its own length); ``sgn(0) = +1``. Biased and deterministic: pair it with
``--error-feedback`` (EF-SignSGD, Karimireddy et al. 2019).

Wire format (payload after the frame of :mod:`mpiqsgd.wire`)::

    n_buckets float32 scales, n_buckets = ceil(numel / bucket)
    numel sign bits, densely packed, 1 = negative

Payload bytes: ``4 * ceil(numel / bucket) + ceil(numel / 8)``.
"""

import torch

from .. import wire
from . import bits as bitpack
from . import kernels
from .base import Codec, check_int
from .qsgd import checked_norms, finite_scales

__all__ = ["Sign"]


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
            decoded = kernels.sign_decode(packed, scales, self.bucket, x.numel(), self.force_torch)
        return torch.cat([scales.view(torch.uint8), packed]), decoded

    def _dequantize(self, payload, numel, out=None):
        n_buckets = -(-numel // self.bucket)
        scales = finite_scales(payload, n_buckets, self.name)
        # min(): the same buckets; nothing is sized by a bucket larger than the message
        return kernels.sign_decode(payload[4 * n_buckets:], scales, min(self.bucket, numel), numel,
                                   self.force_torch, out)
