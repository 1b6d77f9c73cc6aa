"""The empirical model of normalized coordinates: a norm-weighted histogram on fixed bins.

ALQ's variance objective for a gradient ``v`` cut into buckets ``b`` is

    E||Q(v) - v||^2 = sum_i N_b(i)^2 (r_i - L_j)(L_{j+1} - r_i),   r_i = v_i / N_b(i),

so the distribution that matters is that of the ``r_i`` weighted by their bucket's squared
norm. :func:`histogram_of` puts each ``r`` into one of ``B`` fixed bins (``B`` even), uniform
in ``u = sign(r) sqrt(|r|)``: bin ``k`` covers ``[e_k, e_{k+1})`` with
``e_k = sign(u_k) u_k^2``, ``u_k = -1 + 2k / B``. The bins are fine near 0, where the
normalized coordinates of a large bucket live (width ~2e-6 at 0, 4 / B at +-1), and every
rank uses the same ones, so per-rank masses sum to the mass of the whole gradient
(:mod:`mpiqsgd.codecs.gradstats`). Cost: one sequential numba pass, about 1 ms per 262,144
coordinates.

:class:`Histogram` reads the masses as a density that is constant within each bin. Every
integral of ``Psi`` is then a polynomial on each bin piece, so ``Psi`` of any level set,
its gradient, ALQ's exact coordinate update ``int_a^b f = int_a^c (c - r) f / (c - a)``
(a linear equation inside one bin) and the inverse cdf are exact for that density. Up to
the spread of the coordinates within their bins, ``W * Psi(L)`` (``W`` the total mass)
is the exact expected variance of the gradient the statistics came from: the fitted
levels minimize the measured variance, heavy tails included, where the truncated-normal
model (:mod:`mpiqsgd.codecs.truncnorm`) sees only a mean and a standard deviation.

:meth:`Histogram.descend` is ALQ's Gauss-Seidel coordinate descent with up to
:data:`SWEEPS` sweeps (each costs O(B + K log B), so many sweeps are cheap, and no Newton
phase is needed). Kernels are sequential numba functions with a fixed order of
operations: equal masses give bit-identical levels.
"""

import numpy as np

from ..errors import ConfigError
from .kernels import HAVE_NUMBA, cached_jit
from .density import Density
from .truncnorm import flat_args


__all__ = ["Histogram", "BINS", "SWEEPS", "edges_for", "histogram_of"]

BINS = 2048  # default bins: 16 KiB of float64 statistics per rank
MAX_BINS = 1 << 16
SWEEPS = 2000  # coordinate-descent sweeps (stops earlier when no level moves)

_njit = cached_jit(error_model="numpy") if HAVE_NUMBA else (lambda f: f)


