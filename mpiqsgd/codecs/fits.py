"""ALQ and AMQ fits: level sets that minimize the expected rounding variance under a density.

A density (the model of normalized coordinates) is either the parametric
:class:`~mpiqsgd.codecs.truncnorm.Mixture` of truncated normals (the ALQ paper's) or the
empirical :class:`~mpiqsgd.codecs.histogram.Histogram` of the gradients themselves; both
are a :class:`~mpiqsgd.codecs.density.Density`: ``psi(levels)`` (the expected variance
``Psi``, units of norm^2), ``psi_grad``, ``grad_hess`` (tridiagonal Hessian), ``descend``
(ALQ's coordinate descent in place), ``ppf`` and ``cuberoot``.

* ALQ (:func:`fit_alq`): coordinate descent from several starts (quantiles of F,
  uniform, exponential p = 0.5, quantiles of f^(1/3), and any extra tables given); the
  float32 table with the lowest ``Psi`` wins.
* AMQ (:func:`fit_amq`): levels ``+-p^j``, ``j = 0..s``, ``s = 2^(b-1) - 1``; gradient
  descent on ``p`` with the analytic ``dPsi/dp`` (step 0.7 on ``Psi`` relative to the
  best start, halved on every rejected step, 40 steps) from ``p`` in {0.1, ..., 0.9},
  then projected Newton steps with the analytic ``d2Psi/dp2``; the lowest ``Psi`` wins.
  ``p`` stays within ``[max(0.01, 2^(-100/s)), 0.99]`` so that float32 levels stay distinct.
* The guarantee (:func:`guarded`): a fitted table is kept only if its ``Psi`` on the
  statistics it was fitted to is no worse than that of the uniform (QSGD), exponential
  (NUQSGD) and best AMQ tables with the same bits; otherwise the best of those is kept,
  and the caller logs which.

Cost at 3 bits: about 10 ms (ALQ on 64 mixture components) and 20 ms (AMQ); a refit of
an adaptive codec on a 2048-bin histogram, baselines and their AMQ fit included, 20-65 ms
(ResNet-20 gradients, this project's 2-core VM; the upper figure with the machine busy);
8 bits: under 1 s (ALQ on a histogram: 0.72 s). Fits use no threads, no randomness and a
fixed order of operations: equal statistics give bit-identical levels on identical
software and CPUs.
"""

import numpy as np

from ..errors import ConfigError
from .leveltables import amq_d2levels, amq_dlevels, amq_levels, exp_levels, qsgd_levels, to_table, uniform_levels

__all__ = ["ALQ_STARTS", "psi", "psi_grad", "interval_variance", "alq_update", "alq_start", "fit_alq",
           "amq_psi", "amq_grad", "amq_hess", "fit_amq", "p_bounds", "baselines", "guarded"]


def psi(levels, density):
    """Expected rounding variance of one coordinate drawn from ``density``, in units of norm^2.

    ``levels`` may be (..., K): a batch of level sets gives a batch of values.
    """
    return density.psi(levels)


def psi_grad(levels, density):
    """``(Psi, dPsi/dL)``; the gradient is zero at the fixed ends.

    ``dPsi/dL_j = int_{L_{j-1}}^{L_j} (r - L_{j-1}) f - int_{L_j}^{L_{j+1}} (L_{j+1} - r) f``.
    """
    return density.psi_grad(levels)


def interval_variance(levels, density):
    """Per-interval expected variance terms of ``Psi`` (last axis: the K - 1 intervals)."""
    L = np.asarray(levels, dtype=np.float64)
    return density.moments(L[..., :-1], L[..., 1:])[3]


def alq_update(a, c, density, start=None, tol=1e-13):
    """The exact minimizer over ``b`` in ``[a, c]`` of the variance of the intervals [a, b], [b, c].

    ``b = F^-1(F(c) - int_a^c (r - a) f / (c - a))``, equivalently ``int_a^b f =
    int_a^c (c - r) f / (c - a)`` (``Psi`` is convex in ``b``: ``d2/db2 = (c - a) f(b)``).
    Arrays broadcast; ``start`` is Newton's starting point (default the midpoint).
    """
    start = 0.5 * (np.asarray(a, dtype=np.float64) + np.asarray(c, dtype=np.float64)) if start is None else start
    return density.alq_update(a, c, start, tol)


