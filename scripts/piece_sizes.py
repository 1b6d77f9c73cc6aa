"""What cutting a chunk into pieces costs the codec: encode and decode time of one chunk as pieces of
each size, against one message (``scatter``'s ``piece_numel``; a quiet CPU, no network).

    python scripts/piece_sizes.py [--numel 12500000] [--bits 4] [--threads 1,2] [--repeats 5]

For each piece size: the fastest of ``--repeats`` of the time to encode every piece of a chunk of
``--numel`` coordinates (what one rank sends one peer; 12.5M is half of the issue's 25M gradient) and
to decode them all, and that time's excess over one message. The pipeline's fill and drain cost
about one piece's encode plus its decode and the mean piece's encode: the smaller the piece, the
less of the exchange runs without overlap, until per-message costs (calls, headers, the kernels'
thread start-up) take it back.
"""

import argparse
import time

import numpy as np
import torch

from mpiqsgd.codecs import make_codec, make_generator
from mpiqsgd.codecs.kernels import SeedAt, draw_seed, set_kernel_threads
from mpiqsgd.topology.ring import Scatter
from mpiqsgd.transport import LocalGroup

SIZES = [0, 1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 21, 1 << 22]


def seconds(codec, x, layout, repeats):
    buf = [np.empty(codec.encoded_nbytes(e - s) + 64, np.uint8) for s, e in layout]
    enc, dec = [], []
    for rep in range(repeats + 1):  # the first compiles and warms the buffers
        seed = draw_seed(make_generator(0, 0, rep))
        t0 = time.perf_counter()
        messages = [codec.encode(x[s:e], SeedAt(seed, s), out=b) for (s, e), b in zip(layout, buf)]
        t1 = time.perf_counter()
        for (s, e), m in zip(layout, messages):
            codec.decode(np.frombuffer(m, np.uint8).copy(), "cpu", e - s)
        t2 = time.perf_counter()
        if rep:
            enc.append(t1 - t0)
            dec.append(t2 - t1)
    return float(np.min(enc)), float(np.min(dec))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=12_500_000)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    codec = make_codec("qsgd", bits=args.bits)
    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
    (t,) = LocalGroup(1).transports()
    print(f"qsgd {args.bits}-bit, chunk of {args.numel:,} coordinates; ms, fastest of {args.repeats}")
    print(f"{'threads':>7} {'piece_numel':>11} {'pieces':>6} {'encode':>7} {'decode':>7} {'excess':>7} "
          f"{'piece enc+dec':>13}")
    for threads in [int(v) for v in args.threads.split(",")]:
        set_kernel_threads(threads)
        torch.set_num_threads(threads)
        whole = None
        for size in SIZES:
            layout = Scatter(t, codec, piece_numel=size).pieces(args.numel)
            enc, dec = seconds(codec, x, layout, args.repeats)
            whole = whole or enc + dec
            one = (enc + dec) / len(layout)
            print(f"{threads:>7} {size:>11,} {len(layout):>6} {1e3 * enc:>7.1f} {1e3 * dec:>7.1f} "
                  f"{1e3 * (enc + dec - whole):>+7.1f} {1e3 * one:>13.1f}")


if __name__ == "__main__":
    main()
