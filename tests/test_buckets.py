"""Per-bucket norms (mpiqsgd.codecs.buckets)."""


import torch
from conftest import vec


def test_max_bucket_norms_equal_the_max_of_absolute_values():
    from mpiqsgd.codecs.buckets import bucket_norms
    x = vec(10_007, seed=5) ** 3
    x[:300] = -0.0
    x[300:600] = 0.0
    want = torch.cat([x[:10_000].view(-1, 100).abs().amax(1), x[10_000:].abs().amax().view(1)])
    got = bucket_norms(x, 100, "max")
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # bit for bit, +0.0 for zeros
