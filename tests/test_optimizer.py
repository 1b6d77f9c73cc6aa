"""DistributedOptimizer as a torch Optimizer: schedulers, closures, clipping, accumulation, mixed
precision, checkpoints, unused parameters, torch.compile (N ranks as threads of a LocalGroup)."""

import io

import pytest
import torch

from mpiqsgd.codecs import make_codec
from mpiqsgd.errors import ConfigError
from mpiqsgd.exchange import DistributedOptimizer, GradientExchange
from mpiqsgd.transport import LocalGroup
from optimizer_cases import CASES, MODES, accumulate, loss_of, micro_batches
from overlap_cases import _INIT, BUCKET_MB, model


def run(n, fn):
    group = LocalGroup(n)
    return group.run(fn, group.transports())


def make(t, net=None, codec=("qsgd", {"bits": 4, "bucket": 64}), overlap=False, lr=0.1, **kwargs):
    net = net if net is not None else model()
    ex = GradientExchange(net.parameters(), t, make_codec(codec[0], **codec[1]), "ring", seed=3,
                          min_compress_numel=50, bucket_mb=BUCKET_MB, overlap=overlap)
    opt = DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9), ex, **kwargs)
    return net, ex, opt


def params_of(net):
    return [p.detach().clone() for p in net.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# -- an Optimizer ---------------------------------------------------------------------------


def test_is_an_instance_of_the_wrapped_optimizer_class_sharing_its_state():
    t = LocalGroup(1).transports()[0]
    net = model()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt = DistributedOptimizer(sgd, GradientExchange(net.parameters(), t, make_codec("fp32"), "ring"))
    assert isinstance(opt, torch.optim.SGD) and isinstance(opt, DistributedOptimizer)
    assert opt.param_groups is sgd.param_groups and opt.state is sgd.state and opt.defaults is sgd.defaults
    assert type(DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=1), opt.exchange)) is type(opt)
    assert "lr: 0.1" in repr(opt)


def test_lr_scheduler_steps_the_learning_rate():
    def work(t):
        net, ex, opt = make(t)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        lrs = []
        for step in range(5):
            opt.zero_grad()
            loss_of(net, micro_batches(t.rank, step, 1)[0]).backward()
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        return lrs, params_of(net)

    (lrs, p0), (_, p1) = run(2, work)
    assert lrs == [0.1, 0.05, 0.05, 0.025, 0.025]
    assert same(p0, p1)


def test_step_with_a_closure_exchanges_the_closures_gradients():
    def work(t, use_closure):
        net, ex, opt = make(t, overlap=True)
        losses = []
        for step in range(3):
            x = micro_batches(t.rank, step, 1)[0]

            def closure():
                opt.zero_grad()
                loss = loss_of(net, x)
                loss.backward()
                return loss

            if use_closure:
                losses.append(opt.step(closure))
            else:
                losses.append(closure())
                opt.step()
        ex.close()
        return params_of(net), [float(v.detach()) for v in losses]

    with_closure = run(2, lambda t: work(t, True))
    without = run(2, lambda t: work(t, False))
    assert same(with_closure[0][0], with_closure[1][0])
    assert same(with_closure[0][0], without[0][0]) and with_closure[0][1] == without[0][1]


def test_clipping_after_synchronize_sees_the_mean_and_step_does_not_exchange_again():
    def work(t):
        net, ex, opt = make(t)
        opt.zero_grad()
        loss_of(net, micro_batches(t.rank, 0, 1)[0]).backward()
        opt.synchronize()
        grads = [p.grad.clone() for p in net.parameters()]
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 0.01)
        clipped = [p.grad.clone() for p in net.parameters()]
        sent = t.meter.sent()["bytes"]
        opt.step()
        return grads, float(norm), clipped, sent, t.meter.sent()["bytes"], params_of(net)

    (g0, n0, c0, s0, after0, p0), (g1, n1, c1, *_ , p1) = run(2, work)
    assert same(g0, g1) and n0 == n1 > 0.01  # the mean, identical on every rank
    assert abs(float(torch.cat([c.reshape(-1) for c in c0]).norm()) - 0.01) < 1e-6
    assert after0 == s0 > 0  # step() sent nothing more
    assert same(p0, p1)


