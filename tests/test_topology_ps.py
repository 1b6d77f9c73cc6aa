"""``ps``, the parameter server (mpiqsgd.topology.ps). Under mpiexec: tests/mpi/mpi_topologies.py."""


import torch

from mpiqsgd.codecs import make_codec
from mpiqsgd.topology import make_aggregator
from mpiqsgd.transport import LocalGroup


def test_ps_with_encoded_downlink_stays_unbiased():
    # Uplink and downlink roundings must use independent uniforms, else they correlate.
    group = LocalGroup(1)
    t = group.transports()[0]
    agg = make_aggregator("ps", t, make_codec("qsgd", bits=2, bucket=64), downlink="codec")
    g = torch.tensor([0.3, -0.5, 0.1, 0.9] * 16)
    steps = 2000
    mean = sum(agg.aggregate(g.clone(), s).double() for s in range(steps)) / steps
    # per-coordinate variance of two 1-level roundings is at most 2 * (norm^2 / 4)
    stderr = (2 * float(g.norm()) ** 2 / 4 / steps) ** 0.5
    assert float((mean - g.double()).abs().max()) < 4.5 * stderr
