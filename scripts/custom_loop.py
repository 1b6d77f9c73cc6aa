"""Quantized gradient exchange from your own PyTorch loop.

    mpiexec -n 2 python -m mpi4py scripts/custom_loop.py [--steps 100] [--codec qsgd] [--bits 4]

Each rank trains a small classifier on its own synthetic shard; gradients travel as
4-bit QSGD over a ring; rank 0 prints the loss and the bytes this rank sent.
"""

import argparse

import torch

from mpiqsgd.codecs import make_codec
from mpiqsgd.exchange import DistributedOptimizer, GradientExchange, broadcast_parameters
from mpiqsgd.transport import world


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--codec", default="qsgd")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--topology", default="ring")
    args = parser.parse_args()

    transport = world()
    rank = transport.rank
    torch.manual_seed(rank)  # deliberately different: broadcast_parameters makes them equal
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    broadcast_parameters(model, transport)

    codec = make_codec(args.codec, bits=args.bits if args.codec.startswith("qsgd") else None)
    exchange = GradientExchange(model.parameters(), transport, codec, args.topology, min_compress_numel=100)
    optimizer = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), exchange)

    teacher = torch.randn(20, 4, generator=torch.Generator().manual_seed(123))  # same task on every rank
    data = torch.Generator().manual_seed(1000 + rank)  # own shard per rank
    for step in range(args.steps):
        x = torch.randn(64, 20, generator=data)
        y = (x @ teacher).argmax(1)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 20 == 0 or step == args.steps - 1):
            sent = transport.meter.sent()["bytes"]
            print(f"step {step:4d}  loss {loss.item():.4f}  bytes sent by rank 0: {sent:,}", flush=True)


if __name__ == "__main__":
    main()
