"""Byte and time counters: every message a rank sends, and seconds per phase.

The transport records each message once, at its sender: step, phase, source,
destination, header bytes (wire prefix and msgpack header), payload bytes, and the
fp32 bytes the message stands for (4 x the coordinates it carries). Totals are kept
per phase and per link ``"source->dest"``; a collective whose traffic MPI hides is
recorded with ``dest = -1`` and its nominal cost. :func:`merge` sums the totals of
all ranks (the byte counts of a job); ``Meter.totals`` is one rank's, JSON-ready.
``sizes`` is a histogram of message sizes per phase (power-of-two bins: the link
projection of ``mpiqsgd report --link`` needs how many messages of which size).

Link classes: a phase named ``node-*`` (the hierarchical exchange's ``node-reduce`` and
``node-bcast``) moves bytes between ranks of one node (``intra``: shared memory); every other
phase is ``inter`` (crosses the network, as every byte of a flat topology is assumed to).
``by_class`` in :meth:`Meter.totals` and :func:`merge` sums the phases of each class.

Spans: with a :class:`~mpiqsgd.trace.Tracer` attached (``meter.tracer``), every
:meth:`Meter.time` block and :meth:`Meter.span` of a sampled step also becomes one
event of the run's timeline (``trace.json``); without one the cost is one attribute
test per block.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Sequence

import msgpack

if TYPE_CHECKING:
    from .trace import Tracer
    from .transport import Transport

__all__ = ["Message", "Meter", "merge", "size_bin", "link_class", "COUNT_FIELDS", "LINK_CLASSES"]

COUNT_FIELDS = ("messages", "bytes", "header_bytes", "payload_bytes", "fp32_bytes")
LINK_CLASSES = ("intra", "inter")
INTRA_PREFIX = "node-"

# A message count per field of COUNT_FIELDS; and a size histogram, size_bin -> [messages, bytes].
Counts = Dict[str, int]
SizeBins = Dict[int, List[int]]


def link_class(phase: str) -> str:
    """``intra`` for a phase between the ranks of one node (``node-*``), else ``inter``."""
    return "intra" if phase.startswith(INTRA_PREFIX) else "inter"


def _by_class(by_phase: dict[str, Counts]) -> dict[str, Counts]:
    out = {c: _zero() for c in LINK_CLASSES}
    for phase, counts in by_phase.items():
        _add(out[link_class(phase)], counts)
    return out


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
    def bytes(self) -> int:
        return self.header_bytes + self.payload_bytes


def _zero() -> Counts:
    return dict.fromkeys(COUNT_FIELDS, 0)


def size_bin(nbytes: int) -> int:
    """The histogram bin of a message of ``nbytes``: ``k`` holds sizes in [2^(k-1), 2^k) (0 holds 0)."""
    return int(nbytes).bit_length()


def _add_sizes(into: SizeBins, sizes: dict[Any, list[int]]) -> None:
    for k, (count, nbytes) in sizes.items():
        cell = into.setdefault(int(k), [0, 0])
        cell[0] += count
        cell[1] += nbytes


def _sizes_json(by_phase: dict[str, SizeBins]) -> dict[str, dict[str, list[int]]]:
    return {phase: {str(k): list(v) for k, v in sorted(bins.items())} for phase, bins in sorted(by_phase.items())}


def _add(into: Counts, counts: Counts) -> None:
    for field in COUNT_FIELDS:
        into[field] += counts[field]


class Meter:
    """Counters of one rank.

    Args:
        rank: the rank that owns this meter.
        keep_messages: also keep the list of every :class:`Message` (tests, traces);
            totals are always kept.
    """

    def __init__(self, rank: int = 0, keep_messages: bool = False) -> None:
        self.rank = rank
        self.keep_messages = keep_messages
        self.step = 0
        self.tracer: Tracer | None = None  # a mpiqsgd.trace.Tracer records spans of sampled steps
        self._lock = threading.Lock()  # a communication thread records beside the training thread
        self.reset()

    def reset(self) -> None:
        """Zero all counters and timers."""
        self.messages: list[Message] = []
        self.by_phase: defaultdict[str, Counts] = defaultdict(_zero)
        self.by_link: defaultdict[str, Counts] = defaultdict(_zero)
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.sizes: defaultdict[str, SizeBins] = defaultdict(dict)  # phase -> {size_bin: [messages, bytes]}

    def load_totals(self, totals: dict[str, Any]) -> None:
        """Restore counters from :meth:`totals` (resuming a run); message lists are not restored."""
        self.reset()
        for k, v in totals["by_phase"].items():
            _add(self.by_phase[k], v)
        for k, v in totals["by_link"].items():
            _add(self.by_link[k], v)
        self.seconds.update(totals["seconds"])
        for k, v in totals.get("sizes", {}).items():
            _add_sizes(self.sizes[k], v)

    def record(self, phase: str, source: int, dest: int, header_bytes: int, payload_bytes: int,
               fp32_bytes: int) -> None:
        """Count one message sent by this rank."""
        msg = Message(self.step, phase, source, dest, header_bytes, payload_bytes, fp32_bytes)
        counts = {"messages": 1, "bytes": msg.bytes, "header_bytes": header_bytes,
                  "payload_bytes": payload_bytes, "fp32_bytes": fp32_bytes}
        with self._lock:
            _add(self.by_phase[phase], counts)
            _add(self.by_link[f"{source}->{dest}"], counts)
            cell = self.sizes[phase].setdefault(size_bin(msg.bytes), [0, 0])
            cell[0] += 1
            cell[1] += msg.bytes
            if self.keep_messages:
                self.messages.append(msg)

    @contextmanager
    def time(self, phase: str, sync: Callable[[], object] | None = None, name: str | None = None,
             **args: Any) -> Iterator[dict[str, Any]]:
        """Add the seconds spent in the block to ``phase``.

        Args:
            sync: optional callable run before reading the clock (e.g.
                ``torch.cuda.synchronize``) so asynchronous device work is counted.
            name, args: the span's name (default ``phase``) and arguments in the trace.

        Yields:
            ``args``, to which the block may add what it learns (a received message's bytes).
        """
        if sync:
            sync()
        start = time.perf_counter()
        try:
            yield args
        finally:
            if sync:
                sync()
            end = time.perf_counter()
            with self._lock:
                self.seconds[phase] += end - start
            if self.tracer is not None:
                self.tracer.add(self.step, phase, name or phase, start, end, args)

    def trace(self, category: str, name: str, start: float, end: float, **args: Any) -> None:
        """Put an interval timed elsewhere (``perf_counter`` seconds) in the trace; counts nothing."""
        if self.tracer is not None:
            self.tracer.add(self.step, category, name, start, end, args)

    @contextmanager
    def span(self, name: str, category: str = "span", **args: Any) -> Iterator[dict[str, Any]]:
        """A traced block that adds to no counter (a bucket's exchange, a checkpoint)."""
        if self.tracer is None:
            yield args
            return
        start = time.perf_counter()
        try:
            yield args
        finally:
            self.tracer.add(self.step, category, name, start, time.perf_counter(), args)

    def sent(self) -> Counts:
        """Totals over everything this rank sent."""
        total = _zero()
        for counts in self.by_phase.values():
            _add(total, counts)
        return total

    def job_totals(self, transport: Transport) -> dict[str, Any]:
        """:func:`merge` of every rank's totals (collective: call on all ranks of ``transport``)."""
        packed = transport.allgather_bytes(msgpack.packb(self.totals(), use_bin_type=True))
        return merge([msgpack.unpackb(b, raw=False, strict_map_key=False) for b in packed])

    def totals(self) -> dict[str, Any]:
        """This rank's counters as a JSON-ready dict."""
        return {
            "rank": self.rank,
            "sent": self.sent(),
            "by_phase": {k: dict(v) for k, v in sorted(self.by_phase.items())},
            "by_link": {k: dict(v) for k, v in sorted(self.by_link.items())},
            "by_class": _by_class(self.by_phase),
            "seconds": dict(sorted(self.seconds.items())),
            "sizes": _sizes_json(self.sizes),
        }


def merge(per_rank: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sum the :meth:`Meter.totals` of all ranks into job totals.

    Returns:
        dict with ``sent`` (all ranks), ``by_phase``, ``by_link``, ``by_class`` (``intra`` and
        ``inter``, see :func:`link_class`), ``seconds`` and
        ``sizes`` (``{phase: {bin: [messages, bytes]}}``, see :func:`size_bin`) summed
        over ranks, ``per_rank`` (the inputs, by rank), and ``received_by_rank`` /
        ``sent_by_rank`` (bytes per rank; for a parameter server, rank 0's inbound and
        outbound traffic).
    """
    sent = _zero()
    by_phase: defaultdict[str, Counts] = defaultdict(_zero)
    by_link: defaultdict[str, Counts] = defaultdict(_zero)
    seconds: defaultdict[str, float] = defaultdict(float)
    sizes: defaultdict[str, SizeBins] = defaultdict(dict)
    received: defaultdict[int, int] = defaultdict(int)
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
        for k, v in t.get("sizes", {}).items():
            _add_sizes(sizes[k], v)
    return {
        "n_ranks": len(per_rank),
        "sent": sent,
        "by_phase": {k: dict(v) for k, v in sorted(by_phase.items())},
        "by_link": {k: dict(v) for k, v in sorted(by_link.items())},
        "by_class": _by_class(by_phase),
        "seconds": dict(sorted(seconds.items())),
        "sizes": _sizes_json(sizes),
        "sent_by_rank": {t["rank"]: t["sent"]["bytes"] for t in per_rank},
        "received_by_rank": dict(sorted(received.items())),
        "per_rank": sorted(per_rank, key=lambda t: t["rank"]),
    }
