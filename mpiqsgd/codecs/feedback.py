"""Error feedback: a codec that compensates another codec's error.

Per buffer ``key`` the codec keeps a residual ``e`` (initially zero). Each encode:
``p = x + e``; send ``C(p)``; ``e = p - decode(C(p))``. The bytes are exactly the
inner codec's (same header, same size): error feedback changes what is sent, not the
wire format, and receivers decode with the inner codec. Residuals are per rank and per
key (a topology uses one key per place it encodes, e.g. the worker's gradient and a
server's downlink); a residual whose shape no longer matches is reset to zero.

Error feedback needs a contractive compressor, ``E||C(p) - p||^2 < ||p||^2``. Scaled
sign and nearest rounding are; stochastic QSGD is only when its variance factor
``min(d/s^2, sqrt(d)/s)`` is below 1 (e.g. 8 bits, or small buckets): otherwise the
residual grows without bound: :class:`ErrorFeedback` warns at construction, and
:func:`~mpiqsgd.codecs.residual.check_residual` stops the job, naming the fix, once the
residual has clearly diverged (long before it could overflow into the wire).
"""

import warnings

import torch

from .base import Codec
from .residual import check_residual

__all__ = ["ErrorFeedback"]


class ErrorFeedback(Codec):
    """``codec`` with per-key error-feedback residuals; a :class:`Codec` of ``codec``'s wire format.

    Sizes, headers, decoding and adaptation are the inner codec's; encoding adds the
    residual and updates it; the state is the residuals plus the inner codec's state.

    Args:
        codec: any :class:`~mpiqsgd.codecs.base.Codec` (not itself error feedback).
    """

    def __init__(self, codec):
        if isinstance(codec, ErrorFeedback):
            raise TypeError("error feedback is applied once: the codec already has it")
        self.inner = codec
        self.residuals = {}
        bound = codec.variance_bound()
        if bound is not None and bound >= 1:
            warnings.warn(
                f"error feedback with {codec!r} can diverge: its variance factor is up to {bound:.2f} >= 1; "
                "use nearest rounding, more bits or smaller buckets", stacklevel=3)

    name = property(lambda self: self.inner.name)
    params = property(lambda self: self.inner.params)
    stochastic = property(lambda self: self.inner.stochastic)
    adaptive = property(lambda self: self.inner.adaptive)
    base = property(lambda self: self.inner)
    bits = property(lambda self: self.inner.bits)
    bucket = property(lambda self: self.inner.bucket)
    rounding = property(lambda self: self.inner.rounding)
    norm = property(lambda self: self.inner.norm)

    def level_table(self):
        return self.inner.level_table()

    def __repr__(self):
        return f"ErrorFeedback({self.inner!r})"

    def variance_bound(self):
        return self.inner.variance_bound()

    def payload_nbytes(self, numel):
        return self.inner.payload_nbytes(numel)

    def min_payload_nbytes(self, numel):
        return self.inner.min_payload_nbytes(numel)

    def header_bytes(self, numel):
        return self.inner.header_bytes(numel)

    def decode(self, message, device="cpu", numel=None, out=None):
        return self.inner.decode(message, device, numel, out)

    def _decode_payload(self, numel, payload, device, out=None):
        return self.inner._decode_payload(numel, payload, device, out)

    def local_stats(self, flat):
        return self.inner.local_stats(flat)

    def fit(self, stats):
        return self.inner.fit(stats)

    def encode_decode(self, x, rng=None, key="grad", out=None):
        """Encode ``x`` plus the residual of ``key``; update the residual.

        Returns:
            (message, decoded float32 tensor) as :meth:`Codec.encode_decode` (``out`` likewise).
        """
        flat = x.detach().reshape(-1).to(torch.float32)
        p = self.compensate(flat, key)
        message, decoded = self.inner.encode_decode(p, rng, out=out)
        self.update(key, p, decoded, flat)
        return message, decoded

    def compensate(self, flat, key="grad"):
        """``flat`` plus the residual of ``key`` (``flat`` itself where there is none yet): what to
        quantize. For callers that quantize by other means (the decode-free allreduce)."""
        e = self.residuals.get(key)
        return flat if e is None or e.shape != flat.shape else flat + e.to(flat.device)

    def update(self, key, compensated, decoded, flat):
        """Keep ``compensated - decoded`` as the residual of ``key`` (``flat``: this call's input,
        for the divergence check)."""
        self.residuals[key] = compensated - decoded
        check_residual(self.inner, self.residuals[key], flat, key)

    def encode(self, x, rng=None, key="grad", out=None):
        return self.encode_decode(x, rng, key, out)[0]

    def reset(self):
        """Forget all residuals."""
        self.residuals.clear()

    def state_dict(self):
        """Residuals by key, on the CPU, and the inner codec's state if it has any (for checkpoints)."""
        state = {"residuals": {k: v.detach().cpu().clone() for k, v in self.residuals.items()}}
        inner = self.inner.state_dict()
        if inner:
            state["inner"] = inner
        return state

    def load_state_dict(self, state, device="cpu"):
        self.residuals = {k: v.to(device).clone() for k, v in state["residuals"].items()}
        if "inner" in state:
            self.inner.load_state_dict(state["inner"], device)
