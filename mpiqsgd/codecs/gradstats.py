"""Sufficient statistics of normalized gradient coordinates, merged across ranks, and their bytes.

Every rank computes statistics of its own compressed gradient with :func:`local_stats`;
the exchange allgathers their bytes (:func:`stats_to_bytes`), every rank merges them in
rank order (:func:`merge_stats`) and fits the same levels to :func:`density_from_stats`.
Kinds (``r = v_i / N(v)`` per bucket, ``N`` the codec's norm):

* ``"histogram"`` (the default fit of every adaptive codec): the norm-weighted histogram
  of ``r`` on the fixed bins of :mod:`mpiqsgd.codecs.histogram`, bin ``k`` holding
  ``sum N_b(i)^2`` over its coordinates. Merged by summing in rank order. The model is
  the empirical density itself. Bytes: ``8 B`` (16 KiB at the default 2048 bins) plus
  about 40 of msgpack, per rank and refit.
* ``"pooled"`` (``--fit model`` for ALQ-N, AMQ-N): count, sum of ``r`` and the
  within-bucket sum of squared deviations of ``r``; the model is one truncated normal with
  the pooled mean and the pooled within-bucket standard deviation. Merged by summing.
  About 80 bytes.
* ``"mixture"`` (``--fit model`` for ALQ, AMQ): per bucket (mean, std, norm, count) of its
  normalized coordinates, only the ``max_buckets`` buckets of largest norm. Merged by
  concatenating in list order and keeping the top ``max_buckets`` by norm (stable sort).
  Component ``k`` of the model gets weight ``count_k * norm_k**weight_power``; the
  default power 2 makes ``Psi`` proportional to the model's ``E||Q(v) - v||^2`` (each
  bucket's variance is ``norm^2`` times its normalized variance); ``weight_power=1``
  weights by norm as in the paper. 32 bytes per kept bucket plus about 80 (1,263 for
  37 buckets).

Bytes are msgpack maps with float64 arrays as little-endian bytes; :func:`stats_from_bytes`
validates every field (a malformed message is a :class:`~mpiqsgd.errors.ConfigError`).
"""

import math

import msgpack
import numpy as np
import torch

from ..errors import ConfigError, NonFiniteError
from .buckets import bucket_rows
from .histogram import BINS, MAX_BINS, Histogram, histogram_of
from .truncnorm import Mixture

__all__ = ["STATS_KINDS", "local_stats", "merge_stats", "stats_to_bytes", "stats_from_bytes", "density_from_stats"]

STATS_KINDS = ("histogram", "pooled", "mixture")


