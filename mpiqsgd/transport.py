"""The only place bytes enter or leave MPI, and the only place they are counted.

Point-to-point messages use buffer calls only (``Isend`` / ``Probe`` + ``Get_count`` /
``Recv`` on ``[buf, MPI.BYTE]``): no pickle on the wire, the receiver learns the
length from the probe, and every message is recorded by the sender's
:class:`~mpiqsgd.meter.Meter` with its header and payload bytes split by
:func:`mpiqsgd.wire.header_nbytes`. Each phase has its own tag, so messages of
different phases never match each other.

``allreduce_sum`` (the fp32 baseline) is one ``MPI.Allreduce``; MPI does not say
what it sends, so each rank records the nominal bandwidth-optimal cost
``floor(2 (n-1) / n * 4 numel)`` bytes with destination -1. ``allreduce_array`` (a numpy
array in place, ``op`` sum or max: the decode-free allreduce's integer words and shared scales)
is counted the same way, ``floor(2 (n-1) / n * nbytes)``. :meth:`Transport.pipeline` starts the
allreduces of an array's pieces as a producer hands them in (:class:`AllreducePipeline`).

Sub-transports (:meth:`Transport.split`): the ranks of one color, a communicator of their own
(``MPI_Comm_split``; a shared sub-group of a :class:`LocalGroup`), sharing the parent's meter,
which records their messages under world ranks (``world_ranks``), so job totals stay per world
rank. Nodes: ``nodes[r]`` is the node of rank ``r`` (0, 1, ... in order of first appearance), from
the host names (``MPI.Get_processor_name()``, or ``MPIQSGD_HOST`` where set: tests force nodes per
rank with it), or ``LocalGroup(size, ranks_per_node)``.

Small control traffic (meters, statistics, initial parameters) goes through
``allgather_bytes`` / ``bcast_bytes`` and is recorded only when given a phase; ``agree_max`` (one
int32 max-allreduce: whether any rank was asked to stop) is never recorded.

:class:`LocalGroup` runs N ranks as threads of one process (``--simulate N``) with
the same interface and the same byte counting, over in-process queues.

The contract is :class:`Transport`, an abstract base class that does the counting, timing and
tracing once for every transport; :class:`MPITransport` and :class:`LocalTransport` implement
only its primitives, which move bytes (``_send``, ``_recv``, ``_allreduce_array``, ...).

The transport alone owns the meter: :meth:`Transport.begin_step` stamps the step on
every record, every counted call (point-to-point messages, the allreduce baseline,
allgathers given a phase) adds its seconds to ``communicate``, and
:meth:`Transport.timed` is how callers time their own phases (``encode``, ``decode``).
When the meter traces (:mod:`mpiqsgd.trace`), each ``communicate`` block is a span named
``send`` / ``recv`` / ``sendrecv`` / ``allreduce`` / ``allgather`` whose arguments are the
message phase, the peer and the bytes; :meth:`Transport.traced` spans a caller's block.

Waiting: MPI libraries poll at full speed inside a blocking call, so a rank waiting
for a message takes a core from the ranks that compute (oversubscribed ranks on a
laptop, or a communication thread beside backward). :class:`MPITransport` therefore
posts non-blocking calls and polls them itself (:class:`Poller`): a short spin, then
sleeps that double from ``POLL_FIRST_SLEEP`` to ``POLL_MAX_SLEEP`` seconds, so a waiting
rank yields its core. ``wait="spin"`` keeps MPI's blocking calls (lowest latency when
every rank has a core of its own).

Deadlines: with ``comm_timeout`` set, every wait of an :class:`MPITransport` (messages,
the allreduce, allgathers, broadcasts, barriers) ends after that many seconds with
:class:`~mpiqsgd.errors.CommTimeout`, naming the peer (for messages) and the phase, so a
stopped or hung rank ends the job instead of hanging it. Step 0 (kernel compilation,
start-up) gets ``FIRST_STEP_FACTOR`` times longer. Evaluation and checkpoint writes end in
collectives, so the timeout must exceed the slowest rank's evaluation or checkpoint write.
Deadlines need the polling waits (``wait="backoff"``).
"""

from __future__ import annotations

import abc
import atexit
import os
import queue
import sys
import threading
import time
import zlib
from typing import (TYPE_CHECKING, Any, Callable, ContextManager, Hashable, Iterable, Iterator, Sequence, Tuple,
                    NoReturn, TypeVar, cast)

import numpy as np
import numpy.typing as npt
import torch

from . import wire
from .errors import CommTimeout, ConfigError
from .meter import Meter

if TYPE_CHECKING:
    from mpi4py import MPI

ABORT_GRACE_SECONDS = 1.0  # see abort_if_parallel
POLL_SPIN_SECONDS = 20e-6  # poll without sleeping this long: short waits keep their latency
POLL_FIRST_SLEEP = 10e-6  # then sleep, doubling each time ...
POLL_MAX_SLEEP = 500e-6  # ... up to this: a waiting rank costs about 1/1000 of a core
WAITS = ("backoff", "spin")
FIRST_STEP_FACTOR = 10  # step 0 compiles kernels on every rank: allow it more time

__all__ = ["RankLayout", "Transport", "MPITransport", "LocalGroup", "LocalTransport", "Poller", "AllreducePipeline",
           "world", "abort_if_parallel", "exit_together", "exit_now", "allreduce_nbytes", "sum_of", "WAITS",
           "REDUCE_OPS"]

REDUCE_OPS = ("sum", "max")

