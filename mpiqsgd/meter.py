"""Byte and time counters: every message a rank sends, and seconds per phase.

The transport records each message once, at its sender: step, phase, source,
destination, header bytes (wire prefix and msgpack header), payload bytes, and the
fp32 bytes the message stands for (4 x the coordinates it carries). Totals are kept
per phase and per link ``"source->dest"``; a collective whose traffic MPI hides is
recorded with ``dest = -1`` and its nominal cost. :func:`merge` sums the totals of
all ranks (the byte counts of a job); ``Meter.totals`` is one rank's, JSON-ready.
"""

import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import msgpack

__all__ = ["Message", "Meter", "merge", "COUNT_FIELDS"]

COUNT_FIELDS = ("messages", "bytes", "header_bytes", "payload_bytes", "fp32_bytes")


@dataclass(frozen=True)
class Message:
    """One message, as recorded by its sender."""

    step: int
    phase: str
    source: int
    dest: int
    header_bytes: int
    payload_bytes: int
    fp32_bytes: int

    @property
    def bytes(self):
        return self.header_bytes + self.payload_bytes


def _zero():
    return dict.fromkeys(COUNT_FIELDS, 0)


def _add(into, counts):
    for field in COUNT_FIELDS:
        into[field] += counts[field]


class Meter:
    """Counters of one rank.

    Args:
        rank: the rank that owns this meter.
        keep_messages: also keep the list of every :class:`Message` (tests, traces);
            totals are always kept.
    """

    def __init__(self, rank=0, keep_messages=False):
        self.rank = rank
        self.keep_messages = keep_messages
        self.step = 0
        self._lock = threading.Lock()  # a communication thread records beside the training thread
        self.reset()

    def reset(self):
        """Zero all counters and timers."""
        self.messages = []
        self.by_phase = defaultdict(_zero)
        self.by_link = defaultdict(_zero)
        self.seconds = defaultdict(float)

    def load_totals(self, totals):
        """Restore counters from :meth:`totals` (resuming a run); message lists are not restored."""
        self.reset()
        for k, v in totals["by_phase"].items():
            _add(self.by_phase[k], v)
        for k, v in totals["by_link"].items():
            _add(self.by_link[k], v)
        self.seconds.update(totals["seconds"])

    def record(self, phase, source, dest, header_bytes, payload_bytes, fp32_bytes):
        """Count one message sent by this rank."""
        msg = Message(self.step, phase, source, dest, header_bytes, payload_bytes, fp32_bytes)
        counts = {"messages": 1, "bytes": msg.bytes, "header_bytes": header_bytes,
                  "payload_bytes": payload_bytes, "fp32_bytes": fp32_bytes}
        with self._lock:
            _add(self.by_phase[phase], counts)
            _add(self.by_link[f"{source}->{dest}"], counts)
            if self.keep_messages:
                self.messages.append(msg)

    @contextmanager
    def time(self, phase, sync=None):
        """Add the seconds spent in the block to ``phase``.

        Args:
            sync: optional callable run before reading the clock (e.g.
                ``torch.cuda.synchronize``) so asynchronous device work is counted.
        """
        if sync:
            sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                sync()
            elapsed = time.perf_counter() - start
            with self._lock:
                self.seconds[phase] += elapsed

    def sent(self):
        """Totals over everything this rank sent."""
        total = _zero()
        for counts in self.by_phase.values():
            _add(total, counts)
        return total

    def job_totals(self, transport):
        """:func:`merge` of every rank's totals (collective: call on all ranks of ``transport``)."""
        packed = transport.allgather_bytes(msgpack.packb(self.totals(), use_bin_type=True))
        return merge([msgpack.unpackb(b, raw=False, strict_map_key=False) for b in packed])

    def totals(self):
        """This rank's counters as a JSON-ready dict."""
        return {
            "rank": self.rank,
            "sent": self.sent(),
            "by_phase": {k: dict(v) for k, v in sorted(self.by_phase.items())},
            "by_link": {k: dict(v) for k, v in sorted(self.by_link.items())},
            "seconds": dict(sorted(self.seconds.items())),
        }


def merge(per_rank):
    """Sum the :meth:`Meter.totals` of all ranks into job totals.

    Returns:
        dict with ``sent`` (all ranks), ``by_phase``, ``by_link``, ``seconds`` (summed
        over ranks), ``per_rank`` (the inputs, by rank), and ``received_by_rank`` /
        ``sent_by_rank`` (bytes per rank; for a parameter server, rank 0's inbound and
        outbound traffic).
    """
    sent = _zero()
    by_phase = defaultdict(_zero)
    by_link = defaultdict(_zero)
    seconds = defaultdict(float)
    received = defaultdict(int)
    for t in per_rank:
        _add(sent, t["sent"])
        for k, v in t["by_phase"].items():
            _add(by_phase[k], v)
        for k, v in t["by_link"].items():
            _add(by_link[k], v)
            dest = int(k.split("->")[1])
            if dest >= 0:
                received[dest] += v["bytes"]
        for k, v in t["seconds"].items():
            seconds[k] += v
    return {
        "n_ranks": len(per_rank),
        "sent": sent,
        "by_phase": {k: dict(v) for k, v in sorted(by_phase.items())},
        "by_link": {k: dict(v) for k, v in sorted(by_link.items())},
        "seconds": dict(sorted(seconds.items())),
        "sent_by_rank": {t["rank"]: t["sent"]["bytes"] for t in per_rank},
        "received_by_rank": dict(sorted(received.items())),
        "per_rank": sorted(per_rank, key=lambda t: t["rank"]),
    }
