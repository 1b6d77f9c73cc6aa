"""mpiqsgd.transport: what every transport counts and times (one record a message, at its sender, header and
payload apart; collectives at their nominal cost), the in-process LocalGroup behind --simulate, and
MPITransport on a one-rank communicator, and how a process ends (exit_now). Several ranks under mpiexec:
tests/mpi/."""

import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from mpiqsgd import wire
from mpiqsgd.errors import CommTimeout, ConfigError
from mpiqsgd.transport import LocalGroup, Poller, allreduce_nbytes, phase_tag


def test_failure_in_one_rank_releases_the_others():
    group = LocalGroup(3)

    def work(t):
        if t.rank == 2:
            raise ValueError("rank 2 broke")
        if t.rank == 0:
            t.recv(2, "never")
        t.barrier()

    with pytest.raises(ValueError, match="rank 2 broke"):
        group.run(work, group.transports())


def test_collectives():
    group = LocalGroup(3)
    out = group.run(lambda t: (t.allgather_bytes(bytes([t.rank])), t.bcast_bytes(b"x" * (t.rank + 1), root=1),
                               t.allreduce_sum(torch.full((2,), float(t.rank)))), group.transports())
    for gathered, bcast, total in out:
        assert gathered == [b"\x00", b"\x01", b"\x02"] and bcast == b"xx" and torch.equal(total, torch.full((2,), 3.0))


def framed(numel):
    """An fp32 message of ``numel`` zeros."""
    return wire.frame(wire.pack_header("fp32", numel, {}), bytes(4 * numel))


def test_a_message_is_counted_once_at_its_sender_header_and_payload_apart():
    group = LocalGroup(2)
    transports = group.transports(keep_messages=True)
    message = framed(3)

    def work(t):
        t.begin_step(4)
        if t.rank == 0:
            return t.send(message, 1, "push", fp32_bytes=12)
        return bytes(t.recv(0, "push"))

    assert group.run(work, transports)[1] == message
    (m,) = transports[0].meter.messages
    assert (m.step, m.phase, m.source, m.dest, m.payload_bytes, m.fp32_bytes) == (4, "push", 0, 1, 12, 12)
    assert m.header_bytes == wire.header_nbytes(message) == len(message) - 12
    assert transports[1].meter.messages == [] and transports[1].meter.sent()["bytes"] == 0


def test_sendrecv_isend_and_recv_each_count_every_message():
    group = LocalGroup(3)
    transports = group.transports(keep_messages=True)
    messages = [framed(r) for r in range(3)]

    def work(t):
        right, left = (t.rank + 1) % 3, (t.rank - 1) % 3
        got = bytes(t.sendrecv(messages[t.rank], right, left, "ring", fp32_bytes=4 * t.rank))
        if t.rank == 0:
            return got, {source: bytes(m) for source, m in t.recv_each([1, 2], "push")}
        t.wait_sends([t.isend(messages[t.rank], 0, "push", 4 * t.rank)])
        return got, None

    out = group.run(work, transports)
    assert [got for got, _ in out] == [messages[2], messages[0], messages[1]]
    assert out[0][1] == {1: messages[1], 2: messages[2]}
    for t in transports:
        expected = [("ring", (t.rank + 1) % 3)] + ([("push", 0)] if t.rank else [])
        assert [(m.phase, m.dest) for m in t.meter.messages] == expected
        assert t.meter.sent()["bytes"] == len(messages[t.rank]) * len(expected)
        assert t.meter.sent()["fp32_bytes"] == 4 * t.rank * len(expected)


