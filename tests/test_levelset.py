"""Level-set codecs: wire format, kernels, unbiasedness, variance, level tables, adaptive refits."""

import math

import msgpack
import numpy as np
import pytest
import torch

from conftest import draws, vec
from mpiqsgd import wire
from mpiqsgd.codecs import CODECS, ErrorFeedback, decode, gradstats, make_codec, make_generator
from mpiqsgd.codecs.levelset import (AdaptiveLevelSet, LevelSet, expected_variance, named_levels,
                                     normalized_variance, table_id)
from mpiqsgd.codecs.buckets import bucket_norms
from mpiqsgd.codecs.levelset_kernels import inverse_norms
from mpiqsgd.errors import ConfigError, DecodeError

LEVELSET = [
    ("nuqsgd", {}), ("nuqsgd", {"bits": 1, "bucket": 16}), ("nuqsgd", {"bits": 2, "bucket": 100}),
    ("nuqsgd", {"bits": 8, "bucket": 64}), ("nuqsgd", {"norm": "max", "bits": 4, "bucket": 33}),
    ("nuqsgd-zero", {}), ("nuqsgd-zero", {"bits": 2, "bucket": 30}),
    ("terngrad", {"bucket": 50}), ("terngrad", {"bucket": 50, "clip_sigma": 2.5}),
    ("alq", {}), ("alq-n", {"bits": 2, "bucket": 7}), ("amq", {"bits": 4, "bucket": 128}), ("amq-n", {}),
]
STOCHASTIC = [
    ("nuqsgd", {"bits": 3, "bucket": 64}), ("nuqsgd", {"bits": 1, "bucket": 16}),
    ("nuqsgd-zero", {"bits": 4, "bucket": 64}),
    ("terngrad", {"bucket": 32}), ("alq", {"bits": 2, "bucket": 50}),
    ("amq-n", {"bits": 4, "bucket": 128}),
]


def fitted(name, bits=3, bucket=256, seed=0, **kw):
    codec = make_codec(name, bits=bits, bucket=bucket, **kw)
    codec.fit(codec.local_stats(vec(4 * bucket, seed)))
    return codec


def coordinate_variance(levels, x, bucket, norm):
    """Exact per-coordinate variance of stochastic rounding (float64, independent of the codec)."""
    L = np.asarray(levels, dtype=np.float64)
    v = x.double().numpy()
    out = np.zeros(v.size)
    for start in range(0, v.size, bucket):
        b = v[start:start + bucket]
        scale = np.linalg.norm(b) if norm == "l2" else np.abs(b).max()
        if scale == 0:
            continue
        r = np.clip(b / scale, -1, 1)
        j = np.clip(np.searchsorted(L, r, side="right") - 1, 0, L.size - 2)
        out[start:start + bucket] = scale**2 * (r - L[j]) * (L[j + 1] - r)
    return torch.from_numpy(out)


# -- wire format ------------------------------------------------------------------------

@pytest.mark.parametrize("name,params", LEVELSET)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 100, 1000, 8193])
def test_roundtrip_exact_size_and_bit_identical_decode(name, params, n):
    codec = make_codec(name, **params)
    x = vec(n, seed=n)
    message, decoded = codec.encode_decode(x, make_generator(1, 2, 3))
    assert len(message) == codec.encoded_nbytes(n)
    header, payload = wire.unframe(message)
    assert len(payload) == 4 * math.ceil(n / codec.bucket) + math.ceil(n * codec.bits / 8) == codec.payload_nbytes(n)
    assert header["codec"] == "levelset" and header["params"] == codec.params
    assert set(codec.params) == {"bits", "bucket", "norm", "method", "levels"}
    for y in (codec.decode(message), decode(message)):
        assert y.dtype == torch.float32 and y.shape == (n,)
        assert torch.equal(y, decoded)


@pytest.mark.parametrize("name,params", LEVELSET)
def test_decoded_values_are_norm_times_a_level(name, params):
    codec = make_codec(name, **params)
    x = vec(700, seed=5, dist="heavy")
    y = codec.decode(codec.encode(x, make_generator(0)))
    d = codec.bucket
    for start in range(0, 700, d):
        v = x[start:start + d]
        if codec.clip_sigma is not None:
            bound = codec.clip_sigma * v.std(unbiased=False)
            v = v.clamp(-bound, bound)
        scale = v.norm() if codec.norm == "l2" else v.abs().max()
        k = (y[start:start + d] / scale).double().numpy()
        dist = np.abs(k[:, None] - codec.levels[None, :]).min(1)
        assert dist.max() < 1e-5