def _bucket_chunks(flat, bucket, norm, chunk_buckets):
    """Per chunk of whole buckets: the (rows, bucket) float64 coordinates of nonzero buckets and their norms."""
    x = flat.detach().reshape(-1)
    n = x.numel()
    n_buckets = -(-n // bucket)
    for first in range(0, n_buckets, chunk_buckets):
        last = min(n_buckets, first + chunk_buckets)
        part = x[first * bucket:min(n, last * bucket)].to(device="cpu", dtype=torch.float64)
        for v in bucket_rows(part, bucket):
            scale = v.norm(dim=1) if norm == "l2" else v.abs().amax(dim=1)
            keep = scale > 0
            yield v[keep], scale[keep]


def _bucket_moments(flat, bucket, norm, chunk_buckets):
    """Per nonzero bucket: (mean, sum of squared deviations, norm, count) of r = v / N(v), float64."""
    out = []
    for v, scale in _bucket_chunks(flat, bucket, norm, chunk_buckets):
        r = v / scale[:, None]
        mean = r.mean(dim=1)
        ssd = (r - mean[:, None]).pow(2).sum(dim=1)
        count = torch.full_like(mean, v.shape[1])
        out.append(torch.stack([mean, ssd, scale, count], dim=1))
    if not out:
        return np.zeros((0, 4))
    return torch.cat(out).numpy()


def local_stats(flat, bucket, kind, norm="l2", max_buckets=64, bins=BINS, chunk_coords=1 << 21):
    """Sufficient statistics of the normalized coordinates of one rank's gradient.

    Args:
        flat: gradient tensor (flattened; buckets as the codec cuts them).
        bucket: coordinates per bucket.
        kind: ``"histogram"``, ``"pooled"`` or ``"mixture"`` (see the module docstring).
        norm: ``"l2"`` or ``"max"``, the codec's normalization.
        max_buckets: mixture only: keep this many buckets of largest norm.
        bins: histogram only: the number of bins (even, 2..65536).

    Returns:
        A dict (see :func:`stats_to_bytes`); zero buckets are left out.
    """
    if kind not in STATS_KINDS:
        raise ConfigError(f"stats kind must be one of {', '.join(STATS_KINDS)}; got {kind!r}")
    if norm not in ("l2", "max"):
        raise ConfigError(f"norm must be l2 or max; got {norm!r}")
    chunk_buckets = max(1, chunk_coords // int(bucket))
    if kind == "histogram":
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2 or bins % 2 or bins > MAX_BINS:
            raise ConfigError(f"histogram statistics need an even number of bins in 2..{MAX_BINS}; got {bins!r}")
        mass = histogram_of(flat, int(bucket), norm, bins)
        if not np.all(np.isfinite(mass)):  # a bucket's squared norm overflowed: the values are near 1e19
            raise NonFiniteError(
                f"gradient statistics overflow: a bucket's squared norm exceeds the float range (largest |value| "
                f"{float(flat.detach().abs().max()):.3g}): training diverged; lower --lr, and with --error-feedback "
                "use a contractive codec (--rounding nearest, --codec sign, more --bits)")
        return {"kind": "histogram", "norm": norm, "bucket": int(bucket), "mass": mass}
    rows = _bucket_moments(flat, int(bucket), norm, chunk_buckets)
    if kind == "pooled":
        return {"kind": "pooled", "norm": norm, "bucket": int(bucket), "count": int(rows[:, 3].sum()),
                "sum": float((rows[:, 0] * rows[:, 3]).sum()), "ssd": float(rows[:, 1].sum()),
                "n_buckets": int(rows.shape[0])}
    order = np.argsort(-rows[:, 2], kind="stable")[:max_buckets]
    rows = rows[order]
    return {"kind": "mixture", "norm": norm, "bucket": int(bucket), "max_buckets": int(max_buckets),
            "mean": rows[:, 0].copy(), "std": np.sqrt(rows[:, 1] / rows[:, 3]) if rows.size else np.zeros(0),
            "norms": rows[:, 2].copy(), "count": rows[:, 3].copy()}


def merge_stats(stats):
    """Merge statistics of several ranks (in list order, so every rank gets identical bytes)."""
    stats = list(stats)
    if not stats:
        raise ConfigError("merge_stats needs at least one statistics dict")
    first = stats[0]
    for s in stats[1:]:
        for key in ("kind", "norm", "bucket") + (("max_buckets",) if first["kind"] == "mixture" else ()):
            if s.get(key) != first.get(key):
                raise ConfigError(f"cannot merge statistics with {key}={s.get(key)!r} and {first.get(key)!r}")
        if first["kind"] == "histogram" and len(s["mass"]) != len(first["mass"]):
            raise ConfigError(f"cannot merge histograms of {len(first['mass'])} and {len(s['mass'])} bins")
    if first["kind"] == "histogram":
        mass = np.array(first["mass"], dtype=np.float64)
        for s in stats[1:]:
            mass = mass + np.asarray(s["mass"], dtype=np.float64)  # rank order: the same sum everywhere
        return {"kind": "histogram", "norm": first["norm"], "bucket": first["bucket"], "mass": mass}
    if first["kind"] == "pooled":
        out = dict(first)
        for s in stats[1:]:
            for key in ("count", "sum", "ssd", "n_buckets"):
                out[key] = out[key] + s[key]
        return out
    cat = {key: np.concatenate([np.asarray(s[key], dtype=np.float64) for s in stats])
           for key in ("mean", "std", "norms", "count")}
    order = np.argsort(-cat["norms"], kind="stable")[:first["max_buckets"]]
    return {"kind": "mixture", "norm": first["norm"], "bucket": first["bucket"],
            "max_buckets": first["max_buckets"], **{k: v[order] for k, v in cat.items()}}


_ARRAYS = ("mean", "std", "norms", "count")


def stats_to_bytes(stats):
    """Statistics as msgpack bytes (arrays as float64 little-endian)."""
    arrays = {"mixture": _ARRAYS, "histogram": ("mass",)}.get(stats["kind"], ())
    out = {k: (np.ascontiguousarray(v, dtype="<f8").tobytes() if k in arrays else v) for k, v in stats.items()}
    return msgpack.packb(out, use_bin_type=True)


def stats_from_bytes(data):
    """Inverse of :func:`stats_to_bytes`; raises ConfigError for malformed bytes."""
    try:
        raw = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ConfigError(f"unreadable statistics bytes: {exc}") from None
    if not isinstance(raw, dict) or raw.get("kind") not in STATS_KINDS:
        raise ConfigError(f"malformed statistics: {raw!r:.200}")
    out = dict(raw)
    if not isinstance(raw.get("bucket"), int) or raw.get("norm") not in ("l2", "max"):
        raise ConfigError(f"malformed statistics: {raw!r:.200}")
    if raw["kind"] == "histogram":
        mass = raw.get("mass")
        if not isinstance(mass, bytes) or len(mass) % 8 or not 2 <= len(mass) // 8 <= MAX_BINS or len(mass) // 8 % 2:
            raise ConfigError("malformed statistics field 'mass'")
        out["mass"] = np.frombuffer(mass, dtype="<f8").astype(np.float64)
        if not np.all(np.isfinite(out["mass"])) or np.any(out["mass"] < 0):
            raise ConfigError("statistics field 'mass' holds negative or non-finite values")
    elif raw["kind"] == "mixture":
        lengths = set()
        for key in _ARRAYS:
            if not isinstance(raw.get(key), bytes) or len(raw[key]) % 8:
                raise ConfigError(f"malformed statistics field {key!r}")
            out[key] = np.frombuffer(raw[key], dtype="<f8").astype(np.float64)
            lengths.add(out[key].size)
        if len(lengths) != 1:
            raise ConfigError("statistics arrays of different lengths")
    return out


def density_from_stats(stats, weight_power=2.0):
    """The density of merged statistics: a :class:`~mpiqsgd.codecs.histogram.Histogram` or the
    truncated-normal :class:`~mpiqsgd.codecs.truncnorm.Mixture` (see the module docstring)."""
    if stats["kind"] == "histogram":
        return Histogram(stats["mass"])
    if stats["kind"] == "pooled":
        if stats["count"] <= 0:
            raise ConfigError("no statistics: every bucket was zero")
        count = float(stats["count"])
        return Mixture([stats["sum"] / count], [math.sqrt(max(stats["ssd"], 0.0) / count)])
    if len(stats["norms"]) == 0:
        raise ConfigError("no statistics: every bucket was zero")
    norms = np.asarray(stats["norms"], dtype=np.float64)
    weight = np.asarray(stats["count"], dtype=np.float64) * (norms / norms.max()) ** weight_power
    return Mixture(stats["mean"], stats["std"], weight)
