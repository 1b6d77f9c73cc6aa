"""Bucket slicing, per-bucket norms and bucket scales, shared by every bucketed codec.

A flat vector of ``numel`` coordinates is cut into ``ceil(numel / bucket)`` buckets of
``bucket`` consecutive coordinates; the last one may be short and is reduced over its
own coordinates only. The numba kernels walk the same buckets chunk by chunk
(:func:`mpiqsgd.codecs.kernels.bucket_segment`).

One rule for norms that leave the float32 range, for every codec: :func:`checked_norms`
refuses them (and NaN or Inf values) with a :class:`~mpiqsgd.errors.NonFiniteError` naming
the bucket, before anything is sent; a receiver refuses a payload's scales outside
``[0, limit]`` (:func:`finite_scales`).
"""

import numpy as np
import torch

from ..errors import DecodeError, NonFiniteError
from . import kernels
from .base import all_finite, non_finite_error

__all__ = ["n_buckets", "bucket_rows", "bucket_norms", "checked_norms", "finite_scales", "FLT_MAX"]

FLT_MAX = float(np.finfo(np.float32).max)

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
        n = x.numel()
        out = np.empty(n_buckets(n, bucket), dtype=np.float32)
        kernels.run_chunks(kernels.norm_chunks, n, (x.contiguous().numpy(), bucket, kernels.NORM_KINDS[norm], out),
                           units=out.size)
        return torch.from_numpy(out)
    reduce = _REDUCE[norm]
    rows = bucket_rows(x, bucket)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # float64 input: float64 norms
    if not rows:
        return x.new_zeros(0, dtype=dtype)
    return torch.cat([reduce(v) for v in rows]).to(dtype)


def checked_norms(x, bucket, norm, codec, limit=FLT_MAX, force_torch=False):
    """:func:`bucket_norms` of ``x`` (summed in float64: values of 2e19 no longer overflow a
    float32 sum of squares), each at most ``limit``. A NaN or Inf in ``x`` carries into its
    bucket's norm, so the norms are also the codec's check that ``x`` is finite
    (:attr:`~mpiqsgd.codecs.base.Codec.checks_finite`).

    Raises:
        NonFiniteError: ``x`` holds NaN or Inf, or a bucket's norm exceeds ``limit`` (what a
            receiver decodes to finite values), naming the bucket, its norm and what to change.
    """
    norms = bucket_norms(x, bucket, norm, force_torch)
    # one reduction: the common case costs ~1 us; a NaN maximum fails the comparison too
    if not norms.numel() or float(norms.max()) <= limit:
        return norms
    if not all_finite(x):
        raise non_finite_error(codec, x)
    b = int((norms > limit).nonzero()[0, 0])  # x is finite: a norm above the limit, not NaN
    exact = bucket_norms(x.double(), bucket, norm)  # the torch ops, kept in float64 for the message
    raise NonFiniteError(
        f"{codec}: bucket {b} has a {norm} norm of {float(exact[b]):.3g}, beyond what a float32 scale "
        f"carries ({limit:.4g}); the largest value to encode is {float(x.abs().max()):.3g}. Values this "
        "large mean training diverged: lower the learning rate; with error feedback, its residual is "
        "growing without bound: use a contractive codec (nearest rounding, more bits, or sign)")


def finite_scales(payload, n_buckets, codec, limit=FLT_MAX):
    """Read ``n_buckets`` float32 scales from the start of a payload; each must lie in [0, limit]
    (which refuses NaN and Inf in the same pass)."""
    scales = payload[: 4 * n_buckets].view(torch.float32)
    # min and max propagate NaN, which fails both comparisons
    if n_buckets and not (float(scales.min()) >= 0 and float(scales.max()) <= limit):
        bad = scales[~((scales >= 0) & (scales <= limit))][0]
        what = "negative or non-finite" if not bool(torch.isfinite(bad)) or bad < 0 else "too large"
        raise DecodeError(f"{codec}: payload holds a {what} bucket scale {float(bad):.4g} "
                          f"(valid: 0 to {limit:.6g}, so that every decoded value is finite)")
    return scales