def test_exact_level_tables():
    assert named_levels("nuq", 3).tolist() == [-1, -0.5, -0.25, -0.125, 0.125, 0.25, 0.5, 1]
    assert named_levels("nuq", 1).tolist() == [-1, 1]
    assert named_levels("nuq", 8).size == 256 and named_levels("nuq", 8)[128] == 0.5**127
    assert named_levels("nuq0", 3).tolist() == [-1, -0.5, -0.25, 0, 0.25, 0.5, 1]
    assert named_levels("nuq0", 2).tolist() == [-1, 0, 1]
    assert named_levels("nuq0", 8).size == 255 and named_levels("nuq0", 8)[128] == 0.5**126
    assert named_levels("terngrad", 2).tolist() == [-1, 0, 1]
    assert named_levels("uniform", 2).tolist() == pytest.approx([-1, -1 / 3, 1 / 3, 1])
    assert named_levels("qsgd", 3).tolist() == pytest.approx([-1, -2 / 3, -1 / 3, 0, 1 / 3, 2 / 3, 1])
    for bits in range(1, 9):
        t = make_codec("nuqsgd", bits=bits).levels
        assert t.size == 2**bits and t[0] == -1 and t[-1] == 1 and np.all(np.diff(t) > 0)
        assert np.array_equal(make_codec("amq", bits=bits).levels, t)  # adaptive codecs start at NUQ
    codec = make_codec("terngrad")
    assert codec.bits == 2 and codec.norm == "max"


def test_header_carries_the_float32_table():
    codec = make_codec("alq", bits=2, bucket=10)
    header, _ = wire.unframe(codec.encode(vec(25), make_generator(0)))
    assert header["params"] == {"bits": 2, "bucket": 10, "norm": "max", "method": "alq",
                                "levels": np.array([-1, -0.5, 0.5, 1], "<f4").tobytes()}


def test_levelset_qsgd_has_the_qsgd_codec_distribution():
    # QSGD is a level set: l/s for l = -s..s. Same exact variance as the qsgd codec's formula.
    x = vec(1000, seed=3)
    qs = LevelSet(bits=3, bucket=100, method="qsgd")
    unit = torch.stack([x[i:i + 100].norm() for i in range(0, 1000, 100)]).repeat_interleave(100) / 3
    r = x.abs() / unit
    p = r - r.floor()
    expected = float((unit.double() ** 2 * p * (1 - p)).sum())
    assert expected_variance(qs.levels, x, 100) == pytest.approx(expected, rel=1e-5)
    q = make_codec("qsgd", bits=3, bucket=100)
    draws_ls = torch.stack([qs.decode(qs.encode(x, make_generator(0, 0, i))) for i in range(300)])
    draws_q = torch.stack([q.decode(q.encode(x, make_generator(0, 0, i))) for i in range(300)])
    assert float((draws_ls - x).pow(2).sum(1).mean()) == pytest.approx(expected, rel=0.05)
    assert float((draws_q - x).pow(2).sum(1).mean()) == pytest.approx(expected, rel=0.05)


# -- kernels ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,params", [("nuqsgd", {"bits": 1}), ("nuqsgd", {"bits": 3, "bucket": 7}),
                                         ("nuqsgd", {"bits": 8, "bucket": 1000}), ("terngrad", {}),
                                         ("nuqsgd-zero", {"bits": 7, "bucket": 100}),
                                         ("alq", {"bits": 5, "bucket": 512}), ("amq-n", {"bits": 6}),
                                         ("nuqsgd", {"bits": 3}), ("alq", {"bits": 4, "bucket": 512}),
                                         ("nuqsgd", {"bits": 2, "bucket": 16384}),
                                         ("terngrad", {"clip_sigma": 2.0, "bucket": 64})])
