"""Uncompressed baselines (mpiqsgd.codecs.fp): fp32 is the identity, fp16 a checked cast."""


import pytest
import torch

from conftest import vec
from mpiqsgd.codecs import make_codec
from mpiqsgd.errors import NonFiniteError


def test_fp32_is_identity_and_fp16_is_a_cast():
    x = vec(1000)
    assert torch.equal(make_codec("fp32").decode(make_codec("fp32").encode(x)), x)
    assert torch.equal(make_codec("fp16").decode(make_codec("fp16").encode(x)), x.half().float())
    assert len(make_codec("fp16").encode(x)) - len(make_codec("fp32").encode(x)) == -2000


def test_fp16_refuses_overflow():
    with pytest.raises(NonFiniteError, match="range"):
        make_codec("fp16").encode(torch.tensor([1.0, 1e6]))
