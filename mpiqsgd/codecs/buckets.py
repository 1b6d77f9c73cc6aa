"""Bucket slicing and per-bucket norms, shared by every bucketed codec.

A flat vector of ``numel`` coordinates is cut into ``ceil(numel / bucket)`` buckets of
``bucket`` consecutive coordinates; the last one may be short and is reduced over its
own coordinates only. The numba kernels walk the same buckets chunk by chunk
(:func:`mpiqsgd.codecs.kernels.bucket_segment`).
"""

import torch

__all__ = ["n_buckets", "bucket_rows", "bucket_norms", "safe_norms"]

_REDUCE = {
    "l2": lambda v: v.norm(dim=1),
    # max |v_i| from the extremes: no |v| temporary the size of the input (7x faster), same value
    "max": lambda v: torch.maximum(v.amax(dim=1).abs(), v.amin(dim=1).abs()),
    "mean_abs": lambda v: v.abs().mean(dim=1),
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


def bucket_norms(x, bucket, norm="l2"):
    """Float32 norm of each bucket; the last bucket may be short.

    ``norm``: ``"l2"``, ``"max"`` (max |x_i|) or ``"mean_abs"`` (||x||_1 / bucket length).
    """
    reduce = _REDUCE[norm]
    rows = bucket_rows(x, bucket)
    if not rows:
        return x.new_zeros(0)
    return torch.cat([reduce(v) for v in rows])


def safe_norms(x, bucket, norm):
    """Float32 bucket norms as :func:`bucket_norms`, recomputed with scaling where the L2
    norm overflows float32 (finite gradients give finite norms)."""
    norms = bucket_norms(x, bucket, norm)
    if norm == "l2" and not bool(torch.isfinite(norms).all()):
        big = bucket_norms(x.double(), bucket, norm)
        norms = big.clamp(max=torch.finfo(torch.float32).max).to(torch.float32)
    return norms
