"""Projected exchange and step time of every topology on p = 2 .. 1,024 nodes (``mpiqsgd project``).

A model, calibrated by measurements, of one exchange of ``numel`` float32 coordinates between p
nodes, each with its own full-duplex link to a switch (``hub=True``: one link shared by all). It
replays each topology's message schedule (the module docstrings of :mod:`mpiqsgd.topology`) on
rank 0 and adds the codec's CPU time. What is modelled, exactly:

1. **Link.** A message of ``b`` bytes takes ``alpha + b / (beta * payload_fraction)`` seconds on a
   node's link (:class:`~mpiqsgd.linkmodel.Link`: ``alpha`` from ``RATE@LATENCY``, ``--link-model``
   or ``--latency``; ``beta`` the rate; ``payload_fraction`` the share of the rate left for TCP
   payload: 1448 of 1538 bytes on Ethernet, 1448 of 1514 under ``tc tbf``); a message above
   :data:`EAGER_BYTES` pays MPI's rendezvous handshake, ``3 alpha`` in all. A node's messages are
   serialized on its link, sending and receiving at once (full duplex). On a hub a phase in which
   k nodes send at once takes k times its bytes' time. Bytes per message are exact:
   ``codec.encoded_nbytes`` of each chunk (:func:`~mpiqsgd.topology.chunk_bounds`), and each
   topology's bytes per rank equal its own ``sent_nbytes`` (tested).
2. **MPI's allreduce** (the fp32 baseline, ``intsum``'s scales and pieces), as MPICH runs large
   messages (reduce-scatter + allgather, recursive halving and doubling): ``2 ceil(log2 p)``
   messages and ``2 (p-1)/p`` of the buffer on each link, then the reduction of ``(p-1)/p`` of it
   at the fp32-add rate, not overlapped; the fp32 baseline also fills its result and divides by p.
3. **CPU.** Per-core rates in coordinates per second (:class:`Rates`): the codec's encode and
   decode into a new array, fp32 add, copy, first touch of a fresh result, bucket norms, and
   ``intsum``'s pack and unpack. Every CPU phase is slowed by ``max(1, R / C)`` for R ranks on C
   cores per node, or ``max(1, p R / cores)`` when one machine of ``cores`` cores runs all ranks
   (the emulated cluster). Per topology, rank 0's work:

   - ``scatter``, message by message, in pieces of ``piece_numel`` coordinates (one a chunk at 0):
     encode the n-1 other chunks' pieces, piece-major, each sent when encoded and the link is free;
     then, as contributions to its own chunk arrive (the m-th at the time its own m-th message left:
     every rank runs the same schedule on a full-duplex link), decode each, encode and decode its own
     piece at its first contribution, and once a piece has all n: clone + (n-1) adds + divide, encode
     and decode that piece of the mean, send it to n-1 ranks; last, decode and copy the n-1 ranks'
     pieces of the mean as they arrive (the m-th when its own m-th mean message left).
   - ``ring``: n-1 blocking hops of encode, sendrecv, decode and add; encode and decode the owned
     mean; n-1 blocking hops of sendrecv, decode and copy. Nothing overlaps.
   - ``allgather``: encode and decode its gradient; n-1 blocking hops of a whole encoded gradient;
     decode n-1 gradients; clone + (n-1) adds + divide.
   - ``ps`` (fp32 downlink): workers encode and push; the root decodes each push as it arrives,
     sums, and sends the fp32 mean to n-1 workers one after another (the last one's wait counts).
   - ``intsum``: bucket norms and an allreduce MAX of them; the pipeline: piece k's allreduce
     SUM starts as soon as it is packed, while piece k+1 is packed; the pieces in flight share the
     link equally (the driver thread keeps every ``MPI_Iallreduce`` going at once), so the link is
     busy from the first packed piece on; once all are packed, each summed piece is unpacked in
     the order they complete (per piece max(link, CPU), plus the first pack as fill and the
     unpacks of the pieces that complete together at the end as drain).
   - ``allreduce``: the fp32 baseline of 2.

   With R ranks per node the exchange is hierarchical (fp32 inside the node over shared memory at
   the copy rate: (R-1) copies and adds into the leader, (R-1) copies back), the fp32 baseline too.
4. **Step** = compute + exchange (``overlap=True``: max(compute, exchange), a lower bound).

Not modelled: propagation delay beyond alpha, congestion and incast beyond a link's serialization,
TCP slow start, tbf's burst, waiting for the slowest rank, error feedback's extra passes, the
codec's per-message framing CPU, MPI's extra steps for a p that is not a power of two, and the
kernel's own network processing, which shares the cores on an emulated cluster.
"""

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ConfigError

