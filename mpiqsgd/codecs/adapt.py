"""Level-set math: named level sets, truncated-normal models, expected variance, ALQ and AMQ fits.

Pure functions on float64 (no MPI, no codec state). Coordinates are normalized,
``r = v_i / N(v)`` per bucket, so ``r`` lies in [-1, 1]. A level set is ``K`` levels
``-1 = L_0 < L_1 < ... < L_{K-1} = +1``; unbiased stochastic rounding sends ``r`` in
``[L_j, L_{j+1}]`` to ``L_{j+1}`` with probability ``(r - L_j) / (L_{j+1} - L_j)``, with
variance ``(r - L_j)(L_{j+1} - r)``.

Model of the density ``f`` of ``r`` (Faghri et al. 2020): a :class:`Mixture` of normals
``N(mu_k, sigma_k)`` truncated to [-1, 1] with weights ``w_k``. The expected variance of
rounding one coordinate is

    Psi(L) = sum_j integral_{L_j}^{L_{j+1}} (r - L_j)(L_{j+1} - r) f(r) dr,

evaluated in closed form from the normal cdf and pdf (4-point Gauss-Legendre on
intervals narrower than 0.05 sigma, where the closed form cancels).

Statistics (computed by every rank from its own gradient, merged across ranks):

* ``"pooled"`` (ALQ-N, AMQ-N): count, sum of ``r`` and the within-bucket sum of squared
  deviations of ``r``; the model is one truncated normal with the pooled mean and the
  pooled within-bucket standard deviation. Merged by summing.
* ``"mixture"`` (ALQ, AMQ): per bucket (mean, std, norm, count) of its normalized
  coordinates, only the ``max_buckets`` buckets of largest norm. Merged by concatenating
  in list order and keeping the top ``max_buckets`` by norm (stable sort). Component
  ``k`` of the model gets weight ``count_k * norm_k**weight_power``; the default power 2
  makes ``Psi`` proportional to the model's ``E||Q(v) - v||^2`` (each bucket's variance
  is ``norm^2`` times its normalized variance); ``weight_power=1`` weights by norm as
  in the paper.

Fits (deterministic functions of the merged statistics):

* ALQ (:func:`fit_alq`): Gauss-Seidel coordinate descent over the interior levels,
  sweeping ``j = 1..K-2`` (up to 30 sweeps) with the exact update
  ``L_j = F^-1( F(c) - integral_a^c (r - a) f(r) dr / (c - a) )`` (``a, c`` the
  neighbours; ``Psi`` is convex in ``L_j`` between them, so this is the exact minimizer;
  ``F^-1`` by Newton's method safeguarded by bisection), then Newton steps on all levels
  at once (the Hessian is tridiagonal) to finish what coordinate descent does slowly for
  many levels. Starts: quantiles of F, uniform, exponential (p = 0.5), and quantiles of
  an approximation of ``f^(1/3)`` (the optimal level density for many levels); the
  float32 table with the lowest ``Psi`` wins.
* AMQ (:func:`fit_amq`): levels ``+-p^j``, ``j = 0..s``, ``s = 2^(b-1) - 1``; gradient
  descent on ``p`` with the analytic ``dPsi/dp`` (step 0.7 on ``Psi`` relative to the
  best start, halved on every rejected step, 40 steps) from ``p`` in {0.1, ..., 0.9},
  then projected Newton steps with the analytic ``d2Psi/dp2``; the lowest ``Psi`` wins.
  ``p`` stays within ``[max(0.01, 2^(-100/s)), 0.99]`` so that float32 levels stay distinct.

Cost: 3 bits, 64 mixture components: about 10 ms (ALQ) and 20 ms (AMQ); 8 bits: under
1 s. The scalar kernels are numba functions (plain Python without numba).

Determinism: the fits use no threads, no randomness and a fixed order of operations;
equal statistics give bit-identical levels on identical software and CPUs (``exp`` and
``erfc`` are the C library's, one scalar call per value). On a heterogeneous cluster,
fit on one rank and broadcast the level bytes
(:meth:`mpiqsgd.codecs.levelset.AdaptiveLevelSet.set_levels`).
"""

