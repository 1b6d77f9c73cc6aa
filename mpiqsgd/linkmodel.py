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

Link classes: a hierarchical run's meter separates the bytes that stay inside a node
(``intra``: the ``node-*`` phases, shared memory) from those that cross the network
(``inter``). With an ``intra`` link the projection prices each class on its own link,
``T_rank = T_inter(link) + T_intra(intra)``; the node's network link carries only the inter
bytes (only a node's leader sends any). An allreduce's extra latencies are counted as
inter. Without an ``intra`` link every byte is priced on the network link, as a flat
topology's bytes all are.
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


def _rank_cost(totals, n_ranks, by_class=False):
    """``(latencies, bytes)`` one rank's messages cost over the run, collectives as ``2 (n-1)`` messages.

    With ``by_class``: ``{"inter": (latencies, bytes), "intra": (latencies, bytes)}`` from the
    rank's ``by_class`` counts (the collectives' extra latencies counted as inter).
    """
    messages, nbytes = totals["sent"]["messages"], totals["sent"]["bytes"]
    extra = sum(counts["messages"] * (2 * (n_ranks - 1) - 1)  # a collective recorded once, nominal bytes
                for link, counts in totals.get("by_link", {}).items() if link.endswith("->-1"))
    if not by_class:
        return messages + extra, nbytes
    intra = totals.get("by_class", {}).get("intra", {"messages": 0, "bytes": 0})
    return {"inter": (messages - intra["messages"] + extra, nbytes - intra["bytes"]),
            "intra": (intra["messages"], intra["bytes"])}


def project(comm, steps, links, shared=False, intra=None):
    """Projected communication seconds per step of a run on each of ``links``.

    Args:
        comm: the run's ``comm.json`` (:func:`mpiqsgd.meter.merge` output).
        steps: the run's training steps.
        links: :class:`Link` s.
        shared: all ranks share one link (else one link per rank, the slowest rank counts).
        intra: a :class:`Link` for the bytes inside a node (``by_class`` ``intra``); None: every
            byte on the network link.

    Returns:
        dict: ``messages_per_step`` and ``bytes_per_step`` of the rank that decides (or of
        all ranks when shared; network bytes only when ``intra`` is given), ``rank`` (None when
        shared), ``seconds_per_step`` by link label, and with ``intra`` also
        ``intra_bytes_per_step`` (that rank's, or all ranks').
    """
    n = comm.get("n_ranks") or len(comm["per_rank"])
    steps = max(1, steps)
    if intra is None:
        costs = {t["rank"]: {"inter": _rank_cost(t, n), "intra": (0, 0)} for t in comm["per_rank"]}
    else:
        costs = {t["rank"]: _rank_cost(t, n, by_class=True) for t in comm["per_rank"]}

    def seconds(link, cost):
        return link.seconds(*cost["inter"]) + (intra.seconds(*cost["intra"]) if intra is not None else 0.0)

    def describe(cost):
        out = {"messages_per_step": cost["inter"][0] / steps, "bytes_per_step": cost["inter"][1] / steps}
        if intra is not None:
            out["intra_bytes_per_step"] = cost["intra"][1] / steps
        return out

    if shared:  # one link carries every rank's network messages; each node's memory its own
        total = {c: tuple(sum(v[c][i] for v in costs.values()) for i in (0, 1)) for c in ("inter", "intra")}
        worst_intra = max((v["intra"] for v in costs.values()), key=lambda c: c[1])
        return {"rank": None, **describe(total),
                "seconds_per_step": {link.label: seconds(link, {"inter": total["inter"], "intra": worst_intra})
                                     / steps for link in links}}
    out = {"seconds_per_step": {}}
    for link in links:
        rank, cost = max(costs.items(), key=lambda kv: seconds(link, kv[1]))
        out["seconds_per_step"][link.label] = seconds(link, cost) / steps
        out.update(rank=rank, **describe(cost))
    return out
