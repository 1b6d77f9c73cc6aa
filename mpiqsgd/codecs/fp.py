"""Uncompressed baselines: ``fp32`` (identity) and ``fp16`` (half precision cast).

Wire format: the standard frame (:mod:`mpiqsgd.wire`) with a payload of ``numel``
little-endian float32 (4 bytes each) or float16 (2 bytes each) values. No parameters.
An fp16 payload refuses values outside the float16 range rather than sending Inf.
"""

import torch

from ..errors import DecodeError, NonFiniteError
from .base import Codec, all_finite

__all__ = ["FP32", "FP16"]


class _Float(Codec):
    dtype = torch.float32

    def payload_nbytes(self, numel):
        return numel * self.dtype.itemsize

    def _quantize(self, x, rng, want_decoded, into=None):
        cast = x.to(self.dtype)
        # _check_input proved x finite; only a narrowing cast can overflow. (Copying into `into`
        # costs what the frame's copy does: the payload is left to it.)
        if self.dtype is not torch.float32 and not all_finite(cast):
            raise NonFiniteError(f"{self.name}: gradient values exceed the {self.dtype} range")
        return cast.view(torch.uint8), (cast.to(torch.float32) if want_decoded else None)

    def _dequantize(self, payload, numel, out=None):
        values = payload.view(self.dtype)
        if not all_finite(values):
            raise DecodeError(f"{self.name}: payload holds NaN or Inf")
        return values.to(torch.float32) if out is None else out.copy_(values)  # fp16: converted in the copy


class FP32(_Float):
    """Identity codec: 4 bytes per coordinate."""

    name = "fp32"
    bits = 32
    dtype = torch.float32


class FP16(_Float):
    """Half-precision cast: 2 bytes per coordinate, round to nearest."""

    name = "fp16"
    bits = 16
    dtype = torch.float16