import math

import msgpack
import numpy as np
import torch

from ..errors import ConfigError
from .buckets import bucket_rows
from .kernels import HAVE_NUMBA

if HAVE_NUMBA:
    import numba

__all__ = [
    "SIGMA_MIN", "Mixture", "uniform_levels", "qsgd_levels", "exp_levels", "nuq_levels", "nuq_zero_levels",
    "terngrad_levels",
    "amq_levels", "interval_variance", "psi", "psi_grad", "alq_update", "alq_start", "fit_alq", "amq_psi", "amq_grad",
    "amq_hess", "fit_amq", "local_stats", "merge_stats", "stats_to_bytes", "stats_from_bytes", "density_from_stats",
    "to_table",
]

SIGMA_MIN = 1e-6  # floor of a component's std: a constant bucket is a spike, not a point mass
STATS_KINDS = ("pooled", "mixture")

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GL_T = (-0.8611363115940526, -0.3399810435848563, 0.3399810435848563, 0.8611363115940526)
_GL_W = (0.3478548451374538, 0.6521451548625461, 0.6521451548625461, 0.3478548451374538)
_NARROW = 0.05  # intervals narrower than this many sigmas use Gauss-Legendre


# -- named level sets ---------------------------------------------------------------------

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


def _amq_dlevels(p, bits):
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


# -- the model: scalar kernels (numba), one component loop per interval --------------------

_njit = numba.njit(cache=True, nogil=True, error_model="numpy") if HAVE_NUMBA else (lambda f: f)


@_njit
def _upper(z):
    """P(Z > |z|) for a standard normal Z, accurate far in the tail."""
    return 0.5 * math.erfc(abs(z) * _INV_SQRT2)


@_njit
def _dcdf(lo, hi):
    """Phi(hi) - Phi(lo) for lo <= hi, from the tails (no cancellation near 1)."""
    q_lo, q_hi = _upper(lo), _upper(hi)
    if lo >= 0.0:
        d = q_lo - q_hi
    elif hi <= 0.0:
        d = q_hi - q_lo
    else:
        d = 1.0 - q_lo - q_hi
    return d if d > 0.0 else 0.0


@_njit
def _phi(z):
    return math.exp(-0.5 * z * z) * _INV_SQRT2PI


@_njit
def _pdf1(r, mu, sg, wz):
    t = 0.0
    for k in range(mu.size):
        t += wz[k] / sg[k] * _phi((r - mu[k]) / sg[k])
    return t


@_njit
def _mass1(a, c, mu, sg, wz):
    t = 0.0
    for k in range(mu.size):
        al = (a - mu[k]) / sg[k]
        ga = (c - mu[k]) / sg[k]
        if ga - al < _NARROW:  # a difference of cdfs loses a narrow interval's mass
            half, mid = 0.5 * (ga - al), 0.5 * (ga + al)
            m0 = 0.0
            for q in range(4):
                m0 += half * _GL_W[q] * _phi(mid + half * _GL_T[q])
        else:
            m0 = _dcdf(al, ga)
        t += wz[k] * m0
    return t


@_njit
def _moments1(a, c, mu, sg, wz):
    """int f, int (r-a) f, int (c-r) f, int (r-a)(c-r) f over [a, c]."""
    M = A = C = V = 0.0
    for k in range(mu.size):
        s = sg[k]
        al = (a - mu[k]) / s
        ga = (c - mu[k]) / s
        if ga - al < _NARROW:  # the closed form cancels: 4-point Gauss-Legendre in z
            half, mid = 0.5 * (ga - al), 0.5 * (ga + al)
            m0 = a1 = c1 = v1 = 0.0
            for q in range(4):
                z = mid + half * _GL_T[q]
                wp = half * _GL_W[q] * _phi(z)
                m0 += wp
                a1 += wp * (z - al)
                c1 += wp * (ga - z)
                v1 += wp * (z - al) * (ga - z)
        else:
            m0 = _dcdf(al, ga)
            pa, pg = _phi(al), _phi(ga)
            a1 = (pa - pg) - al * m0
            c1 = ga * m0 - (pa - pg)
            v1 = ga * pa - al * pg - (1.0 + al * ga) * m0
        w = wz[k]
        M += w * m0
        A += w * s * a1
        C += w * s * c1
        V += w * s * s * v1
    return M, A, C, V


