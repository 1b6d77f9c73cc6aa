import math

import numpy as np
import pytest
import torch

from conftest import vec
from mpiqsgd.codecs import CODECS, ErrorFeedback, decode, kernels, make_codec, make_generator
from mpiqsgd.codecs.qsgd import QSGD
from mpiqsgd.errors import ConfigError, DecodeError, NonFiniteError

ALL = [
    ("fp32", {}), ("fp16", {}), ("sign", {}), ("sign", {"bucket": 7}),
    ("qsgd", {}), ("qsgd", {"bits": 2, "bucket": 128}), ("qsgd", {"bits": 8}),
    ("qsgd", {"levels": 5, "bucket": 33}), ("qsgd", {"rounding": "nearest"}),
    ("qsgd-inf", {"bits": 3}), ("qsgd-inf", {"rounding": "nearest", "bucket": 100}),
]
STOCHASTIC = [("qsgd", {"bits": b, "bucket": d}) for b, d in [(2, 16), (3, 64), (4, 512), (8, 128)]] + [
    ("qsgd-inf", {"bits": 3, "bucket": 32}), ("qsgd", {"levels": 5, "bucket": 10})]


@pytest.mark.parametrize("name,params", ALL)
@pytest.mark.parametrize("n", [0, 1, 5, 127, 128, 129, 511, 512, 513, 1000, 4099])
def test_roundtrip_exact_size_and_bit_identical_decode(name, params, n):
    codec = make_codec(name, **params)
    x = vec(n, seed=n)
    message, decoded = codec.encode_decode(x, make_generator(1, 2, 3))
    assert isinstance(message, bytes)
    assert len(message) == codec.encoded_nbytes(n)
    assert decoded.shape == (n,) and decoded.dtype == torch.float32
    for y in (codec.decode(message), decode(message)):
        assert y.dtype == torch.float32 and y.shape == (n,)
        assert torch.equal(y, decoded)


@pytest.mark.parametrize("name,params", ALL)
def test_accepts_shapes_and_dtypes(name, params):
    codec = make_codec(name, **params)
    x = vec(60).view(3, 4, 5)
    for t in (x, x.double(), x.half(), x.transpose(0, 2)):
        y = codec.decode(codec.encode(t, make_generator(0)))
        assert y.shape == (60,) and y.dtype == torch.float32


def test_fp32_is_identity_and_fp16_is_a_cast():
    x = vec(1000)
    assert torch.equal(make_codec("fp32").decode(make_codec("fp32").encode(x)), x)
    assert torch.equal(make_codec("fp16").decode(make_codec("fp16").encode(x)), x.half().float())
    assert len(make_codec("fp16").encode(x)) - len(make_codec("fp32").encode(x)) == -2000


def test_fp16_refuses_overflow():
    with pytest.raises(NonFiniteError, match="range"):
        make_codec("fp16").encode(torch.tensor([1.0, 1e6]))


@pytest.mark.parametrize("name,params", ALL)
def test_zero_vector(name, params):
    codec = make_codec(name, **params)
    y = codec.decode(codec.encode(torch.zeros(1000), make_generator(0)))
    assert torch.equal(y, torch.zeros(1000))


