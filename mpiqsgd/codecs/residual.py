"""Stop a job whose error-feedback residual diverges, naming the cause and the fix.

Error feedback keeps ``e = p - decode(C(p))`` with ``p = x + e``. With a contractive
codec ``||e||`` stays within a codec-dependent multiple of the gradients' size; with a
non-contractive one (stochastic QSGD at few bits and large buckets, variance factor
``min(d/s^2, sqrt(d)/s) >= 1``) it grows geometrically, and within tens of steps its
bucket norms leave the float32 range. :func:`check_residual` refuses such a residual
long before that, while the message can still say why. No message pattern and no bytes of
its own: it reads two tensors the wrapper already holds.
"""

import math

import torch

from ..errors import NonFiniteError

__all__ = ["check_residual", "RESIDUAL_RATIO_LIMIT", "RESIDUAL_VALUE_LIMIT"]

# max|e| / max|x| above this is divergence. A contractive codec stays far below it (the
# residual is what it has not sent yet, a few gradients' worth: scaled sign at its worst,
# delta = 1/d, bounds ||e|| near 2 d ||x||, about 1e3 at d = 512); a diverging residual grows
# by about sqrt(variance factor) a step, so it crosses 1e6 a few steps after 1e3.
RESIDUAL_RATIO_LIMIT = 1e6
# Any |e_i| above this is refused whatever the gradient (an L2 norm of 2^30 such values
# is still below FLT_MAX, so the encoder's bucket norms cannot have overflowed yet).
RESIDUAL_VALUE_LIMIT = 1e20


def _peak(t):
    """max |t_i| from one min/max pass (no temporary), 0 for an empty tensor."""
    if not t.numel():
        return 0.0
    lo, hi = torch.aminmax(t.detach().reshape(-1))
    return max(-float(lo), float(hi))


def check_residual(codec, residual, x, key=None, step=None, ratio_limit=RESIDUAL_RATIO_LIMIT,
                   value_limit=RESIDUAL_VALUE_LIMIT):
    """Raise if an error-feedback residual has blown up.

    1. ``residual`` must be finite with every ``|e_i| <= value_limit``.
    2. ``max |e_i| <= ratio_limit * max |x_i|`` where ``x`` is this call's input (skipped
       when ``x`` is all zero: a parameter that stopped receiving gradients keeps sending
       its residual down, which is not divergence).

    Cost: two min/max passes over the buffer (no temporaries), on its device, and two
    device-to-host syncs.

    Args:
        codec: the inner codec (its repr and ``variance_bound()`` go into the message).
        residual: the new residual ``p - decoded``.
        x: the input of this call, before the residual was added.
        key: the buffer's key, for the message.
        step: the training step, for the message.

    Raises:
        NonFiniteError: the residual diverged; the message names the codec, the figures and
            the fixes (nearest rounding, more bits, smaller buckets, a contractive codec).

    Example::

        message, decoded = self.inner.encode_decode(p, rng)
        self.residuals[key] = p - decoded
        check_residual(self.inner, self.residuals[key], flat, key)
    """
    e_peak = _peak(residual)
    reason = None
    if not math.isfinite(e_peak) or e_peak > value_limit:
        reason = f"its largest value is {e_peak:.3g}"
    else:
        x_peak = _peak(x)
        if x_peak > 0 and e_peak > ratio_limit * x_peak:
            reason = f"its largest value {e_peak:.3g} is {e_peak / x_peak:.3g} times the gradient's ({x_peak:.3g})"
    if reason is None:
        return
    where = "".join((f" for {key!r}" if key is not None else "", f" at step {step}" if step is not None else ""))
    bound = codec.variance_bound()
    why = (f"{codec!r} is not contractive (variance factor up to {bound:.3g} >= 1)" if bound is not None
           and bound >= 1 else f"{codec!r} does not contract this residual")
    raise NonFiniteError(
        f"error feedback diverged{where}: {reason}; {why}, so error feedback accumulates instead of "
        "correcting. Fix: nearest rounding (rounding='nearest'; --rounding nearest), more bits (bits=8; --bits 8), "
        "smaller buckets (bucket=; --bucket), a contractive codec (make_codec('sign'); --codec sign), or "
        "error_feedback=False (no --error-feedback)")