@_njit
def _solve1(a, c, target, b, mu, sg, wz, tol):
    """b in [a, c] with int_a^b f = target: Newton safeguarded by bisection."""
    if not c > a:
        return a
    lo, hi = a, c
    b = min(max(b, a), c)
    width = c - a
    for _ in range(200):
        h = _mass1(a, b, mu, sg, wz) - target
        if h == 0.0:
            return b
        if h > 0.0:
            hi = b
        else:
            lo = b
        f = _pdf1(b, mu, sg, wz)
        new = b - h / f if f > 0.0 else lo
        if not (new > lo and new < hi):
            new = 0.5 * (lo + hi)
        if abs(new - b) <= tol * width or hi - lo <= tol * width:
            return new
        b = new
    return b


@_njit
def _alq_step(a, c, start, mu, sg, wz, tol):
    """The exact minimizer of the variance of [a, b] and [b, c] over b."""
    if not c > a:
        return a
    C = _moments1(a, c, mu, sg, wz)[2]
    return _solve1(a, c, C / (c - a), start, mu, sg, wz, tol)


@_njit
def _alq_sweeps(L, sweeps, mu, sg, wz, tol):
    """Gauss-Seidel sweeps j = 1..K-2 over each row of L (in place); returns sweeps done."""
    done = 0
    K = L.shape[1]
    for row in range(L.shape[0]):
        for s in range(sweeps):
            moved = 0.0
            for j in range(1, K - 1):
                new = _alq_step(L[row, j - 1], L[row, j + 1], L[row, j], mu, sg, wz, tol)
                if new > L[row, j - 1] and new < L[row, j + 1]:  # never let rounding merge two levels
                    moved = max(moved, abs(new - L[row, j]))
                    L[row, j] = new
            done = max(done, s + 1)
            if moved <= 1e-15:
                break
    return done


@_njit
def _psi_rows(L, mu, sg, wz, grad, want_grad):
    """Psi of each row of L, and dPsi/dL into grad when want_grad."""
    n, K = L.shape
    out = np.zeros(n)
    for row in range(n):
        prev_A = 0.0
        for j in range(K - 1):
            M, A, C, V = _moments1(L[row, j], L[row, j + 1], mu, sg, wz)
            out[row] += V
            if want_grad:
                if j > 0:
                    grad[row, j] = prev_A - C
                prev_A = A
    return out


@_njit
def _psi1(L, mu, sg, wz):
    t = 0.0
    for j in range(L.size - 1):
        t += _moments1(L[j], L[j + 1], mu, sg, wz)[3]
    return t


@_njit
def _grad_hess(L, mu, sg, wz, g, d, e):
    """Psi of one level set; its gradient g, Hessian diagonal d and off-diagonal e over the
    interior levels. The Hessian is tridiagonal: ``d_j = (L_{j+1} - L_{j-1}) f(L_j)``,
    ``e_j = -int_{L_j}^{L_{j+1}} f`` couples L_j and L_{j+1}."""
    K = L.size
    total = 0.0
    prev_A = 0.0
    for j in range(K - 1):
        M, A, C, V = _moments1(L[j], L[j + 1], mu, sg, wz)
        total += V
        if j > 0:
            g[j - 1] = prev_A - C
            d[j - 1] = (L[j + 1] - L[j - 1]) * _pdf1(L[j], mu, sg, wz)
            if j < K - 2:
                e[j - 1] = -M
        prev_A = A
    return total