__all__ = ["Rates", "BUILTIN_RATES", "Scenario", "TOPOLOGY_NAMES", "parse_nodes", "builtin_rates", "rates_from_bench",
           "measure_rates", "exchange", "project", "format_tables", "plot", "add_project_args", "run_project",
           "ETHERNET_PAYLOAD", "TBF_PAYLOAD", "EAGER_BYTES"]

TOPOLOGY_NAMES = ("allreduce", "scatter", "ring", "allgather", "intsum", "ps")
ETHERNET_PAYLOAD = 1448 / 1538  # TCP payload of a 1500-byte MTU frame with timestamps, preamble and gap
TBF_PAYLOAD = 1448 / 1514  # the same under tc tbf, which counts the frame from its Ethernet header
MAX_NODES = 1 << 16
EAGER_BYTES = 64 * 1024  # above this, a message pays MPI's rendezvous handshake (an assumption: MPICH's varies)


@dataclass
class Rates:
    """Per-core speeds in coordinates per second (one thread), with where each came from."""

    encode: float  # the codec's encode into a reused buffer
    decode: float  # the codec's decode into a new array (as the topologies decode)
    add: float  # fp32 a += b, memory-bound
    copy: float  # fp32 copy into an existing array
    fill: float  # first touch of a fresh result (page faults)
    norms: float  # QSGD bucket norms (intsum's scales)
    int_encode: float  # intsum: quantize and pack into summable words
    int_unpack: float  # intsum: check, unpack and scale the summed words
    source: dict = field(default_factory=dict)  # rate name -> where it came from


# Built-in per-core rates (million coordinates per second, one thread), with their sources.
_DOC_CODECS = "docs/bench-2026-12-01/all-{1,2,3}.json.gz (bench codec --all, 1-thread rows, median of 3 runs; " \
              "Intel Xeon 2-core VM)"
_DOC_INTSUM = "trace-intsum-2.json of docs/bench-2026-12-06 session 2 (rank 0's piece encodes and unpacks, " \
              "2 emulated nodes; AMD EPYC 2-core VM)"
_MEASURED = "measured 2026-12-07 on the AMD EPYC 2-core VM under other users' load (12.5M coordinates, 1 thread, " \
            "best of 7)"
BUILTIN_RATES = {
    "codec": {("qsgd", 4): (721e6, 996e6), ("qsgd", 2): (745e6, 1044e6), ("qsgd", 3): (690e6, 954e6),
              ("qsgd", 8): (684e6, 929e6), ("qsgd-inf", 4): (717e6, 970e6), ("sign", None): (501e6, 1172e6),
              ("fp32", None): (786e6, 1290e6), ("terngrad", 2): (667e6, 1001e6), ("nuqsgd", 3): (531e6, 723e6),
              ("alq", 3): (534e6, 721e6)},
    "copy": (1700e6, _DOC_CODECS + ": memcpy"),
    "fill": (1790e6, "docs/benchmarks.md: 13-15 ms to fill a fresh 100 MB numpy result"),
    "add": (1530e6, _MEASURED),
    "norms": (3900e6, _DOC_INTSUM),
    "int_encode": (750e6, _DOC_INTSUM),
    "int_unpack": (850e6, _DOC_INTSUM),
}


def _codec_key(codec):
    base = codec.base
    name = {"QSGD": "qsgd-inf" if getattr(base, "norm", "l2") == "max" else "qsgd"}.get(type(base).__name__, base.name)
    return name, base.params.get("bits") if name not in ("sign", "fp32") else None


def _rates(encode, decode, codec_source, **over):
    keys = ("copy", "fill", "add", "norms", "int_encode", "int_unpack")
    values = {k: over.get(k, BUILTIN_RATES[k])[0] for k in keys}
    source = {"encode": codec_source, "decode": codec_source}
    source.update({k: over.get(k, BUILTIN_RATES[k])[1] for k in keys})
    return Rates(encode=encode, decode=decode, source=source, **values)


