"""Latency-bandwidth (alpha-beta) link model: fit it to a sweep, project runs onto other links.

Model: a message of ``b`` bytes takes ``t = alpha + b / beta`` seconds (``alpha`` the
latency in seconds, ``beta`` the bandwidth in bytes per second). ``alpha`` and ``beta``
come from ``mpiqsgd bench exchange --sweep`` (:func:`fit`: one-way ping-pong times of
messages from 1 KB to 100 MB, fitted by least squares on relative error, so the small
messages fix ``alpha`` and the large ones ``beta``); a rate named on the command line
(``100mbit``) replaces ``beta``.

Projection of a run (:func:`project`): from its ``comm.json`` (every message each rank
sent, counted by the meter), each rank's messages are taken as serialized on its own
link: ``T_rank = n_messages * alpha + bytes / beta`` over the run, divided by its steps.
An allreduce, which MPI runs as ``2 (n - 1)`` messages that the meter records as one with
the nominal bandwidth-optimal bytes, counts ``2 (n - 1)`` latencies. The slowest rank is
the step's communication time (a parameter server's rank 0). ``shared=True`` puts every
rank's messages on one link instead (a hub, or the shaped loopback of
``scripts/shaped_link.sh``): ``T = sum over ranks``. It is a projection: it ignores
compute overlap, congestion, protocol switches and waiting for slower ranks.
"""

import math
import re

import numpy as np

from .errors import ConfigError

__all__ = ["fit", "parse_rate", "parse_time", "parse_link", "project", "sweep_sizes", "Link"]

_BITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_BYTES = {"b/s": 1, "kb/s": 1e3, "mb/s": 1e6, "gb/s": 1e9}
_TIME = {"s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def sweep_sizes(min_bytes=1000, max_bytes=100_000_000, per_decade=2):
    """Message sizes of the sweep: ``per_decade`` log-spaced sizes per factor 10, both ends included."""
    n = round(per_decade * math.log10(max_bytes / min_bytes)) + 1
    return sorted({int(round(v)) for v in np.geomspace(min_bytes, max_bytes, max(n, 2))})


def fit(nbytes, seconds):
    """Fit ``t = alpha + b / beta`` to measured ``(bytes, seconds)`` minimizing relative error.

    Returns:
        dict: ``alpha_seconds`` (>= 0), ``beta_bytes_per_second``, ``max_relative_error``
        of the fit over the points.
    """
    b = np.asarray(nbytes, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    if b.size < 2 or np.any(t <= 0):
        raise ConfigError("link fit: need at least 2 sizes with positive times")
    # Divide each equation alpha + b * inv_beta = t by t: every point weighs by its relative error.
    (alpha, inv_beta), *_ = np.linalg.lstsq(np.stack([1 / t, b / t], axis=1), np.ones_like(t), rcond=None)
    if alpha < 0:  # latency below resolution: bandwidth alone
        alpha, inv_beta = 0.0, float(np.sum(b / t) / np.sum((b / t) ** 2))
    if inv_beta <= 0:
        raise ConfigError("link fit: times do not grow with message size")
    model = alpha + b * inv_beta
    return {"alpha_seconds": float(alpha), "beta_bytes_per_second": float(1 / inv_beta),
            "max_relative_error": float(np.max(np.abs(model - t) / t))}


def parse_rate(text):
    """Bytes per second of a rate: ``100mbit``, ``1gbit``, ``2.5Gbit`` (bits, decimal) or ``117MB/s`` (bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z/]+)\s*", text)
    unit = m and m.group(2).lower()
    if not m or (unit not in _BITS and unit not in _BYTES):
        raise ConfigError(f"--link: {text!r} is not a rate like 100mbit, 1gbit (bits/s) or 117MB/s (bytes/s)")
    value = float(m.group(1))
    rate = value * _BITS[unit] / 8 if unit in _BITS else value * _BYTES[unit]
    if rate <= 0:
        raise ConfigError(f"--link: rate must be positive; got {text!r}")
    return rate


def parse_time(text):
    """Seconds of a latency such as ``50us`` or ``0.2ms`` (units s, ms, us, ns)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|ms|us|ns)\s*", text)
    if not m:
        raise ConfigError(f"--link: latency {text!r} is not a time like 50us, 0.2ms")
    return float(m.group(1)) * _TIME[m.group(2)]


class Link:
    """A link of the projection: ``alpha_seconds``, ``beta_bytes_per_second`` and a label."""

    def __init__(self, label, alpha_seconds, beta_bytes_per_second):
        self.label, self.alpha, self.beta = label, alpha_seconds, beta_bytes_per_second

    def seconds(self, n_messages, nbytes):
        return n_messages * self.alpha + nbytes / self.beta

    def __repr__(self):
        return f"Link({self.label}: alpha {self.alpha * 1e6:.1f} us, beta {self.beta * 8 / 1e6:.1f} Mbit/s)"


def parse_link(text, model=None):
    """A :class:`Link` from ``RATE[@LATENCY]``: latency from ``@`` or else ``model``'s alpha (else 0).

    ``model`` is a fit (:func:`fit`'s dict); the text ``model`` alone is that fit's own link.
    """
    if text.strip() == "model":
        if model is None:
            raise ConfigError("--link model needs --link-model FILE")
        return Link("model", model["alpha_seconds"], model["beta_bytes_per_second"])
    rate, _, latency = text.partition("@")
    alpha = parse_time(latency) if latency else (model["alpha_seconds"] if model else 0.0)
    return Link(text.strip(), alpha, parse_rate(rate))


def _rank_cost(totals, n_ranks):
    """``(latencies, bytes)`` one rank's messages cost over the run, collectives as ``2 (n-1)`` messages."""
    messages, nbytes = totals["sent"]["messages"], totals["sent"]["bytes"]
    for link, counts in totals.get("by_link", {}).items():
        if link.endswith("->-1"):  # a collective recorded once with its nominal bytes
            messages += counts["messages"] * (2 * (n_ranks - 1) - 1)
    return messages, nbytes


def project(comm, steps, links, shared=False):
    """Projected communication seconds per step of a run on each of ``links``.

    Args:
        comm: the run's ``comm.json`` (:func:`mpiqsgd.meter.merge` output).
        steps: the run's training steps.
        links: :class:`Link` s.
        shared: all ranks share one link (else one link per rank, the slowest rank counts).

    Returns:
        dict: ``messages_per_step`` and ``bytes_per_step`` of the rank that decides (or of
        all ranks when shared), ``rank`` (None when shared), ``seconds_per_step`` by link label.
    """
    n = comm.get("n_ranks") or len(comm["per_rank"])
    costs = {t["rank"]: _rank_cost(t, n) for t in comm["per_rank"]}
    steps = max(1, steps)
    if shared:
        msgs, nbytes = (sum(c[i] for c in costs.values()) for i in (0, 1))
        return {"rank": None, "messages_per_step": msgs / steps, "bytes_per_step": nbytes / steps,
                "seconds_per_step": {link.label: link.seconds(msgs, nbytes) / steps for link in links}}
    out = {"seconds_per_step": {}}
    for link in links:
        rank, (msgs, nbytes) = max(costs.items(), key=lambda kv: link.seconds(*kv[1]))
        out["seconds_per_step"][link.label] = link.seconds(msgs, nbytes) / steps
        out.update(rank=rank, messages_per_step=msgs / steps, bytes_per_step=nbytes / steps)
    return out