@_njit
def _alq_newton(L, steps, mu, sg, wz):
    """Newton steps on all interior levels at once (tridiagonal solve, backtracking that keeps
    the levels sorted and Psi from increasing); stops where the Hessian is not positive definite."""
    K = L.size
    n = K - 2
    if n < 1:
        return 0
    g, d, e = np.empty(n), np.empty(n), np.empty(max(n - 1, 1))
    cp, dp, step, trial = np.empty(n), np.empty(n), np.empty(n), L.copy()
    done = 0
    for _ in range(steps):
        value = _grad_hess(L, mu, sg, wz, g, d, e)
        ok = True
        for i in range(n):  # Thomas algorithm; every pivot must be positive
            piv = d[i] - (e[i - 1] * cp[i - 1] if i > 0 else 0.0)
            if not piv > 0.0:
                ok = False
                break
            cp[i] = e[i] / piv if i < n - 1 else 0.0
            dp[i] = (-g[i] - (e[i - 1] * dp[i - 1] if i > 0 else 0.0)) / piv
        if not ok:
            break
        biggest = 0.0
        for i in range(n - 1, -1, -1):
            step[i] = dp[i] - (cp[i] * step[i + 1] if i < n - 1 else 0.0)
            biggest = max(biggest, abs(step[i]))
        if not np.isfinite(biggest) or biggest <= 1e-15:
            break
        t = 1.0
        accepted = False
        for _ls in range(40):
            for i in range(n):
                trial[i + 1] = L[i + 1] + t * step[i]
            sorted_ = True
            for j in range(K - 1):
                if not trial[j + 1] > trial[j]:
                    sorted_ = False
                    break
            if sorted_ and _psi1(trial, mu, sg, wz) <= value:
                accepted = True
                break
            t *= 0.5
        if not accepted:
            break
        L[:] = trial
        done += 1
        if t * biggest <= 1e-15:
            break
    return done


@_njit
def _alq_newton_rows(L, steps, mu, sg, wz):
    for row in range(L.shape[0]):
        _alq_newton(L[row], steps, mu, sg, wz)


@_njit
def _grad_hess_rows(L, mu, sg, wz, g, d, e):
    out = np.empty(L.shape[0])
    for row in range(L.shape[0]):
        out[row] = _grad_hess(L[row], mu, sg, wz, g[row], d[row], e[row])
    return out


@_njit
def _moments_flat(a, c, mu, sg, wz, out):
    for i in range(a.size):
        out[0, i], out[1, i], out[2, i], out[3, i] = _moments1(a[i], c[i], mu, sg, wz)


@_njit
def _pdf_flat(r, mu, sg, wz, out):
    for i in range(r.size):
        out[i] = _pdf1(r[i], mu, sg, wz)


@_njit
def _mass_flat(a, c, mu, sg, wz, out):
    for i in range(a.size):
        out[i] = _mass1(a[i], c[i], mu, sg, wz)


@_njit
def _solve_flat(a, c, target, start, mu, sg, wz, tol, out):
    for i in range(a.size):
        out[i] = _solve1(a[i], c[i], target[i], start[i], mu, sg, wz, tol)


@_njit
def _alq_flat(a, c, start, mu, sg, wz, tol, out):
    for i in range(a.size):
        out[i] = _alq_step(a[i], c[i], start[i], mu, sg, wz, tol)


def _flat(*arrays):
    arrays = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in arrays))
    return arrays[0].shape, [np.array(v, dtype=np.float64).reshape(-1) for v in arrays]


