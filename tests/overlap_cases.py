"""Shared by tests/test_exchange.py (simulation) and tests/mpi/mpi_overlap.py (mpiexec):
a small model, the configurations, and a few steps of training through the library API."""

import threading

import torch

from mpiqsgd.codecs import make_codec
from mpiqsgd.exchange import DistributedOptimizer, GradientExchange

# (topology, codec name, codec params, topology options): every topology, and a stochastic,
# an error-feedback and an adaptive codec (intsum: QSGD codecs only).
CASES = [("allreduce", "fp32", {}, {})] + [
    (topology, codec, params, options)
    for topology, options in (("ps", {"downlink": "codec"}), ("ring", {}), ("scatter", {}), ("allgather", {}))
    for codec, params in (("qsgd", {"bits": 4, "bucket": 64}),
                          ("qsgd", {"bits": 2, "rounding": "nearest", "error_feedback": True}),
                          ("alq", {"bits": 3, "bucket": 256}))
] + [("intsum", "qsgd", {"bits": 4, "bucket": 64}, {}),
     ("intsum", "qsgd", {"bits": 2, "rounding": "nearest", "error_feedback": True}, {})]
BUCKET_MB = 0.004  # 4 KB: the model below makes 3 buckets


_INIT = threading.Lock()  # simulated ranks are threads: one draws from the global RNG at a time


def model():
    with _INIT:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.ReLU(), torch.nn.Linear(40, 30),
                                   torch.nn.ReLU(), torch.nn.Linear(30, 5))


def train_steps(transport, case, overlap, steps=4, bucket_mb=BUCKET_MB, on_step=None):
    """Train the model ``steps`` steps on this rank's own data; return (parameters, bytes sent, early buckets).

    ``on_step(i)`` is called after each step, if given."""
    topology, codec, params, options = case
    net = model()
    exchange = GradientExchange(net.parameters(), transport, make_codec(codec, **params), topology, seed=3,
                                min_compress_numel=50, adapt_at=(0, 2), bucket_mb=bucket_mb, overlap=overlap,
                                **options)
    opt = DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), exchange)
    data = torch.Generator().manual_seed(100 + transport.rank)
    early = 0
    try:
        for i in range(steps):
            x = torch.randn(16, 12, generator=data)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), x[:, :5].argmax(1)).backward()
            opt.step()
            early += exchange.overlap.early if overlap else 0
            if on_step is not None:
                on_step(i)
    finally:
        exchange.close()
    return [p.detach().clone() for p in net.parameters()], transport.meter.sent()["bytes"], early
