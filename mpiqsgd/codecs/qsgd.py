"""QSGD (Alistarh et al. 2017): per-bucket norm, sign bit and level index per coordinate.

Quantization of one bucket ``v`` of ``d`` coordinates with ``s`` levels: ``r_i =
|v_i| / N(v) * s`` with ``N`` the L2 norm (``qsgd``) or the max norm (``qsgd-inf``);
stochastic rounding picks ``ceil(r_i)`` with probability ``r_i - floor(r_i)``
(unbiased), nearest rounding picks ``round(r_i)`` (biased, deterministic). The
receiver reconstructs ``sgn(v_i) * level_i * N(v) / s``. The rounding's uniforms are
counter based, from one seed drawn from the caller's generator
(:mod:`mpiqsgd.codecs.qsgd_kernels`: a fused numba kernel on the CPU, torch ops elsewhere,
the same bytes either way).

Wire format (payload after the frame of :mod:`mpiqsgd.wire`)::

    n_buckets float32 norms, n_buckets = ceil(numel / bucket)
        (sqrt of the float64 sum of squares, or max |v_i|, rounded once to float32)
    numel codes of `bits` bits, densely packed (mpiqsgd.codecs.bits):
        code = sign << (bits - 1) | level,  sign = 1 for negative, level in 0..s

Payload bytes: ``4 * ceil(numel / bucket) + ceil(numel * bits / 8)``, with
``bits = 1 + ceil(log2(s + 1))``; by default bits = 4 (s = 7) and bucket = 512, about
0.508 bytes per coordinate against 4 for fp32. The last bucket may be short; its
norm covers only its own coordinates.

With ``encoding="elias"`` (codec ``qsgd-elias``; the header's params gain
``"encoding": "elias"``) the same norms are followed by the Elias-omega stream of
:mod:`mpiqsgd.codecs.elias` instead of the dense codes: only non-zero levels are
written, so the length depends on the data (at least ``4 * n_buckets +
ceil(n_buckets / 8)`` bytes). The quantization, its random draws and the decoded
values are those of the dense code (a level-0 coordinate decodes to +0.0 in both).

With ``encoding="entropy"`` (``"encoding": "entropy"`` in the params) the norms are followed
by the stream of :mod:`mpiqsgd.codecs.entropy`: the signed levels (``2 s + 1`` symbols, level
0 one symbol) coded by rANS with their counts in the message; variable length, at least
``4 * n_buckets + 4`` bytes; the same quantization and decoded values (level 0 as +0.0).

Both variable-length encodings take ``bucket <= 65536`` (:data:`mpiqsgd.wire.MAX_VARIABLE_BUCKET`):
the norms alone then spend a payload byte per 16384 coordinates, the most a receiver that
states no expected size decodes (:data:`mpiqsgd.wire.MAX_VALUES_PER_BYTE`).
"""

import functools
import math

import numpy as np
import torch

from ..errors import ConfigError, DecodeError, NonFiniteError
from . import bits as bitpack
from . import elias, entropy, kernels
from .base import Codec, check_bucket, check_choice, check_int
from .buckets import FLT_MAX, checked_norms, finite_scales
from .qsgd_kernels import fused_level_encode, level_decode, level_encode

__all__ = ["QSGD", "bits_for_levels", "max_norm"]

ROUNDINGS = ("stochastic", "nearest")
NORMS = ("l2", "max")
ENCODINGS = ("dense", "elias", "entropy")


def bits_for_levels(levels):
    """Bits per coordinate on the wire for ``levels`` magnitude levels: sign + index."""
    return 1 + math.ceil(math.log2(levels + 1))


@functools.lru_cache(maxsize=None)
def max_norm(levels):
    """The largest float32 norm ``N`` whose top value ``s * (N / s)`` (float32 ops, as the
    kernels compute it) is finite; smaller norms and levels give smaller values (rounding is
    monotone), so a payload's norms at most this decode to finite values only."""
    norm, s = np.float32(FLT_MAX), np.float32(levels)
    with np.errstate(over="ignore"):
        while not np.isfinite(np.float32(norm / s) * s):
            norm = np.nextafter(norm, np.float32(0))
    return float(norm)