class Mixture:
    """Mixture of normals truncated to [-1, 1]: ``f = sum_k w_k N(mu_k, sigma_k) 1[-1,1] / Z_k``.

    Args:
        mu, sigma, weight: 1-D arrays (sigma floored at :data:`SIGMA_MIN`, mu clipped to
            [-1, 1]; weights are normalized, zero weights dropped).
    """

    def __init__(self, mu, sigma, weight=None):
        mu = np.clip(np.asarray(mu, dtype=np.float64).reshape(-1), -1.0, 1.0)
        sigma = np.maximum(np.asarray(sigma, dtype=np.float64).reshape(-1), SIGMA_MIN)
        w = np.ones_like(mu) if weight is None else np.asarray(weight, dtype=np.float64).reshape(-1)
        if not (mu.shape == sigma.shape == w.shape) or mu.size == 0:
            raise ConfigError("a mixture needs equal-length, non-empty mu, sigma and weight")
        if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma)) and np.all(np.isfinite(w))) or np.any(w < 0):
            raise ConfigError("mixture parameters must be finite with non-negative weights")
        keep = w > 0
        if not np.any(keep):
            raise ConfigError("a mixture needs a positive weight")
        self.mu, self.sigma, self.weight = mu[keep], sigma[keep], w[keep] / w[keep].sum()
        z = np.array([_dcdf((-1.0 - m) / s, (1.0 - m) / s) for m, s in zip(self.mu, self.sigma)])
        self._wz = self.weight / z  # weight over truncation mass
        self._args = (self.mu, self.sigma, self._wz)

    def __repr__(self):
        return f"Mixture({self.mu.size} components)"

    def pdf(self, r):
        """Density at ``r`` (array, within [-1, 1])."""
        shape, (r,) = _flat(r)
        out = np.empty(r.size)
        _pdf_flat(r, *self._args, out)
        return out.reshape(shape)

    def mass(self, a, c):
        """``integral_a^c f`` for arrays ``a <= c`` within [-1, 1]."""
        shape, (a, c) = _flat(a, c)
        out = np.empty(a.size)
        _mass_flat(a, c, *self._args, out)
        return out.reshape(shape)

    def cdf(self, r):
        return self.mass(-1.0, r)

    def moments(self, a, c):
        """Integrals over ``[a, c]`` (arrays, ``a <= c``): four arrays

        ``M = int f``, ``A = int (r - a) f``, ``C = int (c - r) f``,
        ``V = int (r - a)(c - r) f``.
        """
        shape, (a, c) = _flat(a, c)
        out = np.empty((4, a.size))
        _moments_flat(a, c, *self._args, out)
        return tuple(v.reshape(shape) for v in out)

    def solve_mass(self, a, c, target, start, tol=1e-13):
        """``b`` in ``[a, c]`` with ``integral_a^b f = target`` (arrays): safeguarded Newton."""
        shape, (a, c, target, start) = _flat(a, c, target, start)
        out = np.empty(a.size)
        _solve_flat(a, c, target, start, *self._args, tol, out)
        return out.reshape(shape)

    def ppf(self, q):
        """Inverse cdf of probabilities ``q`` (array) in [0, 1]."""
        return self.solve_mass(-1.0, 1.0, q, 0.0)


def interval_variance(levels, density):
    """Per-interval expected variance terms of ``Psi`` (last axis: the K - 1 intervals)."""
    L = np.asarray(levels, dtype=np.float64)
    return density.moments(L[..., :-1], L[..., 1:])[3]


def _rows(levels):
    L = np.asarray(levels, dtype=np.float64)
    return L.shape[:-1], np.ascontiguousarray(L.reshape(-1, L.shape[-1]))


def psi(levels, density):
    """Expected rounding variance of one coordinate drawn from ``density``, in units of norm^2.

    ``levels`` may be (..., K): a batch of level sets gives a batch of values.
    """
    shape, L = _rows(levels)
    return _psi_rows(L, *density._args, np.empty((0, 0)), False).reshape(shape)


