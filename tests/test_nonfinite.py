"""Encoders never send what a receiver cannot decode to finite values; diverging error feedback
stops with the cause and the fix."""

import numpy as np
import pytest
import torch

from conftest import vec
from mpiqsgd.codecs import CODECS, ErrorFeedback, decode, make_codec, make_generator
from mpiqsgd.codecs.buckets import bucket_norms, checked_norms
from mpiqsgd.codecs.qsgd import max_norm
from mpiqsgd.codecs.residual import check_residual
from mpiqsgd.errors import NonFiniteError

FLT_MAX = float(np.finfo(np.float32).max)


def small(name):
    return make_codec(name) if name in ("fp32", "fp16") else make_codec(name, bucket=64)


@pytest.mark.parametrize("norm", ["l2", "max", "mean_abs"])
def test_checked_norms_are_the_float64_norms_rounded_once(norm):
    reduce = {"l2": lambda v: v.double().norm(dim=1), "max": lambda v: v.abs().amax(dim=1),
              "mean_abs": lambda v: v.double().abs().mean(dim=1)}[norm]
    for seed, n, bucket in [(0, 1000, 64), (1, 4099, 512), (2, 7, 3)]:
        x = vec(n, seed, "heavy") * 10.0 ** (seed * 3)
        rows = torch.nn.functional.pad(x, (0, -n % bucket)).view(-1, bucket)  # zero padding: the same sums
        expect = reduce(rows).to(torch.float32)
        if norm == "mean_abs" and n % bucket:  # the short last bucket's mean is over its own length
            expect[-1] = x[-(n % bucket):].double().abs().mean().to(torch.float32)
        got = checked_norms(x, bucket, norm, "t")
        assert got.dtype == torch.float32 and torch.allclose(got, expect, rtol=1e-7, atol=0)


@pytest.mark.parametrize("force_torch", [False, True])
def test_norms_are_summed_in_float64_and_do_not_overflow(force_torch):
    x = torch.full((512,), 1e20)
    assert x.pow(2).sum().isinf()  # a float32 sum of squares overflows (what the encoder once sent)
    assert float(bucket_norms(x, 512, "l2", force_torch)) == pytest.approx(1e20 * 512**0.5, rel=1e-6)
    assert float(checked_norms(x, 512, "l2", "t", force_torch=force_torch)) == pytest.approx(1e20 * 512**0.5, rel=1e-6)
    big = torch.full((512,), 1e37)
    assert float(checked_norms(big, 512, "mean_abs", "t", force_torch=force_torch)) == pytest.approx(1e37, rel=1e-6)
    assert bucket_norms(torch.full((512,), FLT_MAX), 512, "l2", force_torch).isinf().all()  # beyond float32