@pytest.mark.parametrize("name,params", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_refused_before_encoding(name, params, bad):
    codec = make_codec(name, **params)
    x = vec(100)
    x[17] = bad
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        codec.encode(x, make_generator(0))


@pytest.mark.parametrize("b", range(2, 9))
def test_qsgd_bits_on_the_wire(b):
    codec = make_codec("qsgd", bits=b, bucket=64)
    assert codec.levels == 2 ** (b - 1) - 1
    n = 64 * 10 + 3
    assert codec.payload_nbytes(n) == 4 * 11 + math.ceil(n * b / 8)
    x = vec(n, seed=b)
    y = codec.decode(codec.encode(x, make_generator(0)))
    # every decoded value is a multiple of norm/s in its bucket
    for bucket in range(11):
        v, q = x[bucket * 64:(bucket + 1) * 64], y[bucket * 64:(bucket + 1) * 64]
        unit = v.norm() / codec.levels
        k = q / unit
        assert torch.allclose(k, k.round(), atol=1e-4)
        assert k.abs().max() <= codec.levels
        assert torch.all((q == 0) | (torch.sign(q) == torch.sign(v)))


def test_sign_is_one_bit_per_coordinate():
    codec = make_codec("sign", bucket=100)
    n = 1000
    assert codec.payload_nbytes(n) == 4 * 10 + 125
    x = vec(n)
    y = codec.decode(codec.encode(x))
    assert torch.allclose(y[:100].abs(), x[:100].abs().mean().expand(100))
    assert torch.equal(y > 0, x >= 0)


def test_levels_sets_bits():
    assert make_codec("qsgd", levels=7).bits == 4
    assert make_codec("qsgd", levels=8).bits == 5
    assert make_codec("qsgd", levels=1).bits == 2
    with pytest.raises(ConfigError, match="levels=7 needs bits=4"):
        make_codec("qsgd", levels=7, bits=5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="qsgd", bits=0), "bits must be between 2 and 8"),
    (dict(name="qsgd", bits=1), "use the 'sign' codec"),
    (dict(name="qsgd", bits=9), "between 2 and 8"),
    (dict(name="qsgd", bucket=0), "bucket must be"),
    (dict(name="sign", bucket=0), "bucket must be"),
    (dict(name="qsgd", levels=0), "levels must be"),
    (dict(name="qsgd", rounding="up"), "stochastic, nearest"),
    (dict(name="nope"), "fp32, fp16, qsgd, qsgd-inf, qsgd-elias, sign"),
    (dict(name="fp32", bits=4), "takes no parameter bits"),
    (dict(name="qsgd-inf", norm="l2"), "fixes norm"),
    (dict(name="qsgd", bits=2.5), "integer"),
])
def test_invalid_parameters_fail_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_codec(**kwargs)


def test_stochastic_codec_requires_generator():
    with pytest.raises(ConfigError, match="Generator"):
        make_codec("qsgd").encode(vec(10))


def test_same_generator_seed_same_bytes_and_different_seeds_differ():
    codec = make_codec("qsgd")
    x = vec(5000)
    assert codec.encode(x, make_generator(1, 0, 5)) == codec.encode(x, make_generator(1, 0, 5))
    assert codec.encode(x, make_generator(1, 0, 5)) != codec.encode(x, make_generator(1, 1, 5))
    assert codec.encode(x, make_generator(1, 0, 5)) != codec.encode(x, make_generator(1, 0, 6))


def test_nearest_rounding_is_deterministic_and_nearest():
    codec = make_codec("qsgd", rounding="nearest", bits=3, bucket=50)
    x = vec(1000)
    a = codec.encode(x, make_generator(1))
    assert a == codec.encode(x, make_generator(2)) == codec.encode(x)
    y = codec.decode(a)
    unit = x[:50].norm() / codec.levels
    assert torch.all((y[:50] - x[:50]).abs() <= unit / 2 + 1e-6)


def draws(codec, x, t):
    return torch.stack([codec.decode(codec.encode(x, make_generator(7, 0, i))) for i in range(t)]).double()


def coordinate_variance(codec, x):
    """Exact per-coordinate Var[Q(x)_i] of stochastic QSGD: unit^2 p (1 - p), p = frac(|x_i| / unit)."""
    d, s = codec.bucket, codec.levels
    out = torch.zeros(x.numel(), dtype=torch.float64)
    for start in range(0, x.numel(), d):
        v = x[start:start + d].double()
        norm = v.norm() if codec.norm == "l2" else v.abs().max()
        r = v.abs() / norm * s
        p = r - r.floor()
        out[start:start + d] = (norm / s) ** 2 * p * (1 - p)
    return out


def expected_qsgd_variance(codec, x):
    """Exact E||Q(x) - x||^2 of stochastic QSGD."""
    return float(coordinate_variance(codec, x).sum())


@pytest.mark.parametrize("name,params", STOCHASTIC)
@pytest.mark.parametrize("dist", ["normal", "heavy"])
def test_stochastic_codecs_are_unbiased(name, params, dist):
    codec = make_codec(name, **params)
    x = vec(200, seed=3, dist=dist)
    t = 1500
    mean = draws(codec, x, t).mean(0)
    # 6 standard errors per coordinate, from the exact variance of the rounding
    tol = 6 * (coordinate_variance(codec, x) / t).sqrt() + 1e-6 * x.abs().max()
    assert torch.all((mean - x.double()).abs() <= tol), float(((mean - x.double()).abs() / tol).max())


