"""The only place bytes enter or leave MPI, and the only place they are counted.

Point-to-point messages use buffer calls only (``Isend`` / ``Probe`` + ``Get_count`` /
``Recv`` on ``[buf, MPI.BYTE]``): no pickle on the wire, the receiver learns the
length from the probe, and every message is recorded by the sender's
:class:`~mpiqsgd.meter.Meter` with its header and payload bytes split by
:func:`mpiqsgd.wire.header_nbytes`. Each phase has its own tag, so messages of
different phases never match each other.

``allreduce_sum`` (the fp32 baseline) is one ``MPI.Allreduce``; MPI does not say
what it sends, so each rank records the nominal bandwidth-optimal cost
``floor(2 (n-1) / n * 4 numel)`` bytes with destination -1.

Small control traffic (meters, statistics, initial parameters) goes through
``allgather_bytes`` / ``bcast_bytes`` and is recorded only when given a phase.

:class:`LocalGroup` runs N ranks as threads of one process (``--simulate N``) with
the same interface and the same byte counting, over in-process queues.
"""

import queue
import sys
import threading
import time
import zlib

import numpy as np
import torch

from . import wire
from .meter import Meter

ABORT_GRACE_SECONDS = 1.0  # see abort_if_parallel

__all__ = ["Transport", "MPITransport", "LocalGroup", "LocalTransport", "world", "abort_if_parallel"]


def phase_tag(phase):
    """The MPI tag of a phase: stable across ranks and runs."""
    return 1 + zlib.crc32(phase.encode()) % 30000


def _as_bytes_array(buf):
    return np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)


class Transport:
    """What topologies need from a communicator; see :class:`MPITransport`.

    Attributes:
        rank, size: this process's rank and the number of ranks.
        meter: the :class:`~mpiqsgd.meter.Meter` every sent message is recorded in.
    """

    rank = 0
    size = 1
    meter = None

    def _record(self, buf, dest, phase, fp32_bytes, framed=True):
        nbytes = len(memoryview(buf).cast("B"))
        header = wire.header_nbytes(buf) if framed else 0
        self.meter.record(phase, self.rank, dest, header, nbytes - header, fp32_bytes)


class MPITransport(Transport):
    """Transport over an mpi4py communicator.

    Args:
        comm: an ``mpi4py.MPI.Comm`` (default ``COMM_WORLD``).
        meter: where to count messages (default: a new :class:`Meter`).
    """

    def __init__(self, comm=None, meter=None):
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.meter = Meter(self.rank) if meter is None else meter
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_size = node.Get_size()  # ranks of this communicator on this node
        self.local_rank = node.Get_rank()  # this rank's index among them (picks its GPU)
        node.Free()

    def send(self, buf, dest, phase, fp32_bytes):
        """Blocking send of a framed message to ``dest``."""
        self._record(buf, dest, phase, fp32_bytes)
        self.comm.Send([_as_bytes_array(buf), self._MPI.BYTE], dest=dest, tag=phase_tag(phase))

    def recv(self, source, phase):
        """Receive one message of ``phase`` from ``source``; return it as a uint8 array."""
        status = self._MPI.Status()
        tag = phase_tag(phase)
        self.comm.Probe(source=source, tag=tag, status=status)
        out = np.empty(status.Get_count(self._MPI.BYTE), dtype=np.uint8)
        self.comm.Recv([out, self._MPI.BYTE], source=source, tag=tag)
        return out

    def sendrecv(self, buf, dest, source, phase, fp32_bytes):
        """Send to ``dest`` while receiving from ``source`` (any lengths); no deadlock in rings."""
        self._record(buf, dest, phase, fp32_bytes)
        request = self.comm.Isend([_as_bytes_array(buf), self._MPI.BYTE], dest=dest, tag=phase_tag(phase))
        try:
            return self.recv(source, phase)
        finally:
            request.Wait()

    def allreduce_sum(self, tensor, phase="allreduce"):
        """Sum a float32 tensor over all ranks with ``MPI.Allreduce`` (staged through the CPU)."""
        host = tensor.detach().to("cpu", torch.float32).contiguous().numpy().copy()
        n = self.size
        if n > 1:
            nominal = 2 * (n - 1) * host.nbytes // n
            self.meter.record(phase, self.rank, -1, 0, nominal, nominal)
            self.comm.Allreduce(self._MPI.IN_PLACE, [host, self._MPI.FLOAT], op=self._MPI.SUM)
        return torch.from_numpy(host).to(tensor.device)

    def allgather_bytes(self, buf, phase=None):
        """Every rank's ``buf`` (any lengths), in rank order; counted only when ``phase`` is given."""
        data = _as_bytes_array(buf)
        counts = np.zeros(self.size, dtype=np.int64)
        self.comm.Allgather([np.array([data.size], dtype=np.int64), self._MPI.INT64_T],
                            [counts, self._MPI.INT64_T])
        if phase is not None:
            for dest in range(self.size):
                if dest != self.rank:
                    self._record(data, dest, phase, 0, framed=False)
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        out = np.empty(int(counts.sum()), dtype=np.uint8)
        self.comm.Allgatherv([data, self._MPI.BYTE], [out, (counts, displs), self._MPI.BYTE])
        return [out[d:d + c].tobytes() for d, c in zip(displs, counts)]

    def bcast_bytes(self, buf, root=0):
        """``root``'s bytes on every rank (uncounted control traffic, e.g. initial parameters)."""
        data = _as_bytes_array(buf) if self.rank == root else np.empty(0, np.uint8)
        count = np.array([data.size], dtype=np.int64)
        self.comm.Bcast([count, self._MPI.INT64_T], root=root)
        out = data.copy() if self.rank == root else np.empty(int(count[0]), dtype=np.uint8)
        self.comm.Bcast([out, self._MPI.BYTE], root=root)
        return out.tobytes()

    def barrier(self):
        self.comm.Barrier()


