import pytest
import torch
from hypothesis import given, settings, strategies as st

from mpiqsgd.codecs import bits


@pytest.mark.parametrize("b", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 2, 7, 8, 9, 15, 16, 17, 1000, 4097])
def test_roundtrip_and_exact_size(b, n):
    codes = torch.randint(0, 2**b, (n,), generator=torch.Generator().manual_seed(n * 10 + b), dtype=torch.uint8)
    packed = bits.pack(codes, b)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (n * b + 7) // 8 == bits.packed_nbytes(n, b)
    assert torch.equal(bits.unpack(packed, n, b), codes)


def test_layout_is_lsb_first_and_dense():
    # codes 1, 2, 3 of 2 bits -> bits 10 01 11 (LSB first) -> 0b00111001
    assert bits.pack(torch.tensor([1, 2, 3], dtype=torch.uint8), 2).tolist() == [0b00111001]
    # 3-bit codes cross byte boundaries: 7, 0, 5 -> 111 000 101 -> byte0 0b01000111, byte1 0b1
    assert bits.pack(torch.tensor([7, 0, 5], dtype=torch.uint8), 3).tolist() == [0b01000111, 0b1]
    # 1-bit codes (numpy's packbits on the CPU): code k of a byte is its bit k
    assert bits.pack(torch.tensor([1, 0, 0, 1, 1, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [0b00011001, 0b1]
    assert bits.unpack(torch.tensor([0b10000010, 0xFF], dtype=torch.uint8), 9, 1).tolist() == [0, 1, 0, 0, 0, 0, 0,
                                                                                               1, 1]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.lists(st.integers(0, 255), max_size=200))
def test_roundtrip_property(b, values):
    codes = torch.tensor([v % (2**b) for v in values], dtype=torch.uint8)
    assert torch.equal(bits.unpack(bits.pack(codes, b), len(values), b), codes)
