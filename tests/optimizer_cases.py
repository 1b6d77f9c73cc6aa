"""Shared by tests/test_optimizer.py (simulation) and tests/mpi/mpi_optimizer.py (mpiexec):
gradient accumulation through :class:`mpiqsgd.exchange.DistributedOptimizer`, three ways."""

import torch

from mpiqsgd.codecs import make_codec
from mpiqsgd.exchange import DistributedOptimizer, GradientExchange
from overlap_cases import BUCKET_MB, model

# (topology, codec name, codec params): a stochastic codec and an error-feedback one.
CASES = [("ring", "qsgd", {"bits": 4, "bucket": 64}),
         ("allgather", "qsgd", {"bits": 2, "rounding": "nearest", "error_feedback": True})]
MODES = ("accumulate", "no_sync", "summed")


def micro_batches(rank, step, k):
    g = torch.Generator().manual_seed(1000 * rank + 10 * step)
    return [torch.randn(8, 12, generator=g) for _ in range(k)]


def loss_of(net, x):
    return torch.nn.functional.cross_entropy(net(x), x[:, :5].argmax(1))


def accumulate(transport, case, k, overlap, mode, steps=3):
    """Train ``steps`` steps of ``k`` micro-batches each; return (parameters, bytes sent).

    ``accumulate``: ``backward_passes_per_step=k``, k backward passes; ``no_sync``: the first
    k-1 passes inside ``no_sync()``, one counted pass; ``summed``: each micro-batch's gradient
    by ``torch.autograd.grad``, summed in backward's order into ``.grad``, one exchange.
    """
    topology, codec, params = case
    net = model()
    exchange = GradientExchange(net.parameters(), transport, make_codec(codec, **params), topology, seed=3,
                                min_compress_numel=50, bucket_mb=BUCKET_MB, overlap=overlap)
    opt = DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), exchange,
                               backward_passes_per_step=k if mode == "accumulate" else 1)
    try:
        for step in range(steps):
            opt.zero_grad()
            batches = micro_batches(transport.rank, step, k)
            if mode == "accumulate":
                for x in batches:
                    loss_of(net, x).backward()
            elif mode == "no_sync":
                with opt.no_sync():
                    for x in batches[:-1]:
                        loss_of(net, x).backward()
                loss_of(net, batches[-1]).backward()
            else:
                total = None
                for x in batches:
                    grads = torch.autograd.grad(loss_of(net, x), list(net.parameters()))
                    total = list(grads) if total is None else [a + b for a, b in zip(total, grads)]
                for p, g in zip(net.parameters(), total):
                    p.grad = g
            opt.step()
    finally:
        exchange.close()
    return [p.detach().clone() for p in net.parameters()], transport.meter.sent()["bytes"]