@pytest.mark.parametrize("norm", ["l2", "max", "mean_abs"])
def test_numba_norms_equal_the_torch_ops(norm):
    """The kernel's float64 sums in its order and torch's in its own round to the same float32 norms
    (they could differ only within float64 rounding error of a float32 rounding boundary)."""
    for seed, n, bucket in [(0, 100_003, 512), (1, 4099, 8192), (2, 7, 3), (3, 300_000, 17)]:
        x = vec(n, seed, "heavy")
        assert torch.equal(bucket_norms(x, bucket, norm), bucket_norms(x, bucket, norm, force_torch=True))
        expect = {"l2": lambda v: v.double().norm(), "max": lambda v: v.abs().max(),
                  "mean_abs": lambda v: v.double().abs().mean()}[norm]
        assert float(bucket_norms(x, bucket, norm)[-1]) == pytest.approx(
            float(expect(x[(n - 1) // bucket * bucket:])), rel=1e-7)  # the last bucket, which may be short


@pytest.mark.parametrize("norm", ["l2", "max", "mean_abs"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("force_torch", [False, True])
def test_a_non_finite_value_makes_its_bucket_norm_non_finite(norm, bad, force_torch):
    for position in (0, 5, 15, 16, 99):  # the kernel's lanes, and the tail past the last whole lane group
        x = torch.randn(300)
        x[100 + position] = bad
        norms = bucket_norms(x, 100, norm, force_torch)
        assert bool(torch.isfinite(norms[[0, 2]]).all()) and not bool(torch.isfinite(norms[1]))


def may_refuse(name, magnitude):
    """Whether no finite message of ``small(name)`` can carry ``magnitude`` everywhere: beyond fp16's
    range, or a bucket's l2 norm (64 values) beyond float32's. Every other case must encode."""
    if name == "fp16":
        return magnitude > float(np.finfo(np.float16).max)
    return magnitude * 64**0.5 > FLT_MAX


@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.parametrize("magnitude", [1e19, 1e20, 1e30, 1e37, 2e38, FLT_MAX])
def test_large_finite_gradients_encode_to_finite_values_or_refuse(name, magnitude):
    """Either the bytes decode to the encoder's own finite values, or NonFiniteError before sending,
    and only where no finite message exists (:func:`may_refuse`)."""
    codec = small(name)
    x = vec(200, 3).sign() * magnitude
    try:
        message, decoded = codec.encode_decode(x, make_generator(0))
    except NonFiniteError as exc:
        assert "norm" in str(exc) or "range" in str(exc), str(exc)
        assert may_refuse(name, magnitude), f"{name} refused {magnitude:g}, which a finite message carries: {exc}"
        return
    assert bool(torch.isfinite(decoded).all())
    assert torch.equal(decode(message), decoded)


@pytest.mark.parametrize("name", ["qsgd", "qsgd-elias", "sign", "nuqsgd"])
def test_sum_of_squares_overflow_no_longer_refused(name):
    """1e20 everywhere: finite norms; encoded and decoded without loss of scale."""
    codec = small(name)
    x = vec(256, 4).sign() * 1e20
    message, decoded = codec.encode_decode(x, make_generator(0))
    assert torch.equal(decode(message), decoded)
    assert float(decoded.abs().max()) > 1e19


def test_overflowing_norm_names_the_cause():
    with pytest.raises(NonFiniteError, match=r"bucket 1 has a l2 norm of 4\.24e\+38.*contractive"):
        make_codec("qsgd", bucket=4).encode(torch.tensor([1.0, 0, 0, 0, 3e38, 3e38, 0, 0]), make_generator(0))
    # qsgd-inf at 8 bits: s * (FLT_MAX / s) rounds to inf, so FLT_MAX itself is refused
    assert max_norm(127) < FLT_MAX
    with pytest.raises(NonFiniteError, match="max norm"):
        make_codec("qsgd-inf", bits=8, bucket=4).encode(torch.tensor([FLT_MAX, 1.0]), make_generator(0))


def _run_error_feedback(codec, steps, check=True):
    """Feed the same gradient ``steps`` times; return the step at which a NonFiniteError came, or None."""
    ef = ErrorFeedback(codec)
    x = vec(4096, 5)
    for step in range(steps):
        try:
            ef.encode_decode(x, make_generator(0, 0, step))
            if check:
                check_residual(codec, ef.residuals["grad"], x, "grad", step)
        except NonFiniteError as exc:
            return step, str(exc)
    return None, None


def test_diverging_error_feedback_stops_with_cause_and_fix():
    with pytest.warns(UserWarning, match="can diverge"):
        step, message = _run_error_feedback(make_codec("qsgd", bits=2, bucket=512), 60)
    assert step is not None and step < 60, step  # the residual's values are then near 1e7, far from overflow
    assert "error feedback diverged for 'grad'" in message and "not contractive" in message
    assert "--rounding nearest" in message and "--codec sign" in message


def test_without_the_residual_check_the_encoder_still_refuses_before_sending():
    """A residual grown to 3e37 (finite values, bucket norms past FLT_MAX): refused, not sent as inf."""
    with pytest.warns(UserWarning, match="can diverge"):
        ef = ErrorFeedback(make_codec("qsgd", bits=2, bucket=512))
    x = vec(4096, 5)
    ef.residuals["grad"] = x * 3e37
    with pytest.raises(NonFiniteError, match="norm of .*e\\+38.*error feedback"):
        ef.encode_decode(x, make_generator(0))


@pytest.mark.parametrize("codec", [make_codec("qsgd", bits=2, bucket=512, rounding="nearest"), make_codec("sign"),
                                   make_codec("qsgd", bits=8, bucket=64)], ids=repr)
def test_contractive_error_feedback_is_not_flagged(codec):
    assert _run_error_feedback(codec, 150) == (None, None)


def test_residual_check_edge_cases():
    codec = make_codec("sign")
    check_residual(codec, torch.ones(10), torch.zeros(10))  # no gradient: not divergence
    check_residual(codec, torch.zeros(0), torch.zeros(0))
    with pytest.raises(NonFiniteError, match="largest value is inf"):
        check_residual(codec, torch.tensor([1.0, float("inf")]), torch.ones(2))
    with pytest.raises(NonFiniteError, match="largest value is nan"):
        check_residual(codec, torch.tensor([float("nan"), 1.0]), torch.ones(2))
    with pytest.raises(NonFiniteError, match="at step 7"):
        check_residual(codec, torch.full((3,), 2e6), torch.ones(3), step=7)