# What isend returns and wait_sends takes: (request, buffer, dest, phase, bytes), the request being
# whatever the transport's _isend gave.
SendHandle = Tuple[Any, "wire.BytesLike", int, str, int]
_T = TypeVar("_T")
_A = TypeVar("_A", bound=np.ndarray)


def allreduce_nbytes(numel: int, n: int, itemsize: int = 4) -> int:
    """Nominal bytes one rank sends in a bandwidth-optimal allreduce of ``numel`` items of ``itemsize``
    bytes (float32 by default)."""
    return 2 * (n - 1) * itemsize * numel // n if n > 1 else 0


class Poller:
    """Wait for a condition without holding a core: spin briefly, then sleep with back-off."""

    def __init__(self, spin_seconds: float = POLL_SPIN_SECONDS, first_sleep: float = POLL_FIRST_SLEEP,
                 max_sleep: float = POLL_MAX_SLEEP) -> None:
        self.spin_seconds, self.first_sleep, self.max_sleep = spin_seconds, first_sleep, max_sleep

    def until(self, done: Callable[[], _T | None], timeout: float | None = None,
              what: Callable[[], str] | None = None) -> _T:
        """Return the first true value of ``done()``.

        Raises:
            CommTimeout: ``timeout`` seconds passed first; the message says ``what()`` was awaited.
        """
        result = done()
        if result:
            return result
        start = time.perf_counter()
        sleep = self.first_sleep
        while True:
            result = done()
            if result:
                return result
            waited = time.perf_counter() - start
            if timeout is not None and waited > timeout:
                raise CommTimeout(f"waited {waited:.0f} s for {what() if what else 'a peer'}: that rank, or a "
                                  "rank it waits for in turn, is stopped, hung or gone (the earliest such message "
                                  "names the first; raise comm_timeout= (--comm-timeout) if it is only slow)")
            if waited > self.spin_seconds:
                time.sleep(sleep)
                sleep = min(2 * sleep, self.max_sleep)


def phase_tag(phase: str) -> int:
    """The MPI tag of a phase: stable across ranks and runs."""
    return 1 + zlib.crc32(phase.encode()) % 30000


def _as_bytes_array(buf: wire.BytesLike) -> npt.NDArray[np.uint8]:
    return np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)


