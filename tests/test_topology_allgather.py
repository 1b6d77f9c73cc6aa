"""``allgather`` (mpiqsgd.topology.allgather). Under mpiexec: tests/mpi/mpi_topologies.py."""


import torch

from mpiqsgd.codecs import make_codec, make_generator
from mpiqsgd.topology import make_aggregator


def test_one_rank_stochastic_is_seeded_by_seed_rank_and_step(t):
    x = torch.randn(1001)
    codec = make_codec("qsgd")
    out = make_aggregator("allgather", t, codec, seed=5).aggregate(x.clone(), step=9)
    assert torch.equal(out, codec.decode(codec.encode(x, make_generator(5, 0, 9))))
