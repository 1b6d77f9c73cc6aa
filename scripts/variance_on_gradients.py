"""Exact quantization variance of 3-bit level sets on real gradients (which fit, which norm).

    python scripts/variance_on_gradients.py [--model resnet20] [--bucket 8192] [--bits 3] [--steps 60]

Trains ``--model`` on CIFAR-10 (shared copy, or synthetic data when absent: said in the
output) for ``--steps`` SGD steps of batch 64 in one process and, at steps 0, 20 and the
last, computes for every level set the exact E||Q(v) - v||^2 / ||v||^2 of unbiased
stochastic rounding of the gradient (tensors of at least 1,000 coordinates, as training
compresses them): fixed tables (QSGD's, NUQSGD's, TernGrad's) and each adaptive codec
fitted to the gradient itself with ``--fit histogram`` and ``--fit model``, each with the
L2 and the max norm. Also checks the histogram's variance against the exact one.
"""

import argparse

import torch

from mpiqsgd.codecs import gradstats, make_codec
from mpiqsgd.codecs import leveltables as T
from mpiqsgd.codecs.levelset import expected_variance
from mpiqsgd.train import data as D
from mpiqsgd.train.models import build_model


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--bucket", type=int, default=8192)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    torch.manual_seed(0)
    try:
        train, _ = D.load_dataset("cifar10", None, False, seed=0)
        source = "CIFAR-10"
    except Exception as exc:  # no data here: say so and use the synthetic task
        train, _ = D.load_dataset("synthetic", None, False, synthetic_train=5000, synthetic_test=100, seed=0)
        source = f"synthetic data (CIFAR-10 not found: {exc})"
    print(f"{args.model} on {source}; {args.bits} bits, bucket {args.bucket}")
    model = build_model(args.model, num_classes=train.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    when = {0, 20, args.steps - 1}
    for step in range(args.steps):
        sel = torch.randint(0, len(train), (64,)).numpy()
        x, y = D.to_tensor(train.images[sel]), torch.as_tensor(train.labels[sel]).long()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if step in when:
            report(step, torch.cat([q.grad.reshape(-1) for q in model.parameters() if q.numel() >= 1000]), args)
        opt.step()


def report(step, g, args):
    total = float(g.double().pow(2).sum())
    rows = {}
    for norm in ("l2", "max"):
        rows[f"qsgd levels, {norm}"] = (T.to_table(T.qsgd_levels(args.bits)), norm)
        rows[f"nuq levels, {norm}"] = (T.to_table(T.nuq_levels(args.bits)), norm)
        for method in ("alq", "amq", "alq-n", "amq-n"):
            for fit in ("histogram", "model"):
                if fit == "histogram" and method.endswith("-n"):
                    continue  # the same statistics as alq / amq
                codec = make_codec(method, bits=args.bits, bucket=args.bucket, norm=norm, fit=fit)
                codec.fit(codec.local_stats(g))
                rows[f"{method} fit={fit}, {norm}"] = (codec.table.copy(), norm)
                if fit == "histogram":
                    density = gradstats.density_from_stats(codec.stats)
                    exact = expected_variance(codec.table, g, args.bucket, norm)
                    print(f"  step {step}: {method} {norm}: histogram variance / exact = "
                          f"{density.total * codec.model_variance / exact:.5f}")
    if args.bits == 2:
        rows["terngrad levels, max"] = (T.to_table(T.terngrad_levels()), "max")
    print(f"step {step}: {g.numel()} coordinates; E||Q(v)-v||^2 / ||v||^2, best first")
    scored = {k: expected_variance(t, g, args.bucket, norm) / total for k, (t, norm) in rows.items()}
    for name, value in sorted(scored.items(), key=lambda kv: kv[1]):
        print(f"  {name:32s} {value:.4f}")


if __name__ == "__main__":
    main()