class LocalGroup:
    """N ranks inside one process, one thread each, joined by queues (``--simulate N``).

    Runs the very code a real job runs (same topologies, same byte counting); only the
    wire is a ``queue.Queue`` per (source, dest, tag). If one rank fails, the others
    stop waiting and :meth:`run` re-raises the first error.
    """

    def __init__(self, size):
        self.size = size
        self._queues = {}
        self._lock = threading.Lock()
        self._barrier = threading.Barrier(size)
        self._slots = [None] * size
        self.error = None

    def queue(self, source, dest, tag):
        with self._lock:
            return self._queues.setdefault((source, dest, tag), queue.Queue())

    def barrier(self):
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            raise _Aborted() from None

    def exchange(self, rank, value):
        """Every rank's ``value``, in rank order (a collective of the group)."""
        self.barrier()
        self._slots[rank] = value
        self.barrier()
        values = list(self._slots)
        self.barrier()
        return values

    def transports(self, keep_messages=False):
        return [LocalTransport(self, r, Meter(r, keep_messages)) for r in range(self.size)]

    def run(self, fn, transports):
        """Call ``fn(transport)`` for every rank in its own thread; return the results by rank."""
        results = [None] * self.size

        def target(t):
            try:
                results[t.rank] = fn(t)
            except _Aborted:
                pass
            except BaseException as exc:  # first failure wins; wake everyone else
                with self._lock:
                    if self.error is None:
                        self.error = exc
                self._barrier.abort()

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
    """One rank of a :class:`LocalGroup`; same methods and byte counting as :class:`MPITransport`."""

    def __init__(self, group, rank, meter=None):
        self.group = group
        self.rank = rank
        self.size = group.size
        self.meter = Meter(rank) if meter is None else meter

    def send(self, buf, dest, phase, fp32_bytes):
        self._record(buf, dest, phase, fp32_bytes)
        self.group.queue(self.rank, dest, phase_tag(phase)).put(bytes(memoryview(buf).cast("B")))

    def recv(self, source, phase):
        q = self.group.queue(source, self.rank, phase_tag(phase))
        while True:
            try:
                return np.frombuffer(q.get(timeout=0.05), dtype=np.uint8)
            except queue.Empty:
                if self.group.error is not None:
                    raise _Aborted() from None

    def sendrecv(self, buf, dest, source, phase, fp32_bytes):
        self.send(buf, dest, phase, fp32_bytes)
        return self.recv(source, phase)

    def allreduce_sum(self, tensor, phase="allreduce"):
        """Sum in rank order (MPI may associate differently: last-bit differences from a real job)."""
        n = self.size
        host = tensor.detach().to("cpu", torch.float32).contiguous().clone()
        if n > 1:
            nominal = 2 * (n - 1) * host.numel() * 4 // n
            self.meter.record(phase, self.rank, -1, 0, nominal, nominal)
        total = self.group.exchange(self.rank, host)
        acc = total[0].clone()
        for t in total[1:]:
            acc += t
        return acc.to(tensor.device)

    def allgather_bytes(self, buf, phase=None):
        data = bytes(memoryview(buf).cast("B"))
        if phase is not None:
            for dest in range(self.size):
                if dest != self.rank:
                    self._record(data, dest, phase, 0, framed=False)
        return self.group.exchange(self.rank, data)

    def bcast_bytes(self, buf, root=0):
        return self.group.exchange(self.rank, bytes(memoryview(buf).cast("B")) if self.rank == root else None)[root]

    def barrier(self):
        self.group.barrier()


def world():
    """An :class:`MPITransport` on ``COMM_WORLD``, with codec threads shared among the node's ranks."""
    from .machine import share_cpus

    transport = MPITransport()
    share_cpus(transport.local_size)
    return transport


def abort_if_parallel(message):
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
    mpi.COMM_WORLD.Abort(1)