def test_unbiasedness_test_can_fail():
    biased = make_codec("qsgd", bits=3, bucket=64, rounding="nearest")
    x = vec(200, seed=3)
    mean = draws(biased, x, 50).mean(0)
    tol = 6 * (coordinate_variance(make_codec("qsgd", bits=3, bucket=64), x) / 50).sqrt()
    assert not torch.all((mean - x.double()).abs() <= tol)


@pytest.mark.parametrize("bits,bucket", [(2, 16), (3, 128), (4, 512), (6, 64)])
@pytest.mark.parametrize("dist", ["normal", "heavy", "uniform"])
def test_qsgd_variance_matches_formula_and_lemma_bound(bits, bucket, dist):
    codec = make_codec("qsgd", bits=bits, bucket=bucket)
    x = vec(bucket * 2, seed=bits, dist=dist)
    t = 600
    q = draws(codec, x, t)
    sq = (q - x.double()).pow(2).sum(1)
    measured = float(sq.mean())
    expected = expected_qsgd_variance(codec, x)
    stderr = float(sq.std()) / math.sqrt(t)
    assert abs(measured - expected) <= 6 * stderr + 1e-9
    d, s = bucket, codec.levels
    bound = min(d / s**2, math.sqrt(d) / s)
    for b in range(2):  # the lemma is per bucket
        v = x[b * bucket:(b + 1) * bucket].double()
        per_bucket = float((q[:, b * bucket:(b + 1) * bucket] - v).pow(2).sum(1).mean())
        assert per_bucket <= bound * float(v.pow(2).sum()) * 1.05


def test_max_norm_has_lower_variance_than_l2_on_gaussian():
    x = vec(4096)
    v_l2 = expected_qsgd_variance(make_codec("qsgd", bits=3), x)
    v_max = expected_qsgd_variance(make_codec("qsgd-inf", bits=3), x)
    assert v_max < v_l2


def test_decode_refuses_message_of_other_parameters():
    message = make_codec("qsgd", bits=4).encode(vec(100), make_generator(0))
    with pytest.raises(DecodeError, match="encoded with qsgd"):
        make_codec("qsgd", bits=3).decode(message)
    with pytest.raises(DecodeError, match="this codec is fp32"):
        make_codec("fp32").decode(message)


def test_header_is_self_describing():
    from mpiqsgd import wire
    codec = make_codec("qsgd-inf", bits=3, bucket=100, rounding="nearest")
    header, payload = wire.unframe(codec.encode(vec(250)))
    assert header == {"codec": "qsgd", "numel": 250,
                      "params": {"bits": 3, "levels": 3, "bucket": 100, "norm": "max", "rounding": "nearest"}}
    assert len(payload) == 4 * 3 + math.ceil(250 * 3 / 8)


@pytest.mark.filterwarnings("ignore:error feedback with")
def test_registry_names():
    assert set(CODECS) == {"fp32", "fp16", "qsgd", "qsgd-inf", "qsgd-elias", "sign", "nuqsgd", "nuqsgd-zero",
                           "terngrad", "alq", "alq-n", "amq", "amq-n"}
    assert isinstance(make_codec("qsgd", error_feedback=True), ErrorFeedback)


# -- error feedback ---------------------------------------------------------------------

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


@pytest.mark.parametrize("params", [{}, {"bits": 2, "bucket": 7}, {"bits": 8, "bucket": 1000},
                                    {"rounding": "nearest", "bits": 3}, {"norm": "max", "bits": 5},
                                    {"bits": 4, "bucket": 16384}, {"bits": 3, "bucket": 1},
                                    {"norm": "max", "bits": 8, "bucket": 64, "rounding": "nearest"}])