def edges_for(bins):
    """The ``bins + 1`` bin edges in ``r`` (float64, from -1 to 1, 0 in the middle)."""
    u = np.linspace(-1.0, 1.0, bins + 1)
    e = np.sign(u) * u * u
    e[bins // 2] = 0.0
    return e


# -- kernels ------------------------------------------------------------------------------

@_njit
def _bin(x, e):
    """k with e[k] <= x < e[k+1], clamped to 0..B-1."""
    k = np.searchsorted(e, x, side="right") - 1
    if k < 0:
        return 0
    if k > e.size - 2:
        return e.size - 2
    return k


@_njit
def _moments1(a, c, e, d):
    """int f, int (r-a) f, int (c-r) f, int (r-a)(c-r) f over [a, c] for the piecewise constant f."""
    M = A = C = V = 0.0
    if not c > a:
        return M, A, C, V
    w = c - a
    for k in range(_bin(a, e), _bin(c, e) + 1):
        x0 = max(a, e[k])
        x1 = min(c, e[k + 1])
        if not x1 > x0 or d[k] == 0.0:
            continue
        p, q = x0 - a, x1 - a
        dq = q - p
        half = 0.5 * dq * (q + p)  # (q^2 - p^2) / 2 without cancellation
        M += d[k] * dq
        A += d[k] * half
        C += d[k] * (w * dq - half)
        V += d[k] * dq * (0.5 * w * (q + p) - (q * q + q * p + p * p) / 3.0)
    return M, A, C, V


@_njit
def _solve1(a, c, target, e, d):
    """b in [a, c] with int_a^b f = target (the first such b; c when the mass is short)."""
    acc = 0.0
    for k in range(_bin(a, e), _bin(c, e) + 1):
        x0 = max(a, e[k])
        x1 = min(c, e[k + 1])
        if not x1 > x0:
            continue
        m = d[k] * (x1 - x0)
        if acc + m >= target and d[k] > 0.0:
            return min(x0 + (target - acc) / d[k], x1)
        acc += m
    return c


@_njit
def _alq_step(a, c, e, d):
    if not c > a:
        return a
    C = _moments1(a, c, e, d)[2]
    return _solve1(a, c, C / (c - a), e, d)


@_njit
def _sweeps(L, sweeps, e, d, tol):
    K = L.shape[1]
    for row in range(L.shape[0]):
        for _ in range(sweeps):
            moved = 0.0
            for j in range(1, K - 1):
                new = _alq_step(L[row, j - 1], L[row, j + 1], e, d)
                if new > L[row, j - 1] and new < L[row, j + 1]:  # never let rounding merge two levels
                    moved = max(moved, abs(new - L[row, j]))
                    L[row, j] = new
            if moved <= tol:
                break


@_njit
def _psi_rows(L, e, d, grad, want_grad):
    n, K = L.shape
    out = np.zeros(n)
    for row in range(n):
        prev_A = 0.0
        for j in range(K - 1):
            M, A, C, V = _moments1(L[row, j], L[row, j + 1], e, d)
            out[row] += V
            if want_grad:
                if j > 0:
                    grad[row, j] = prev_A - C
                prev_A = A
    return out


@_njit
def _grad_hess_rows(L, e, d, g, hd, he):
    n, K = L.shape
    out = np.zeros(n)
    for row in range(n):
        prev_A = 0.0
        for j in range(K - 1):
            M, A, C, V = _moments1(L[row, j], L[row, j + 1], e, d)
            out[row] += V
            if j > 0:
                g[row, j - 1] = prev_A - C
                hd[row, j - 1] = (L[row, j + 1] - L[row, j - 1]) * d[_bin(L[row, j], e)]
                if j < K - 2:
                    he[row, j - 1] = -M
            prev_A = A
    return out


@_njit
def _moments_flat(a, c, e, d, out):
    for i in range(a.size):
        out[0, i], out[1, i], out[2, i], out[3, i] = _moments1(a[i], c[i], e, d)


@_njit
def _alq_flat(a, c, e, d, out):
    for i in range(a.size):
        out[i] = _alq_step(a[i], c[i], e, d)


@_njit
def _ppf_flat(q, e, d, out):
    for i in range(q.size):
        out[i] = _solve1(e[0], e[e.size - 1], q[i], e, d)


@_njit
def _histogram_kernel(x, bucket, bins, use_max, out):
    """Add each bucket's norm^2-weighted bin counts of x / norm to out (sequential: deterministic)."""
    half = bins / 2.0
    for first in range(0, x.size, bucket):
        last = min(x.size, first + bucket)
        scale = 0.0
        for i in range(first, last):
            v = abs(float(x[i]))
            if use_max:
                scale = max(scale, v)
            else:
                scale += v * v
        if not use_max:
            scale = np.sqrt(scale)
        if not scale > 0.0:
            continue
        w = scale * scale
        for i in range(first, last):
            r = float(x[i]) / scale
            u = np.sqrt(abs(r))
            k = int((1.0 + u if r >= 0.0 else 1.0 - u) * half)
            out[min(max(k, 0), bins - 1)] += w


def histogram_of(flat, bucket, norm, bins):
    """The norm^2-weighted counts per bin of ``r = v / N(bucket)`` (float64; zero buckets add nothing).

    Bin ``k`` is ``floor((1 + sign(r) sqrt|r|) B / 2)`` (clamped), the bins of :func:`edges_for`.
    """
    import torch

    x = flat.detach().reshape(-1).to(device="cpu", dtype=torch.float32).contiguous().numpy()
    out = np.zeros(bins)
    _histogram_kernel(x, int(bucket), int(bins), norm == "max", out)
    return out


# -- the density --------------------------------------------------------------------------

class Histogram(Density):
    """A density constant within each bin of :func:`edges_for`.

    Args:
        mass: non-negative weights per bin (B of them, B even, at least 2); normalized here.

    Raises:
        ConfigError: a wrong number of bins, negative or non-finite weights, or no mass.
    """

    _psi_rows = staticmethod(_psi_rows)
    _grad_hess_rows = staticmethod(_grad_hess_rows)

    def __init__(self, mass):
        mass = np.asarray(mass, dtype=np.float64).reshape(-1)
        bins = mass.size
        if bins < 2 or bins % 2 or bins > MAX_BINS:
            raise ConfigError(f"a histogram needs an even number of bins in 2..{MAX_BINS}; got {bins}")
        if not np.all(np.isfinite(mass)) or np.any(mass < 0):
            raise ConfigError("histogram masses must be finite and non-negative")
        total = float(mass.sum())
        if not total > 0:
            raise ConfigError("no statistics: every bucket was zero")
        self.total = total
        self.mass = mass / total
        self.edges = edges_for(bins)
        self.density = self.mass / np.diff(self.edges)
        self._args = (self.edges, self.density)

    @property
    def bins(self):
        return self.mass.size

    def __repr__(self):
        return f"Histogram({self.bins} bins)"

    def pdf(self, r):
        """Density at ``r`` (array within [-1, 1])."""
        r = np.asarray(r, dtype=np.float64)
        k = np.clip(np.searchsorted(self.edges, r, side="right") - 1, 0, self.bins - 1)
        return self.density[k]

    def moments(self, a, c):
        """Integrals over ``[a, c]`` (arrays, ``a <= c``): ``M = int f``, ``A = int (r - a) f``,
        ``C = int (c - r) f``, ``V = int (r - a)(c - r) f``."""
        shape, (a, c) = flat_args(a, c)
        out = np.empty((4, a.size))
        _moments_flat(a, c, *self._args, out)
        return tuple(v.reshape(shape) for v in out)

    def mass_between(self, a, c):
        """``int_a^c f`` (arrays)."""
        return self.moments(a, c)[0]

    def cdf(self, r):
        return self.mass_between(-1.0, r)

    def ppf(self, q):
        """Inverse cdf of probabilities ``q`` (array) in [0, 1]: the first ``r`` with ``F(r) = q``."""
        shape, (q,) = flat_args(q)
        out = np.empty(q.size)
        _ppf_flat(q, *self._args, out)
        return out.reshape(shape)

    def alq_update(self, a, c, start=None, tol=None):
        """The exact minimizer over ``b`` in ``[a, c]`` of the variance of [a, b] and [b, c] (arrays;
        ``start`` and ``tol`` are accepted for the density contract; the update is exact)."""
        shape, (a, c) = flat_args(a, c)
        out = np.empty(a.size)
        _alq_flat(a, c, *self._args, out)
        return out.reshape(shape)

    def descend(self, L, sweeps=SWEEPS, tol=1e-15, newton_steps=None):
        """ALQ on each row of ``L`` (n, K) in place: at least :data:`SWEEPS` Gauss-Seidel sweeps
        (fewer when no level moves by more than ``tol``)."""
        _sweeps(L, max(int(sweeps), SWEEPS), *self._args, float(tol))

    def cuberoot(self):
        """The histogram of density ``f^(1/3)`` normalized: the level density optimal for many levels."""
        return Histogram(np.cbrt(self.density) * np.diff(self.edges))
