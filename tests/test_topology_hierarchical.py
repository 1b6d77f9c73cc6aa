"""The hierarchical exchange in simulation: LocalGroup nodes, fp32 == flat bitwise, bytes per link class."""

import pytest
import torch

from mpiqsgd.codecs import make_codec
from mpiqsgd.codecs.fp import FP32
from mpiqsgd.errors import ConfigError
from mpiqsgd.meter import merge
from mpiqsgd.topology import Nodes, make_aggregator, wants_hierarchical
from mpiqsgd.train.config import TrainConfig
from mpiqsgd.transport import LocalGroup

FLAT_FP32 = [("allreduce", {}), ("ps", {}), ("ps", {"downlink": "codec"}), ("ring", {}), ("scatter", {}),
             ("allgather", {})]


def exact_grads(n, numel, step=0):
    """Small integers times 1/4: every sum over ranks, in any order, and its halving are exact."""
    return [torch.randint(-64, 65, (numel,), generator=torch.Generator().manual_seed(100 * step + r)).float() / 4
            for r in range(n)]


def run(n, ranks_per_node, build, grads, steps=1):
    """Every rank's outputs of ``steps`` calls of the aggregator ``build(transport)``, and the transports."""
    group = LocalGroup(n, ranks_per_node)
    transports = group.transports(keep_messages=True)

    def job(t):
        agg = build(t)
        return agg, [agg.aggregate(grads(step)[t.rank].clone(), step) for step in range(steps)]

    return group.run(job, transports), transports


@pytest.mark.parametrize("n,rpn", [(4, 2), (6, 2)])
@pytest.mark.parametrize("topology,options", FLAT_FP32)
@pytest.mark.parametrize("numel", [1, 5, 1001])
def test_fp32_hierarchical_equals_flat_bitwise(n, rpn, topology, options, numel):
    def grads(step):
        return exact_grads(n, numel, step)

    flat, _ = run(n, None, lambda t: make_aggregator(topology, t, FP32(), **options), grads)
    hier, transports = run(n, rpn, lambda t: make_aggregator(topology, t, FP32(), nodes=Nodes(t), **options), grads)
    reference = flat[0][1][0]
    assert all(torch.equal(out[0], reference) for _, out in flat + hier)
    assert torch.equal(reference, torch.stack(grads(0)).sum(0) / n)
    aggs = [agg for agg, _ in hier]
    assert [t.meter.sent()["bytes"] for t in transports] == [aggs[0].sent_nbytes(numel, r) for r in range(n)]


