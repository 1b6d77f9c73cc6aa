"""The decode-free allreduce: the summable code (mpiqsgd.codecs.summable) and the intsum topology,
in simulation (LocalGroup) and on a one-rank communicator. Under mpiexec: tests/mpi/mpi_topologies.py."""

import numpy as np
import pytest
import torch

from conftest import shared_norms, vec
from mpiqsgd.codecs import make_codec, make_generator, summable
from mpiqsgd.errors import ConfigError, DecodeError, NonFiniteError
from mpiqsgd.topology import make_aggregator
from mpiqsgd.topology.intsum import IntSum
from mpiqsgd.transport import LocalGroup, LocalTransport


def simulate(n, xs, steps=1, codec=None, **options):
    """Each rank's results of ``steps`` intsum calls in a LocalGroup of ``n``; the aggregators too."""
    group = LocalGroup(n)
    aggs = {}

    def rank(t):
        agg = aggs[t.rank] = IntSum(t, codec(t.rank) if codec else make_codec("qsgd"), seed=7, **options)
        return [agg.aggregate(xs[t.rank], step) for step in range(steps)]

    return group.run(rank, group.transports()), aggs


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_simulated_intsum_is_bit_identical_on_ranks_and_unbiased_around_the_mean(n):
    numel = 40_000
    xs = [vec(numel, seed=r) * (r + 1) for r in range(n)]
    results, _ = simulate(n, xs, steps=2, piece_numel=10_000)
    for r in range(1, n):
        assert all(torch.equal(a, b) for a, b in zip(results[0], results[r]))
    exact = sum(xs) / n
    err = float((results[0][0] - exact).norm() / exact.norm())
    # 4-bit QSGD, buckets of 512: allgather's own norms give about 1.26; the shared norm is the
    # largest rank's (here up to 8x the smallest's), so the small ranks' levels are coarser
    assert 0 < err < 2.0
    assert not torch.equal(results[0][0], results[0][1])  # each step draws new uniforms


def test_pipelined_equals_unpipelined_bitwise():
    numel = 300_001
    xs = [vec(numel, seed=r) for r in range(3)]
    whole, _ = simulate(3, xs, steps=2, piece_numel=0)
    pieces, _ = simulate(3, xs, steps=2, piece_numel=30_000)
    assert all(torch.equal(a, b) for a, b in zip(whole[0], pieces[0]))


def test_the_mean_is_the_mean_of_each_ranks_quantized_contribution():
    numel = 10_000
    xs = [vec(numel, seed=r) for r in range(3)]
    results, _ = simulate(3, xs, codec=lambda r: make_codec("qsgd", rounding="nearest"))
    layout = summable.SummableLayout(7, 3)
    norms = shared_norms(xs, 512)
    own = [summable.encode_reference(x, norms, 512, layout, 0, False)[1] for x in xs]
    assert torch.allclose(results[0][0], sum(own) / 3, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("codec", ["qsgd", "qsgd-inf"])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_one_rank_is_the_qsgd_round_trip(codec, rounding):
    x = vec(30_001, dist="heavy")
    c = make_codec(codec, rounding=rounding)
    (results,), _ = simulate(1, [x], codec=lambda r: make_codec(codec, rounding=rounding))
    assert torch.equal(results[0], c.decode(c.encode(x, make_generator(7, 0, 0))))


def test_error_feedback_keeps_the_residual_of_the_own_contribution():
    numel = 20_000
    xs = [vec(numel, seed=r) for r in range(2)]
    results, aggs = simulate(2, xs, steps=3, codec=lambda r: make_codec("qsgd", rounding="nearest",
                                                                        error_feedback=True))
    for r in range(2):
        residual = aggs[r].codec.residuals["grad"]
        assert residual.shape == (numel,) and float(residual.abs().max()) > 0
        assert aggs[r].codecs["codec"].state_dict()["residuals"]["grad"].shape == (numel,)
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1]))


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("piece_numel", [0, 25_000])
def test_bytes_counted_equal_the_formula(n, piece_numel):
    numel = 100_003
    group = LocalGroup(n)

    def rank(t):
        agg = IntSum(t, make_codec("qsgd", bits=3), piece_numel=piece_numel)
        agg.aggregate(vec(numel, seed=t.rank), 0)
        return t.meter.sent()["bytes"], agg.sent_nbytes(numel, t.rank)

    for counted, formula in group.run(rank, group.transports()):
        assert counted == formula
        if n > 1:  # scales and words at the nominal allreduce cost
            layout = summable.SummableLayout(3, n)
            assert formula >= 2 * (n - 1) * (8 * layout.n_words(numel) + 4 * 196) // n - 2 * n


class CorruptingTransport(LocalTransport):
    """Rank 1 adds to a field of the words it contributes: the sum overflows."""

    def allreduce_array(self, array, op="sum", phase="allreduce", fp32_numel=0):
        if phase == "intsum" and self.rank == 1:
            array[5] = np.uint64(0xFFFFFFFFFFFFFFF)
        return super().allreduce_array(array, op, phase, fp32_numel)


def test_a_rank_sending_impossible_codes_stops_every_rank_naming_the_bucket():
    group = LocalGroup(2)
    transports = [CorruptingTransport(group, r) for r in range(2)]
    with pytest.raises(DecodeError, match=r"intsum: the summed levels of bucket 0 .*exceed what 2 ranks"):
        group.run(lambda t: IntSum(t, make_codec("qsgd")).aggregate(vec(5000, seed=t.rank), 0), transports)


@pytest.mark.parametrize("codec", [make_codec("fp32"), make_codec("sign"), make_codec("nuqsgd"),
                                   make_codec("qsgd", encoding="entropy")])
def test_refuses_codecs_whose_levels_do_not_add(codec):
    with pytest.raises(ConfigError, match="topology 'intsum' sums QSGD levels"):
        make_aggregator("intsum", LocalGroup(1).transports()[0], codec)


def test_refuses_a_non_finite_gradient():
    x = vec(3000)
    x[1234] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        simulate(1, [x])