@pytest.mark.parametrize("n", [1, 9, 1000, 300_000])
def test_cpu_kernel_and_torch_kernel_give_the_same_bytes(name, params, n):
    """Buckets dividing the kernels' chunk with at most 4 bits take the fused norms-and-codes kernel."""
    fast = make_codec(name, **params)
    ref = make_codec(name, **params)
    ref.force_torch = True
    x = vec(n, seed=n) ** 3
    x[: n // 3] = 0.0  # a zero bucket or two
    x[n // 3: n // 3 + n // 10] *= 1e19  # L2 norms beyond float32 (clamped to its maximum)
    m1, d1 = fast.encode_decode(x, make_generator(4, 1, 2))
    m2, d2 = ref.encode_decode(x, make_generator(4, 1, 2))
    assert m1 == m2
    assert torch.equal(d1, d2)
    assert torch.equal(fast.decode(m2), ref.decode(m1))


@pytest.mark.parametrize("name,params", [("nuqsgd", {"bits": 3}), ("alq", {"bits": 6}), ("terngrad", {})])
def test_subnormal_buckets_divide_by_their_norm_on_both_kernels(name, params):
    """A bucket whose norm is subnormal has no finite inverse: both kernels divide there (and
    multiply by 1 / norm everywhere else), so they agree and the values keep their sign and scale."""
    fast, ref = make_codec(name, bucket=4, **params), make_codec(name, bucket=4, **params)
    ref.force_torch = True
    x = torch.tensor([1e-40, -2e-40, 5e-41, 0.0, 0.3, -0.2, 0.1, 0.05, -1e-39, 1e-39, 0.0, 2e-39])
    norms = bucket_norms(x, 4, fast.norm)
    assert torch.isinf(inverse_norms(norms)).tolist() == [True, False, True]  # the division path is taken
    m1, d1 = fast.encode_decode(x, make_generator(5))
    m2, d2 = ref.encode_decode(x, make_generator(5))
    assert m1 == m2 and torch.equal(d1, d2)
    bound = norms.repeat_interleave(4)  # every level is within [-1, 1] of the norm
    assert bool((d1.abs() <= bound).all()) and float(d1[[0, 1, 2, 8, 9, 11]].abs().max()) > 0


def test_extreme_inputs():
    codec = make_codec("nuqsgd", bucket=4)
    x = torch.tensor([1e20, -1e20, 3e19, 0.0, 1e-40, -1e-38, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0])
    y = codec.decode(codec.encode(x, make_generator(0)))
    assert torch.isfinite(y).all() and float(y[:4].abs().max()) > 1e19
    assert torch.equal(y[8:12], torch.zeros(4))  # a zero bucket decodes to zeros
    assert torch.equal(codec.decode(codec.encode(torch.zeros(100), make_generator(0))), torch.zeros(100))
    one = codec.decode(codec.encode(torch.tensor([-3.0]), make_generator(0)))
    assert torch.equal(one, torch.tensor([-3.0]))  # r = -1 is a level: exact


# -- statistics of the rounding ---------------------------------------------------------

def test_expected_variance_matches_independent_formula():
    x = vec(3000, seed=1, dist="heavy")
    for name, params in LEVELSET:
        codec = make_codec(name, **params)
        if codec.clip_sigma is not None:
            continue
        want = float(coordinate_variance(codec.levels, x, codec.bucket, codec.norm).sum())
        assert expected_variance(codec.levels, x, codec.bucket, codec.norm) == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert normalized_variance(named_levels("nuq", 3), torch.zeros(5), 4) == 0.0


@pytest.mark.parametrize("name,params", STOCHASTIC + [("fitted-alq", {}), ("fitted-amq", {})])
@pytest.mark.parametrize("dist", ["normal", "heavy"])
def test_every_codec_is_unbiased(name, params, dist):
    codec = fitted(name[7:], bits=3, bucket=64) if name.startswith("fitted") else make_codec(name, **params)
    x = vec(200, seed=3, dist=dist)
    t = 1500
    mean = draws(codec, x, t).mean(0)
    var = coordinate_variance(codec.levels, x, codec.bucket, codec.norm)
    tol = 6 * (var / t).sqrt() + 1e-6 * x.abs().max()
    assert torch.all((mean - x.double()).abs() <= tol), float(((mean - x.double()).abs() / tol).max())


@pytest.mark.parametrize("name,params", STOCHASTIC + [("fitted-alq-n", {}), ("fitted-amq", {})])
def test_empirical_variance_matches_expected_variance(name, params):
    codec = fitted(name[7:], bits=3, bucket=128) if name.startswith("fitted") else make_codec(name, **params)
    x = vec(512, seed=11, dist="uniform")
    t = 600
    sq = (draws(codec, x, t) - x.double()).pow(2).sum(1)
    expected = expected_variance(codec.levels, x, codec.bucket, codec.norm)
    stderr = float(sq.std()) / math.sqrt(t)
    assert abs(float(sq.mean()) - expected) <= 6 * stderr + 1e-9 * expected


def test_terngrad_is_ternary_with_max_norm_and_clipping():
    x = vec(400, seed=2, dist="heavy")
    plain = make_codec("terngrad", bucket=100)
    y = plain.decode(plain.encode(x, make_generator(0)))
    for start in range(0, 400, 100):
        s = x[start:start + 100].abs().max()
        assert set(torch.unique(y[start:start + 100] / s).tolist()) <= {-1.0, 0.0, 1.0}
    clipped = make_codec("terngrad", bucket=100, clip_sigma=2.5)
    z = clipped.decode(clipped.encode(x, make_generator(0)))
    for start in range(0, 400, 100):
        bound = 2.5 * x[start:start + 100].std(unbiased=False)
        assert float(z[start:start + 100].abs().max()) <= float(bound) * (1 + 1e-6)
    assert clipped.params == plain.params  # clipping is the encoder's business: same wire format


# -- validation -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(name="terngrad", bits=3), "bits=2"),
    (dict(name="terngrad", norm="l2"), "fixes norm"),
    (dict(name="nuqsgd", bits=0), "between 1 and 8"),
    (dict(name="nuqsgd", bits=9), "between 1 and 8"),
    (dict(name="alq", bucket=0), "bucket must be"),
    (dict(name="nuqsgd", norm="l1"), "l2, max"),
    (dict(name="nuqsgd-zero", bits=1), "bits >= 2"),
    (dict(name="nuqsgd", levels=[-1, 0, 1]), "method's own"),
    (dict(name="alq", levels=[-1, 0, 1]), "exactly 2\\^bits = 8"),
    (dict(name="alq", bits=2, levels=[-1, 0.5, 0.2, 1]), "strictly increasing"),
    (dict(name="alq", bits=2, levels=[-0.9, 0, 0.5, 1]), "exactly -1"),
    (dict(name="alq", levels=7), "levels must be"),
    (dict(name="terngrad", clip_sigma=-1), "clip_sigma"),
    (dict(name="amq", rounding="nearest"), "takes no parameter rounding"),
])
def test_invalid_parameters_fail_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_codec(**kwargs)