def psi_grad(levels, density):
    """``(Psi, dPsi/dL)``; the gradient is zero at the fixed ends.

    ``dPsi/dL_j = int_{L_{j-1}}^{L_j} (r - L_{j-1}) f - int_{L_j}^{L_{j+1}} (L_{j+1} - r) f``.
    """
    shape, L = _rows(levels)
    grad = np.zeros_like(L)
    value = _psi_rows(L, *density._args, grad, True)
    return value.reshape(shape), grad.reshape(shape + (L.shape[1],))


def alq_update(a, c, density, start=None, tol=1e-13):
    """The exact minimizer over ``b`` in ``[a, c]`` of the variance of the intervals [a, b], [b, c].

    ``b = F^-1(F(c) - int_a^c (r - a) f / (c - a))``, equivalently ``int_a^b f =
    int_a^c (c - r) f / (c - a)`` (``Psi`` is convex in ``b``: ``d2/db2 = (c - a) f(b)``).
    Arrays broadcast; ``start`` is Newton's starting point (default the midpoint).
    """
    start = 0.5 * (np.asarray(a, dtype=np.float64) + np.asarray(c, dtype=np.float64)) if start is None else start
    shape, (a, c, start) = _flat(a, c, start)
    out = np.empty(a.size)
    _alq_flat(a, c, start, *density._args, tol, out)
    return out.reshape(shape)


def _cuberoot_proxy(density):
    """A mixture close to f^(1/3) normalized: the level density that is optimal for many levels."""
    return Mixture(density.mu, density.sigma * math.sqrt(3.0), density.weight ** (1 / 3) * density.sigma ** (2 / 3))


ALQ_STARTS = ("quantile", "uniform", "exp", "cuberoot")


def alq_start(kind, density, bits):
    """A starting level set for ALQ: quantiles of F, uniform, exponential (p = 0.5), or
    quantiles of (approximately) f^(1/3)."""
    K = 2**bits
    if kind in ("quantile", "cuberoot"):
        model = density if kind == "quantile" else _cuberoot_proxy(density)
        inner = model.ppf(np.arange(1, K - 1) / (K - 1))
        return np.concatenate([[-1.0], inner, [1.0]])
    if kind == "uniform":
        return uniform_levels(bits)
    if kind == "exp":
        return exp_levels(bits)
    raise ConfigError(f"unknown ALQ start {kind!r}; choose from {', '.join(ALQ_STARTS)}")


def fit_alq(density, bits, sweeps=30, starts=ALQ_STARTS, tol=1e-13, newton_steps=20):
    """ALQ levels for ``density``: Gauss-Seidel coordinate descent from several starts.

    Each sweep replaces ``L_1, ..., L_{K-2}`` in turn by :func:`alq_update` of its
    neighbours; a start stops after ``sweeps`` sweeps or when no level moves by more
    than 1e-15. Coordinate descent slows down as K grows (each sweep moves information
    one level), so up to ``newton_steps`` Newton steps on all levels at once (the Hessian
    of Psi is tridiagonal) finish the descent to the local minimum. The float32 table of
    lowest ``Psi`` wins (the first on ties).

    Returns:
        (float32 table of ``2^bits`` levels, its Psi as a float).
    """
    L = np.stack([alq_start(s, density, bits) for s in starts])
    _alq_sweeps(L, int(sweeps), *density._args, tol)
    _alq_newton_rows(L, int(newton_steps), *density._args)
    tables = [to_table(row) for row in L]
    values = psi(np.stack(tables).astype(np.float64), density)
    best = int(np.argmin(values))
    return tables[best], float(values[best])


def _p_bounds(bits):
    s = 2 ** (bits - 1) - 1
    return (max(0.01, 2.0 ** (-100.0 / s)) if s > 0 else 0.01), 0.99


def amq_psi(p, bits, density):
    """``Psi`` of the AMQ levels of multiplier ``p`` (array or scalar)."""
    return psi(amq_levels(p, bits), density)


def amq_grad(p, bits, density):
    """``(Psi(p), dPsi/dp)`` analytically: ``sum_j dPsi/dL_j * dL_j/dp``."""
    value, g = psi_grad(amq_levels(p, bits), density)
    return value, np.sum(g * _amq_dlevels(p, bits), axis=-1)