ALQ_STARTS = ("quantile", "uniform", "exp", "cuberoot")


def alq_start(kind, density, bits):
    """A starting level set for ALQ: quantiles of F, uniform, exponential (p = 0.5), or
    quantiles of (approximately) f^(1/3)."""
    K = 2**bits
    if kind in ("quantile", "cuberoot"):
        model = density if kind == "quantile" else density.cuberoot()
        inner = model.ppf(np.arange(1, K - 1) / (K - 1))
        return np.concatenate([[-1.0], inner, [1.0]])
    if kind == "uniform":
        return uniform_levels(bits)
    if kind == "exp":
        return exp_levels(bits)
    raise ConfigError(f"unknown ALQ start {kind!r}; choose from {', '.join(ALQ_STARTS)}")


def fit_alq(density, bits, sweeps=30, starts=ALQ_STARTS, tol=1e-13, newton_steps=20, extra=()):
    """ALQ levels for ``density``: Gauss-Seidel coordinate descent from several starts.

    Each sweep replaces ``L_1, ..., L_{K-2}`` in turn by :func:`alq_update` of its
    neighbours; a start stops after ``sweeps`` sweeps or when no level moves by more
    than 1e-15. Coordinate descent slows down as K grows (each sweep moves information
    one level), so up to ``newton_steps`` Newton steps on all levels at once (the Hessian
    of Psi is tridiagonal) finish the descent to the local minimum. The float32 table of
    lowest ``Psi`` wins (the first on ties). ``extra``: more starting tables of ``2^bits`` levels.

    Returns:
        (float32 table of ``2^bits`` levels, its Psi as a float).
    """
    L = np.stack([alq_start(s, density, bits) for s in starts] + [np.asarray(t, dtype=np.float64) for t in extra])
    density.descend(L, sweeps, tol, newton_steps)
    tables = [to_table(row) for row in L]
    values = density.psi(np.stack(tables).astype(np.float64))
    best = int(np.argmin(values))
    return tables[best], float(values[best])


def p_bounds(bits):
    """The range of AMQ's multiplier p at ``bits``."""
    s = 2 ** (bits - 1) - 1
    return (max(0.01, 2.0 ** (-100.0 / s)) if s > 0 else 0.01), 0.99


def amq_psi(p, bits, density):
    """``Psi`` of the AMQ levels of multiplier ``p`` (array or scalar)."""
    return psi(amq_levels(p, bits), density)


def amq_grad(p, bits, density):
    """``(Psi(p), dPsi/dp)`` analytically: ``sum_j dPsi/dL_j * dL_j/dp``."""
    value, g = psi_grad(amq_levels(p, bits), density)
    return value, np.sum(g * amq_dlevels(p, bits), axis=-1)


def amq_hess(p, bits, density):
    """``(Psi, dPsi/dp, d2Psi/dp2)`` for an array of ``p``: ``u' H u + g' w`` with ``u = dL/dp``,
    ``w = d2L/dp2`` and H the tridiagonal Hessian of Psi in the levels."""
    p = np.atleast_1d(np.asarray(p, dtype=np.float64))
    L = np.ascontiguousarray(amq_levels(p, bits))
    n = L.shape[1] - 2
    g, d, e = np.zeros((p.size, n)), np.zeros((p.size, n)), np.zeros((p.size, max(n - 1, 1)))
    value = density.grad_hess(L, g, d, e)
    u = amq_dlevels(p, bits)[:, 1:-1]
    w = amq_d2levels(p, bits)[:, 1:-1]
    grad = np.sum(g * u, -1)
    hess = np.sum(d * u * u, -1) + 2 * np.sum(e[:, :n - 1] * u[:, :-1] * u[:, 1:], -1) + np.sum(g * w, -1)
    return value, grad, hess


