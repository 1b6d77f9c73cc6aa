"""Bits per coordinate of QSGD's dense, Elias and entropy encodings against the symbols' entropy.

    python scripts/codec_sizes.py [--numel 1000000] [--bits 2,3,4,8] [--json]

Data: a normal vector of ``--numel`` coordinates, and one ResNet-20 gradient: mpiqsgd's
``resnet20`` at its seeded initialization, one backward pass of a random CIFAR-shaped batch of
128 images with random labels (all parameters as one flat vector, 272,474 coordinates). Sizes
are deterministic (seeded), so they need no quiet machine. For each bits: the whole message's
bits per coordinate for each encoding, the empirical entropy H of the symbols (signed levels,
memoryless) and the entropy message against H plus its side bytes (frame, header, scales, model).
"""

import argparse
import json

import torch

from mpiqsgd.bench import symbol_stats
from mpiqsgd.codecs import make_codec
from mpiqsgd.train.models import build_model


def resnet20_gradient(seed=0, batch=128):
    torch.manual_seed(seed)
    model = build_model("resnet20", num_classes=10)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def rows(data, bits_list, bucket):
    out = []
    for bits in bits_list:
        row = {"bits": bits}
        for encoding in ("dense", "elias", "entropy"):
            stats = symbol_stats(make_codec("qsgd", bits=bits, bucket=bucket, encoding=encoding), data)
            row[encoding] = stats["bits_per_coordinate"]
            row["H"] = stats["entropy_bits_per_coordinate"]
            if encoding == "entropy":
                row["entropy_vs_limit"] = stats["vs_entropy"]
                row["group"] = stats["group"]
            if encoding == "elias":
                row["elias_vs_bound"] = stats["vs_elias_bound"]
        out.append(row)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numel", type=int, default=1_000_000)
    p.add_argument("--bits", default="2,3,4,8")
    p.add_argument("--bucket", type=int, default=512)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    bits_list = [int(b) for b in args.bits.split(",")]
    data = {"normal": torch.randn(args.numel, generator=torch.Generator().manual_seed(0)),
            "resnet20 gradient": resnet20_gradient()}
    result = {name: rows(x, bits_list, args.bucket) for name, x in data.items()}
    if args.json:
        print(json.dumps({"bucket": args.bucket, "numel": {k: v.numel() for k, v in data.items()}, **result},
                         indent=2))
        return
    print(f"qsgd, bucket {args.bucket}: bits per coordinate of the whole message (H: symbols' entropy)")
    print(f"{'data':<18} {'bits':>4} {'dense':>7} {'elias':>7} {'entropy':>7} {'H':>7} {'entropy/(H+side)':>17} "
          f"{'elias/bound':>11}")
    for name, table in result.items():
        for r in table:
            print(f"{name:<18} {r['bits']:>4} {r['dense']:7.4f} {r['elias']:7.4f} {r['entropy']:7.4f} "
                  f"{r['H']:7.4f} {r['entropy_vs_limit']:17.4f} {r['elias_vs_bound']:11.3f}")


if __name__ == "__main__":
    main()
