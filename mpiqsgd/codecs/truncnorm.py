"""The truncated-normal model of normalized coordinates (Faghri et al. 2020), in closed form.

The density ``f`` of ``r = v_i / N(v)`` is modelled as a :class:`Mixture` of normals
``N(mu_k, sigma_k)`` truncated to [-1, 1] with weights ``w_k``. The expected variance of
unbiased stochastic rounding of one coordinate to the levels ``L`` is

    Psi(L) = sum_j integral_{L_j}^{L_{j+1}} (r - L_j)(L_{j+1} - r) f(r) dr,

evaluated from the normal cdf and pdf (4-point Gauss-Legendre on intervals narrower than
0.05 sigma, where the closed form cancels). :class:`Mixture` is a
:class:`~mpiqsgd.codecs.density.Density` (the contract of the fits); the empirical
alternative is :class:`mpiqsgd.codecs.histogram.Histogram`.

ALQ's coordinate descent on this model (:meth:`Mixture.descend`): Gauss-Seidel sweeps
``j = 1..K-2`` with the exact update ``L_j = F^-1(F(c) - integral_a^c (r - a) f(r) dr /
(c - a))`` (``a, c`` the neighbours; ``Psi`` is convex in ``L_j`` between them;
``F^-1`` by Newton's method safeguarded by bisection), then Newton steps on all levels at
once (the Hessian is tridiagonal) to finish what coordinate descent does slowly for many
levels. The scalar kernels are numba functions (plain Python without numba); they use no
threads and a fixed order of operations, so equal parameters give bit-identical results.
"""

import math

import numpy as np

from ..errors import ConfigError
from .density import Density
from .kernels import HAVE_NUMBA, cached_jit


__all__ = ["SIGMA_MIN", "Mixture", "flat_args"]

SIGMA_MIN = 1e-6  # floor of a component's std: a constant bucket is a spike, not a point mass

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GL_T = (-0.8611363115940526, -0.3399810435848563, 0.3399810435848563, 0.8611363115940526)
_GL_W = (0.3478548451374538, 0.6521451548625461, 0.6521451548625461, 0.3478548451374538)
_NARROW = 0.05  # intervals narrower than this many sigmas use Gauss-Legendre

# -- scalar kernels (numba), one component loop per interval ------------------------------

_njit = cached_jit(error_model="numpy") if HAVE_NUMBA else (lambda f: f)


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


def flat_args(*arrays):
    """Broadcast arrays to one shape; returns it and their flat float64 copies."""
    arrays = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in arrays))
    return arrays[0].shape, [np.array(v, dtype=np.float64).reshape(-1) for v in arrays]


class Mixture(Density):
    """Mixture of normals truncated to [-1, 1]: ``f = sum_k w_k N(mu_k, sigma_k) 1[-1,1] / Z_k``.

    Args:
        mu, sigma, weight: 1-D arrays (sigma floored at :data:`SIGMA_MIN`, mu clipped to
            [-1, 1]; weights are normalized, zero weights dropped).
    """

    _psi_rows = staticmethod(_psi_rows)
    _grad_hess_rows = staticmethod(_grad_hess_rows)

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
        shape, (r,) = flat_args(r)
        out = np.empty(r.size)
        _pdf_flat(r, *self._args, out)
        return out.reshape(shape)

    def mass(self, a, c):
        """``integral_a^c f`` for arrays ``a <= c`` within [-1, 1]."""
        shape, (a, c) = flat_args(a, c)
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
        shape, (a, c) = flat_args(a, c)
        out = np.empty((4, a.size))
        _moments_flat(a, c, *self._args, out)
        return tuple(v.reshape(shape) for v in out)

    def solve_mass(self, a, c, target, start, tol=1e-13):
        """``b`` in ``[a, c]`` with ``integral_a^b f = target`` (arrays): safeguarded Newton."""
        shape, (a, c, target, start) = flat_args(a, c, target, start)
        out = np.empty(a.size)
        _solve_flat(a, c, target, start, *self._args, tol, out)
        return out.reshape(shape)

    def ppf(self, q):
        """Inverse cdf of probabilities ``q`` (array) in [0, 1]."""
        return self.solve_mass(-1.0, 1.0, q, 0.0)

    def alq_update(self, a, c, start, tol=1e-13):
        """The exact minimizer over ``b`` in ``[a, c]`` of the variance of [a, b] and [b, c] (arrays)."""
        shape, (a, c, start) = flat_args(a, c, start)
        out = np.empty(a.size)
        _alq_flat(a, c, start, *self._args, tol, out)
        return out.reshape(shape)

    def descend(self, L, sweeps, tol=1e-13, newton_steps=20):
        """ALQ on each row of ``L`` (n, K) in place: Gauss-Seidel sweeps, then Newton steps."""
        _alq_sweeps(L, int(sweeps), *self._args, tol)
        _alq_newton_rows(L, int(newton_steps), *self._args)

    def cuberoot(self):
        """A mixture close to f^(1/3) normalized: the level density that is optimal for many levels."""
        return Mixture(self.mu, self.sigma * math.sqrt(3.0), self.weight ** (1 / 3) * self.sigma ** (2 / 3))
