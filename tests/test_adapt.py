"""Level-set math: truncated-normal moments, Psi and its gradients, ALQ and AMQ fits, statistics."""

import math
import time

import numpy as np
import pytest
import torch

from mpiqsgd.codecs import fits, gradstats, leveltables, truncnorm
from mpiqsgd.codecs.truncnorm import Mixture
from mpiqsgd.errors import ConfigError

CASES = [(0.0, 0.01), (0.05, 0.02), (0.0, 0.3), (-0.4, 0.1), (0.8, 0.5), (0.0, 1.0)]


def tn_pdf(mu, sigma):
    """Truncated normal density on [-1, 1], written independently of adapt (math.erf)."""
    z = 0.5 * (math.erf((1 - mu) / (sigma * math.sqrt(2))) - math.erf((-1 - mu) / (sigma * math.sqrt(2))))
    return lambda r: np.exp(-0.5 * ((r - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi) * z)


def cumulative(f, a, c, n=200_001):
    """Trapezoid cumulative integrals of f, r f and r^2 f on a grid of [a, c]."""
    r = np.linspace(a, c, n)
    y = f(r)
    out = []
    for k in range(3):
        g = y * r**k
        out.append(np.concatenate([[0.0], np.cumsum(0.5 * (g[1:] + g[:-1]) * np.diff(r))]))
    return r, out


def hat_variance(F, lo, hi, i, j):
    """int_{r_i}^{r_j} (r - lo)(hi - r) f from the cumulative integrals."""
    m0, m1, m2 = (Fk[j] - Fk[i] for Fk in F)
    return -m2 + (lo + hi) * m1 - lo * hi * m0


@pytest.mark.parametrize("mu,sigma", CASES)
def test_interval_moments_match_quadrature(mu, sigma):
    f = tn_pdf(mu, sigma)
    m = Mixture([mu], [sigma])
    for a, c in [(-1, 1), (-0.2, 0.3), (0.01, 0.0105), (0.5, 0.9), (-1, -0.99), (mu, mu + 1e-4)]:
        c = min(c, 1.0)
        r = np.linspace(a, c, 100_001)
        y = f(r)
        want = [np.trapezoid(y * w, r) for w in (1, r - a, c - r, (r - a) * (c - r))]
        got = m.moments(a, c)
        for g, w in zip(got, want):
            assert float(g) == pytest.approx(w, rel=1e-6, abs=1e-15 + 1e-9 * abs(want[0]) * (c - a) ** 2)
    assert float(m.cdf(1.0)) == pytest.approx(1.0, abs=1e-14)
    assert float(m.cdf(-1.0)) == 0.0
    q = np.array([0.001, 0.25, 0.5, 0.9, 0.999])
    assert np.allclose(m.cdf(m.ppf(q)), q, atol=1e-12)


def test_mixture_is_the_weighted_sum_of_its_components():
    comps = [(0.0, 0.05), (0.3, 0.2), (-0.9, 0.4)]
    w = np.array([1.0, 3.0, 0.5])
    mix = Mixture([c[0] for c in comps], [c[1] for c in comps], w)
    levels = np.array([-1, -0.4, -0.02, 0.01, 0.2, 1.0])
    singles = [fits.psi(levels, Mixture([mu], [s])) for mu, s in comps]
    assert fits.psi(levels, mix) == pytest.approx(float(np.dot(w / w.sum(), singles)), rel=1e-12)
    assert float(mix.pdf(0.1)) == pytest.approx(sum(wk / w.sum() * tn_pdf(mu, s)(0.1)
                                                    for wk, (mu, s) in zip(w, comps)), rel=1e-12)


@pytest.mark.parametrize("mu,sigma", CASES)
def test_alq_closed_form_update_matches_brute_force_minimization(mu, sigma):
    f = tn_pdf(mu, sigma)
    m = Mixture([mu], [sigma])
    for a, c in [(-1.0, 1.0), (-0.05, 0.1), (mu - sigma, mu + 2 * sigma), (0.2, 0.9)]:
        a, c = max(a, -1.0), min(c, 1.0)
        r, F = cumulative(f, a, c)
        n = r.size
        k = np.arange(1, n - 1)
        # Objective of every grid point b = r_k: variance of [a, b] plus variance of [b, c].
        objective = np.array([hat_variance(F, a, r[i], 0, i) + hat_variance(F, r[i], c, i, n - 1) for i in k])
        brute = r[k[np.argmin(objective)]]
        b = float(fits.alq_update(a, c, m))
        i = int(np.clip(np.searchsorted(r, b), 1, n - 2))
        closed = hat_variance(F, a, r[i], 0, i) + hat_variance(F, r[i], c, i, n - 1)
        assert closed <= objective.min() * (1 + 1e-7) + 1e-18  # b sits between grid points
        assert abs(b - brute) <= 2e-3 * (c - a), (a, c, b, brute)
        # and the model's own Psi agrees that b is the minimizer over a fine grid
        bs = np.linspace(a, c, 2001)[1:-1]
        psis = fits.psi(np.stack([np.full_like(bs, a), bs, np.full_like(bs, c)], -1), m)
        assert fits.psi(np.array([a, b, c]), m) <= psis.min() + 1e-15


def test_psi_matches_monte_carlo_on_samples_of_the_model():
    rng = np.random.default_rng(0)
    mu, sigma = 0.05, 0.2
    r = rng.normal(mu, sigma, 400_000)
    r = r[np.abs(r) <= 1]
    levels = np.array([-1.0, -0.3, -0.05, 0.0, 0.02, 0.15, 0.6, 1.0])
    j = np.clip(np.searchsorted(levels, r, side="right") - 1, 0, levels.size - 2)
    v = (r - levels[j]) * (levels[j + 1] - r)
    assert abs(v.mean() - fits.psi(levels, Mixture([mu], [sigma]))) <= 6 * v.std() / math.sqrt(v.size)


@pytest.mark.parametrize("mu,sigma", CASES[:4])
def test_psi_gradient_matches_finite_differences(mu, sigma):
    m = Mixture([mu, -0.1], [sigma, 0.07], [2.0, 1.0])
    levels = np.array([-1.0, -0.5, -0.08, -0.01, 0.03, 0.2, 0.45, 1.0])
    _, grad = fits.psi_grad(levels, m)
    assert grad[0] == grad[-1] == 0
    h = 1e-6
    for j in range(1, levels.size - 1):
        up, down = levels.copy(), levels.copy()
        up[j] += h
        down[j] -= h
        fd = (fits.psi(up, m) - fits.psi(down, m)) / (2 * h)
        assert grad[j] == pytest.approx(fd, rel=1e-5, abs=1e-11)


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_amq_analytic_gradient_matches_finite_differences(bits):
    m = Mixture([0.0, 0.02], [0.02, 0.1], [1.0, 0.3])
    lo, hi = fits.p_bounds(bits)
    for p in np.linspace(max(lo, 0.1), 0.95, 7):
        value, grad = fits.amq_grad(p, bits, m)
        h = 1e-6
        fd = (fits.amq_psi(p + h, bits, m) - fits.amq_psi(p - h, bits, m)) / (2 * h)
        assert value == pytest.approx(fits.amq_psi(p, bits, m), rel=1e-14)
        assert float(grad) == pytest.approx(float(fd), rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("bits", [2, 3, 5])
def test_amq_second_derivative_matches_finite_differences(bits):
    m = Mixture([0.0, 0.05], [0.03, 0.2], [1.0, 0.5])
    p = np.linspace(max(fits.p_bounds(bits)[0], 0.1), 0.9, 5)
    value, grad, hess = fits.amq_hess(p, bits, m)
    h = 1e-5
    fd = (fits.amq_grad(p + h, bits, m)[1] - fits.amq_grad(p - h, bits, m)[1]) / (2 * h)
    assert np.allclose(value, fits.amq_psi(p, bits, m), rtol=1e-13)
    assert np.allclose(grad, fits.amq_grad(p, bits, m)[1], rtol=1e-12, atol=1e-15)
    assert np.allclose(hess, fd, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("mu,sigma", [(0.0, 0.01), (0.02, 0.1), (0.0, 0.4)])
def test_amq_fit_finds_the_best_multiplier(bits, mu, sigma):
    m = Mixture([mu], [sigma])
    table, p, value = fits.fit_amq(m, bits)
    grid = np.linspace(*fits.p_bounds(bits), 4001)
    best = fits.amq_psi(grid, bits, m).min()
    assert value <= best * (1 + 1e-4)
    assert np.array_equal(table, leveltables.to_table(leveltables.amq_levels(p, bits)))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("mu,sigma", [(0.0, 0.01), (0.02, 0.1), (0.0, 0.4)])
def test_alq_fit_is_a_fixed_point_and_beats_every_start_and_fixed_set(bits, mu, sigma):
    m = Mixture([mu, mu + sigma], [sigma, 2 * sigma], [1.0, 0.2])
    table, value = fits.fit_alq(m, bits)
    L = table.astype(np.float64)
    assert value == pytest.approx(fits.psi(L, m), rel=1e-12)
    for j in range(1, L.size - 1):  # every level is its neighbours' exact minimizer (up to float32)
        assert abs(float(fits.alq_update(L[j - 1], L[j + 1], m)) - L[j]) <= 1e-4 * (L[j + 1] - L[j - 1])
    for start in fits.ALQ_STARTS:
        assert value <= fits.psi(fits.alq_start(start, m, bits), m) * (1 + 1e-6)
    for fixed in (leveltables.nuq_levels(bits), leveltables.uniform_levels(bits), leveltables.qsgd_levels(bits)):
        assert value < fits.psi(fixed, m)
    assert value <= fits.fit_amq(m, bits)[2] * (1 + 1e-6)  # AMQ's family is a subset of ALQ's


def test_alq_at_8_bits_on_a_narrow_density():
    # 256 levels, most of them packed into a few sigma around 0; the exponential start has
    # levels down to 0.5**127. Levels must stay distinct and beat every fixed set.
    m = Mixture([0.0], [0.011])
    table, value = fits.fit_alq(m, 8)
    assert table.size == 256 and np.all(np.diff(table) > 0)
    assert value < min(fits.psi(leveltables.nuq_levels(8), m), fits.psi(leveltables.qsgd_levels(8), m)) / 100
    assert value <= fits.fit_amq(m, 8)[2]


def test_fits_are_deterministic_and_cheap():
    stats = {"kind": "mixture", "norm": "l2", "bucket": 8192, "max_buckets": 64,
             "mean": np.linspace(-0.001, 0.001, 64), "std": np.linspace(0.005, 0.02, 64),
             "norms": np.linspace(1, 3, 64), "count": np.full(64, 8192.0)}
    m = gradstats.density_from_stats(stats)
    fits.fit_alq(m, 3)
    fits.fit_amq(m, 3)  # compiled
    t = time.perf_counter()
    a = fits.fit_alq(m, 3)
    b = fits.fit_amq(m, 3)
    elapsed = time.perf_counter() - t
    assert elapsed < 0.5
    m2 = gradstats.density_from_stats(gradstats.stats_from_bytes(gradstats.stats_to_bytes(stats)))
    assert fits.fit_alq(m2, 3)[0].tobytes() == a[0].tobytes()
    assert fits.fit_amq(m2, 3)[0].tobytes() == b[0].tobytes()


def test_to_table_rounds_to_float32_and_keeps_levels_distinct():
    t = leveltables.to_table([-1.0000001, 0.1, 0.1 + 1e-12, 0.3, 1.0000001])
    assert t.dtype == np.float32 and t[0] == -1 and t[-1] == 1 and np.all(np.diff(t) > 0)
    with pytest.raises(ConfigError):
        leveltables.to_table([-1, 0.5, 0.2, 1])
    with pytest.raises(ConfigError):
        leveltables.to_table([-1, np.nan, 1])


# -- statistics -------------------------------------------------------------------------

def reference_rows(x, bucket, norm):
    rows = []
    v = x.double().numpy()
    for start in range(0, v.size, bucket):
        b = v[start:start + bucket]
        scale = np.linalg.norm(b) if norm == "l2" else np.abs(b).max()
        if scale > 0:
            r = b / scale
            rows.append((r.mean(), r.std(), scale, b.size, ((r - r.mean()) ** 2).sum()))
    return np.array(rows)


@pytest.mark.parametrize("norm", ["l2", "max"])
def test_local_stats_match_a_direct_computation(norm):
    x = torch.randn(1000) * torch.linspace(0.1, 5, 1000)
    x[300:400] = 0  # one zero bucket: left out
    rows = reference_rows(x, 100, norm)
    assert rows.shape[0] == 9
    pooled = gradstats.local_stats(x, 100, "pooled", norm, chunk_coords=300)
    assert pooled["count"] == 900 and pooled["n_buckets"] == 9
    assert pooled["sum"] == pytest.approx((rows[:, 0] * rows[:, 3]).sum(), rel=1e-12, abs=1e-12)
    assert pooled["ssd"] == pytest.approx(rows[:, 4].sum(), rel=1e-12)
    mix = gradstats.local_stats(x, 100, "mixture", norm, max_buckets=4)
    order = np.argsort(-rows[:, 2], kind="stable")[:4]
    assert np.allclose(mix["norms"], rows[order, 2], rtol=1e-12)
    assert np.allclose(mix["mean"], rows[order, 0], rtol=1e-10, atol=1e-14)
    assert np.allclose(mix["std"], rows[order, 1], rtol=1e-10)
    assert np.array_equal(mix["count"], rows[order, 3])


def test_short_last_bucket_and_chunking_give_the_same_stats():
    x = torch.randn(1037)
    a = gradstats.local_stats(x, 64, "mixture", max_buckets=100)
    b = gradstats.local_stats(x, 64, "mixture", max_buckets=100, chunk_coords=128)
    assert gradstats.stats_to_bytes(a) == gradstats.stats_to_bytes(b)
    assert sorted(a["count"].tolist()).count(13.0) == 1 and a["count"].sum() == 1037


def test_merge_stats():
    x = torch.randn(4096) * torch.linspace(0.5, 2, 4096)
    parts = [x[:1024], x[1024:3072], x[3072:]]
    pooled = gradstats.merge_stats([gradstats.local_stats(p, 256, "pooled") for p in parts])
    whole = gradstats.local_stats(x, 256, "pooled")
    assert pooled["count"] == whole["count"] and pooled["n_buckets"] == whole["n_buckets"] == 16
    assert pooled["ssd"] == pytest.approx(whole["ssd"], rel=1e-12)
    mixed = gradstats.merge_stats([gradstats.local_stats(p, 256, "mixture", max_buckets=5) for p in parts])
    full = gradstats.local_stats(x, 256, "mixture", max_buckets=5)
    assert gradstats.stats_to_bytes(mixed) == gradstats.stats_to_bytes(full)  # top 5 by norm, whoever held them
    with pytest.raises(ConfigError, match="bucket"):
        gradstats.merge_stats([gradstats.local_stats(x, 256, "pooled"), gradstats.local_stats(x, 128, "pooled")])
    with pytest.raises(ConfigError, match="kind"):
        gradstats.merge_stats([gradstats.local_stats(x, 256, "pooled"), gradstats.local_stats(x, 256, "mixture")])


def test_stats_bytes_roundtrip_and_validation():
    x = torch.randn(2000)
    for kind in gradstats.STATS_KINDS:
        s = gradstats.local_stats(x, 128, kind)
        data = gradstats.stats_to_bytes(s)
        assert isinstance(data, bytes)
        back = gradstats.stats_from_bytes(data)
        assert gradstats.stats_to_bytes(back) == data
    for bad in (b"\x93", b"garbage", gradstats.stats_to_bytes({"kind": "median"})):
        with pytest.raises(ConfigError):
            gradstats.stats_from_bytes(bad)
    with pytest.raises(ConfigError, match="stats kind"):
        gradstats.local_stats(x, 128, "median")


def test_density_from_stats():
    pooled = {"kind": "pooled", "norm": "l2", "bucket": 4, "count": 8, "sum": 0.8, "ssd": 0.32, "n_buckets": 2}
    m = gradstats.density_from_stats(pooled)
    assert m.mu.tolist() == [0.1] and m.sigma.tolist() == pytest.approx([0.2])
    mix = {"kind": "mixture", "norm": "l2", "bucket": 4, "max_buckets": 3, "mean": np.array([0.0, 0.1, 0.2]),
           "std": np.array([0.1, 0.0, 0.3]), "norms": np.array([4.0, 2.0, 1.0]), "count": np.array([4.0, 4.0, 2.0])}
    m = gradstats.density_from_stats(mix)
    assert m.weight == pytest.approx(np.array([64, 16, 2]) / 82)  # count * norm^2
    assert m.sigma[1] == truncnorm.SIGMA_MIN
    assert gradstats.density_from_stats(mix, weight_power=1).weight == pytest.approx(np.array([16, 8, 2]) / 26)
