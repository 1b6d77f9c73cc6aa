"""Named level sets: the fixed tables of QSGD, NUQSGD, TernGrad and AMQ's exponential family.

A level set is ``K`` levels ``-1 = L_0 < L_1 < ... < L_{K-1} = +1`` on normalized
coordinates ``r = v_i / N(v)`` (see :mod:`mpiqsgd.codecs.levelset`). Functions return
float64 arrays; :func:`to_table` rounds them to the float32 table a codec carries.
"""

import numpy as np

from ..errors import ConfigError

__all__ = ["uniform_levels", "qsgd_levels", "exp_levels", "nuq_levels", "nuq_zero_levels", "terngrad_levels",
           "amq_levels", "amq_dlevels", "amq_d2levels", "to_table"]

def uniform_levels(bits):
    """``K = 2^bits`` evenly spaced levels from -1 to 1 (no zero level)."""
    return np.linspace(-1.0, 1.0, 2**bits)


def qsgd_levels(bits):
    """QSGD's signed levels ``l / s``, ``l = -s..s``, ``s = 2^(bits-1) - 1`` (``2^bits - 1`` levels)."""
    s = 2 ** (bits - 1) - 1
    return np.arange(-s, s + 1, dtype=np.float64) / s


def exp_levels(bits, p=0.5):
    """``K = 2^bits`` levels ``+-p^j``, ``j = 0..K/2-1``; the ALQ paper's signed NUQ for p = 0.5."""
    return amq_levels(p, bits)


nuq_levels = exp_levels


def nuq_zero_levels(bits):
    """NUQSGD's levels with a zero level (the JMLR paper): ``0`` and ``+-0.5^j``,
    ``j = 0..s-1``, ``s = 2^(bits-1) - 1`` (``2^bits - 1`` levels; a sign and a magnitude index)."""
    if bits < 2:
        raise ValueError("nuq_zero_levels needs bits >= 2")
    s = 2 ** (bits - 1) - 1
    pos = 0.5 ** np.arange(s)
    return np.concatenate([-pos, [0.0], pos[::-1]])


def terngrad_levels():
    """TernGrad's levels {-1, 0, 1}."""
    return np.array([-1.0, 0.0, 1.0])


def amq_levels(p, bits):
    """AMQ levels ``-1, -p, ..., -p^s, p^s, ..., p, 1`` (``s = 2^(bits-1) - 1``); ``p`` may be an array."""
    s = 2 ** (bits - 1) - 1
    p = np.asarray(p, dtype=np.float64)
    pos = p[..., None] ** np.arange(s + 1)
    return np.concatenate([-pos, pos[..., ::-1]], axis=-1)


def amq_dlevels(p, bits):
    """Derivative of :func:`amq_levels` in ``p``."""
    s = 2 ** (bits - 1) - 1
    p = np.asarray(p, dtype=np.float64)
    j = np.arange(s + 1)
    d = j * p[..., None] ** np.maximum(j - 1, 0)
    return np.concatenate([-d, d[..., ::-1]], axis=-1)


def to_table(levels):
    """Round levels to the float32 table a codec uses; ends exactly -1 and 1, strictly increasing.

    Raises:
        ConfigError: the levels cannot form a valid table (unsorted, outside [-1, 1]).
    """
    src = np.asarray(levels, dtype=np.float64)
    if src.ndim != 1 or src.size < 2 or not np.all(np.isfinite(src)) or not np.all(np.diff(src) > 0):
        raise ConfigError(f"a level table needs at least 2 finite, strictly increasing levels; got {levels!r:.200}")
    t = src.astype(np.float32)
    t[0], t[-1] = -1.0, 1.0
    for j in range(1, t.size - 1):  # a float32 collision of two float64 levels: nudge up
        if t[j] <= t[j - 1]:
            t[j] = np.nextafter(t[j - 1], np.float32(2.0))
    if not np.all(np.diff(t) > 0) or t.min() < -1 or t.max() > 1:
        raise ConfigError(f"levels must be strictly increasing within [-1, 1]; got {levels!r:.200}")
    return t


def amq_d2levels(p, bits):
    """Second derivative of :func:`amq_levels` in ``p``."""
    s = 2 ** (bits - 1) - 1
    p = np.asarray(p, dtype=np.float64)
    j = np.arange(s + 1)
    d2 = j * (j - 1) * p[..., None] ** np.maximum(j - 2, 0)
    return np.concatenate([-d2, d2[..., ::-1]], axis=-1)