@pytest.mark.parametrize("n,rpn", [(4, 2), (6, 2), (6, 3)])
@pytest.mark.parametrize("topology", ["scatter", "ring", "allreduce"])
def test_bytes_per_link_class(n, rpn, topology):
    numel = 10_007
    codec = FP32 if topology == "allreduce" else (lambda: make_codec("qsgd", bits=4))
    n_nodes = n // rpn

    def grads(step):
        return [torch.randn(numel, generator=torch.Generator().manual_seed(r)) for r in range(n)]

    hier, transports = run(n, rpn, lambda t: make_aggregator(topology, t, codec(), nodes=Nodes(t)), grads)
    job = merge([t.meter.totals() for t in transports])
    # Inter-node: the flat topology's bytes on one rank per node (per node, not per rank).
    _, flat_transports = run(n_nodes, None, lambda t: make_aggregator(topology, t, codec()), grads)
    flat = merge([t.meter.totals() for t in flat_transports])
    assert job["by_class"]["inter"] == flat["by_class"]["inter"] == flat["sent"]
    assert flat["by_class"]["intra"]["bytes"] == 0
    # Intra-node: 2 (W - L) fp32 messages.
    fp32 = FP32().encoded_nbytes(numel)
    assert job["by_class"]["intra"]["bytes"] == 2 * (n - n_nodes) * fp32
    assert job["by_class"]["intra"]["messages"] == 2 * (n - n_nodes)
    assert set(job["by_phase"]) - set(flat["by_phase"]) == {"node-reduce", "node-bcast"}
    agg = hier[0][0]
    for r, t in enumerate(transports):
        by_class = agg.sent_nbytes_by_class(numel, r)
        assert t.meter.totals()["by_class"]["intra"]["bytes"] == by_class["intra"]
        assert t.meter.totals()["by_class"]["inter"]["bytes"] == by_class["inter"]
    # The leaders' sub-transport records world ranks: node k's leader is world rank k * rpn.
    leaders = [k * rpn for k in range(n_nodes)]
    messages = [m for t in transports for m in t.meter.messages]
    assert {m.source for m in messages if not m.phase.startswith("node-")} == set(leaders)
    assert {m.dest for m in messages if not m.phase.startswith("node-")} <= set(leaders + [-1])
    assert all(m.source // rpn == m.dest // rpn and m.source != m.dest for m in messages if m.phase.startswith("node-"))
    assert {r: job["sent_by_rank"][r] for r in range(n)} == {r: agg.sent_nbytes(numel, r) for r in range(n)}


@pytest.mark.parametrize("topology,options", [("scatter", {}), ("ring", {}), ("intsum", {"piece_numel": 2048}),
                                              ("ps", {"downlink": "codec"}), ("allgather", {})])
def test_inner_topology_sees_node_means_as_a_flat_job_of_leaders(topology, options):
    # When both ranks of a node hold the same gradient, the node mean is that gradient exactly: the
    # leaders then run what a flat job of one rank per node runs, seeds included, bit for bit.
    numel, n_nodes = 5000, 3

    def node_grads(step):
        return [torch.randn(numel, generator=torch.Generator().manual_seed(10 * step + k)) for k in range(n_nodes)]

    def codec():
        return make_codec("qsgd", bits=4, error_feedback=True, rounding="nearest")

    flat, _ = run(n_nodes, None, lambda t: make_aggregator(topology, t, codec(), seed=3, **options), node_grads,
                  steps=3)
    hier, _ = run(2 * n_nodes, 2, lambda t: make_aggregator(topology, t, codec(), seed=3, nodes=Nodes(t), **options),
                  lambda step: [g for g in node_grads(step) for _ in range(2)], steps=3)
    for step in range(3):
        assert all(torch.equal(out[step], flat[0][1][step]) for _, out in hier)
    # Error feedback lives on the leaders: only they encode.
    residuals = [agg.codec.residuals for agg, _ in hier]
    assert all(residuals[r] for r in (0, 2, 4)) and not any(residuals[r] for r in (1, 3, 5))


@pytest.mark.parametrize("topology", ["scatter", "intsum"])
def test_quantized_replicas_are_bit_identical_and_near_the_mean(topology):
    n, numel = 6, 20_000

    def grads(step):
        return [torch.randn(numel, generator=torch.Generator().manual_seed(10 * step + r)) for r in range(n)]

    hier, _ = run(n, 2, lambda t: make_aggregator(topology, t, make_codec("qsgd", bits=4, error_feedback=True,
                                                                     rounding="nearest"), seed=1, nodes=Nodes(t)),
                  grads, steps=2)
    for step in range(2):
        outs = [out[step] for _, out in hier]
        assert all(torch.equal(o, outs[0]) for o in outs[1:])
        exact = torch.stack(grads(step)).mean(0)
        assert 0 < float((outs[0] - exact).norm() / exact.norm()) < 4  # 4-bit QSGD, buckets of 512: large


def test_unequal_nodes_give_the_mean_over_all_ranks():
    n, numel = 5, 3000  # nodes of 2, 2 and 1 ranks

    def grads(step):
        return [torch.randn(numel, generator=torch.Generator().manual_seed(r)) for r in range(n)]

    hier, transports = run(n, 2, lambda t: make_aggregator("scatter", t, FP32(), nodes=Nodes(t)), grads)
    assert transports[4].nodes == (0, 0, 1, 1, 2) and hier[0][0].nodes.members == [[0, 1], [2, 3], [4]]
    outs = [out[0] for _, out in hier]
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert torch.allclose(outs[0], torch.stack(grads(0)).mean(0), rtol=1e-5, atol=1e-6)
    assert transports[4].meter.totals()["by_class"]["intra"]["bytes"] == 0  # alone on its node


def test_split_sub_transport_shares_the_meter_under_world_ranks():
    group = LocalGroup(6, 3)

    def job(t):
        sub = t.split(t.rank % 3 if t.rank != 5 else None)
        if sub is None:
            return None
        sub.send(b"x" * (sub.rank + 1), (sub.rank + 1) % sub.size, "test", 0)
        sub.recv((sub.rank - 1) % sub.size, "test")
        return sub.rank, sub.size, sub.world_ranks, sub.nodes, sub.local_size

    transports = group.transports()
    out = group.run(job, transports)
    assert out[0] == (0, 2, [0, 3], (0, 1), 1) and out[3] == (1, 2, [0, 3], (0, 1), 1)
    assert out[2] == (0, 1, [2], (0,), 1) and out[5] is None
    assert set(transports[0].meter.by_link) == {"0->3"} and set(transports[3].meter.by_link) == {"3->0"}
    assert transports[0].local_rank == 0 and transports[4].local_rank == 1 and transports[4].local_size == 3


def test_a_failure_inside_a_sub_group_releases_every_rank():
    group = LocalGroup(4, 2)

    def job(t):
        nodes = Nodes(t)
        if t.rank == 3:
            raise RuntimeError("deliberate")
        if nodes.is_leader:
            nodes.leaders.recv(1 - nodes.leaders.rank, "never")  # rank 2 never sends: 3 failed first
        else:
            t.recv(0, "never")

    with pytest.raises(RuntimeError, match="deliberate"):
        group.run(job, group.transports())


def test_automatic_choice():
    def decide(n, rpn, mode="auto", dedicated=False):
        group = LocalGroup(n, rpn)
        return wants_hierarchical(group.transports()[0], mode, dedicated)

    assert decide(4, 2) and decide(6, 2) and decide(5, 2)
    assert not decide(4, None) and not decide(4, 1) and not decide(4, 4)  # one node; one rank per node
    assert not decide(4, 2, "off") and decide(4, None, "on") and not decide(4, 2, dedicated=True)
    with pytest.raises(ConfigError, match="hierarchical must be one of auto, on, off"):
        decide(4, 2, "yes")
    with pytest.raises(ConfigError, match="dedicated"):
        decide(4, 2, "on", dedicated=True)


def test_ranks_per_node_needs_simulate():
    with pytest.raises(ConfigError, match="--ranks-per-node groups simulated workers"):
        TrainConfig(ranks_per_node=2).validate()
    TrainConfig(simulate=4, ranks_per_node=2).validate()
    with pytest.raises(ConfigError, match="ranks_per_node"):
        LocalGroup(4, 0)