def test_synchronize_misuse_is_refused():
    t = LocalGroup(1).transports()[0]
    net, ex, opt = make(t)
    loss_of(net, micro_batches(0, 0, 1)[0]).backward()
    opt.synchronize()
    with pytest.raises(ConfigError, match=r"synchronize\(\) twice"):
        opt.synchronize()
    loss_of(net, micro_batches(0, 1, 1)[0]).backward()
    with pytest.raises(ConfigError, match=r"backward\(\) after synchronize\(\)"):
        opt.step()


def test_zero_grad_set_to_none_and_add_param_group_for_an_unfrozen_layer():
    def work(t):
        net = model()
        head = torch.nn.Linear(5, 3)
        with torch.no_grad():
            head.weight.copy_(torch.arange(15.0).reshape(3, 5) / 15)
            head.bias.zero_()
        head.requires_grad_(False)
        net, ex, opt = make(t, net=net)
        assert len(ex.params) == 6
        sent = []
        for step in range(3):
            if step == 1:  # unfreeze the head, give it its own learning rate
                head.requires_grad_(True)
                opt.add_param_group({"params": head.parameters(), "lr": 0.01})
            opt.zero_grad(set_to_none=True)
            assert all(p.grad is None for p in net.parameters())
            x = micro_batches(t.rank, step, 1)[0]
            head(net(x)).pow(2).mean().backward()
            before = t.meter.sent()["bytes"]
            opt.step()
            sent.append(t.meter.sent()["bytes"] - before)
        return len(ex.params), params_of(head), sent

    (n0, h0, sent), (n1, h1, _) = run(2, work)
    assert n0 == n1 == 8 and same(h0, h1)
    assert sent[1] > sent[0]


def test_load_state_dict_round_trip_keeps_residuals_levels_and_step():
    codec = ("qsgd", {"bits": 2, "rounding": "nearest", "error_feedback": True})

    def work(t, split):
        net, ex, opt = make(t, codec=codec)
        blob = None
        for step in range(4):
            if step == split:
                buf = io.BytesIO()
                torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
                blob = buf.getvalue()
                saved = torch.load(io.BytesIO(blob), weights_only=True)
                net, ex, opt = make(t, codec=codec)  # a fresh process, as after a restart
                net.load_state_dict(saved["model"])
                opt.load_state_dict(saved["opt"])
                assert opt.steps == split
                assert saved["opt"]["mpiqsgd"]["exchange"]["compressed.codec"]["residuals"]
            opt.zero_grad()
            loss_of(net, micro_batches(t.rank, step, 1)[0]).backward()
            opt.step()
        return params_of(net)

    straight = run(2, lambda t: work(t, None))
    resumed = run(2, lambda t: work(t, 2))
    assert same(straight[0], resumed[0]) and same(straight[1], resumed[1])


def test_adaptive_levels_are_in_the_state_dict():
    def work(t):
        net, ex, opt = make(t, codec=("alq", {"bits": 3, "bucket": 256}))
        opt.zero_grad()
        loss_of(net, micro_batches(t.rank, 0, 1)[0]).backward()
        opt.step()
        return opt.state_dict()["mpiqsgd"]["exchange"]

    state = run(2, work)[0]
    assert state["compressed.codec"]


def test_parameters_are_checked():
    t = LocalGroup(1).transports()[0]
    net = model()
    ex = GradientExchange(net.parameters(), t, make_codec("fp32"), "ring")
    with pytest.raises(ConfigError, match="optimizer= must be a torch.optim.Optimizer"):
        DistributedOptimizer(net, ex)
    with pytest.raises(ConfigError, match="exchange= must be a GradientExchange"):
        DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=1), None)
    with pytest.raises(ConfigError, match="backward_passes_per_step must be an integer >= 1"):
        DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=1), ex, backward_passes_per_step=0)
    ex2 = GradientExchange(model().parameters(), t, make_codec("fp32"), "ring", overlap=True)
    with pytest.raises(ConfigError, match="overlap=False"):
        DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=1), ex2, skip_non_finite=True)
    ex2.close()


