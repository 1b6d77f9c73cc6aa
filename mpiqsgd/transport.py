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

Small control traffic (meters, statistics) goes through ``allgather_bytes`` and is
recorded only when given a phase.
"""

import sys
import zlib

import numpy as np
import torch

from . import wire
from .meter import Meter

__all__ = ["Transport", "MPITransport", "world", "abort_if_parallel", "mpi_library"]


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

    def barrier(self):
        self.comm.Barrier()


def world():
    """An :class:`MPITransport` on ``COMM_WORLD``."""
    return MPITransport()


def mpi_library():
    """One line naming the MPI library (imports mpi4py)."""
    from mpi4py import MPI

    return MPI.Get_library_version().strip().splitlines()[0].strip()


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
    mpi.COMM_WORLD.Abort(1)