def sum_of(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of equally shaped tensors, added one after another in the given order (a simulated
    allreduce's order, and the topologies' sums of received messages)."""
    acc = tensors[0].clone()
    for t in tensors[1:]:
        acc += t
    return acc


def _check_op(op: str) -> None:
    if op not in REDUCE_OPS:
        raise ConfigError(f"transport: allreduce op must be one of {', '.join(REDUCE_OPS)}; got {op!r}")


class RankLayout:
    """Who the ranks are: what byte formulas and topologies read from a transport.

    Attributes:
        rank, size: this process's rank and the number of ranks.
        local_rank, local_size: this rank's index among the ranks of its node, and their number.
        nodes: the node of every rank, in rank order (0, 1, ... by first appearance).
        world_ranks: the world rank of every rank of a sub-transport (None: the ranks are world ranks).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    nodes: tuple[int, ...] = (0,)
    world_ranks: list[int] | None = None

    @property
    def n_nodes(self) -> int:
        """How many nodes the ranks are on."""
        return len(set(self.nodes))

    def world_rank(self, rank: int) -> int:
        """The world rank of ``rank`` of this transport (-1, a collective's destination, stays -1)."""
        return rank if self.world_ranks is None or rank < 0 else self.world_ranks[rank]


class Transport(RankLayout, abc.ABC):
    """What topologies need from a communicator: the contract every transport keeps.

    The public calls count, time and trace; a subclass only moves bytes, in the abstract
    primitives below (``_send``, ``_recv``, ...), which count and time nothing.

    Attributes:
        meter: the :class:`~mpiqsgd.meter.Meter` every sent message is recorded in (and
            ``rank``, ``size``, ``nodes`` ... of :class:`RankLayout`).

    Message calls: ``send(buf, dest, phase, fp32_bytes)``, ``recv(source, phase)`` (a
    uint8 array), ``sendrecv(buf, dest, source, phase, fp32_bytes)``, non-blocking
    ``isend(...)`` (a handle for ``wait_sends``; ``buf`` must stay unchanged until then),
    ``recv_each(sources, phase)`` (one message from each source, in arrival order),
    ``allreduce_sum(tensor)``, ``allreduce_array(array, op)``;
    control calls: ``allgather_bytes(buf, phase=None)``, ``bcast_bytes(buf, root)``, ``barrier()``.

    Counting: every message is recorded by its sender with its header and payload bytes; an
    allreduce at its nominal cost (:func:`allreduce_nbytes`, destination -1) on every rank; an
    allgather given a phase as a message to each other rank. Timing: each counted call is one
    ``communicate`` block (a span of the trace named ``send`` / ``recv`` / ``sendrecv`` /
    ``wait_sends`` / ``allreduce`` / ``allgather``). On one rank the allreduces send, count and
    time nothing.
    """

    meter: Meter

    # -- primitives: what a subclass implements (moves bytes; counts and times nothing) ---------

    @abc.abstractmethod
    def split(self, color: int | None) -> Transport | None:
        """The sub-transport of the ranks that pass the same ``color`` (None: this rank joins none and
        gets None), ranked as here, sharing this meter. Collective: every rank calls it."""

    @abc.abstractmethod
    def _send(self, buf: wire.BytesLike, dest: int, phase: str) -> None:
        """Deliver ``buf`` to ``dest``; return when ``buf`` may be reused."""

    @abc.abstractmethod
    def _recv(self, source: int, phase: str) -> npt.NDArray[np.uint8]:
        """The next message of ``phase`` from ``source``, as a new uint8 array."""

    @abc.abstractmethod
    def _sendrecv(self, buf: wire.BytesLike, dest: int, source: int, phase: str) -> npt.NDArray[np.uint8]:
        """Send ``buf`` to ``dest`` while receiving (and returning) a message from ``source``."""

    @abc.abstractmethod
    def _isend(self, buf: wire.BytesLike, dest: int, phase: str) -> Any:
        """Start delivering ``buf`` to ``dest``; return what :meth:`_wait_send` takes."""

    @abc.abstractmethod
    def _wait_send(self, request: Any, dest: int, phase: str) -> None:
        """Return when the send started by :meth:`_isend` (its ``request``) has left."""

    @abc.abstractmethod
    def _next_source(self, pending: Sequence[int], phase: str) -> int:
        """One of ``pending`` whose message of ``phase`` may be received now (waiting for one)."""

    @abc.abstractmethod
    def _allreduce_sum(self, host: torch.Tensor, phase: str) -> torch.Tensor:
        """The sum over all ranks of a float32 CPU tensor ``host`` (which it may overwrite)."""

    @abc.abstractmethod
    def _allreduce_array(self, array: np.ndarray, op: str, phase: str) -> None:
        """Reduce a contiguous numpy ``array`` over all ranks in place (``op``: "sum" or "max")."""

    @abc.abstractmethod
    def _allgather(self, data: npt.NDArray[np.uint8], phase: str | None) -> list[bytes]:
        """Every rank's ``data`` (a uint8 array, any lengths) as bytes, in rank order."""

    @abc.abstractmethod
    def bcast_bytes(self, buf: wire.BytesLike, root: int = 0) -> bytes:
        """``root``'s bytes on every rank (uncounted control traffic, e.g. initial parameters)."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Return when every rank has called it."""

    # -- the calls topologies make: counted, timed and traced here, once for every transport ----

    def begin_step(self, step: int) -> None:
        """Stamp ``step`` on everything recorded from now on."""
        self.meter.step = step

    def timed(self, phase: str, **args: Any) -> ContextManager[dict[str, Any]]:
        """Context manager adding the seconds of its block to ``phase`` in the meter (``args``: for the trace)."""
        return self.meter.time(phase, **args)

    def traced(self, name: str, **args: Any) -> ContextManager[dict[str, Any]]:
        """Context manager making its block one span of the trace (see :meth:`Meter.span`); counts nothing."""
        return self.meter.span(name, "exchange", **args)

    def require_threads(self) -> None:
        """Raise :class:`ConfigError` unless a second thread may make this transport's calls."""

    def _record(self, buf: wire.BytesLike, dest: int, phase: str, fp32_bytes: int, framed: bool = True) -> int:
        nbytes = len(memoryview(buf).cast("B"))
        header = wire.header_nbytes(buf) if framed else 0
        self.meter.record(phase, self.world_rank(self.rank), self.world_rank(dest), header, nbytes - header,
                          fp32_bytes)
        return nbytes

    def _record_allreduce(self, array: np.ndarray, phase: str, fp32_numel: int) -> int:
        """Record an allreduce of ``array`` at its nominal cost (and the fp32 allreduce of
        ``fp32_numel`` values it stands for); return the nominal bytes."""
        nominal = allreduce_nbytes(array.nbytes, self.size, itemsize=1)
        if self.size > 1:
            self.meter.record(phase, self.world_rank(self.rank), -1, 0, nominal,
                              allreduce_nbytes(fp32_numel, self.size))
        return nominal

    def send(self, buf: wire.BytesLike, dest: int, phase: str, fp32_bytes: int) -> None:
        """Send a framed message to ``dest``; returns when the buffer may be reused."""
        nbytes = self._record(buf, dest, phase, fp32_bytes)
        with self.meter.time("communicate", name="send", message=phase, peer=dest, bytes=nbytes):
            self._send(buf, dest, phase)

    def recv(self, source: int, phase: str) -> npt.NDArray[np.uint8]:
        """Receive one message of ``phase`` from ``source``; return it as a uint8 array."""
        with self.meter.time("communicate", name="recv", message=phase, peer=source) as span:
            out = self._recv(source, phase)
            span["bytes"] = out.size
            return out

    def sendrecv(self, buf: wire.BytesLike, dest: int, source: int, phase: str,
                 fp32_bytes: int) -> npt.NDArray[np.uint8]:
        """Send to ``dest`` while receiving from ``source`` (any lengths); no deadlock in rings."""
        nbytes = self._record(buf, dest, phase, fp32_bytes)
        with self.meter.time("communicate", name="sendrecv", message=phase, peer=dest, bytes=nbytes,
                             source=source) as span:
            out = self._sendrecv(buf, dest, source, phase)
            span["received_bytes"] = out.size
            return out

    def isend(self, buf: wire.BytesLike, dest: int, phase: str, fp32_bytes: int) -> SendHandle:
        """Start sending a framed message to ``dest``; finish with :meth:`wait_sends`."""
        nbytes = self._record(buf, dest, phase, fp32_bytes)
        return self._isend(buf, dest, phase), buf, dest, phase, nbytes

    def wait_sends(self, handles: Sequence[SendHandle]) -> None:
        """Wait until every message started by :meth:`isend` has left."""
        if not handles:
            return
        with self.meter.time("communicate", name="wait_sends", messages=len(handles),
                             bytes=sum(h[4] for h in handles), peers=[h[2] for h in handles]):
            for request, _, dest, phase, _ in handles:
                self._wait_send(request, dest, phase)

    def recv_each(self, sources: Iterable[int], phase: str) -> Iterator[tuple[int, npt.NDArray[np.uint8]]]:
        """Yield ``(source, message)`` for one message of ``phase`` from each of ``sources``, as they arrive."""
        pending = list(sources)
        while pending:
            with self.meter.time("communicate", name="recv", message=phase) as span:
                source = self._next_source(pending, phase)
                message = self._recv(source, phase)
                span.update(peer=source, bytes=message.size)
            pending.remove(source)
            yield source, message

    def allreduce_sum(self, tensor: torch.Tensor, phase: str = "allreduce") -> torch.Tensor:
        """Sum a float32 tensor over all ranks (staged through the CPU), counted at the nominal cost."""
        host = tensor.detach().to("cpu", torch.float32).contiguous().clone()
        if self.size > 1:
            nominal = allreduce_nbytes(host.numel(), self.size)
            self.meter.record(phase, self.world_rank(self.rank), -1, 0, nominal, nominal)
            with self.meter.time("communicate", name="allreduce", message=phase, bytes=nominal):
                host = self._allreduce_sum(host, phase)
        return host.to(tensor.device)

    def allreduce_array(self, array: _A, op: str = "sum", phase: str = "allreduce", fp32_numel: int = 0) -> _A:
        """Reduce a contiguous numpy ``array`` over all ranks in place (``op``: "sum" or "max");
        counted at the nominal cost of its bytes, standing for an fp32 allreduce of ``fp32_numel``."""
        _check_op(op)
        nominal = self._record_allreduce(array, phase, fp32_numel)
        if self.size > 1:
            with self.meter.time("communicate", name="allreduce", message=phase, bytes=nominal):
                self._allreduce_array(array, op, phase)
        return array

    def allgather_bytes(self, buf: wire.BytesLike, phase: str | None = None) -> list[bytes]:
        """Every rank's ``buf`` (any lengths), in rank order; counted and timed only when ``phase`` is given."""
        data = _as_bytes_array(buf)
        if phase is None:
            return self._allgather(data, phase)
        for dest in range(self.size):
            if dest != self.rank:
                self._record(data, dest, phase, 0, framed=False)
        with self.meter.time("communicate", name="allgather", message=phase, bytes=data.size):
            return self._allgather(data, phase)

    def pipeline(self, op: str, phase: str) -> AllreducePipeline:
        """An :class:`AllreducePipeline` over this transport (allreduces in the caller's thread)."""
        return AllreducePipeline(self, op, phase)

    @abc.abstractmethod
    def agree_max(self, value: int) -> int:
        """Collective: the largest of every rank's int32 ``value`` (uncounted control traffic)."""


class AllreducePipeline:
    """In-place allreduces of the pieces of one array, in order, each started as soon as the
    producer hands it in, so that encoding piece k+1 overlaps piece k on the wire.

    Use: ``put(piece, fp32_numel)`` for each piece (a contiguous numpy view; not touched again
    until it is done), ``close()``, then ``for k in pipeline.done(): ...`` yields the index of
    each piece whose sum is complete. This base class reduces each piece when it is put (no
    overlap: simulated ranks, MPI libraries without thread support); :class:`MPITransport`'s
    runs the allreduces in a driver thread. Collective: every rank puts the same pieces in the
    same order.
    """

    def __init__(self, transport: Transport, op: str, phase: str) -> None:
        _check_op(op)
        self.transport, self.op, self.phase = transport, op, phase
        self.count = 0

    def put(self, piece: np.ndarray, fp32_numel: int) -> None:
        self.transport.allreduce_array(piece, self.op, self.phase, fp32_numel)
        self.count += 1

    def close(self) -> None:
        pass

    def done(self) -> Iterator[int]:
        yield from range(self.count)

class MPITransport(Transport):
    """Transport over an mpi4py communicator.

    Args:
        comm: an ``mpi4py.MPI.Comm`` (default ``COMM_WORLD``).
        meter: where to count messages (default: a new :class:`Meter`).
        wait: ``"backoff"`` (default: poll non-blocking calls, sleeping between polls) or
            ``"spin"`` (MPI's blocking calls).
        comm_timeout: seconds a wait may last before :class:`CommTimeout` (None: forever).
        world_ranks: the world rank of each rank of ``comm`` (a sub-transport's; None: ``comm``'s ranks).
    """

    def __init__(self, comm: MPI.Comm | None = None, meter: Meter | None = None, wait: str = "backoff",
                 comm_timeout: float | None = None, world_ranks: Sequence[int] | None = None) -> None:
        from mpi4py import MPI

        if wait not in WAITS:
            raise ConfigError(f"transport: wait must be one of {', '.join(WAITS)}; got {wait!r}")
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.meter = Meter(self.rank) if meter is None else meter
        self.poller = Poller() if wait == "backoff" else None
        if comm_timeout is not None and (wait != "backoff" or not comm_timeout > 0):
            raise ConfigError(f"transport: comm_timeout must be positive and needs wait='backoff'; got "
                              f"{comm_timeout} with wait={wait!r}")
        self.comm_timeout = comm_timeout
        self.world_ranks = None if world_ranks is None else list(world_ranks)
        # Ranks on this node: by host name, not MPI_COMM_TYPE_SHARED, which counts one rank
        # per "node" when MPI is told not to use shared memory (MPIR_CVAR_NOLOCAL, the
        # shaped-link benchmarks) and would hand every rank all the node's cores.
        # MPIQSGD_HOST names the node instead (tests place ranks on nodes with it).
        host = os.environ.get("MPIQSGD_HOST") or MPI.Get_processor_name()
        hosts = self.allgather_bytes(host.encode())
        order = list(dict.fromkeys(hosts))
        self.nodes = tuple(order.index(h) for h in hosts)
        here = [r for r, h in enumerate(hosts) if h == hosts[self.rank]]
        self.local_size = len(here)  # ranks of this communicator on this node
        self.local_rank = here.index(self.rank)  # this rank's index among them (picks its GPU)

    def split(self, color: int | None) -> MPITransport | None:
        """``MPI_Comm_split`` by ``color`` (key: this rank), as an :class:`MPITransport` sharing this meter."""
        MPI = self._MPI
        comm = self.comm.Split(MPI.UNDEFINED if color is None else int(color), self.rank)
        if comm == MPI.COMM_NULL:
            return None
        world_ranks = np.empty(comm.Get_size(), dtype=np.int64)
        comm.Allgather([np.array([self.world_rank(self.rank)], dtype=np.int64), MPI.INT64_T],
                       [world_ranks, MPI.INT64_T])
        return MPITransport(comm, self.meter, "spin" if self.poller is None else "backoff", self.comm_timeout,
                            world_ranks.tolist())

    def require_threads(self) -> None:
        """Exchanges in a communication thread need ``MPI_THREAD_SERIALIZED`` (one thread calls MPI at a time)."""
        MPI = self._MPI
        provided = MPI.Query_thread()
        if provided < MPI.THREAD_SERIALIZED:
            names = {MPI.THREAD_SINGLE: "MPI_THREAD_SINGLE", MPI.THREAD_FUNNELED: "MPI_THREAD_FUNNELED"}
            raise ConfigError(
                f"overlapping communication with backward runs MPI calls from a second thread, which needs "
                f"MPI_THREAD_SERIALIZED; this MPI library provides {names.get(provided, provided)}. "
                "Exchange without overlap, or use an MPI built with thread support "
                "(mpi4py requests MPI_THREAD_MULTIPLE unless mpi4py.rc.thread_level says otherwise)")

    def _timeout(self) -> float | None:
        if self.comm_timeout is None:
            return None
        return self.comm_timeout * (FIRST_STEP_FACTOR if self.meter.step == 0 else 1)

    def _wait(self, request: MPI.Request, what: str) -> None:
        if self.poller is None:
            request.Wait()
        else:
            self.poller.until(request.Test, self._timeout(), lambda: f"{what} (rank {self.rank}, "
                              f"step {self.meter.step})")

    def _send(self, buf: wire.BytesLike, dest: int, phase: str) -> None:
        self._wait_send(self._isend(buf, dest, phase), dest, phase)

    def _recv(self, source: int, phase: str) -> npt.NDArray[np.uint8]:
        status = self._MPI.Status()
        tag = phase_tag(phase)
        what = f"a '{phase}' message from rank {source}"
        if self.poller is None:
            self.comm.Probe(source=source, tag=tag, status=status)
        else:
            self.poller.until(lambda: self.comm.Iprobe(source=source, tag=tag, status=status), self._timeout(),
                              lambda: f"{what} (rank {self.rank}, step {self.meter.step})")
        # A new array per message, by measurement: the allocator hands out memory just freed and
        # still in cache; buffers kept per message from step to step made exchanges slower (README).
        out = np.empty(status.Get_count(self._MPI.BYTE), dtype=np.uint8)
        self._wait(self.comm.Irecv([out, self._MPI.BYTE], source=source, tag=tag), what)
        return out

    def _sendrecv(self, buf: wire.BytesLike, dest: int, source: int, phase: str) -> npt.NDArray[np.uint8]:
        request = self._isend(buf, dest, phase)
        try:
            return self._recv(source, phase)
        finally:
            self._wait_send(request, dest, phase)

    def _isend(self, buf: wire.BytesLike, dest: int, phase: str) -> MPI.Request:
        return self.comm.Isend([_as_bytes_array(buf), self._MPI.BYTE], dest=dest, tag=phase_tag(phase))

    def _wait_send(self, request: MPI.Request, dest: int, phase: str) -> None:
        self._wait(request, f"rank {dest} to take a '{phase}' message")

    def _next_source(self, pending: Sequence[int], phase: str) -> int:
        if self.poller is None or len(pending) == 1:
            return pending[0]
        tag = phase_tag(phase)
        (source,) = self.poller.until(  # a 1-tuple: rank 0 is falsy
            lambda: next(((s,) for s in pending if self.comm.Iprobe(source=s, tag=tag)), None),
            self._timeout(),
            lambda: f"'{phase}' messages from ranks {pending} (rank {self.rank}, step {self.meter.step})")
        return source

    def _allreduce_sum(self, host: torch.Tensor, phase: str) -> torch.Tensor:
        buf = [host.numpy(), self._MPI.FLOAT]
        self._collective(self.comm.Iallreduce, self.comm.Allreduce, f"the other ranks in the '{phase}' allreduce",
                         self._MPI.IN_PLACE, buf, op=self._MPI.SUM)
        return host

    def _mpi_args(self, array: np.ndarray, op: str) -> tuple[np.ndarray, MPI.Op]:
        _check_op(op)
        return array, getattr(self._MPI, op.upper())  # mpi4py types the buffer from the array's dtype

    def _allreduce_array(self, array: np.ndarray, op: str, phase: str) -> None:
        buf, mpi_op = self._mpi_args(array, op)
        self._collective(self.comm.Iallreduce, self.comm.Allreduce, f"the other ranks in the '{phase}' allreduce",
                         self._MPI.IN_PLACE, buf, op=mpi_op)

    def pipeline(self, op: str, phase: str) -> AllreducePipeline:
        """Allreduces started and finished by a driver thread (the only thread calling MPI while the
        pipeline runs), where the MPI library allows a second thread; else in the caller's thread."""
        if self.size == 1 or self._MPI.Query_thread() < self._MPI.THREAD_SERIALIZED:
            return AllreducePipeline(self, op, phase)
        return _DrivenPipeline(self, op, phase)

    def _allgather(self, data: npt.NDArray[np.uint8], phase: str | None) -> list[bytes]:
        counts = np.zeros(self.size, dtype=np.int64)
        what = f"the other ranks in an allgather ({phase or 'control'})"
        self._collective(self.comm.Iallgather, self.comm.Allgather, what,
                         [np.array([data.size], dtype=np.int64), self._MPI.INT64_T], [counts, self._MPI.INT64_T])
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        out = np.empty(int(counts.sum()), dtype=np.uint8)
        self._collective(self.comm.Iallgatherv, self.comm.Allgatherv, what,
                         [data, self._MPI.BYTE], [out, (counts, displs), self._MPI.BYTE])
        return [out[d:d + c].tobytes() for d, c in zip(displs, counts)]

    def bcast_bytes(self, buf: wire.BytesLike, root: int = 0) -> bytes:
        """``root``'s bytes on every rank (uncounted control traffic, e.g. initial parameters)."""
        data = _as_bytes_array(buf) if self.rank == root else np.empty(0, np.uint8)
        count = np.array([data.size], dtype=np.int64)
        what = f"rank {root}'s broadcast"
        self._collective(self.comm.Ibcast, self.comm.Bcast, what, [count, self._MPI.INT64_T], root=root)
        out = data.copy() if self.rank == root else np.empty(int(count[0]), dtype=np.uint8)
        self._collective(self.comm.Ibcast, self.comm.Bcast, what, [out, self._MPI.BYTE], root=root)
        return out.tobytes()

    def agree_max(self, value: int) -> int:
        flag = np.array([value], dtype=np.int32)
        if self.size > 1:
            self._collective(self.comm.Iallreduce, self.comm.Allreduce, "the other ranks in a control allreduce",
                             self._MPI.IN_PLACE, [flag, self._MPI.INT32_T], op=self._MPI.MAX)
        return int(flag[0])

    def barrier(self) -> None:
        self._collective(self.comm.Ibarrier, self.comm.Barrier, "the other ranks at a barrier")

    def _collective(self, nonblocking: Callable[..., MPI.Request], blocking: Callable[..., object], what: str,
                    *args: Any, **kwargs: Any) -> None:
        if self.poller is None:
            blocking(*args, **kwargs)
        else:
            self._wait(nonblocking(*args, **kwargs), what)


class _DrivenPipeline(AllreducePipeline):
    """:class:`AllreducePipeline` whose ``MPI_Iallreduce`` calls are started and tested by one driver
    thread (polling with the transport's back-off, so that a waiting rank yields its core), while
    the producer encodes the next piece. The consumer's time waiting in :meth:`done` is
    ``communicate``; each piece's allreduce is a span of the trace on the driver's thread.
    """

    transport: MPITransport

    def __init__(self, transport: MPITransport, op: str, phase: str) -> None:
        super().__init__(transport, op, phase)
        self._todo: queue.Queue[tuple[int, np.ndarray, int] | None] = queue.Queue()
        self._finished: queue.Queue[int | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drive, name="mpiqsgd-allreduce", daemon=True)
        self._thread.start()

    def put(self, piece: np.ndarray, fp32_numel: int) -> None:
        nominal = self.transport._record_allreduce(piece, self.phase, fp32_numel)
        self._todo.put((self.count, piece, nominal))
        self.count += 1

    def close(self) -> None:
        self._todo.put(None)

    def _drive(self) -> None:
        t = self.transport
        in_flight: list[tuple[int, MPI.Request, float, int]] = []
        closed, sleep = False, POLL_FIRST_SLEEP
        try:
            while not closed or in_flight:
                progressed = False
                while True:  # start every piece handed in
                    try:
                        item = self._todo.get_nowait() if in_flight or closed else self._todo.get(timeout=0.05)
                    except queue.Empty:
                        break
                    if item is None:
                        closed = True
                        break
                    k, piece, nominal = item
                    buf, mpi_op = t._mpi_args(piece, self.op)
                    in_flight.append((k, t.comm.Iallreduce(t._MPI.IN_PLACE, buf, op=mpi_op), time.perf_counter(),
                                      nominal))
                    progressed = True
                for entry in list(in_flight):
                    k, request, start, nominal = entry
                    if request.Test():
                        in_flight.remove(entry)
                        t.meter.trace("communicate", "allreduce", start, time.perf_counter(), message=self.phase,
                                      piece=k, bytes=nominal)
                        self._finished.put(k)
                        progressed = True
                    elif (timeout := t._timeout()) is not None and time.perf_counter() - start > timeout:
                        raise CommTimeout(f"waited {time.perf_counter() - start:.0f} s for the other ranks in "
                                          f"piece {k} of the '{self.phase}' allreduce (rank {t.rank}, step "
                                          f"{t.meter.step}): a rank is stopped, hung or gone")
                if in_flight and not progressed:
                    time.sleep(sleep)
                    sleep = min(2 * sleep, POLL_MAX_SLEEP)
                elif progressed:
                    sleep = POLL_FIRST_SLEEP
        except BaseException as exc:  # handed to the consumer
            self._error = exc
        finally:
            self._finished.put(None)

    def done(self) -> Iterator[int]:
        t = self.transport
        remaining = self.count
        try:
            while remaining:
                with t.meter.time("communicate", name="wait", message=self.phase):
                    k = self._finished.get()
                if k is None:
                    raise self._error or RuntimeError("allreduce pipeline ended early")
                remaining -= 1
                yield k
        finally:
            self._thread.join()
            if self._error is not None:
                raise self._error


class LocalGroup:
    """N ranks inside one process, one thread each, joined by queues (``--simulate N``).

    Runs the very code a real job runs (same topologies, same byte counting); only the
    wire is a ``queue.Queue`` per (source, dest, tag). If one rank fails, the others
    stop waiting and :meth:`run` re-raises the first error.

    Args:
        size: the number of ranks.
        ranks_per_node: group the ranks into nodes of this many, in rank order (the last
            node may hold fewer); None: all on one node.
    """

    def __init__(self, size: int, ranks_per_node: int | None = None, _root: LocalGroup | None = None) -> None:
        if ranks_per_node is not None and not (isinstance(ranks_per_node, int) and ranks_per_node >= 1):
            raise ConfigError(f"LocalGroup: ranks_per_node must be an integer >= 1 or None; got {ranks_per_node!r}")
        self.size = size
        self.nodes = tuple(r // ranks_per_node if ranks_per_node else 0 for r in range(size))
        self._queues: dict[tuple[int, int, int], queue.Queue[bytes]] = {}
        self._lock = threading.Lock()
        self._barrier = threading.Barrier(size)
        self._slots: list[Any] = [None] * size
        # Sub-groups (LocalTransport.split) share the root's error and are aborted with it.
        self._root = self if _root is None else _root
        self._subgroups: dict[Hashable, LocalGroup] = {}
        self._error: BaseException | None = None

    @property
    def error(self) -> BaseException | None:
        """The first failure of any rank (of this group or the group it was split from), or None."""
        return self._root._error

    def subgroup(self, key: Hashable, nodes: Sequence[int]) -> LocalGroup:
        """The sub-group ``key`` of ranks on ``nodes`` (one entry a rank), created by the first of its ranks to ask."""
        root = self._root
        with root._lock:
            sub = root._subgroups.get(key)
            if sub is None:
                sub = root._subgroups[key] = LocalGroup(len(nodes), _root=root)
                order = list(dict.fromkeys(nodes))  # numbered by first appearance, as MPITransport does
                sub.nodes = tuple(order.index(n) for n in nodes)
            return sub

    def queue(self, source: int, dest: int, tag: int) -> queue.Queue[bytes]:
        with self._lock:
            return self._queues.setdefault((source, dest, tag), queue.Queue())

    def barrier(self) -> None:
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            raise _Aborted() from None

    def exchange(self, rank: int, value: _T) -> list[_T]:
        """Every rank's ``value``, in rank order (a collective of the group)."""
        self.barrier()
        self._slots[rank] = value
        self.barrier()
        values = list(self._slots)
        self.barrier()
        return values

    def transports(self, keep_messages: bool = False) -> list[LocalTransport]:
        return [LocalTransport(self, r, Meter(r, keep_messages)) for r in range(self.size)]

    def _abort(self, exc: BaseException) -> None:
        """Record the first failure and wake every rank waiting in this group or a sub-group."""
        root = self._root
        with root._lock:
            if root._error is None:
                root._error = exc
            groups = [root, *root._subgroups.values()]
        for group in groups:
            group._barrier.abort()

    def run(self, fn: Callable[[LocalTransport], _T], transports: Sequence[LocalTransport]) -> list[_T | None]:
        """Call ``fn(transport)`` for every rank in its own thread; return the results by rank."""
        results: list[_T | None] = [None] * self.size

        def target(t: LocalTransport) -> None:
            try:
                results[t.rank] = fn(t)
            except _Aborted:
                pass
            except BaseException as exc:  # first failure wins; wake everyone else
                self._abort(exc)

        threads = [threading.Thread(target=target, args=(t,), name=f"rank{t.rank}") for t in transports]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if self.error is not None:
            raise self.error
        return results


class _Aborted(Exception):
    """Raised in a simulated rank when another rank failed."""


class LocalTransport(Transport):
    """One rank of a :class:`LocalGroup`: the bytes move through in-process queues; counting and
    timing are :class:`Transport`'s, as for :class:`MPITransport`."""

    def __init__(self, group: LocalGroup, rank: int, meter: Meter | None = None,
                 world_ranks: Sequence[int] | None = None) -> None:
        self.group = group
        self.rank = rank
        self.size = group.size
        self.nodes = group.nodes
        here = [r for r in range(self.size) if self.nodes[r] == self.nodes[rank]]
        self.local_rank, self.local_size = here.index(rank), len(here)
        self.world_ranks = None if world_ranks is None else list(world_ranks)
        self.meter = Meter(rank) if meter is None else meter
        self._splits = 0  # split() calls so far: the same count names the same sub-group on every rank

    def split(self, color: int | None) -> LocalTransport | None:
        colors = self.group.exchange(self.rank, color)
        self._splits += 1
        if color is None:
            return None
        members = [r for r, c in enumerate(colors) if c is not None and c == color]
        sub = self.group.subgroup((id(self.group), self._splits, color), [self.nodes[r] for r in members])
        return LocalTransport(sub, members.index(self.rank), self.meter, [self.world_rank(r) for r in members])

    def _send(self, buf: wire.BytesLike, dest: int, phase: str) -> None:
        self.group.queue(self.rank, dest, phase_tag(phase)).put(bytes(memoryview(buf).cast("B")))

    def _recv(self, source: int, phase: str) -> npt.NDArray[np.uint8]:
        q = self.group.queue(source, self.rank, phase_tag(phase))
        while True:
            try:
                return np.frombuffer(q.get(timeout=0.05), dtype=np.uint8)
            except queue.Empty:
                if self.group.error is not None:
                    raise _Aborted() from None

    def _sendrecv(self, buf: wire.BytesLike, dest: int, source: int, phase: str) -> npt.NDArray[np.uint8]:
        self._send(buf, dest, phase)
        return self._recv(source, phase)

    def _isend(self, buf: wire.BytesLike, dest: int, phase: str) -> None:
        self._send(buf, dest, phase)  # queues never block: the message has left

    def _wait_send(self, request: None, dest: int, phase: str) -> None:
        pass

    def _next_source(self, pending: Sequence[int], phase: str) -> int:
        return pending[0]  # in the given order: queues cannot be probed together

    def _allreduce_sum(self, host: torch.Tensor, phase: str) -> torch.Tensor:
        """Sum in rank order (MPI may associate differently: last-bit differences from a real job)."""
        return sum_of(self.group.exchange(self.rank, host))

    def _allreduce_array(self, array: np.ndarray, op: str, phase: str) -> None:
        """Reduce in rank order (sums of integers and maxima are exact: the bits MPI gives)."""
        values = self.group.exchange(self.rank, array.copy())
        reduce = np.add if op == "sum" else np.maximum
        array[...] = values[0]
        for v in values[1:]:
            reduce(array, v, out=array)

    def _allgather(self, data: npt.NDArray[np.uint8], phase: str | None) -> list[bytes]:
        return self.group.exchange(self.rank, data.tobytes())

    def bcast_bytes(self, buf: wire.BytesLike, root: int = 0) -> bytes:
        # Only the root contributes bytes (the others None), so the root's entry is bytes.
        mine = bytes(memoryview(buf).cast("B")) if self.rank == root else None
        return cast(bytes, self.group.exchange(self.rank, mine)[root])

    def agree_max(self, value: int) -> int:
        return max(self.group.exchange(self.rank, int(value)))

    def barrier(self) -> None:
        self.group.barrier()


def world(wait: str = "backoff", comm_timeout: float | None = None) -> MPITransport:
    """An :class:`MPITransport` on ``COMM_WORLD``, with codec threads shared among the node's ranks."""
    from .machine import share_cpus

    transport = MPITransport(wait=wait, comm_timeout=comm_timeout)
    share_cpus(transport.local_size)
    return transport


def abort_if_parallel(message: str) -> None:
    """Print ``message`` and abort every rank, if this is an MPI job of more than one rank.

    Without this an exception on one rank leaves the others waiting in a receive
    forever. Returns (printing nothing) when MPI was never started or has one rank.
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized() or mpi.COMM_WORLD.Get_size() == 1:
        return
    rank = mpi.COMM_WORLD.Get_rank()
    print(f"{message.rstrip()}\nmpiqsgd: rank {rank} failed; aborting all ranks", file=sys.stderr, flush=True)
    # mpiexec forwards a rank's stderr through a pipe that it may stop reading the
    # moment the abort arrives; give the message time to get out first.
    time.sleep(ABORT_GRACE_SECONDS)
    sys.stdout.flush()
    mpi.COMM_WORLD.Abort(1)
    os._exit(1)  # MPICH's Abort may return before mpiexec ends this process: never go on (or print twice)


def exit_together(status: int) -> None:
    """End this process with ``status`` when every rank of an MPI job ends on purpose with it
    (:class:`~mpiqsgd.errors.StopJob`): a barrier, then :func:`exit_now`.

    Without the explicit finalize ``python -m mpi4py`` turns a non-zero status into ``MPI_Abort``
    (a line on stderr per rank, and a rank still writing is killed). A non-zero status waits
    :data:`ABORT_GRACE_SECONDS` first, as an abort does: under Open MPI's mpirun, loaded, the
    one line a refused launch prints was once lost (CI, 2026-12-07). Returns (doing nothing) when
    MPI was never started or has one rank.
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized() or mpi.COMM_WORLD.Get_size() == 1:
        return
    mpi.COMM_WORLD.Barrier()
    if status:  # as abort_if_parallel: the launcher may stop forwarding output at the first non-zero exit
        _flush_stdio()
        time.sleep(ABORT_GRACE_SECONDS)
    exit_now(status)


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said on it
            pass


def exit_now(status: int) -> NoReturn:
    """End this process with ``status`` now that its work is done: flush stdout and stderr, run
    the ``atexit`` handlers, finalize MPI if it was started, and ``os._exit``.

    This skips only the interpreter's teardown, which frees torch's, numba's and LLVM's modules
    one object at a time: 1.1-1.9 s of CPU per process on the 2-core test machine (a process that
    imported torch and ran two codecs: 4.3 s of CPU with the teardown, 3.2 s without), and 4 to
    15 s of wall time per rank when many ranks share a loaded machine. Every file mpiqsgd writes
    is closed when it returns; ``atexit`` handlers (logging's flush, say) still run. The command
    line's entry points end this way (:func:`mpiqsgd.cli.run`); a library caller's process ends
    as it would.
    """
    _flush_stdio()
    atexit._run_exitfuncs()
    _flush_stdio()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(status)