def _amq_d2levels(p, bits):
    s = 2 ** (bits - 1) - 1
    p = np.asarray(p, dtype=np.float64)
    j = np.arange(s + 1)
    d2 = j * (j - 1) * p[..., None] ** np.maximum(j - 2, 0)
    return np.concatenate([-d2, d2[..., ::-1]], axis=-1)


def amq_hess(p, bits, density):
    """``(Psi, dPsi/dp, d2Psi/dp2)`` for an array of ``p``: ``u' H u + g' w`` with ``u = dL/dp``,
    ``w = d2L/dp2`` and H the tridiagonal Hessian of Psi in the levels."""
    p = np.atleast_1d(np.asarray(p, dtype=np.float64))
    L = np.ascontiguousarray(amq_levels(p, bits))
    n = L.shape[1] - 2
    g, d, e = np.zeros((p.size, n)), np.zeros((p.size, n)), np.zeros((p.size, max(n - 1, 1)))
    value = _grad_hess_rows(L, *density._args, g, d, e)
    u = _amq_dlevels(p, bits)[:, 1:-1]
    w = _amq_d2levels(p, bits)[:, 1:-1]
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
    lo, hi = _p_bounds(bits)
    if bits == 1:
        t = to_table(amq_levels(0.5, 1))
        return t, 0.5, float(psi(t.astype(np.float64), density))
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
    values = psi(np.stack(tables).astype(np.float64), density)
    best = int(np.argmin(values))
    return tables[best], float(p[best]), float(values[best])


# -- statistics ---------------------------------------------------------------------------