def test_registry_has_the_level_set_codecs():
    assert {"nuqsgd", "nuqsgd-zero", "terngrad", "alq", "alq-n", "amq", "amq-n"} <= set(CODECS)
    assert isinstance(make_codec("alq"), AdaptiveLevelSet) and not isinstance(make_codec("nuqsgd"), AdaptiveLevelSet)
    assert make_codec("alq-n", fit="model").stats_kind == "pooled"
    assert make_codec("amq", fit="model").stats_kind == "mixture"
    assert make_codec("alq").stats_kind == make_codec("amq-n").stats_kind == "histogram"  # the default fit


def reframe(params, numel, payload):
    return wire.frame(msgpack.packb({"codec": "levelset", "numel": numel, "params": params}, use_bin_type=True),
                      payload)


def test_invalid_bytes_are_decode_errors():
    good = make_codec("terngrad", bucket=4).params
    norm = np.float32(1.0).tobytes()
    with pytest.raises(DecodeError, match="code"):  # code 3 of the 2-bit ternary set
        decode(reframe(good, 1, norm + bytes([3])))
    assert decode(reframe(good, 1, norm + bytes([2]))).tolist() == [1.0]
    with pytest.raises(DecodeError, match="scale"):
        decode(reframe(good, 1, np.float32(-1.0).tobytes() + bytes([0])))
    with pytest.raises(DecodeError, match="scale"):
        decode(reframe(good, 1, np.float32(np.nan).tobytes() + bytes([0])))
    alq = make_codec("alq", bits=2, bucket=4).params
    bad_tables = [np.array([-1, 0.5, 0.2, 1], "<f4").tobytes(), np.array([-1, 0, 1], "<f4").tobytes(),
                  np.array([-1, np.nan, 0.5, 1], "<f4").tobytes(), np.array([-1, 0, 0.5, 2], "<f4").tobytes(),
                  b"\0" * 5, [-1.0, -0.5, 0.5, 1.0], None]
    for table in bad_tables:
        with pytest.raises(DecodeError, match="invalid levelset parameters"):
            decode(reframe({**alq, "levels": table}, 1, norm + bytes([0])))
    nuq = make_codec("nuqsgd", bits=2, bucket=4).params
    with pytest.raises(DecodeError, match="method's own"):  # a fixed method with foreign levels
        decode(reframe({**nuq, "levels": np.array([-1, -0.3, 0.3, 1], "<f4").tobytes()}, 1, norm + bytes([0])))
    with pytest.raises(DecodeError, match="invalid levelset parameters"):
        decode(reframe({**nuq, "method": "lloyd"}, 1, norm + bytes([0])))


