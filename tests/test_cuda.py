"""Codecs on a CUDA device: the quantization runs there (torch ops), its bytes decode on the CPU
to the values the GPU encoder returns, and CPU bytes decode on the GPU to the CPU's values.

Skipped where torch sees no CUDA device; ``scripts/gpu_check.sh`` runs these on a GPU machine.
"""

import numpy as np
import pytest
import torch

from mpiqsgd import wire
from mpiqsgd.codecs import decode, make_codec, make_generator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CODECS = [("fp32", {}), ("fp16", {}), ("sign", {}), ("qsgd", {}), ("qsgd", {"bits": 2, "bucket": 128}),
          ("qsgd", {"bits": 8}), ("qsgd", {"rounding": "nearest"}), ("qsgd-inf", {"bits": 3}),
          ("qsgd-elias", {}), ("qsgd", {"encoding": "entropy"}), ("nuqsgd", {}), ("nuqsgd-zero", {}),
          ("terngrad", {}), ("terngrad", {"clip_sigma": 2.5}), ("alq", {}), ("amq", {"bits": 6}),
          ("alq", {"encoding": "entropy"})]


def _vector(n=300_001, seed=0):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) ** 3
    x[: n // 10] = 0.0  # zero buckets
    return x


@pytest.mark.parametrize("name,params", CODECS)
def test_gpu_bytes_decode_on_the_cpu_to_the_gpu_values_and_back(name, params):
    codec = make_codec(name, **params)
    x = _vector().cuda()
    message, values = codec.encode_decode(x, make_generator(3, 1, 2))
    assert values.device.type == "cuda" and bool(torch.isfinite(values).all())
    on_cpu = decode(message)
    assert on_cpu.device.type == "cpu" and torch.equal(on_cpu, values.cpu())
    assert torch.equal(decode(message, device="cuda"), values)
    out = torch.empty(x.numel(), device="cuda")
    assert codec.decode(message, device="cuda", out=out) is out and torch.equal(out, values)
    cpu_message = codec.encode(x.cpu(), make_generator(3, 1, 2))
    assert torch.equal(decode(cpu_message, device="cuda").cpu(), decode(cpu_message))


@pytest.mark.parametrize("name,params", [c for c in CODECS if c[0] not in ("alq", "amq")])
def test_gpu_and_cpu_encoders_write_the_same_bytes(name, params):
    """The same algorithm and uniforms on both, the one seed drawn from the same CPU generator (as the
    exchange's rounds do); only an L2 norm within float64 rounding of a float32 boundary could
    differ (about 1e-7 per bucket), which these seeded inputs do not hit."""
    codec = make_codec(name, **params)
    x = _vector(seed=1)
    on_gpu = codec.encode(x.cuda(), make_generator(5, 0, 7))
    on_cpu = codec.encode(x, make_generator(5, 0, 7))
    assert on_gpu == on_cpu


def test_gpu_encode_frames_into_a_reused_host_buffer():
    codec = make_codec("qsgd")
    x = _vector().cuda()
    out = np.empty(codec.encoded_nbytes(x.numel()) + wire.SLACK, dtype=np.uint8)
    message = codec.encode(x, make_generator(0), out=out)
    assert not isinstance(message, bytes) and np.shares_memory(np.frombuffer(message, np.uint8), out)
    assert bytes(message) == codec.encode(x, make_generator(0))


def test_a_generator_on_the_device_also_works():
    """Only the seed is drawn from the generator; one on the GPU gives other (valid) bytes."""
    codec = make_codec("qsgd")
    x = _vector().cuda()
    message, values = codec.encode_decode(x, make_generator(0, device="cuda"))
    assert torch.equal(decode(message, device="cuda"), values)
