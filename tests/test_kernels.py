"""The codec kernels' shared machinery (mpiqsgd.codecs.kernels): the counter-based uniforms."""


import numpy as np
import pytest
import torch

from mpiqsgd.codecs import kernels


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
