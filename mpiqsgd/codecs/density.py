"""The density contract of the level-set fits: what :mod:`mpiqsgd.codecs.fits` needs of a model.

A density ``f`` of normalized coordinates on [-1, 1] gives, for level sets ``L`` (rows of
``K`` levels from -1 to 1), the expected variance of unbiased stochastic rounding

    Psi(L) = sum_j integral_{L_j}^{L_{j+1}} (r - L_j)(L_{j+1} - r) f(r) dr

and what the fits descend with. Implementations: the parametric
:class:`~mpiqsgd.codecs.truncnorm.Mixture` and the empirical
:class:`~mpiqsgd.codecs.histogram.Histogram`. A subclass sets ``_args`` (its kernels'
parameters) and the numba kernels ``_psi_rows(L, *args, grad, want_grad)`` and
``_grad_hess_rows(L, *args, g, d, e)``, and implements the methods that raise here.
"""

import numpy as np

__all__ = ["Density", "rows"]


def rows(levels):
    """Level sets (..., K) as their leading shape and a contiguous (n, K) float64 array."""
    L = np.asarray(levels, dtype=np.float64)
    return L.shape[:-1], np.ascontiguousarray(L.reshape(-1, L.shape[-1]))


class Density:
    """A density of normalized coordinates (see the module docstring)."""

    _args = ()
    _psi_rows = None
    _grad_hess_rows = None

    def psi(self, levels):
        """Expected rounding variance of one coordinate (units of norm^2) for level sets (..., K)."""
        shape, L = rows(levels)
        return type(self)._psi_rows(L, *self._args, np.empty((0, 0)), False).reshape(shape)

    def psi_grad(self, levels):
        """``(Psi, dPsi/dL)`` for level sets (..., K); the gradient is zero at the fixed ends."""
        shape, L = rows(levels)
        grad = np.zeros_like(L)
        value = type(self)._psi_rows(L, *self._args, grad, True)
        return value.reshape(shape), grad.reshape(shape + (L.shape[1],))

    def grad_hess(self, L, g, d, e):
        """Psi of each row of ``L`` (n, K); its gradient into ``g``, the tridiagonal Hessian's
        diagonal into ``d`` (``(L_{j+1} - L_{j-1}) f(L_j)``) and off-diagonal into ``e``
        (``-integral_{L_j}^{L_{j+1}} f``), over the interior levels."""
        return type(self)._grad_hess_rows(np.ascontiguousarray(L), *self._args, g, d, e)

    def moments(self, a, c):
        """Integrals over ``[a, c]`` (arrays): ``M = int f``, ``A = int (r - a) f``,
        ``C = int (c - r) f``, ``V = int (r - a)(c - r) f``."""
        raise NotImplementedError

    def ppf(self, q):
        """Inverse cdf of probabilities ``q`` (array) in [0, 1]."""
        raise NotImplementedError

    def alq_update(self, a, c, start, tol=1e-13):
        """The exact minimizer over ``b`` in ``[a, c]`` of the variance of [a, b] and [b, c] (arrays)."""
        raise NotImplementedError

    def descend(self, L, sweeps, tol=1e-13, newton_steps=20):
        """ALQ's coordinate descent on each row of ``L`` (n, K), in place."""
        raise NotImplementedError

    def cuberoot(self):
        """The density proportional to f^(1/3) (the optimal level density for many levels)."""
        raise NotImplementedError
