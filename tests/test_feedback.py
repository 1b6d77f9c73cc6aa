"""Error feedback (mpiqsgd.codecs.feedback): the residual, its state, and the warning that a
non-contractive codec diverges."""


import pytest
import torch

from conftest import vec
from mpiqsgd.codecs import ErrorFeedback, make_codec, make_generator
from mpiqsgd.errors import NonFiniteError


def test_error_feedback_residual_semantics():
    inner = make_codec("sign", bucket=8)
    ef = ErrorFeedback(inner)
    g1, g2 = vec(32, 1), vec(32, 2)
    m1, d1 = ef.encode_decode(g1, key="a")
    assert m1 == inner.encode(g1)  # first call: residual zero
    assert torch.allclose(ef.residuals["a"], g1 - d1)
    m2, d2 = ef.encode_decode(g2, key="a")
    p2 = g2 + (g1 - d1)
    assert m2 == inner.encode(p2)
    assert torch.allclose(ef.residuals["a"], p2 - d2)
    assert len(m2) == ef.encoded_nbytes(32)
    assert torch.equal(ef.decode(m2), d2)
    # keys are independent
    ef.encode_decode(g1, key="b")
    assert torch.allclose(ef.residuals["b"], g1 - d1)


def test_error_feedback_keeps_what_the_compressor_drops():
    # Sum of decoded values tracks the sum of inputs: the difference is the bounded residual.
    ef = make_codec("sign", bucket=16, error_feedback=True)
    total_in, total_out = torch.zeros(64), torch.zeros(64)
    for i in range(200):
        g = vec(64, seed=i)
        total_in += g
        total_out += ef.decode(ef.encode(g))
    assert torch.allclose(total_in - total_out, ef.residuals["grad"], atol=1e-3)
    plain = make_codec("sign", bucket=16)
    drift = sum(vec(64, seed=i) - plain.decode(plain.encode(vec(64, seed=i))) for i in range(200))
    assert (total_in - total_out).norm() < 0.5 * drift.norm()


@pytest.mark.filterwarnings("ignore:error feedback with")
def test_error_feedback_state_roundtrip_reset_and_shape_change():
    ef = make_codec("qsgd", bits=2, error_feedback=True)
    ef.encode(vec(100), make_generator(0), key="k")
    state = ef.state_dict()
    other = make_codec("qsgd", bits=2, error_feedback=True)
    other.load_state_dict(state)
    g = vec(100, 5)
    assert ef.encode(g, make_generator(1), key="k") == other.encode(g, make_generator(1), key="k")
    ef.reset()
    assert ef.residuals == {}
    ef.encode(vec(100), make_generator(0), key="k")
    m = ef.encode(vec(50), make_generator(0), key="k")  # new shape: residual reset, not an error
    assert m == make_codec("qsgd", bits=2).encode(vec(50), make_generator(0))


def test_error_feedback_refuses_nan_without_touching_residual():
    ef = make_codec("sign", error_feedback=True)
    ef.encode(vec(10))
    before = ef.residuals["grad"].clone()
    bad = vec(10)
    bad[0] = float("nan")
    with pytest.raises(NonFiniteError):
        ef.encode(bad)
    assert torch.equal(ef.residuals["grad"], before)


def test_error_feedback_warns_when_the_compressor_is_not_contractive():
    with pytest.warns(UserWarning, match="can diverge"):
        make_codec("qsgd", bits=4, bucket=512, error_feedback=True)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_codec("qsgd", bits=8, error_feedback=True)
        make_codec("qsgd", bits=4, rounding="nearest", error_feedback=True)
        make_codec("sign", error_feedback=True)


def test_error_feedback_with_non_contractive_qsgd_really_diverges():
    # The warning is not hypothetical: the residual grows step after step.
    with pytest.warns(UserWarning):
        ef = make_codec("qsgd", bits=2, bucket=512, error_feedback=True)
    g = vec(512)
    norms = []
    for step in range(30):
        ef.encode(g, make_generator(0, 0, step))
        norms.append(float(ef.residuals["grad"].norm()))
    assert norms[-1] > 5 * norms[0]


def test_error_feedback_state_includes_the_inner_codec_state():
    ef = make_codec("alq-n", bits=3, bucket=64, error_feedback=True)
    ef.inner.fit(ef.inner.local_stats(vec(640)))
    ef.encode(vec(640), make_generator(0))
    other = make_codec("alq-n", bits=3, bucket=64, error_feedback=True)
    other.load_state_dict(ef.state_dict())
    assert other.params == ef.params and torch.equal(other.residuals["grad"], ef.residuals["grad"])