class QSGD(Codec):
    """QSGD with dense bit packing.

    Args:
        bits: bits per coordinate on the wire, sign included (2..8). Default 4.
        levels: number of non-zero magnitude levels s (1..127); sets bits to
            ``1 + ceil(log2(s + 1))``. Give bits or levels, or both if consistent.
        bucket: coordinates per bucket, each with its own fp32 norm. Default 512.
        norm: ``"l2"`` (QSGD) or ``"max"`` (QSGD-inf).
        rounding: ``"stochastic"`` (unbiased, default) or ``"nearest"``.
        encoding: ``"dense"`` bit packing (default, fixed length), ``"elias"``
            (the paper's sparse code) or ``"entropy"`` (rANS with the symbol counts in the
            message); both variable length, with bucket at most 65536.
    """

    name = "qsgd"
    checks_finite = True  # through checked_norms

    def __init__(self, bits=None, levels=None, bucket=512, norm="l2", rounding="stochastic", encoding="dense"):
        if levels is not None:
            levels = check_int(self.name, "levels", levels, 1, 127)
            needed = bits_for_levels(levels)
            if bits is not None and check_int(self.name, "bits", bits, 2, 8) != needed:
                raise ConfigError(f"{self.name}: levels={levels} needs bits={needed}, got bits={bits}")
            bits = needed
        else:
            if bits == 1:
                raise ConfigError(
                    f"{self.name}: bits must be between 2 and 8 (a sign bit plus at least one level bit); "
                    "got 1. For 1 bit per coordinate use the 'sign' codec"
                )
            bits = check_int(self.name, "bits", 4 if bits is None else bits, 2, 8)
            levels = 2 ** (bits - 1) - 1
        self.bits = bits
        self.levels = levels
        self.encoding = check_choice(self.name, "encoding", encoding, ENCODINGS)
        self.bucket = check_bucket(self.name, bucket, encoding)
        self.norm = check_choice(self.name, "norm", norm, NORMS)
        self.rounding = check_choice(self.name, "rounding", rounding, ROUNDINGS)
        self.stochastic = rounding == "stochastic"
        if encoding == "entropy":
            entropy.check_available(self.name)
            self._symbols = entropy.qsgd_symbols(self.bits, self.levels)
        self.force_torch = False  # tests: run the torch kernels on the CPU too

    @property
    def params(self):
        params = {"bits": self.bits, "levels": self.levels, "bucket": self.bucket,
                  "norm": self.norm, "rounding": self.rounding}
        if self.encoding != "dense":  # dense headers stay as they were
            params["encoding"] = self.encoding
        return params

    def variance_bound(self):
        """Lemma 3.1: E||Q(v) - v||^2 <= min(d/s^2, sqrt(d)/s) ||v||^2 per bucket (stochastic, L2 norm).

        None where the lemma does not apply (nearest rounding or max norm).
        """
        if not self.stochastic or self.norm != "l2":
            return None
        return min(self.bucket / self.levels**2, math.sqrt(self.bucket) / self.levels)

    def level_table(self):
        s = self.levels
        return np.arange(-s, s + 1, dtype=np.float64) / s if self.stochastic else None

    def payload_nbytes(self, numel):
        if self.encoding != "dense":
            return None
        return 4 * (-(-numel // self.bucket)) + bitpack.packed_nbytes(numel, self.bits)

    def min_payload_nbytes(self, numel):
        if self.encoding == "dense":
            return self.payload_nbytes(numel)
        n_buckets = -(-numel // self.bucket)
        if self.encoding == "entropy":
            return 4 * n_buckets + entropy.MIN_STREAM_BYTES if numel else 0
        return 4 * n_buckets + (n_buckets + 7) // 8  # one bit per all-zero bucket

    def _quantize(self, x, rng, want_decoded, into=None):
        seed = kernels.draw_seed(rng) if self.stochastic else 0
        limit = max_norm(self.levels)
        cpu = kernels.use_numba(x.device, self.force_torch)
        codes = kernels.codes_slot(into, x.numel(), self.bucket) if cpu else None  # only dense codes have an `into`
        if cpu and kernels.one_pass(self.bucket):  # norms and codes in one pass: each bucket read once
            norms, packed, decoded, bad = fused_level_encode(
                x, self.bucket, self.norm, self.bits, self.levels, limit, seed, self.stochastic, want_decoded, codes)
            if bad:
                checked_norms(x, self.bucket, self.norm, self.name, limit, self.force_torch)  # raises the cause
                raise NonFiniteError(f"{self.name}: {bad} bucket norm(s) not finite or above {limit:.4g}")
        else:
            norms = checked_norms(x, self.bucket, self.norm, self.name, limit, self.force_torch)
            scale = self.levels / norms
            # A zero bucket, or one so small that levels / norm overflows, is sent as zeros.
            scale = torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale))
            packed, decoded = level_encode(
                x, scale, norms / self.levels, self.bucket, self.bits, self.levels, seed, self.stochastic,
                want_decoded, self.force_torch, out=codes)
        if codes is not None:
            kernels.place_scales(into, norms)
            return into, decoded
        if self.encoding != "dense":
            packed = self._elias(packed, x.numel()) if self.encoding == "elias" else self._entropy(packed, x.numel())
            if want_decoded:
                decoded = decoded + 0.0  # -0.0 -> +0.0: zeros are not sent
        return torch.cat([norms.view(torch.uint8), packed.to(norms.device)]), decoded

    def _elias(self, packed, numel):
        """Transcode the dense codes into the Elias stream (read in place, no unpacking)."""
        return torch.from_numpy(elias.encode_parallel(packed.cpu().numpy(), numel, self.bits, self.bucket))

    def _entropy(self, packed, numel):
        code_symbol, table = self._symbols
        return torch.from_numpy(entropy.encode(packed.cpu().numpy(), numel, self.bits, code_symbol, table.size))

    def _dequantize(self, payload, numel, out=None):
        n_buckets = -(-numel // self.bucket)
        # A norm near FLT_MAX would round its top value s * (norm / s) to inf.
        unit = finite_scales(payload, n_buckets, self.name, max_norm(self.levels)) / self.levels
        bucket = min(self.bucket, numel)  # the same buckets; kernels never size anything by a hostile bucket
        if self.encoding == "elias":
            return self._elias_decode(payload[4 * n_buckets:], unit, numel, bucket, out)
        if self.encoding == "entropy":
            table, target = self._symbols[1], kernels.host_array(out)
            values = entropy.decode(payload[4 * n_buckets:].cpu().numpy(), numel, table.size, unit.cpu().numpy(),
                                    bucket, table, self.name, target)
            return out if target is not None else torch.from_numpy(values).to(unit.device)
        values, bad = level_decode(payload[4 * n_buckets:], unit, bucket,
                                   self.bits, self.levels, numel, self.force_torch, out)
        if bad:
            raise DecodeError(f"{self.name}: {bad} level index(es) above s={self.levels} in payload")
        return values

    def _elias_decode(self, stream, unit, numel, bucket, out):
        target = kernels.host_array(out)
        # Lazily zeroed: only the pages of non-zero coordinates are touched, so a short stream
        # claiming many zeros costs memory only when its values are read. A given `out` is zeroed.
        values = np.zeros(numel, dtype=np.float32) if target is None else target
        err = elias.decode_stream(stream.cpu().numpy(), unit.cpu().numpy(), bucket, self.levels, numel, values,
                                  target is not None)
        if err:
            raise DecodeError(f"{self.name}: invalid elias stream: {elias.ERRORS[err]}")
        return out if target is not None else torch.from_numpy(values).to(unit.device)