# -- gradient accumulation ------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{'-'.join(map(str, c[2].values()))}")
def test_accumulation_is_bit_identical_with_and_without_overlap_and_to_the_summed_gradient(case):
    k = 3
    results = {(overlap, mode): run(2, lambda t: accumulate(t, case, k, overlap, mode))
               for overlap in (False, True) for mode in MODES}
    reference = results[(False, "summed")]
    for key, per_rank in results.items():
        for rank in range(2):
            assert same(per_rank[rank][0], reference[rank][0]), f"{key} rank {rank} differs"
            assert per_rank[rank][1] == reference[rank][1], f"{key} rank {rank} sent other bytes"
    assert same(reference[0][0], reference[1][0])


@pytest.mark.parametrize("overlap", [False, True])
def test_a_backward_pass_beyond_the_declared_ones_is_an_error(overlap):
    t = LocalGroup(1).transports()[0]
    net, ex, opt = make(t, overlap=overlap, backward_passes_per_step=2)
    opt.zero_grad()
    for x in micro_batches(0, 0, 2):
        loss_of(net, x).backward()
    with pytest.raises(ConfigError, match=r"backward pass 3 since the last exchange, but backward_passes_per_step=2"):
        loss_of(net, micro_batches(0, 1, 1)[0]).backward()
    ex.close()


def test_the_issues_two_micro_batches_give_the_same_gradient_with_overlap():
    # the issue's report: with overlap the second micro-batch never reached the exchange
    def work(t, overlap):
        with _INIT:  # simulated ranks are threads: one draws from the global RNG at a time
            torch.manual_seed(0)
            net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        ex = GradientExchange(net.parameters(), t, make_codec("fp32"), "ring", bucket_mb=0.01, overlap=overlap)
        opt = DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), ex, backward_passes_per_step=2)
        opt.zero_grad()
        g = torch.Generator().manual_seed(t.rank)
        for _ in range(2):
            net(torch.randn(4, 64, generator=g)).pow(2).mean().backward()
        opt.synchronize()
        norm = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).norm()
        ex.close()
        return float(norm)

    assert run(2, lambda t: work(t, True)) == run(2, lambda t: work(t, False))


# -- parameters without a gradient ----------------------------------------------------------


class Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Linear(12, 40)
        self.used = torch.nn.Linear(40, 5)
        self.unused = torch.nn.Linear(40, 5)  # used by rank 0 only

    def forward(self, x, branch):
        return (self.unused if branch else self.used)(torch.relu(self.trunk(x)))


@pytest.mark.parametrize("overlap", [False, True])
def test_unused_parameters_contribute_zeros_and_receive_the_mean(overlap):
    def work(t):
        with _INIT:
            net = Branchy()
        ex = GradientExchange(net.parameters(), t, make_codec("fp32"), "ring", bucket_mb=0.002, overlap=overlap)
        opt = DistributedOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), ex)
        own = None
        for step in range(2):
            opt.zero_grad()
            x = micro_batches(t.rank, step, 1)[0]
            loss = net(x, branch=False).pow(2).mean()
            if t.rank == 0:
                loss = loss + net(x, branch=True).pow(2).mean()
            loss.backward()
            own = None if net.unused.weight.grad is None else net.unused.weight.grad.clone()
            opt.synchronize()
            mean = net.unused.weight.grad.clone()
            opt.step()
        ex.close()
        return own, mean, params_of(net)

    (own0, mean0, p0), (own1, mean1, p1) = run(2, work)
    assert own1 is None and torch.equal(mean0, mean1) and torch.equal(mean0, own0 / 2)
    assert same(p0, p1)


# -- mixed precision ------------------------------------------------------------------------


def test_bf16_autocast_exchanges_fp32_gradients():
    def work(t):
        net, ex, opt = make(t)
        for step in range(2):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = net(micro_batches(t.rank, step, 1)[0])
            assert out.dtype == torch.bfloat16
            torch.nn.functional.cross_entropy(out.float(), torch.zeros(8, dtype=torch.long)).backward()
            assert all(p.grad.dtype == torch.float32 for p in net.parameters())
            opt.step()
        return params_of(net), t.meter.sent()["bytes"]

    (p0, s0), (p1, s1) = run(2, work)
    assert same(p0, p1) and s0 > 0


