"""QSGD and QSGD-inf (mpiqsgd.codecs.qsgd and its kernels): bits on the wire, rounding, unbiasedness,
variance against the exact formula, and the numba kernels against the torch ops."""

import math

import numpy as np
import pytest
import torch

from conftest import draws, vec
from mpiqsgd.codecs import make_codec, make_generator
from mpiqsgd.codecs.qsgd import QSGD
from mpiqsgd.errors import ConfigError

STOCHASTIC = [("qsgd", {"bits": b, "bucket": d}) for b, d in [(2, 16), (3, 64), (4, 512), (8, 128)]] + [
    ("qsgd-inf", {"bits": 3, "bucket": 32}), ("qsgd", {"levels": 5, "bucket": 10})]


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


def test_levels_sets_bits():
    assert make_codec("qsgd", levels=7).bits == 4
    assert make_codec("qsgd", levels=8).bits == 5
    assert make_codec("qsgd", levels=1).bits == 2
    with pytest.raises(ConfigError, match="levels=7 needs bits=4"):
        make_codec("qsgd", levels=7, bits=5)


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


@pytest.mark.parametrize("name", ["qsgd", "qsgd-inf"])
def test_subnormal_buckets_are_sent_as_zeros_consistently(name):
    codec = make_codec(name, bucket=16)
    x = torch.zeros(32)
    x[0], x[5], x[20] = 1e-39, -1e-39, 1.0
    message, decoded = codec.encode_decode(x, make_generator(0))
    assert torch.equal(decoded, codec.decode(message))
    assert torch.equal(decoded[:16], torch.zeros(16))


def test_kernels_refuse_an_output_without_the_spare_bytes():
    from mpiqsgd.codecs.qsgd_kernels import level_encode

    x, norms = torch.randn(64), torch.ones(1)
    with pytest.raises(ValueError, match="40 bytes"):  # 32 packed + 8 spare
        level_encode(x, 7 / norms, norms / 7, 512, 4, 7, 0, False, False, out=np.empty(39, np.uint8))
    packed, _ = level_encode(x, 7 / norms, norms / 7, 512, 4, 7, 0, False, False, out=np.empty(40, np.uint8))
    assert packed.numel() == 32