# -- adaptive codecs --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["alq", "alq-n", "amq", "amq-n"])
def test_fit_changes_the_table_and_old_messages_no_longer_decode(name):
    codec = make_codec(name, bits=3, bucket=256)
    x = vec(2048, seed=1)
    old_params = codec.params
    old = codec.encode(x, make_generator(0))
    table = codec.fit(gradstats.merge_stats([codec.local_stats(x[:1024]), codec.local_stats(x[1024:])]))
    assert codec.params["levels"] == table.astype("<f4").tobytes() != old_params["levels"]
    assert table[0] == -1 and table[-1] == 1 and np.all(np.diff(table) > 0) and table.dtype == np.float32
    with pytest.raises(DecodeError, match=f"level table #{table_id(old_params['levels'])}.*holds table "
                                          f"#{table_id(codec.params['levels'])}"):
        codec.decode(old)
    assert torch.equal(decode(old), make_codec(name, bits=3, bucket=256).decode(old))  # the header's own table
    new = codec.encode(x, make_generator(0))
    assert torch.equal(codec.decode(new), decode(new))
    assert codec.model_variance > 0 and codec.n_fits == 1


def test_fit_is_deterministic_and_a_function_of_the_stats_only():
    x = vec(4096, seed=9) * torch.linspace(0.1, 3, 4096)
    a, b = make_codec("alq", bucket=512), make_codec("alq", bucket=512)
    stats = [a.local_stats(x[i:i + 1024]) for i in range(0, 4096, 1024)]
    a.fit(gradstats.merge_stats(stats))
    b.fit(gradstats.stats_to_bytes(gradstats.merge_stats(stats)))  # as received over the wire
    assert a.params == b.params
    b.fit(gradstats.merge_stats(stats))
    assert a.params == b.params


def test_error_feedback_forwards_fit():
    ef = make_codec("amq-n", error_feedback=True, bucket=64)
    assert isinstance(ef, ErrorFeedback)
    before = ef.params["levels"]
    ef.fit(ef.local_stats(vec(640)))
    assert ef.params["levels"] != before == make_codec("amq-n").params["levels"]


@pytest.mark.parametrize("name", ["alq", "amq-n"])
def test_state_dict_roundtrip(name):
    codec = fitted(name)
    state = codec.state_dict()
    state = msgpack.unpackb(msgpack.packb(state, use_bin_type=True), raw=False)  # checkpoint-safe values
    fresh = make_codec(name, bits=3, bucket=256)
    message = codec.encode(vec(600), make_generator(0))
    with pytest.raises(DecodeError, match="level table"):
        fresh.decode(message)
    fresh.load_state_dict(state)
    assert fresh.params == codec.params and fresh.p == codec.p and fresh.n_fits == 1
    assert torch.equal(fresh.decode(message), codec.decode(message))
    assert gradstats.stats_to_bytes(fresh.stats) == gradstats.stats_to_bytes(codec.stats)
    with pytest.raises(ConfigError, match="bits"):
        make_codec(name, bits=4, bucket=256).load_state_dict(state)