@pytest.mark.parametrize("n", [1, 9, 1000, 40_001, 300_000])
def test_cpu_kernel_and_torch_kernel_give_the_same_bytes(params, n):
    # The numba CPU kernel and the torch ops used on GPUs are one algorithm: same seed, same bytes.
    # Buckets that divide the kernels' chunk take the fused norms-and-codes kernel (512, 16384, 1, 64).
    fast, ref = QSGD(**params), QSGD(**params)
    ref.force_torch = True
    x = vec(n, seed=n) ** 3
    x[: n // 4] = 0.0  # zero buckets: scale 0
    x[n // 4: n // 3] *= 1e-38  # tiny buckets: levels / norm overflows, sent as zeros
    m1, d1 = fast.encode_decode(x, make_generator(4, 1, 2))
    m2, d2 = ref.encode_decode(x, make_generator(4, 1, 2))
    assert m1 == m2
    assert torch.equal(d1, d2)
    assert torch.equal(fast.decode(m2), ref.decode(m1))


@pytest.mark.parametrize("bucket", [1, 7, 512])
@pytest.mark.parametrize("n", [1, 9, 1000, 300_000])
def test_sign_cpu_kernel_and_torch_ops_agree(bucket, n):
    fast, ref = make_codec("sign", bucket=bucket), make_codec("sign", bucket=bucket)
    ref.force_torch = True
    x = vec(n, seed=n)
    x[::5] = 0.0  # sgn(0) = +1
    m1, d1 = fast.encode_decode(x)
    m2, d2 = ref.encode_decode(x)
    assert m1 == m2 and torch.equal(d1, d2)
    assert torch.equal(fast.decode(m2), ref.decode(m1))
    nonzero = d1 != 0  # a bucket of zeros has scale 0
    assert torch.equal(d1[nonzero].sign(), torch.where(x < 0, -1.0, 1.0)[nonzero])
    assert bool((x[~nonzero] == 0).all())


def test_counter_based_uniforms_are_uniform():
    from mpiqsgd.codecs.kernels import uniform
    u = uniform(123, 200_000).double()
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005
    assert abs(float(u.var()) - 1 / 12) < 0.002
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.01
    pairs = u.view(-1, 2)  # the two halves of one hash: independent too
    assert abs(float(torch.corrcoef(pairs.T)[0, 1])) < 0.01
    joint = torch.histc((pairs[:, 0] * 4).floor() * 4 + (pairs[:, 1] * 4).floor(), bins=16, min=0, max=16)
    assert float(((joint - 6250) ** 2 / 6250).sum()) < 50  # chi-square, 15 degrees of freedom (p < 1e-5)
    assert not torch.equal(uniform(124, 1000), uniform(123, 1000))


@pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba absent")
@pytest.mark.parametrize("start,m", [(0, 1), (0, 16384), (16384, 7), (2 * 16384, 1000)])
def test_numba_uniforms_equal_the_torch_ones(start, m):
    import numba

    @numba.njit
    def fill(seed, start, m, u):
        kernels.fill_uniforms(seed, start, m, u)

    u = np.full(m + 2, -1.0, dtype=np.float32)
    fill(np.uint64(987654321), start, m, u)
    assert torch.equal(torch.from_numpy(u[:m]), kernels.uniform(987654321, start + m)[start:])
    assert u[m + m % 2] == -1.0  # nothing written past m rounded up to even


def test_error_feedback_state_includes_the_inner_codec_state():
    ef = make_codec("alq-n", bits=3, bucket=64, error_feedback=True)
    ef.inner.fit(ef.inner.local_stats(vec(640)))
    ef.encode(vec(640), make_generator(0))
    other = make_codec("alq-n", bits=3, bucket=64, error_feedback=True)
    other.load_state_dict(ef.state_dict())
    assert other.params == ef.params and torch.equal(other.residuals["grad"], ef.residuals["grad"])


@pytest.mark.parametrize("name", ["qsgd", "qsgd-inf"])
def test_subnormal_buckets_are_sent_as_zeros_consistently(name):
    codec = make_codec(name, bucket=16)
    x = torch.zeros(32)
    x[0], x[5], x[20] = 1e-39, -1e-39, 1.0
    message, decoded = codec.encode_decode(x, make_generator(0))
    assert torch.equal(decoded, codec.decode(message))
    assert torch.equal(decoded[:16], torch.zeros(16))


def test_max_bucket_norms_equal_the_max_of_absolute_values():
    from mpiqsgd.codecs.buckets import bucket_norms
    x = vec(10_007, seed=5) ** 3
    x[:300] = -0.0
    x[300:600] = 0.0
    want = torch.cat([x[:10_000].view(-1, 100).abs().amax(1), x[10_000:].abs().amax().view(1)])
    got = bucket_norms(x, 100, "max")
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # bit for bit, +0.0 for zeros
