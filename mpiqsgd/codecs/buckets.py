"""Bucket slicing and per-bucket norms, shared by every bucketed codec.

A flat vector of ``numel`` coordinates is cut into ``ceil(numel / bucket)`` buckets of
``bucket`` consecutive coordinates; the last one may be short and is reduced over its
own coordinates only. The numba kernels walk the same buckets chunk by chunk
(:func:`mpiqsgd.codecs.kernels.bucket_segment`).
"""

import torch

from . import kernels
from .base import all_finite, non_finite_error

__all__ = ["n_buckets", "bucket_rows", "bucket_norms", "safe_norms"]

_REDUCE = {  # the torch ops (other devices, and force_torch); sums in float64, as the numba kernel's
    # float64 accumulation without a float64 copy of the input (8 bytes per coordinate on a GPU)
    "l2": lambda v: torch.linalg.vector_norm(v, dim=1, dtype=torch.float64),
    # max |v_i| from the extremes: no |v| temporary the size of the input (7x faster), same value
    "max": lambda v: torch.maximum(v.amax(dim=1).abs(), v.amin(dim=1).abs()),
    "mean_abs": lambda v: v.abs().sum(dim=1, dtype=torch.float64) / v.shape[1],
}


def n_buckets(numel, bucket):
    """Number of buckets of ``numel`` coordinates: ``ceil(numel / bucket)``."""
    return -(-numel // bucket)


def bucket_rows(x, bucket):
    """Views of a flat tensor as 2-D rows of buckets: the full ones, then the short last one.

    Returns:
        a list of one or two tensors of shape (rows, length) that share ``x``'s storage; empty
        ones are left out.
    """
    full = x.numel() // bucket
    rows = [x[: full * bucket].view(full, bucket)] if full else []
    if full * bucket < x.numel():
        rows.append(x[full * bucket:].view(1, -1))
    return rows


def bucket_norms(x, bucket, norm="l2", force_torch=False):
    """Float32 norm of each bucket; the last bucket may be short.

    ``norm``: ``"l2"``, ``"max"`` (max |x_i|) or ``"mean_abs"`` (||x||_1 / bucket length).
    Sums are taken in float64 and rounded once to float32, so finite values never overflow
    them (a norm beyond the float32 range is Inf) and a NaN or Inf in a bucket makes its
    norm NaN or Inf. On the CPU a numba kernel computes them in one pass on the kernels'
    threads (torch's own threads, spinning after a reduction, slowed the quantization kernel
    that follows by a quarter); the torch ops sum in another order, so an L2 norm may differ
    in its last bit where the float64 sum lies within its rounding error of a float32
    rounding boundary (an estimate from the sum's rounding error over a float32 ulp: about 1e-7
    per bucket of 512).
    """
    if x.dtype == torch.float32 and x.numel() and kernels.use_numba(x.device, force_torch):
        return kernels.bucket_norms(x.contiguous(), bucket, norm)
    reduce = _REDUCE[norm]
    rows = bucket_rows(x, bucket)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # float64 input: float64 norms
    if not rows:
        return x.new_zeros(0, dtype=dtype)
    return torch.cat([reduce(v) for v in rows]).to(dtype)


def safe_norms(x, bucket, norm, codec=None, force_torch=False):
    """Float32 bucket norms as :func:`bucket_norms`, an L2 norm beyond float32 clamped to the
    float32 maximum (finite gradients give finite norms).

    A NaN or Inf in ``x`` carries into its bucket's norm; with ``codec`` (a codec's name) given,
    it raises that codec's :class:`~mpiqsgd.errors.NonFiniteError`, so the norms are the codec's
    check that ``x`` is finite (:attr:`~mpiqsgd.codecs.base.Codec.checks_finite`).
    """
    norms = bucket_norms(x, bucket, norm, force_torch)
    if not bool(torch.isfinite(norms).all()):
        if codec is not None and not all_finite(x):
            raise non_finite_error(codec, x)
        norms = norms.clamp(max=torch.finfo(torch.float32).max)
    return norms