def scaler_steps(t, device, use_scaler, inject_at=None, steps=3):
    """``steps`` steps through GradScaler (or none); at step ``inject_at`` rank 1's gradient gets an Inf."""
    net, ex, opt = make(t, net=model().to(device))
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10, enabled=use_scaler)
    skipped, scales = [], []
    for step in range(steps):
        opt.zero_grad()
        x = micro_batches(t.rank, step, 1)[0].to(device)
        with torch.autocast(device, dtype=torch.float16, enabled=device == "cuda"):
            loss = loss_of(net, x)
        scaler.scale(loss).backward()
        if step == inject_at and t.rank == 1:
            next(net.parameters()).grad[0, 0] = float("inf")
        before = params_of(net)
        scaler.step(opt)
        scaler.update()
        skipped.append(opt.skipped and same(before, params_of(net)))
        scales.append(scaler.get_scale() if use_scaler else None)
    return params_of(net), skipped, scales


def test_grad_scaler_exchange_sees_unscaled_gradients():
    # The scale is a power of two, so scaled backward then unscale gives the plain gradients' bits.
    scaled = run(2, lambda t: scaler_steps(t, "cpu", True))
    plain = run(2, lambda t: scaler_steps(t, "cpu", False))
    assert same(scaled[0][0], plain[0][0]) and same(scaled[1][0], plain[1][0])


def test_grad_scaler_skips_a_step_with_inf_on_any_rank_on_every_rank():
    (p0, skipped0, scales0), (p1, skipped1, scales1) = run(2, lambda t: scaler_steps(t, "cpu", True, inject_at=1))
    assert skipped0 == skipped1 == [False, True, False]
    assert same(p0, p1)
    assert scales1[1] == scales1[0] / 2 and scales0[1] == scales0[0]  # each rank's scaler decides its own scale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 GradScaler needs a GPU")
def test_grad_scaler_fp16_on_the_gpu():
    (p0, skipped0, _), (p1, skipped1, _) = run(2, lambda t: scaler_steps(t, "cuda", True, inject_at=1))
    assert skipped0 == skipped1 and skipped0[1]
    assert same(p0, p1)


# -- torch.compile --------------------------------------------------------------------------


def _inductor_unavailable():
    try:
        f = torch.compile(lambda x: x * 2 + 1)
        f(torch.ones(3))
    except Exception as exc:  # no C++ compiler, no triton...
        return f"torch.compile unavailable here: {type(exc).__name__}: {str(exc)[:200]}"
    return None


def test_a_compiled_model_exchanges_like_the_eager_one():
    reason = _inductor_unavailable()
    if reason:
        pytest.skip(reason)
    nets = [model() for _ in range(2)]
    compiled = [torch.compile(n) for n in nets]
    for c in compiled:  # compile in this thread before the ranks' threads run it
        loss_of(c, micro_batches(0, 0, 1)[0]).backward()
        for p in c.parameters():
            p.grad = None

    def work(t, use_compiled):
        net = nets[t.rank] if use_compiled else model()
        _, ex, opt = make(t, net=net, overlap=True)
        fn = compiled[t.rank] if use_compiled else net
        early = 0
        for step in range(2):
            opt.zero_grad()
            loss_of(fn, micro_batches(t.rank, step, 1)[0]).backward()
            opt.step()
            early += ex.overlap.early
        ex.close()
        return params_of(net), early

    compiled_run = run(2, lambda t: work(t, True))
    eager_run = run(2, lambda t: work(t, False))
    assert same(compiled_run[0][0], compiled_run[1][0])
    assert compiled_run[0][1] == 2 * len(make_buckets_of_model())  # buckets left during the compiled backward
    for a, b in zip(compiled_run[0][0], eager_run[0][0]):
        assert torch.allclose(a, b, atol=1e-5)


def make_buckets_of_model():
    from mpiqsgd.exchange import make_buckets

    return make_buckets(list(model().parameters()), BUCKET_MB, 50)