def test_allreduces_are_counted_at_their_nominal_cost():
    group = LocalGroup(4)
    transports = group.transports(keep_messages=True)

    def work(t):
        total = t.allreduce_sum(torch.full((10,), float(t.rank)))
        words = t.allreduce_array(np.array([t.rank, 7 - t.rank], np.uint64), "max", "scales", fp32_numel=100)
        return total, words

    for total, words in group.run(work, transports):
        assert torch.equal(total, torch.full((10,), 6.0)) and words.tolist() == [3, 7]
    assert allreduce_nbytes(10, 4) == 60 and allreduce_nbytes(16, 4, itemsize=1) == 24
    for t in transports:
        a, b = t.meter.messages
        assert (a.phase, a.dest, a.header_bytes, a.payload_bytes, a.fp32_bytes) == ("allreduce", -1, 0, 60, 60)
        assert (b.phase, b.dest, b.header_bytes, b.payload_bytes, b.fp32_bytes) == ("scales", -1, 0, 24, 600)
    (one,) = LocalGroup(1).transports()
    one.allreduce_sum(torch.ones(10))
    one.allreduce_array(np.ones(3), "sum")
    assert one.meter.sent()["messages"] == 0 == allreduce_nbytes(10, 1)  # one rank: nothing leaves it
    with pytest.raises(ConfigError, match="op must be one of sum, max; got 'min'"):
        one.allreduce_array(np.ones(3), "min")


def test_an_allgather_is_counted_only_when_given_a_phase():
    group = LocalGroup(3)
    transports = group.transports(keep_messages=True)
    out = group.run(lambda t: (t.allgather_bytes(b"ab" * (t.rank + 1)), t.allgather_bytes(b"xyz", phase="stats")),
                    transports)
    assert out[0] == ([b"ab", b"abab", b"ababab"], [b"xyz"] * 3)
    for t in transports:
        assert [(m.phase, m.dest, m.header_bytes, m.payload_bytes) for m in t.meter.messages] == [
            ("stats", d, 0, 3) for d in range(3) if d != t.rank]


def test_waiting_is_communication_and_callers_time_their_own_phases():
    group = LocalGroup(2)
    transports = group.transports()

    def work(t):
        with t.timed("encode"):
            time.sleep(0.02)
        if t.rank == 1:
            time.sleep(0.05)  # rank 0 waits for this message
            t.send(framed(0), 0, "push", 0)
        else:
            t.recv(1, "push")

    group.run(work, transports)
    assert all(0.02 <= t.meter.seconds["encode"] < 5 for t in transports)
    assert 0.04 <= transports[0].meter.seconds["communicate"] < 5
    assert set(transports[1].meter.seconds) == {"encode", "communicate"}


def test_phase_tags_are_stable_and_valid_mpi_tags():
    assert [phase_tag(p) for p in ("push", "pull", "ring")] == [22341, 3700, 2647]  # the same on every rank and run
    assert all(1 <= phase_tag(p) <= 30000 for p in ("", "allgather", "x" * 1000))


def test_poller_returns_the_first_true_value_and_times_out_naming_the_wait():
    values = iter([0, None, "", 5])
    assert Poller(spin_seconds=0, first_sleep=1e-4).until(lambda: next(values)) == 5
    with pytest.raises(CommTimeout, match="waited 0 s for rank 3's push: that rank"):
        Poller(spin_seconds=0, first_sleep=1e-4, max_sleep=1e-3).until(lambda: False, timeout=0.05,
                                                                         what=lambda: "rank 3's push")


def test_mpi_transport_on_one_rank_sends_to_itself_and_counts_it(t):
    t.meter.reset()
    message = framed(2)
    handle = t.isend(message, 0, "self", fp32_bytes=8)
    assert bytes(t.recv(0, "self")) == message
    t.wait_sends([handle])
    assert t.meter.sent() == {"messages": 1, "bytes": len(message), "header_bytes": len(message) - 8,
                              "payload_bytes": 8, "fp32_bytes": 8}
    assert torch.equal(t.allreduce_sum(torch.ones(3)), torch.ones(3))
    assert t.allgather_bytes(b"q", phase="x") == [b"q"]
    assert t.meter.sent()["messages"] == 1  # a one-rank allreduce or allgather sends nothing


EXIT_NOW = """
import atexit
from mpiqsgd.transport import exit_now

class Teardown:
    def __del__(self):
        print("teardown ran", flush=True)

kept = Teardown()  # freed only by the interpreter's teardown
atexit.register(lambda: print("atexit ran", flush=True))
print("buffered, not flushed", end="; ")
exit_now(3)
"""


def test_exit_now_says_everything_runs_atexit_and_skips_the_teardown():
    proc = subprocess.run([sys.executable, "-c", EXIT_NOW], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered, not flushed; atexit ran\n", proc.stdout