def _bucket_moments(flat, bucket, norm, chunk_buckets):
    """Per nonzero bucket: (mean, sum of squared deviations, norm, count) of r = v / N(v), float64."""
    x = flat.detach().reshape(-1)
    n = x.numel()
    n_buckets = -(-n // bucket)
    out = []
    for first in range(0, n_buckets, chunk_buckets):
        last = min(n_buckets, first + chunk_buckets)
        part = x[first * bucket:min(n, last * bucket)].to(device="cpu", dtype=torch.float64)
        for v in bucket_rows(part, bucket):
            scale = v.norm(dim=1) if norm == "l2" else v.abs().amax(dim=1)
            keep = scale > 0
            v, scale = v[keep], scale[keep]
            r = v / scale[:, None]
            mean = r.mean(dim=1)
            ssd = (r - mean[:, None]).pow(2).sum(dim=1)
            count = torch.full_like(mean, v.shape[1])
            out.append(torch.stack([mean, ssd, scale, count], dim=1))
    if not out:
        return np.zeros((0, 4))
    return torch.cat(out).numpy()


def local_stats(flat, bucket, kind, norm="l2", max_buckets=64, chunk_coords=1 << 21):
    """Sufficient statistics of the normalized coordinates of one rank's gradient.

    Args:
        flat: gradient tensor (flattened; buckets as the codec cuts them).
        bucket: coordinates per bucket.
        kind: ``"pooled"`` (ALQ-N, AMQ-N) or ``"mixture"`` (ALQ, AMQ).
        norm: ``"l2"`` or ``"max"``, the codec's normalization.
        max_buckets: mixture only: keep this many buckets of largest norm.

    Returns:
        A dict (see :func:`stats_to_bytes`); zero buckets are left out.
    """
    if kind not in STATS_KINDS:
        raise ConfigError(f"stats kind must be one of {', '.join(STATS_KINDS)}; got {kind!r}")
    if norm not in ("l2", "max"):
        raise ConfigError(f"norm must be l2 or max; got {norm!r}")
    rows = _bucket_moments(flat, int(bucket), norm, max(1, chunk_coords // int(bucket)))
    if kind == "pooled":
        return {"kind": "pooled", "norm": norm, "bucket": int(bucket), "count": int(rows[:, 3].sum()),
                "sum": float((rows[:, 0] * rows[:, 3]).sum()), "ssd": float(rows[:, 1].sum()),
                "n_buckets": int(rows.shape[0])}
    order = np.argsort(-rows[:, 2], kind="stable")[:max_buckets]
    rows = rows[order]
    return {"kind": "mixture", "norm": norm, "bucket": int(bucket), "max_buckets": int(max_buckets),
            "mean": rows[:, 0].copy(), "std": np.sqrt(rows[:, 1] / rows[:, 3]) if rows.size else np.zeros(0),
            "norms": rows[:, 2].copy(), "count": rows[:, 3].copy()}


def merge_stats(stats):
    """Merge statistics of several ranks (in list order, so every rank gets identical bytes)."""
    stats = list(stats)
    if not stats:
        raise ConfigError("merge_stats needs at least one statistics dict")
    first = stats[0]
    for s in stats[1:]:
        for key in ("kind", "norm", "bucket") + (("max_buckets",) if first["kind"] == "mixture" else ()):
            if s.get(key) != first.get(key):
                raise ConfigError(f"cannot merge statistics with {key}={s.get(key)!r} and {first.get(key)!r}")
    if first["kind"] == "pooled":
        out = dict(first)
        for s in stats[1:]:
            for key in ("count", "sum", "ssd", "n_buckets"):
                out[key] = out[key] + s[key]
        return out
    cat = {key: np.concatenate([np.asarray(s[key], dtype=np.float64) for s in stats])
           for key in ("mean", "std", "norms", "count")}
    order = np.argsort(-cat["norms"], kind="stable")[:first["max_buckets"]]
    return {"kind": "mixture", "norm": first["norm"], "bucket": first["bucket"],
            "max_buckets": first["max_buckets"], **{k: v[order] for k, v in cat.items()}}


_ARRAYS = ("mean", "std", "norms", "count")


def stats_to_bytes(stats):
    """Statistics as msgpack bytes (arrays as float64 little-endian)."""
    arrays = _ARRAYS if stats["kind"] == "mixture" else ()
    out = {k: (np.ascontiguousarray(v, dtype="<f8").tobytes() if k in arrays else v) for k, v in stats.items()}
    return msgpack.packb(out, use_bin_type=True)


def stats_from_bytes(data):
    """Inverse of :func:`stats_to_bytes`; raises ConfigError for malformed bytes."""
    try:
        raw = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ConfigError(f"unreadable statistics bytes: {exc}") from None
    if not isinstance(raw, dict) or raw.get("kind") not in STATS_KINDS:
        raise ConfigError(f"malformed statistics: {raw!r:.200}")
    out = dict(raw)
    if raw["kind"] == "mixture":
        lengths = set()
        for key in _ARRAYS:
            if not isinstance(raw.get(key), bytes) or len(raw[key]) % 8:
                raise ConfigError(f"malformed statistics field {key!r}")
            out[key] = np.frombuffer(raw[key], dtype="<f8").astype(np.float64)
            lengths.add(out[key].size)
        if len(lengths) != 1:
            raise ConfigError("statistics arrays of different lengths")
    return out


def density_from_stats(stats, weight_power=2.0):
    """The truncated-normal model of merged statistics (see the module docstring)."""
    if stats["kind"] == "pooled":
        if stats["count"] <= 0:
            raise ConfigError("no statistics: every bucket was zero")
        count = float(stats["count"])
        return Mixture([stats["sum"] / count], [math.sqrt(max(stats["ssd"], 0.0) / count)])
    if len(stats["norms"]) == 0:
        raise ConfigError("no statistics: every bucket was zero")
    norms = np.asarray(stats["norms"], dtype=np.float64)
    weight = np.asarray(stats["count"], dtype=np.float64) * (norms / norms.max()) ** weight_power
    return Mixture(stats["mean"], stats["std"], weight)
