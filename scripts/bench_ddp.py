"""The peer: torch DDP on gloo, timed like ``mpiqsgd bench step`` (same models, batch, ranks, link).

    mpiexec -n 4 python scripts/bench_ddp.py --model resnet20 --batch-size 32 \
        [--hooks none,fp16,powersgd1,powersgd2,mpiqsgd-qsgd4,mpiqsgd-qsgd4-intsum]

Launched by mpiexec only to start the processes: ranks come from the launcher's environment
(PMI_RANK/PMI_SIZE of MPICH, OMPI_COMM_WORLD_* of Open MPI, else RANK/WORLD_SIZE) and torch.distributed
connects them over TCP (gloo) at $MASTER_ADDR, else 127.0.0.1 (--port). For each hook, every repeat times one step of
the model alone (forward, backward, SGD: no communication) and one DDP step, each started
by a barrier and timed on the slowest rank; the medians and their difference are printed
as one JSON line per hook. PowerSGD starts compressing at step 2 (its default waits 1,000
steps) and is warmed up before timing; it runs with one DDP bucket (see ``main``).

``mpiqsgd-<codec><bits>`` (e.g. ``mpiqsgd-qsgd4``) is :func:`mpiqsgd.ddp.mpiqsgd_hook` with that
codec (tensors under ``--min-compress-numel`` elements as fp32), on DDP's own buckets; with the
suffix ``-intsum`` (``mpiqsgd-qsgd4-intsum``) through the decode-free integer sum; its row
adds the bytes one rank sent per step, as mpiqsgd's meter counts them.
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from mpiqsgd.bench import _step_inputs
from mpiqsgd.codecs import make_codec
from mpiqsgd.ddp import MpiqsgdState, mpiqsgd_hook
from mpiqsgd.machine import machine_info
from mpiqsgd.train.models import build_model


def env_rank():
    for rank, size in (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                       ("RANK", "WORLD_SIZE")):
        if rank in os.environ:
            return int(os.environ[rank]), int(os.environ[size])
    return 0, 1


def mpiqsgd_codec(hook):
    """(codec, collective): ``mpiqsgd-qsgd4`` -> make_codec("qsgd", bits=4) through ``allgather``;
    ``mpiqsgd-sign`` -> make_codec("sign"); ``mpiqsgd-qsgd4-intsum`` -> the decode-free integer sum."""
    spec = hook.removeprefix("mpiqsgd-")
    spec, collective = (spec.removesuffix("-intsum"), "intsum") if spec.endswith("-intsum") else (spec, "allgather")
    name, bits = spec.rstrip("0123456789"), spec[len(spec.rstrip("0123456789")):]
    return make_codec(name, bits=int(bits) if bits else None), collective


def register(model, hook, min_compress_numel=1024):
    if hook == "none":
        return None
    if hook == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return None
    if hook.startswith("mpiqsgd-"):
        codec, collective = mpiqsgd_codec(hook)
        state = MpiqsgdState(None, codec, min_compress_numel=min_compress_numel, collective=collective)
        model.register_comm_hook(state, mpiqsgd_hook)
        return state
    rank = int(hook.removeprefix("powersgd"))
    state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=rank, start_powerSGD_iter=2)
    model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    return state


def slowest(seconds):
    t = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hooks", default="none,fp16,powersgd1,powersgd2,mpiqsgd-qsgd4,mpiqsgd-qsgd4-intsum")
    p.add_argument("--min-compress-numel", type=int, default=1024)  # mpiqsgd hooks: smaller tensors go as fp32
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--port", type=int, default=29517)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rank, size = env_rank()
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // size))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")  # `mpiqsgd cluster run`: its first node
    dist.init_process_group("gloo", init_method=f"tcp://{addr}:{args.port}", rank=rank, world_size=size)
    x, y = _step_inputs(args.model, args.batch_size, args.seed, rank, "cpu")
    loss_fn = torch.nn.functional.cross_entropy
    for hook in args.hooks.split(","):
        torch.manual_seed(args.seed)
        alone, wrapped = build_model(args.model, num_classes=10), build_model(args.model, num_classes=10)
        if hook.startswith("powersgd"):
            # PowerSGD chains a second allreduce onto each bucket's first from a future's
            # callback; on gloo two buckets' chains can then be issued in different orders on
            # different ranks (a collective mismatch). One bucket avoids the race.
            dist._DEFAULT_FIRST_BUCKET_BYTES = 1 << 40
            ddp = DDP(wrapped, bucket_cap_mb=1 << 20)
        else:
            ddp = DDP(wrapped)
        state = register(ddp, hook, args.min_compress_numel)
        opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (alone, ddp)]
        alone_s, step_s = [], []
        for rep in range(args.warmup + args.repeats):
            times = []
            for model, opt in zip((alone, ddp), opts):
                dist.barrier()
                start = time.perf_counter()
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
                times.append(time.perf_counter() - start)
            if rep >= args.warmup:
                alone_s.append(times[0])
                step_s.append(times[1])
            if rep == args.warmup - 1 and isinstance(state, MpiqsgdState):
                state.meter.reset()
        alone_s, step_s = slowest(alone_s), slowest(step_s)
        if rank == 0:
            a, s = statistics.median(alone_s), statistics.median(step_s)
            print(json.dumps({"benchmark": "ddp-step", "hook": hook, "model": args.model, "n_ranks": size,
                              "batch_size": args.batch_size, "repeats": args.repeats, "compute_seconds": a,
                              "step_seconds": s, "overhead_seconds": s - a, "overhead_vs_compute": (s - a) / a,
                              "compute_seconds_per_repeat": alone_s, "step_seconds_per_repeat": step_s,
                              **({"sent_bytes_per_step": state.meter.sent()["bytes"] // args.repeats,
                                  "min_compress_numel": args.min_compress_numel}
                                 if isinstance(state, MpiqsgdState) else {}),
                              "machine": machine_info()}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