def builtin_rates(codec):
    """The built-in :class:`Rates` of ``codec`` (a :class:`ConfigError` for a codec not in the table)."""
    key = _codec_key(codec)
    if key not in BUILTIN_RATES["codec"] or codec.base.params.get("encoding", "dense") != "dense":
        known = ", ".join(f"{n}{'' if b is None else f' {b}-bit'}" for n, b in BUILTIN_RATES["codec"])
        raise ConfigError(f"--codec-rate builtin: no built-in rates for {codec!r} (known: {known}); give "
                          "--codec-rate FILE (`mpiqsgd bench codec --json`) or --codec-rate measure")
    enc, dec = BUILTIN_RATES["codec"][key]
    return _rates(enc, dec, "built-in: " + _DOC_CODECS)


def rates_from_bench(path, codec):
    """:class:`Rates` whose encode and decode come from ``mpiqsgd bench codec [--all] --json`` output at
    ``path`` (its 1-thread scaling row where present; the new-array decode); the rest built-in."""
    try:
        data = json.loads(Path(path).read_text())
        results = data["results"] if data.get("benchmark") == "codec-all" else [data]
        match = [r for r in results if r["codec"] == repr(codec)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--codec-rate {path}: not a `mpiqsgd bench codec --json` output ({exc})") from None
    if not match:
        raise ConfigError(f"--codec-rate {path}: holds no result for {codec!r} "
                          f"(it has {', '.join(r.get('codec', '?') for r in results)})")
    r = match[0]
    one = [s for s in r.get("scaling") or [] if s["threads"] == 1]
    timing, threads = (one[0], 1) if one else (r, r.get("machine", {}).get("torch_threads", "?"))
    numel = r["numel"]
    return _rates(numel / timing["encode_seconds"], numel / timing["decode_new_seconds"],
                  f"{path} ({threads} thread(s), {r.get('machine', {}).get('cpu_model') or 'cpu'})")


def measure_rates(codec, numel=8_000_000, repeats=5):
    """:class:`Rates` measured now on this machine, one thread, best of ``repeats`` (a few seconds)."""
    import numpy as np
    import torch

    from . import wire
    from .codecs import make_generator, summable
    from .codecs.kernels import set_kernel_threads
    from .codecs.buckets import checked_norms
    from .codecs.qsgd import QSGD, max_norm
    from .topology.base import empty_like

    old = set_kernel_threads(1), torch.get_num_threads()
    torch.set_num_threads(1)

    def best(fn):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return numel / min(times)

    try:
        x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
        y = torch.randn(numel, generator=torch.Generator().manual_seed(1))
        out = np.empty((codec.encoded_nbytes(numel) or 4 * numel) + wire.SLACK, dtype=np.uint8)
        rng = make_generator(0, 0, 0)
        received = np.frombuffer(bytearray(codec.encode(x, rng, out=out)), dtype=np.uint8)
        measured = {"copy": best(lambda: y.copy_(x)), "fill": best(lambda: empty_like(x).fill_(0)),
                    "add": best(lambda: y.add_(x))}
        encode, decode = best(lambda: codec.encode(x, rng, out=out)), best(lambda: codec.decode(received, "cpu", numel))
        base = codec.base
        if isinstance(base, QSGD) and base.encoding == "dense":
            norms = checked_norms(x, base.bucket, base.norm, base.name, max_norm(base.levels))
            measured["norms"] = best(lambda: checked_norms(x, base.bucket, base.norm, base.name, max_norm(base.levels)))
            layout = summable.SummableLayout(base.levels, 8)
            scale, unit = summable.bucket_scales(norms, base.levels)
            words, result = np.zeros(layout.n_words(numel), np.uint64), np.empty(numel, np.float32)
            chunks, mean_unit = layout.n_chunks(numel), (unit / 8).numpy()
            measured["int_encode"] = best(lambda: summable.encode_words(x, scale, unit, base.bucket, layout, 1, True,
                                                                        words, 0, chunks))
            words[:] = 0
            measured["int_unpack"] = best(lambda: summable.unpack_mean(words, mean_unit, base.bucket, layout, result,
                                                                       0, chunks))
    finally:
        set_kernel_threads(old[0])
        torch.set_num_threads(old[1])
    label = f"measured now ({numel:,} coordinates, 1 thread, best of {repeats})"
    return _rates(encode, decode, label, **{k: (v, label) for k, v in measured.items()})


def parse_nodes(text):
    """Node counts of ``--nodes``: ``A-B`` (the powers of two from A to B, and A and B), or ``A,B,C``."""
    try:
        if "-" in text:
            lo, hi = (int(v) for v in text.split("-"))
            if lo > hi:
                raise ValueError
            nodes = {lo, hi} | {1 << k for k in range(lo.bit_length(), hi.bit_length()) if lo <= 1 << k <= hi}
        else:
            nodes = {int(v) for v in text.split(",") if v.strip()}
    except ValueError:
        raise ConfigError(f"--nodes: {text!r} is not a range like 2-1024 or a list like 2,4,8") from None
    if not nodes or min(nodes) < 2 or max(nodes) > MAX_NODES:
        raise ConfigError(f"--nodes: node counts must be between 2 and {MAX_NODES}; got {text!r}")
    return sorted(nodes)


@dataclass
class Scenario:
    """What the projection runs on: the gradient, the codec, the link, the nodes' cores."""

    numel: int
    codec: object  # the codec (fp32 for the baseline is built in)
    link: object  # linkmodel.Link (alpha seconds, beta bytes per second of the rate)
    rates: Rates
    payload_fraction: float = ETHERNET_PAYLOAD
    hub: bool = False  # one link shared by all nodes instead of one each
    ranks_per_node: int = 1
    cores_per_node: float = None  # None: a core per rank
    cores: float = None  # one machine of this many cores runs every rank (an emulated cluster)
    compute_seconds: float = 0.0
    overlap: bool = False
    piece_numel: int = None  # scatter and intsum: coordinates a message (a pipelined allreduce) holds; None: default

    def slowdown(self, p):
        """Factor by which CPU phases slow when ranks share cores."""
        if self.cores:
            return max(1.0, p * self.ranks_per_node / self.cores)
        return max(1.0, self.ranks_per_node / (self.cores_per_node or self.ranks_per_node))


class _Rank:
    """Rank 0's account of one exchange: CPU and link seconds, bytes and messages sent."""

    def __init__(self, sc, p):
        self.sc, self.p, self.s = sc, p, sc.slowdown(p)
        self.cpu = self.link = 0.0
        self.bytes = self.messages = 0

    def work(self, numel, rate):
        """CPU seconds of ``numel`` coordinates at ``rate`` (a :class:`Rates` field name)."""
        t = self.s * numel / getattr(self.sc.rates, rate)
        self.cpu += t
        return t

    def latency(self, nbytes):
        """alpha of one message; above the eager limit MPI's rendezvous adds a handshake round trip."""
        return self.sc.link.alpha * (3 if nbytes > EAGER_BYTES else 1)

    def send(self, nbytes, senders=1, count=True):
        """Link seconds of one message of ``nbytes`` while ``senders`` nodes send alike (a hub sums them)."""
        link = self.sc.link
        t = self.latency(nbytes) + nbytes * (senders if self.sc.hub else 1) / (link.beta * self.sc.payload_fraction)
        self.link += t
        if count:
            self.bytes += nbytes
            self.messages += 1
        return t

    def allreduce(self, numel, itemsize, coord_cost=1.0):
        """MPICH's large-message allreduce of ``numel`` items: link and reduction, not overlapped."""
        from .transport import allreduce_nbytes

        p = self.p
        nbytes = allreduce_nbytes(numel, p, itemsize)
        steps = 2 * math.ceil(math.log2(p))
        link = self.sc.link
        on_link = nbytes * (p if self.sc.hub else 1) / (link.beta * self.sc.payload_fraction)
        t = steps * self.latency(nbytes / steps) + on_link
        self.link += t
        self.bytes += nbytes
        self.messages += steps
        return t + self.work(coord_cost * numel * (p - 1) / p, "add")


def _shared(ready, work):
    """Completion times of transfers that start at ``ready`` and need ``work`` seconds of one link, all
    in flight at once sharing it equally (processor sharing): ``intsum``'s concurrent ``MPI_Iallreduce`` s."""
    left = dict(enumerate(work))
    done, now, order = {}, 0.0, sorted(range(len(ready)), key=lambda k: ready[k])
    arrived = []
    while len(done) < len(work):
        if not arrived:
            k = order.pop(0)
            now = max(now, ready[k])
            arrived.append(k)
            continue
        k = min(arrived, key=lambda j: left[j])
        finish = now + left[k] * len(arrived)
        nxt = ready[order[0]] if order else math.inf
        if nxt < finish:  # a new transfer joins before the next one ends
            for j in arrived:
                left[j] -= (nxt - now) / len(arrived)
            now = nxt
            arrived.append(order.pop(0))
            continue
        served = left[k]
        for j in arrived:
            left[j] -= served
        now = finish
        arrived.remove(k)
        done[k] = now
    return done


def _chunks(numel, p):
    from .topology import chunk_bounds

    return [b - a for a, b in chunk_bounds(numel, p)]


def _scatter(r, numel, codec):
    """Rank 0 of the pipelined scatter (:class:`~mpiqsgd.topology.ring.Scatter`), replayed message by message.

    Every rank runs the same schedule, so the m-th message into rank 0 is taken to arrive when rank 0's own
    m-th message of that phase has left (its link is full duplex and carries as many bytes in as out)."""
    from .topology import make_aggregator
    from .topology.hierarchical import LeaderShape

    p = r.p
    agg = make_aggregator("scatter", LeaderShape(p), codec, **_piece_option(r.sc))
    layout = [[b - a for a, b in agg.pieces(size)] for size in _chunks(numel, p)]
    cpu = up = 0.0

    def send(c):  # a message of c coordinates leaves when it is made and the link is free
        nonlocal up
        up = max(up, cpu) + r.send(codec.encoded_nbytes(c), p)
        return up

    out = []
    for c in _piece_major(layout, range(1, p)):  # piece k for every peer, then piece k + 1
        cpu += r.work(c, "encode")
        out.append(send(c))
    mine, have, done, mean = layout[0], [0] * len(layout[0]), 0, []
    incoming = [k for k in range(len(mine)) for _ in range(p - 1)]  # piece-major over the p - 1 sources
    for m, k in enumerate(incoming):
        c = mine[k]
        cpu = max(cpu, out[min(m, len(out) - 1)]) + r.work(c, "decode")
        while done <= k:  # own piece encoded (and decoded) when its first contribution arrives
            cpu += r.work(mine[done], "encode") + r.work(mine[done], "decode")
            done += 1
        have[k] += 1
        if have[k] == p - 1:  # sum in rank order, divide, encode the mean once, send it to every peer
            cpu += r.work(c, "copy") + r.work((p - 1) * c, "add") + r.work(c, "add")
            cpu += r.work(c, "encode") + r.work(c, "decode") + r.work(c, "copy")
            mean.extend(send(c) for _ in range(p - 1))
    for m, c in enumerate(_piece_major(layout, range(1, p))):  # the pieces of the mean, decoded as they arrive
        cpu = max(cpu, mean[min(m, len(mean) - 1)]) + r.work(c, "decode") + r.work(c, "copy") + r.work(c, "fill")
    return max(cpu, up)


def _piece_major(layout, ranks):
    """Sizes of the pieces of ``ranks``' chunks in the order Scatter sends and receives them
    (:func:`~mpiqsgd.topology.ring.piece_major`: piece 0 of each, then piece 1...)."""
    from .topology.ring import piece_major

    taken = dict.fromkeys(ranks, 0)
    sizes = []
    for c in piece_major(layout, ranks):
        sizes.append(layout[c][taken[c]])
        taken[c] += 1
    return sizes


def _piece_option(sc):
    return {} if sc.piece_numel is None else {"piece_numel": sc.piece_numel}


def _ring(r, numel, codec):
    p, sizes = r.p, _chunks(numel, r.p)
    t = 0.0
    for k in range(p - 1):  # reduce-scatter: rank 0 sends its running sum of chunk -k, receives chunk -k-1
        c, recv = sizes[-k % p], sizes[(-k - 1) % p]
        t += r.work(c, "encode") + r.send(codec.encoded_nbytes(c), p) + r.work(recv, "decode") + r.work(recv, "add")
    owned = sizes[1 % p]
    t += r.work(owned, "add") + r.work(owned, "encode") + r.work(owned, "decode")
    for k in range(p - 1):  # allgather: forward chunk (1 - k), receive chunk (-k)
        c, recv = sizes[(1 - k) % p], sizes[-k % p]
        t += r.send(codec.encoded_nbytes(c), p) + r.work(recv, "decode") + r.work(recv, "copy") + r.work(recv, "fill")
    return t


def _allgather(r, numel, codec):
    p = r.p
    t = r.work(numel, "encode") + r.work(numel, "decode")
    t += sum(r.send(codec.encoded_nbytes(numel), p) for _ in range(p - 1))
    t += r.work((p - 1) * numel, "decode") + r.work(numel, "copy") + r.work(numel, "fill")
    return t + r.work(p * numel, "add")  # p - 1 adds and the divide


def _ps(r, numel, codec):
    """The root's account: pushes arrive one after another on its link; the fp32 pulls leave the same way."""
    from .codecs.fp import FP32

    p = r.p
    push = codec.encoded_nbytes(numel)
    worker_encode = r.s * numel / r.sc.rates.encode  # the workers' encode, beside the root's own
    arrivals = [worker_encode + (k + 1) * r.send(push, 1, count=False) for k in range(p - 1)]
    t = r.work(numel, "encode") + r.work(numel, "decode")
    for a in arrivals:
        t = max(t, a) + r.work(numel, "decode")
    t += r.work(numel, "copy") + r.work(p * numel, "add")
    return t + sum(r.send(FP32().encoded_nbytes(numel), 1) for _ in range(p - 1))


def _intsum(r, numel, codec):
    from .topology import make_aggregator
    from .topology.hierarchical import LeaderShape

    base = codec.base
    agg = make_aggregator("intsum", LeaderShape(r.p), codec, **_piece_option(r.sc))
    t = r.work(numel, "norms") + r.allreduce(-(-numel // base.bucket), 4)
    produce, links, consume = [], [], []
    for c0, c1 in agg.pieces(numel):
        start, stop = agg.layout.chunk_coords(c0, c1, numel)
        w0, w1 = agg.layout.chunk_words(c0, c1, numel)
        produce.append(r.work(stop - start, "int_encode"))
        links.append(r.allreduce(w1 - w0, 8, coord_cost=2.0))  # a uint64 word costs two fp32 adds
        consume.append(r.work(stop - start, "int_unpack"))
    ready = [t + sum(produce[:k + 1]) for k in range(len(produce))]
    t = ready[-1]
    for when, k in sorted((when, k) for k, when in _shared(ready, links).items()):  # unpacked as they complete
        t = max(t, when) + consume[k]
    return t


def _fp32_allreduce(r, numel, codec):
    return r.allreduce(numel, 4) + r.work(numel, "fill") + r.work(numel, "add")


_MODELS = {"allreduce": _fp32_allreduce, "scatter": _scatter, "ring": _ring, "allgather": _allgather, "ps": _ps,
           "intsum": _intsum}


def _intra(r, numel):
    """The hierarchical exchange's fp32 phases inside a node (shared memory): reduce to the leader, bcast."""
    k = r.sc.ranks_per_node - 1
    return r.work(k * numel, "copy") + r.work(k * numel, "add") + r.work(numel, "add") + r.work(k * numel, "copy")


def exchange(topology, p, sc):
    """Projected seconds of one exchange of ``sc.numel`` coordinates on ``p`` nodes.

    Returns:
        dict: ``exchange_seconds``, ``cpu_seconds`` and ``link_seconds`` (rank 0's, summed over the
        exchange; overlap makes the exchange shorter than their sum), ``bytes_per_rank`` and
        ``messages_per_rank`` rank 0 sends between nodes, ``cpu_slowdown``; None where the topology
        does not take the codec (``intsum`` takes dense QSGD only).
    """
    from .codecs import summable
    from .codecs.fp import FP32

    codec = FP32() if topology == "allreduce" else sc.codec
    if topology == "intsum":
        try:
            summable.check_codec(codec, "intsum")
        except ConfigError:
            return None
    r = _Rank(sc, p)
    seconds = _MODELS[topology](r, sc.numel, codec)
    if sc.ranks_per_node > 1:
        seconds += _intra(r, sc.numel)
    return {"exchange_seconds": seconds, "cpu_seconds": r.cpu, "link_seconds": r.link, "bytes_per_rank": r.bytes,
            "messages_per_rank": r.messages, "cpu_slowdown": r.s}


def project(sc, nodes, topologies=TOPOLOGY_NAMES):
    """Rows of the projection: one per node count and topology, with step time and speedups against
    the fp32 allreduce (exchange and step)."""
    rows = []
    for p in nodes:
        base = exchange("allreduce", p, sc)
        base_step = _step(sc, base["exchange_seconds"])
        for name in ("allreduce",) + tuple(t for t in topologies if t != "allreduce"):
            x = base if name == "allreduce" else exchange(name, p, sc)
            if x is None:
                rows.append({"nodes": p, "topology": name, "exchange_seconds": None,
                             "note": "takes dense qsgd/qsgd-inf only"})
                continue
            step = _step(sc, x["exchange_seconds"])
            rows.append({"nodes": p, "topology": name, **x, "step_seconds": step,
                         "speedup_exchange": base["exchange_seconds"] / x["exchange_seconds"],
                         "speedup_step": base_step / step})
    return rows


def _step(sc, seconds):
    return max(sc.compute_seconds, seconds) if sc.overlap else sc.compute_seconds + seconds


def format_tables(rows, sc, topologies):
    """Fixed-width text: exchange seconds and step seconds per node count (rows) and topology (columns)."""
    names = ["allreduce"] + [t for t in topologies if t != "allreduce"]
    by = {(r["nodes"], r["topology"]): r for r in rows}
    nodes = sorted({r["nodes"] for r in rows})
    out = []
    for key, title in (("exchange_seconds", "exchange seconds (speedup vs fp32 allreduce)"),
                       ("step_seconds", f"step seconds = compute {sc.compute_seconds * 1e3:g} ms "
                                        f"{'overlapped with' if sc.overlap else '+'} exchange (speedup vs fp32)")):
        speed = "speedup_exchange" if key == "exchange_seconds" else "speedup_step"
        out.append(title)
        out.append(f"{'nodes':>6} " + " ".join(f"{n:>17}" for n in names))
        for p in nodes:
            cells = []
            for n in names:
                r = by.get((p, n))
                cells.append(f"{'n/a':>17}" if not r or r["exchange_seconds"] is None else
                             f"{r[key]:9.4f} ({r[speed]:5.2f}x)")
            out.append(f"{p:>6} " + " ".join(cells))
        out.append("")
    return "\n".join(out)


def plot(rows, sc, path, topologies):
    """Step time against nodes (log x and y), one line per topology; ConfigError when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(f"--plot {path}: matplotlib is not installed (pip install matplotlib); the tables "
                          "above were printed") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in ["allreduce"] + [t for t in topologies if t != "allreduce"]:
        pts = [(r["nodes"], r["step_seconds"]) for r in rows if r["topology"] == name and r.get("step_seconds")]
        if pts:
            ax.plot(*zip(*pts), marker="o", label="fp32 allreduce" if name == "allreduce" else name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("nodes")
    ax.set_ylabel("step seconds (projected)")
    ax.set_title(f"{sc.codec!r}"[:60] + f"\n{sc.numel:,} coords, {sc.link.label}{' hub' if sc.hub else ''}, "
                 f"compute {sc.compute_seconds * 1e3:g} ms", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- command line

def add_project_args(p):
    """Flags of ``mpiqsgd project``."""
    from .options import CodecOptions, TopologyOptions, add_fields

    add_fields(p, CodecOptions)
    p.add_argument("--numel", type=int, default=25_000_000, help="coordinates of the gradient (default 25M)")
    p.add_argument("--link", default="1gbit", help="each node's link: RATE[@LATENCY], e.g. 10gbit, 1gbit@50us")
    p.add_argument("--latency", default="50us", help="alpha when neither --link's @LATENCY nor --link-model gives "
                                                     "one (default 50us)")
    p.add_argument("--link-model", metavar="FILE", help="alpha from `mpiqsgd bench exchange --sweep --out FILE`")
    p.add_argument("--payload-fraction", type=float, default=ETHERNET_PAYLOAD,
                   help=f"share of the rate TCP payload gets (default {ETHERNET_PAYLOAD:.4f}, Ethernet; "
                        f"tc tbf: {TBF_PAYLOAD:.4f})")
    p.add_argument("--nodes", default="2-1024", help="node counts: A-B (powers of two, and A and B) or A,B,C")
    p.add_argument("--topology", default="all", help=f"comma-separated of {', '.join(TOPOLOGY_NAMES)}, or all")
    p.add_argument("--compute-ms", type=float, default=0.0, help="compute time of a step in ms (default 0)")
    p.add_argument("--overlap", action="store_true", help="step = max(compute, exchange) instead of their sum")
    p.add_argument("--codec-rate", default=None, metavar="FILE|measure|builtin",
                   help="codec speed: `mpiqsgd bench codec --json` output, measure now (a few seconds), or the "
                        "built-in table (default: built-in where it has the codec, else measure)")
    p.add_argument("--hub", action="store_true", help="all nodes share one link (else a switch: one link each)")
    p.add_argument("--ranks-per-node", type=int, default=1, help="ranks per node (>1: hierarchical exchange)")
    p.add_argument("--cores-per-node", type=float, help="cores per node (default: one per rank)")
    p.add_argument("--cores", type=float, help="one machine of this many cores runs all ranks (emulated cluster): "
                                               "CPU phases slow by max(1, nodes x ranks-per-node / cores)")
    add_fields(p, TopologyOptions, names=("piece_numel",))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="PNG", help="draw step time against nodes (needs matplotlib)")


def _link(args):
    from .linkmodel import parse_link, parse_time

    model = None
    if args.link_model:
        try:
            model = json.loads(Path(args.link_model).read_text())["fit"]["pingpong"]
            model["alpha_seconds"], model["beta_bytes_per_second"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"--link-model {args.link_model}: not a `bench exchange --sweep` JSON with a fit "
                              f"({exc})") from None
    elif args.link.strip() != "model":  # "model" without --link-model: parse_link says what is missing
        model = {"alpha_seconds": parse_time(args.latency), "beta_bytes_per_second": None}
    return parse_link(args.link, model)


def _topologies(text):
    names = TOPOLOGY_NAMES if text == "all" else tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in names if t not in TOPOLOGY_NAMES]
    if bad or not names:
        raise ConfigError(f"--topology: unknown {', '.join(bad) or repr(text)}; choose from "
                          f"{', '.join(TOPOLOGY_NAMES)} or all")
    return names


def scenario_from_args(args):
    """The :class:`Scenario` and node counts ``mpiqsgd project``'s flags describe."""
    from .options import CodecOptions

    nodes = parse_nodes(args.nodes)
    topologies = _topologies(args.topology)
    for name in ("numel", "ranks_per_node"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    for name in ("cores_per_node", "cores"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive; got {getattr(args, name)}")
    if args.compute_ms < 0 or not 0 < args.payload_fraction <= 1:
        raise ConfigError("--compute-ms must be >= 0 and --payload-fraction in (0, 1]")
    codec = CodecOptions.of(args).build_codec()
    link = _link(args)
    choice = args.codec_rate
    if choice is None:
        try:
            rates = builtin_rates(codec)
        except ConfigError:
            rates = measure_rates(codec)
    elif choice == "builtin":
        rates = builtin_rates(codec)
    elif choice == "measure":
        rates = measure_rates(codec)
    else:
        rates = rates_from_bench(choice, codec)
    sc = Scenario(args.numel, codec, link, rates, args.payload_fraction, args.hub, args.ranks_per_node,
                  args.cores_per_node, args.cores, args.compute_ms / 1e3, args.overlap, args.piece_numel)
    return sc, nodes, topologies


def describe(sc):
    """JSON-ready description of a scenario."""
    return {"numel": sc.numel, "codec": repr(sc.codec), "link": sc.link.label, "alpha_seconds": sc.link.alpha,
            "beta_bytes_per_second": sc.link.beta, "payload_fraction": sc.payload_fraction,
            "network": "hub (one shared link)" if sc.hub else "switch (one full-duplex link per node)",
            "ranks_per_node": sc.ranks_per_node, "cores_per_node": sc.cores_per_node, "cores": sc.cores,
            "compute_seconds": sc.compute_seconds, "overlap": sc.overlap,
            "rates_coords_per_second": {k: v for k, v in asdict(sc.rates).items() if k != "source"},
            "rate_sources": sc.rates.source}


def run_project(args):
    """``mpiqsgd project``: print the projection tables (or JSON), optionally draw the plot."""
    sc, nodes, topologies = scenario_from_args(args)
    rows = project(sc, nodes, topologies)
    if args.json:
        print(json.dumps({"projection": describe(sc), "rows": rows}, indent=1))
    else:
        d = describe(sc)
        share = (f"all ranks on {sc.cores:g} cores" if sc.cores else
                 f"{sc.ranks_per_node} rank(s) per node on {sc.cores_per_node or sc.ranks_per_node:g} core(s)")
        print(f"projection: {d['codec']}, {sc.numel:,} coordinates, {d['network']} at {sc.link.label} "
              f"(alpha {sc.link.alpha * 1e6:g} us, payload {sc.payload_fraction:.3f} of the rate), {share}")
        print("codec rates (M coords/s per core): " + ", ".join(
            f"{k} {v / 1e6:.0f}" for k, v in d["rates_coords_per_second"].items()))
        for src in sorted(set(sc.rates.source.values())):
            print(f"  from {src}: {', '.join(k for k, v in sc.rates.source.items() if v == src)}")
        print()
        print(format_tables(rows, sc, topologies))
    if args.plot:
        plot(rows, sc, args.plot, topologies)
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)

