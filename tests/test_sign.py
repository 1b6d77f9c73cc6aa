"""Scaled sign (mpiqsgd.codecs.sign): one bit a coordinate, and its kernel against the torch ops."""


import pytest
import torch

from conftest import vec
from mpiqsgd.codecs import make_codec


def test_sign_is_one_bit_per_coordinate():
    codec = make_codec("sign", bucket=100)
    n = 1000
    assert codec.payload_nbytes(n) == 4 * 10 + 125
    x = vec(n)
    y = codec.decode(codec.encode(x))
    assert torch.allclose(y[:100].abs(), x[:100].abs().mean().expand(100))
    assert torch.equal(y > 0, x >= 0)


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