def test_set_levels_installs_a_broadcast_table():
    a, b = fitted("alq", seed=3), make_codec("alq", bits=3, bucket=256)
    b.set_levels(a.params["levels"])
    assert a.params == b.params


def test_fit_refuses_statistics_of_another_kind():
    codec = make_codec("alq", bucket=64, fit="model")
    with pytest.raises(ConfigError, match="mixture statistics"):
        codec.fit(gradstats.local_stats(vec(640), 64, "pooled"))
    with pytest.raises(ConfigError, match="bucket=64"):
        codec.fit(gradstats.local_stats(vec(640), 32, "mixture"))
    with pytest.raises(ConfigError, match="histogram statistics"):
        make_codec("alq", bucket=64).fit(gradstats.local_stats(vec(640), 64, "mixture"))
    with pytest.raises(ConfigError, match="every bucket was zero"):
        codec.fit(codec.local_stats(torch.zeros(100)))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_adapted_levels_beat_qsgd_and_nuqsgd_on_gaussian_gradients(bits):
    # Buckets of normal coordinates with bucket-dependent scale and mean: what the models assume.
    g = torch.Generator().manual_seed(bits)
    d = 512
    scale = torch.rand(32, generator=g) * 2 + 0.1
    x = (torch.randn(32, d, generator=g) + 0.3 * torch.randn(32, 1, generator=g)) * scale[:, None]
    x = x.reshape(-1)
    for norm in ("l2", "max"):
        qsgd = expected_variance(named_levels("qsgd", bits), x, d, norm)
        nuq = min(expected_variance(named_levels(m, bits), x, d, norm) for m in ("nuq", "nuq0"))
        for name in ("alq", "alq-n", "amq", "amq-n"):
            for fit in ("histogram", "model"):
                codec = make_codec(name, bits=bits, bucket=d, norm=norm, fit=fit)
                codec.fit(codec.local_stats(x))
                v = expected_variance(codec.levels, x, d, norm)
                assert v < min(qsgd, nuq), (name, fit, norm, v, qsgd, nuq)


def test_truncated_and_mutated_messages_are_decode_errors():
    import random
    messages = [make_codec(name, **params).encode(vec(n, seed=n), make_generator(0))
                for name, params in [("terngrad", {"bucket": 8}), ("alq", {"bits": 3, "bucket": 16}),
                                     ("nuqsgd", {"bits": 8, "bucket": 5})] for n in (1, 37)]
    rng = random.Random(5)
    for message in messages:
        for cut in range(len(message)):
            with pytest.raises(DecodeError):
                decode(message[:cut])
        for _ in range(200):
            mutated = bytearray(message)
            mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
            with pytest.raises(DecodeError):
                decode(bytes(mutated))


def test_load_state_dict_takes_a_device_like_other_codec_state():
    codec = fitted("alq-n")
    fresh = make_codec("alq-n", bits=3, bucket=256)
    fresh.load_state_dict(codec.state_dict(), "cpu")
    assert fresh.params == codec.params


def test_cpu_search_grid_matches_searchsorted_on_cell_edges_and_levels():
    # Levels and inputs on the CPU kernel's grid edges (multiples of 2^-13) and next to them.
    e = 2.0**-13
    levels = [-1, -0.5, -e, 0, e, 0.25, 0.5, 1]
    fast = make_codec("alq", bits=3, bucket=10**6, norm="max", levels=levels)
    ref = make_codec("alq", bits=3, bucket=10**6, norm="max", levels=levels)
    ref.force_torch = True
    base = torch.tensor(levels + [k * e for k in range(-40, 41)], dtype=torch.float32)
    x = torch.cat([base, torch.nextafter(base, torch.tensor(2.0)), torch.nextafter(base, torch.tensor(-2.0)),
                   torch.rand(5000) * 2 - 1]).clamp(-1, 1)
    x[0] = 1.0  # max norm 1: r = x exactly
    m1, d1 = fast.encode_decode(x, make_generator(3))
    m2, d2 = ref.encode_decode(x, make_generator(3))
    assert m1 == m2 and torch.equal(d1, d2)
    on_level = torch.isin(x, torch.tensor(levels, dtype=torch.float32))
    assert torch.equal(d1[on_level], x[on_level])  # a coordinate on a level is exact
