"""The in-process LocalGroup transport behind --simulate."""

import pytest
import torch

from mpiqsgd.transport import LocalGroup


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
