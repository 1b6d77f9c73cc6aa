"""The empirical (histogram) model of normalized coordinates, its ALQ/AMQ fits and the refit guarantee."""

import numpy as np
import pytest
import torch

from mpiqsgd.codecs import fits, gradstats, make_codec
from mpiqsgd.codecs import leveltables as T
from mpiqsgd.codecs.histogram import Histogram, edges_for
from mpiqsgd.codecs.levelset import expected_variance
from mpiqsgd.errors import ConfigError, NonFiniteError
from mpiqsgd.options import CodecOptions


def heavy(n=1 << 16, seed=0, df=2.5):
    """Student-t coordinates with bucket-dependent scales: heavier tails than any normal model."""
    g = np.random.default_rng(seed)
    x = g.standard_t(df, size=n) * np.repeat(g.uniform(0.1, 3.0, n // 1024 + 1), 1024)[:n]
    return torch.from_numpy(x.astype(np.float32))


def hist_of(x, bucket, norm, bins=2048):
    return gradstats.density_from_stats(gradstats.local_stats(x, bucket, "histogram", norm, bins=bins))


@pytest.mark.parametrize("norm", ["l2", "max"])
def test_histogram_variance_is_the_measured_variance(norm):
    x, bucket = heavy(), 1024
    density = hist_of(x, bucket, norm)
    g = np.random.default_rng(1)
    for _ in range(5):  # random tables, and the named ones
        inner = np.sort(g.uniform(-0.3, 0.3, 6)) if norm == "l2" else np.sort(g.uniform(-1, 1, 6))
        table = T.to_table(np.concatenate([[-1.0], inner, [1.0]]))
        exact = expected_variance(table, x, bucket, norm)
        assert density.total * float(density.psi(table.astype(np.float64))) == pytest.approx(exact, rel=2e-3)
    for table in (T.to_table(T.qsgd_levels(3)), T.to_table(T.nuq_levels(3))):
        exact = expected_variance(table, x, bucket, norm)
        assert density.total * float(density.psi(table.astype(np.float64))) == pytest.approx(exact, rel=2e-3)


def test_histogram_moments_against_a_fine_grid():
    mass = np.random.default_rng(2).uniform(0, 1, 64)
    mass[10:20] = 0.0  # an empty stretch
    h = Histogram(mass)
    r = np.linspace(-1, 1, 2_000_001)
    f = h.pdf(r)
    for a, c in [(-1.0, 1.0), (-0.3, 0.2), (0.01, 0.02), (-0.9, -0.85)]:
        sel = (r >= a) & (r <= c)
        rr, ff = r[sel], f[sel]
        M, A, C, V = h.moments(a, c)
        for got, want in [(M, np.trapezoid(ff, rr)), (A, np.trapezoid((rr - a) * ff, rr)),
                          (C, np.trapezoid((c - rr) * ff, rr)), (V, np.trapezoid((rr - a) * (c - rr) * ff, rr))]:
            assert float(got) == pytest.approx(want, rel=2e-3, abs=1e-9)
    assert float(h.cdf(1.0)) == pytest.approx(1.0)
    q = np.array([0.1, 0.5, 0.9])
    assert np.allclose(h.cdf(h.ppf(q)), q, atol=1e-12)


def test_alq_update_is_the_exact_minimizer():
    h = hist_of(heavy(seed=3), 512, "max", bins=256)
    for a, c in [(-1.0, 1.0), (-0.2, 0.4), (0.05, 0.6)]:
        b = float(fits.alq_update(a, c, h))
        grid = np.linspace(a, c, 20001)[1:-1]
        values = [float(h.psi(np.array([a, t, c]))) for t in grid]
        assert float(h.psi(np.array([a, b, c]))) <= min(values) + 1e-12


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fitted_levels_are_locally_optimal_and_beat_every_baseline(bits):
    x, bucket = heavy(seed=bits), 1024
    for norm in ("l2", "max"):
        h = hist_of(x, bucket, norm)
        table, value = fits.fit_alq(h, bits)
        L = table.astype(np.float64)
        assert float(h.psi(L)) == pytest.approx(value)
        for j in range(1, L.size - 1):  # no single level moves to a lower variance
            for t in np.linspace(L[j - 1], L[j + 1], 41)[1:-1]:
                trial = L.copy()
                trial[j] = t
                assert float(h.psi(trial)) >= value * (1 - 1e-6)
        measured = expected_variance(table, x, bucket, norm)
        for name, base in fits.baselines(h, bits).items():
            assert measured <= expected_variance(base, x, bucket, norm) * (1 + 1e-5), (norm, name)


def test_histogram_fit_beats_the_truncated_normal_fit_on_heavy_tails():
    x, bucket = heavy(seed=7), 1024
    model, hist = (make_codec("alq", bits=3, bucket=bucket, fit=f) for f in ("model", "histogram"))
    for codec in (model, hist):
        codec.fit(codec.local_stats(x))
    assert expected_variance(hist.levels, x, bucket, "max") < 0.9 * expected_variance(model.levels, x, bucket, "max")


def test_guarantee_keeps_a_better_baseline():
    h = hist_of(heavy(seed=4), 1024, "max")
    bad = T.to_table(np.array([-1.0, -0.999, -0.998, -0.997, 0.997, 0.998, 0.999, 1.0]))
    table, value, won, scores = fits.guarded(bad, float(h.psi(bad.astype(np.float64))), h, 3)
    assert won != "fit" and value == min(scores.values()) and np.array_equal(table, fits.baselines(h, 3)[won])
    good, v = fits.fit_alq(h, 3)
    assert fits.guarded(good, v, h, 3)[2] == "fit"


def test_every_refit_records_the_guarantee():
    codec = make_codec("amq", bits=3, bucket=1024)
    codec.fit(codec.local_stats(heavy(seed=5)))
    psi = codec.last_fit["psi"]
    assert set(psi) == {"fit", "uniform", "qsgd", "nuq"}  # amq is the fit itself
    assert psi[codec.last_fit["won"]] == min(psi.values()) == codec.model_variance


def test_histogram_statistics_merge_to_the_whole_and_fit_identically():
    x, bucket = heavy(seed=6), 1024
    codec = make_codec("alq", bits=3, bucket=bucket)
    parts = [codec.local_stats(x[:32768]), codec.local_stats(x[32768:])]  # bucket-aligned halves
    merged = gradstats.merge_stats(parts)
    assert np.allclose(merged["mass"], codec.local_stats(x)["mass"], rtol=1e-12, atol=0)
    wire = [gradstats.stats_to_bytes(p) for p in parts]
    a, b = make_codec("alq", bits=3, bucket=bucket), make_codec("alq", bits=3, bucket=bucket)
    a.fit(gradstats.merge_stats([gradstats.stats_from_bytes(w) for w in wire]))
    b.fit(gradstats.stats_to_bytes(gradstats.merge_stats(parts)))
    assert a.levels_bytes == b.levels_bytes  # every rank fits bit-identical levels
    assert len(wire[0]) < 8 * 2048 + 100  # the documented size


def test_malformed_histogram_statistics_are_refused():
    good = gradstats.local_stats(heavy(n=4096), 1024, "histogram", "max", bins=16)
    import msgpack

    for change in ({"mass": b"\x00" * 12}, {"mass": b"\x00" * 24}, {"mass": "text"},
                   {"mass": np.full(16, -1.0).tobytes()}, {"mass": np.full(16, np.nan).tobytes()}, {"bucket": "x"}):
        raw = {**good, "mass": good["mass"].tobytes(), **change}
        with pytest.raises(ConfigError):
            gradstats.stats_from_bytes(msgpack.packb(raw, use_bin_type=True))
    with pytest.raises(ConfigError, match="histograms of 16 and 32 bins"):
        gradstats.merge_stats([good, gradstats.local_stats(heavy(n=4096), 1024, "histogram", "max", bins=32)])
    with pytest.raises(ConfigError, match="even number of bins"):
        gradstats.local_stats(heavy(n=4096), 1024, "histogram", "max", bins=7)
    for mass in ([1.0], [1.0, -1.0], [0.0, 0.0], [1.0, np.inf]):
        with pytest.raises(ConfigError):
            Histogram(mass)


def test_edges_are_symmetric_and_fine_near_zero():
    e = edges_for(2048)
    assert e[0] == -1 and e[-1] == 1 and e[1024] == 0 and np.allclose(e, -e[::-1])
    assert np.all(np.diff(e) > 0) and e[1025] < 1e-5


def test_norm_and_fit_flags():

    assert CodecOptions(codec="nuqsgd", norm="max").build_codec().norm == "max"
    assert CodecOptions(codec="alq").build_codec().norm == "max"
    assert CodecOptions(codec="nuqsgd").build_codec().norm == "l2"
    assert CodecOptions(codec="amq-n", fit="model").build_codec().stats_kind == "pooled"
    with pytest.raises(ConfigError, match="--norm applies only to the level-set codecs.*qsgd-inf"):
        CodecOptions(codec="qsgd", norm="max").build_codec()
    with pytest.raises(ConfigError, match="--fit applies only to the adaptive codecs"):
        CodecOptions(codec="nuqsgd", fit="model").build_codec()
    with pytest.raises(ConfigError, match="terngrad' fixes norm"):
        CodecOptions(codec="terngrad", norm="l2").build_codec()


def test_checkpoint_of_another_fit_is_refused():
    a = make_codec("alq", bits=3, bucket=256, fit="model")
    with pytest.raises(ConfigError, match="fit='model'"):
        make_codec("alq", bits=3, bucket=256).load_state_dict(a.state_dict())


def test_statistics_of_a_diverged_gradient_say_so():
    # Finite values whose squared bucket norm overflows (what a diverging error-feedback residual
    # reaches before the loss turns NaN): a clear NonFiniteError, not a complaint about histogram masses.
    flat = torch.full((1024,), 3e19)
    with pytest.raises(NonFiniteError, match="training diverged"):
        gradstats.local_stats(flat, 512, "histogram")
    assert np.isfinite(gradstats.local_stats(flat / 1e10, 512, "histogram")["mass"]).all()
