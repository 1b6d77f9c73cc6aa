"""mpiqsgd.exchange: gradient buckets and overlap with backward, in one process (a LocalGroup of threads).
DistributedOptimizer: tests/test_optimizer.py."""

import pytest
import torch

from mpiqsgd.exchange import make_buckets
from mpiqsgd.transport import LocalGroup
from overlap_cases import BUCKET_MB, CASES, model, train_steps


def run_group(n, case, overlap, bucket_mb=BUCKET_MB):
    group = LocalGroup(n)
    return group.run(lambda t: train_steps(t, case, overlap, bucket_mb=bucket_mb), group.transports())


def test_buckets_follow_backward_order_and_size():
    params = list(model().parameters())
    buckets = make_buckets(params, BUCKET_MB, 50)
    assert len(buckets) == 3
    flat = [p for b in buckets for p in b.params]
    assert [id(p) for p in flat] == [id(p) for p in reversed(params)]  # the order backward produces them
    assert all(sum(4 * p.numel() for p in b.params) <= 4000 or len(b.params) == 1 for b in buckets)
    assert all(p.numel() >= 50 for b in buckets for p in b.compressed)
    assert all(p.numel() < 50 for b in buckets for p in b.uncompressed)
    one = make_buckets(params, 0, 50)
    assert len(one) == 1 and [id(p) for p in one[0].params] == [id(p) for p in params]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{'-'.join(map(str, c[2].values()))}")
@pytest.mark.parametrize("n", [2, 3])
def test_overlap_equals_same_bucketing_without_overlap(n, case):
    plain = run_group(n, case, overlap=False)
    overlapped = run_group(n, case, overlap=True)
    for rank in range(n):
        params_a, sent_a, _ = plain[rank]
        params_b, sent_b, early = overlapped[rank]
        assert sent_a == sent_b > 0 or case[0] == "allreduce"
        assert all(torch.equal(a, b) for a, b in zip(params_a, params_b)), f"rank {rank} differs"
        assert all(torch.equal(a, b) for a, b in zip(params_b, overlapped[0][0])), "replicas differ"
    # every bucket of every step left during backward, except at the adaptive refits (steps 0 and 2)
    assert overlapped[0][2] == 3 * (2 if case[1] == "alq" else 4)


def test_buckets_use_independent_randomness_and_residuals():
    case = ("ring", "qsgd", {"bits": 2, "rounding": "nearest", "error_feedback": True}, {})
    bucketed = run_group(2, case, overlap=False)
    whole = run_group(2, case, overlap=False, bucket_mb=0)
    assert not all(torch.equal(a, b) for a, b in zip(bucketed[0][0], whole[0][0]))
    assert bucketed[0][1] > whole[0][1]  # more messages, more framing


def test_finish_without_begin_is_an_error():
    from mpiqsgd.codecs import make_codec
    from mpiqsgd.errors import ConfigError
    from mpiqsgd.exchange import GradientExchange

    group = LocalGroup(1)
    t = group.transports()[0]
    ex = GradientExchange(model().parameters(), t, make_codec("qsgd"), "ring", bucket_mb=BUCKET_MB, overlap=True)
    ex.begin(0)
    with pytest.raises(ConfigError, match=r"finish\(1\) without begin\(1\)"):
        ex.finish(1)
    ex.close()


def test_error_in_the_communication_thread_reaches_the_training_thread():
    from mpiqsgd.codecs import make_codec
    from mpiqsgd.errors import NonFiniteError
    from mpiqsgd.exchange import GradientExchange

    group = LocalGroup(1)
    t = group.transports()[0]
    net = model()
    ex = GradientExchange(net.parameters(), t, make_codec("qsgd"), "ring", bucket_mb=BUCKET_MB, overlap=True,
                          min_compress_numel=1)
    ex.begin(0)
    net(torch.full((4, 12), float("nan"))).sum().backward()
    with pytest.raises(NonFiniteError):
        ex.finish(0)
    ex.close()


def test_broadcast_parameters_gives_every_rank_the_roots_parameters_and_buffers():
    from mpiqsgd.exchange import broadcast_parameters, parameter_checksum

    group = LocalGroup(3)

    def rank(t):
        torch.manual_seed(t.rank)  # a different start on every rank
        net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        net[1].running_mean += t.rank
        before = parameter_checksum(net.parameters())
        broadcast_parameters(net, t, root=1)
        return before, parameter_checksum(net.parameters()), net[1].running_mean.clone()

    transports = group.transports()
    out = group.run(rank, transports)
    assert len({before for before, _, _ in out}) == 3
    assert all(after == out[1][0] for _, after, _ in out)  # root 1's parameters, unchanged on root 1
    assert all(torch.equal(mean, torch.ones(3)) for _, _, mean in out)  # buffers too
    assert all(t.meter.sent()["bytes"] == 0 for t in transports)  # set-up traffic, uncounted


def test_parameter_checksum_changes_with_any_bit():
    from mpiqsgd.exchange import parameter_checksum

    params = [torch.zeros(5), torch.ones(2, 2)]
    same = [torch.zeros(5), torch.ones(2, 2)]
    assert parameter_checksum(params) == parameter_checksum(same)
    same[1].view(torch.int32)[1, 0] ^= 1  # the lowest bit of one float
    assert parameter_checksum(params) != parameter_checksum(same)
    assert parameter_checksum([torch.tensor([0.0])]) != parameter_checksum([torch.tensor([-0.0])])
