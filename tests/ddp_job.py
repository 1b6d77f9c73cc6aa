"""DDP + mpiqsgd_hook on gloo, run under torchrun by tests/test_ddp.py.

Each rank trains a few steps with the hook, records every bucket it handed over and got back,
then replays all ranks' buckets through mpiqsgd's own topology of the same pattern (``allgather``
or ``intsum``, a LocalGroup of threads) and checks: the same means bit for bit, the same bytes
counted, replicas identical.
Prints ``ok <case> rank <r>`` per passed case.
"""

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from mpiqsgd.codecs import make_codec
from mpiqsgd.ddp import MpiqsgdState, mpiqsgd_hook
from mpiqsgd.topology.allgather import Allgather
from mpiqsgd.topology.intsum import IntSum
from mpiqsgd.transport import LocalGroup

CASES = {  # name -> (codec name, codec params, min_compress_numel, warmup_steps, collective)
    "qsgd4": ("qsgd", {"bits": 4, "bucket": 64}, 50, 1, "allgather"),
    "ef-nearest": ("qsgd", {"bits": 2, "rounding": "nearest", "error_feedback": True}, 0, 0, "allgather"),
    "elias": ("qsgd-elias", {"bits": 4}, 50, 0, "allgather"),
    "intsum4": ("qsgd", {"bits": 4, "bucket": 64}, 50, 1, "intsum"),
    "intsum-ef": ("qsgd", {"bits": 2, "rounding": "nearest", "error_feedback": True}, 0, 0, "intsum"),
}
TOPOLOGY = {"allgather": Allgather, "intsum": IntSum}  # what each collective must equal
STEPS = 4


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.ReLU(), torch.nn.Linear(40, 30), torch.nn.ReLU(),
                               torch.nn.Linear(30, 5))


def train(case, compiled=False):
    codec, params, min_numel, warmup, collective = CASES[case]
    # DDP's optimizer for compiled models wants the first bucket (1 MB) no larger than the others
    model = DDP(net()) if compiled else DDP(net(), bucket_cap_mb=0.004)
    state = MpiqsgdState(None, make_codec(codec, **params), seed=3, min_compress_numel=min_numel,
                         warmup_steps=warmup, collective=collective)
    seen = {}

    def hook(state, bucket):
        key = (state.step, bucket.index())
        given = (bucket.buffer().clone(), [g.numel() for g in bucket.gradients()])

        def record(fut):
            value = fut.value()
            seen[key] = (*given, value.clone())
            return value

        return mpiqsgd_hook(state, bucket).then(record)

    model.register_comm_hook(state, hook)
    fn = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(100 + dist.get_rank())
    for _ in range(STEPS):
        x = torch.randn(16, 12, generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(fn(x), x[:, :5].argmax(1)).backward()
        opt.step()
    return model, state, seen


def replay(case, everyone):
    """Every rank's buckets through mpiqsgd's topology: {(step, index): mean} and bytes, by rank."""
    codec, params, min_numel, warmup, collective = CASES[case]
    group = LocalGroup(len(everyone))

    def work(t):
        agg = TOPOLOGY[collective](t, make_codec(codec, **params), seed=3)
        means = {}
        for key in sorted(everyone[t.rank]):
            step, index = key
            if step < warmup:
                continue
            buffer, numels, _ = everyone[t.rank][key]
            mask = torch.cat([torch.full((n,), n >= min_numel) for n in numels])
            means[key] = agg.aggregate(buffer[mask], step, stream=index)
        return means, t.meter.by_phase[collective]["bytes"]

    return group.run(work, group.transports())


def check(case, compiled=False):
    rank, n = dist.get_rank(), dist.get_world_size()
    model, state, seen = train(case, compiled)
    everyone = [None] * n
    dist.all_gather_object(everyone, {k: tuple(v) for k, v in seen.items()})
    replicas = [None] * n
    dist.all_gather_object(replicas, [p.detach() for p in model.parameters()])
    assert all(torch.equal(a, b) for r in replicas for a, b in zip(r, replicas[0])), "replicas differ"
    codec, params, min_numel, warmup, collective = CASES[case]
    means, sent = replay(case, everyone)[rank]
    assert compiled or len({index for _, index in seen}) > 1, "expected several DDP buckets"
    for key, (buffer, numels, out) in seen.items():
        mask = torch.cat([torch.full((k,), k >= min_numel) for k in numels])
        if key[0] < warmup:
            assert torch.allclose(out, sum(e[key][0] for e in everyone) / n, atol=1e-6), f"warm-up {key}"
            continue
        assert torch.equal(out[mask], means[key]), f"bucket {key}: not the {collective} topology's mean"
        if not bool(mask.all()):
            assert torch.allclose(out[~mask], sum(e[key][0][~mask] for e in everyone) / n, atol=1e-6)
    counted = state.meter.by_phase[collective]["bytes"]
    if make_codec(codec, **params).fixed_size:
        assert counted == sent > 0, f"hook counted {counted} bytes, the allgather topology {sent}"
    else:
        assert counted >= sent > 0 and state.meter.by_phase["lengths"]["messages"] > 0  # padded to the longest
    print(f"ok {case}{' compiled' if compiled else ''} rank {rank}", flush=True)


def main():
    dist.init_process_group("gloo")
    for case in sys.argv[1].split(","):
        if case == "compiled":
            check("qsgd4", compiled=True)
        else:
            check(case)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