def fit_amq(density, bits, steps=40, lr=0.7, starts=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), newton_steps=20):
    """AMQ multiplier for ``density``: projected gradient descent on ``p`` from several starts.

    Gradient descent (step ``lr`` on Psi relative to its best start, halved on every
    rejected step, ``steps`` steps) from each start, then up to ``newton_steps`` projected
    Newton steps on ``p`` (analytic second derivative, backtracking) to converge.

    Returns:
        (float32 table of ``2^bits`` levels, p, its Psi).
    """
    lo, hi = p_bounds(bits)
    if bits == 1:
        t = to_table(amq_levels(0.5, 1))
        return t, 0.5, float(density.psi(t.astype(np.float64)))
    p = np.clip(np.asarray(starts, dtype=np.float64), lo, hi)
    value, grad = amq_grad(p, bits, density)
    scale = 1.0 / max(float(value.min()), 1e-300)
    step = np.full(p.shape, float(lr))
    for _ in range(steps):
        trial = np.clip(p - step * grad * scale, lo, hi)
        tv, tg = amq_grad(trial, bits, density)
        accept = tv <= value
        p = np.where(accept, trial, p)
        value = np.where(accept, tv, value)
        grad = np.where(accept, tg, grad)
        step = np.where(accept, step, 0.5 * step)
    active = np.ones(p.shape, dtype=bool)
    for _ in range(newton_steps):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        value, grad, hess = amq_hess(p[idx], bits, density)
        with np.errstate(divide="ignore", invalid="ignore"):
            delta = np.where(hess > 0, -grad / hess, -step[idx] * grad * scale)
        delta = np.where(np.isfinite(delta), delta, 0.0)
        t = np.ones(idx.size)
        moved = np.zeros(idx.size, dtype=bool)
        for _ls in range(30):
            trial = np.clip(p[idx] + t * delta, lo, hi)
            ok = ~moved & (trial != p[idx]) & (amq_psi(trial, bits, density) <= value)
            p[idx] = np.where(ok, trial, p[idx])
            moved |= ok
            if moved.all():
                break
            t = np.where(moved, t, 0.5 * t)
        # converged (a step below 1e-14) or stuck (no decrease along the step): done
        active[idx] = moved & (np.abs(t * delta) > 1e-14)
    tables = [to_table(amq_levels(q, bits)) for q in p]
    values = density.psi(np.stack(tables).astype(np.float64))
    best = int(np.argmin(values))
    return tables[best], float(p[best]), float(values[best])


def _padded_qsgd(density, bits):
    """QSGD's ``2^bits - 1`` levels plus the midpoint of the interval of largest variance: a table of
    ``2^bits`` levels (an adaptive codec's size) whose ``Psi`` is at most QSGD's."""
    L = qsgd_levels(bits)
    j = int(np.argmax(interval_variance(L, density)))
    return np.insert(L, j + 1, 0.5 * (L[j] + L[j + 1]))


def baselines(density, bits, amq=None):
    """The fixed tables a fit must not lose to, each of ``2^bits`` float32 levels: ``uniform``,
    ``qsgd`` (QSGD's levels, padded by :func:`_padded_qsgd`), ``nuq`` (NUQSGD's ``+-0.5^j``) and
    ``amq`` (the best AMQ table for ``density``: ``amq`` if given, else :func:`fit_amq`'s)."""
    out = {"uniform": to_table(uniform_levels(bits))}
    if bits >= 2:
        out["qsgd"] = to_table(_padded_qsgd(density, bits))
    out["nuq"] = to_table(exp_levels(bits))
    out["amq"] = fit_amq(density, bits)[0] if amq is None else amq
    return out


def guarded(table, value, density, bits, candidates=None):
    """The guarantee of every refit: ``table`` (with ``Psi`` ``value`` under ``density``) if no
    baseline table does better on the same density, else the best baseline.

    Returns:
        (table, its Psi, the winner's name: ``"fit"`` or a key of :func:`baselines`,
        ``{name: Psi}`` of every candidate, the fit included).
    """
    candidates = baselines(density, bits) if candidates is None else candidates
    names = list(candidates)
    values = density.psi(np.stack([candidates[n] for n in names]).astype(np.float64)) if names else []
    scores = {"fit": float(value), **{n: float(v) for n, v in zip(names, values)}}
    best = min(scores, key=lambda n: (scores[n], n != "fit"))  # the fit wins ties
    if best == "fit":
        return table, float(value), "fit", scores
    return candidates[best], scores[best], best, scores

