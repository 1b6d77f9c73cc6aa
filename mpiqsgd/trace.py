"""Per-rank timelines in Chrome trace format (``trace.json``; Perfetto, chrome://tracing).

A :class:`Tracer` attached to a rank's :class:`~mpiqsgd.meter.Meter` turns every timed
block of a sampled step into one complete event (``"ph": "X"``, ``ts`` / ``dur`` in
microseconds): ``cat`` is the meter phase (``compute``, ``encode``, ``communicate``,
``decode``, ``wait``, ``update``, ``eval``; ``exchange`` for a bucket's whole
aggregate call, ``checkpoint``), ``name`` says what ran (``send``, ``recv``,
``sendrecv``, ``allreduce``, ``bucket 3`` ...), and ``args`` carry the message phase,
peer and bytes, the bucket (stream) and the step. ``pid`` is the rank, ``tid`` the
thread: 0 the training thread, 1 the communication thread of ``--overlap``.
Evaluations and checkpoints are recorded whatever the step.

Steps to sample (``--trace-steps``): comma-separated items, each a step ``N``, a range
``A-B`` (inclusive) or ``*/N`` (every N-th step, from 0); ``all``; empty: off.

Timestamps are wall-clock (``time.time`` at the tracer's start plus ``perf_counter``),
so ranks on one host line up exactly and ranks on several hosts as well as their clocks
agree. :func:`write_trace` gathers every rank's events to rank 0 (uncounted control
traffic) at the end of a run and writes one file.

Cost: recording an event is a tuple append under a lock (about a microsecond); the
tracer times its own bookkeeping and ``otherData`` in the file says how much it was
(``recording_seconds_by_rank``, ``recording_microseconds_per_event``). Without a tracer
the meter tests one attribute per timed block.
"""

import json
import threading
import time

import msgpack

from .errors import ConfigError
from .fileio import atomic_write_bytes

__all__ = ["Tracer", "parse_steps", "write_trace", "chrome_events", "ALWAYS"]

ALWAYS = ("eval", "checkpoint")  # categories traced whatever the step
COMM_THREAD = "mpiqsgd-comm"  # the name of exchange.py's communication thread


def parse_steps(spec):
    """The step sampler of a ``--trace-steps`` value: a predicate on steps, or None when off.

    Raises:
        ConfigError: an item that is not ``N``, ``A-B``, ``*/N`` or ``all``.
    """
    spec = (spec or "").strip()
    if not spec or spec in ("0", "off", "none"):
        # "0" is off, not step 0 ("0-0" traces step 0): the flag's default reads as off.
        return None
    if spec == "all":
        return lambda step: True
    singles, ranges, every = set(), [], []
    for item in (s.strip() for s in spec.split(",")):
        try:
            if item.startswith("*/"):
                every.append(int(item[2:]))
                if every[-1] < 1:
                    raise ValueError
            elif "-" in item:
                a, b = (int(x) for x in item.split("-", 1))
                if a < 0 or b < a:
                    raise ValueError
                ranges.append((a, b))
            else:
                singles.add(int(item))
        except ValueError:
            raise ConfigError(f"--trace-steps: {item!r} is not a step N, a range A-B or */N (every N-th step); "
                              f"got {spec!r}") from None
    return lambda step: step in singles or any(a <= step <= b for a, b in ranges) or any(step % n == 0 for n in every)


class Tracer:
    """Span recorder of one rank (attach as ``meter.tracer``).

    Args:
        rank: the ``pid`` of this rank's events.
        sampled: predicate on steps (from :func:`parse_steps`).
    """

    def __init__(self, rank, sampled):
        self.rank = rank
        self.sampled = sampled
        self.offset = time.time() - time.perf_counter()  # perf_counter -> wall clock seconds
        self.events = []  # (tid, category, name, start, end, step, args)
        self.threads = {}  # thread ident -> (tid, name)
        self.recording_seconds = 0.0  # time spent in add(): the tracer's own cost
        self._lock = threading.Lock()
        self._last = (None, False)  # (step, sampled(step)): one predicate call per step

    def _tid(self):
        ident = threading.get_ident()
        found = self.threads.get(ident)
        if found is None:
            comm = threading.current_thread().name == COMM_THREAD
            taken = {t for t, _ in self.threads.values()}
            tid = 1 if comm else 0
            while tid in taken:
                tid += 2
            name = "communication" if comm else "training" if tid == 0 else threading.current_thread().name
            found = self.threads[ident] = (tid, name)
        return found[0]

    def add(self, step, category, name, start, end, args):
        """Record one span (``start`` / ``end`` from ``perf_counter``) if ``step`` is sampled."""
        t0 = time.perf_counter()
        last_step, keep = self._last
        if step != last_step:
            keep = bool(self.sampled(step))
            self._last = (step, keep)
        if keep or category in ALWAYS:
            with self._lock:
                self.events.append((self._tid(), category, name, start, end, step, args))
                self.recording_seconds += time.perf_counter() - t0

    def state(self):
        """This rank's events, packed for :func:`write_trace`."""
        off = self.offset
        return {"rank": self.rank, "recording_seconds": self.recording_seconds,
                "threads": sorted(self.threads.values()),
                "events": [(tid, cat, name, (s + off) * 1e6, (e - s) * 1e6, step, args)
                           for tid, cat, name, s, e, step, args in self.events]}


def chrome_events(states):
    """Chrome trace events (metadata first, times from the earliest event) of the ranks' :meth:`Tracer.state`."""
    starts = [ev[3] for st in states for ev in st["events"]]
    origin = min(starts) if starts else 0.0
    out = []
    for st in sorted(states, key=lambda s: s["rank"]):
        pid = st["rank"]
        out.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": f"rank {pid}"}})
        out.append({"name": "process_sort_index", "ph": "M", "pid": pid, "args": {"sort_index": pid}})
        for tid, name in st["threads"]:
            out.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}})
        for tid, cat, name, ts, dur, step, args in st["events"]:
            out.append({"name": name, "cat": cat, "ph": "X", "ts": round(ts - origin, 3), "dur": round(dur, 3),
                        "pid": pid, "tid": tid, "args": {"step": step, **args}})
    return out


def write_trace(meter, transport, path):
    """Gather every rank's events and write ``path`` on rank 0 (collective; a no-op without a tracer).

    Returns:
        the number of events written (rank 0), None elsewhere or without a tracer.
    """
    if meter.tracer is None:
        return None
    packed = msgpack.packb(meter.tracer.state(), use_bin_type=True)
    states = [msgpack.unpackb(b, raw=False, strict_map_key=False) for b in transport.allgather_bytes(packed)]
    if transport.rank != 0:
        return None
    events = chrome_events(states)
    n = sum(len(s["events"]) for s in states)
    other = {"producer": "mpiqsgd", "events": n,
             "recording_seconds_by_rank": {s["rank"]: s["recording_seconds"] for s in states},
             "recording_microseconds_per_event": (1e6 * sum(s["recording_seconds"] for s in states) / n) if n else None}
    atomic_write_bytes(path, json.dumps({"traceEvents": events, "displayTimeUnit": "ms", "otherData": other},
                                        separators=(",", ":")).encode())
    return n
