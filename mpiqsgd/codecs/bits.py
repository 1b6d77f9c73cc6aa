"""Dense bit packing of small unsigned integer codes, on the codes' device.

``n`` codes of ``bits`` bits each (1 <= bits <= 8) occupy exactly
``ceil(n * bits / 8)`` bytes. Code ``i`` sits at bit offset ``i * bits`` of the
stream, least significant bit first; unused bits of the last byte are zero.
Each group of 8 codes is one little-endian word of ``bits`` bytes, so packing is
eight shift-and-or passes over the data.
"""

import numpy as np
import torch

__all__ = ["packed_nbytes", "pack", "unpack"]


def packed_nbytes(n, bits):
    """Exact bytes of ``n`` codes of ``bits`` bits."""
    return (n * bits + 7) // 8


def _word(bits):
    return (torch.int32, 4) if bits <= 4 else (torch.int64, 8)


def pack(codes, bits):
    """Pack codes into a uint8 tensor.

    Args:
        codes: 1-D uint8 tensor with values in [0, 2**bits).
        bits: bits per code, 1..8.

    Returns:
        1-D uint8 tensor of ``packed_nbytes(codes.numel(), bits)`` bytes, on the codes' device.
    """
    n = codes.numel()
    if n == 0:
        return codes.new_zeros(0, dtype=torch.uint8)
    if bits == 1 and codes.device.type == "cpu":  # numpy's packbits: the same layout, much faster
        return torch.from_numpy(np.packbits(codes.numpy(), bitorder="little"))
    groups = (n + 7) // 8
    if n % 8:
        codes = torch.cat([codes, codes.new_zeros(groups * 8 - n)])
    cols = codes.view(groups, 8)
    dtype, word_bytes = _word(bits)
    words = torch.empty(groups, dtype=dtype, device=codes.device).copy_(cols[:, 0])
    for k in range(1, 8):
        words |= cols[:, k].to(dtype) << (k * bits)
    packed = words.view(torch.uint8).view(groups, word_bytes)[:, :bits].reshape(-1)
    return packed[: packed_nbytes(n, bits)]


def unpack(packed, n, bits):
    """Inverse of :func:`pack`: return ``n`` codes as a uint8 tensor."""
    if n == 0:
        return packed.new_zeros(0, dtype=torch.uint8)
    if bits == 1 and packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.numpy(), count=n, bitorder="little"))
    groups = (n + 7) // 8
    dtype, word_bytes = _word(bits)
    flat = torch.zeros(groups * bits, dtype=torch.uint8, device=packed.device)
    flat[: packed.numel()] = packed
    buf = torch.zeros(groups, word_bytes, dtype=torch.uint8, device=packed.device)
    buf[:, :bits] = flat.view(groups, bits)
    words = buf.view(dtype).view(groups)
    codes = torch.empty(groups, 8, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    for k in range(8):
        codes[:, k] = (words >> (k * bits)) & mask
    return codes.view(-1)[:n]
