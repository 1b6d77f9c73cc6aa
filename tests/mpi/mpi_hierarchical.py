"""Multi-rank tests of the hierarchical exchange; run under mpiexec (an even number of ranks) by
tests/test_mpi_launch.py. While this module's tests run, each rank names its node
``node<rank // 2>`` through MPIQSGD_HOST, which transports read when they are made, so one machine
holds 2, 3, ... nodes of 2 ranks; the other modules of the job see one node.

Every rank runs every test in the same order, on 4 and 6 ranks (tests/mpi/subworld.py); no test
skips on some ranks of its communicator only.
"""

import pytest
import torch
from mpi4py import MPI

from mpiqsgd.codecs import make_codec
from mpiqsgd.codecs.fp import FP32
from mpiqsgd.exchange import GradientExchange
from mpiqsgd.meter import Meter
from mpiqsgd.topology import Nodes, make_aggregator
from mpiqsgd.transport import LocalGroup, MPITransport
from subworld import comm_fixture

comm = comm_fixture([4, 6])  # 2 and 3 nodes of 2 ranks

RANKS_PER_NODE = 2


@pytest.fixture(scope="module", autouse=True)
def node_names():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MPIQSGD_HOST", f"node{MPI.COMM_WORLD.Get_rank() // RANKS_PER_NODE}")
        yield


@pytest.fixture(scope="module")
def t(comm):
    transport = MPITransport(comm)
    transport.meter = Meter(transport.rank, keep_messages=True)
    return transport


@pytest.fixture(scope="module")
def nodes(t):
    return Nodes(t)


def exact_grads(n, numel, step=0):
    """Small integers times 1/4: sums over ranks in any order, and their halving, are exact."""
    return [torch.randint(-64, 65, (numel,), generator=torch.Generator().manual_seed(100 * step + r)).float() / 4
            for r in range(n)]


def grads(n, numel, step=0):
    return [torch.randn(numel, generator=torch.Generator().manual_seed(1000 * step + r)) * (r + 1) for r in range(n)]


def same_on_all_ranks(t, tensor):
    blobs = t.allgather_bytes(tensor.numpy().tobytes())
    return all(b == blobs[0] for b in blobs)


def test_nodes_come_from_the_forced_host_names(t, nodes):
    assert t.size % RANKS_PER_NODE == 0, "launch an even number of ranks"
    assert t.nodes == tuple(r // RANKS_PER_NODE for r in range(t.size)) and t.n_nodes == t.size // 2
    assert t.local_size == 2 and t.local_rank == t.rank % 2
    assert nodes.is_leader == (t.rank % 2 == 0)
    if nodes.is_leader:
        assert nodes.leaders.size == t.n_nodes and nodes.leaders.rank == t.rank // 2
        assert nodes.leaders.world_ranks == list(range(0, t.size, 2)) and nodes.leaders.meter is t.meter
    else:
        assert nodes.leaders is None


@pytest.mark.parametrize("topology,options", [("allreduce", {}), ("ps", {}), ("ps", {"downlink": "codec"}),
                                              ("ring", {}), ("scatter", {}), ("allgather", {})])
@pytest.mark.parametrize("numel", [1, 5, 4099])
def test_fp32_hierarchical_equals_flat_bitwise(t, nodes, topology, options, numel):
    g = exact_grads(t.size, numel)
    flat = make_aggregator(topology, t, FP32(), **options).aggregate(g[t.rank].clone(), step=0)
    hier = make_aggregator(topology, t, FP32(), nodes=nodes, **options).aggregate(g[t.rank].clone(), step=0)
    assert torch.equal(flat, hier) and torch.equal(flat, torch.stack(g).sum(0) / t.size)
    assert same_on_all_ranks(t, hier)


QUANTIZED = [("scatter", {"error_feedback": True, "rounding": "nearest"}, {}), ("ring", {"bits": 3}, {}),
             ("intsum", {"error_feedback": True, "rounding": "nearest"}, {"piece_numel": 2048}), ("intsum", {}, {}),
             ("ps", {"bits": 8}, {"downlink": "codec"})]


@pytest.mark.parametrize("topology,params,options", QUANTIZED)
def test_quantized_equals_simulation_bitwise(t, nodes, topology, params, options):
    numel, steps = 5001, 3
    agg = make_aggregator(topology, t, make_codec("qsgd", **params), seed=5, nodes=nodes, **options)
    mpi = [agg.aggregate(grads(t.size, numel, s)[t.rank].clone(), step=s) for s in range(steps)]
    for out in mpi:
        assert same_on_all_ranks(t, out)
    group = LocalGroup(t.size, RANKS_PER_NODE)

    def simulated(lt):
        a = make_aggregator(topology, lt, make_codec("qsgd", **params), seed=5, nodes=Nodes(lt), **options)
        return [a.aggregate(grads(t.size, numel, s)[lt.rank].clone(), step=s) for s in range(steps)]

    sim = group.run(simulated, group.transports())
    assert all(torch.equal(a, b) for a, b in zip(mpi, sim[t.rank]))
    if params.get("error_feedback"):  # residuals on the leaders only
        assert bool(agg.codec.residuals) == nodes.is_leader


@pytest.mark.parametrize("topology,codec", [("scatter", "qsgd"), ("intsum", "qsgd"), ("allreduce", "fp32")])
def test_bytes_per_link_class(t, nodes, topology, codec):
    numel = 10_007
    agg = make_aggregator(topology, t, make_codec(codec), seed=1, nodes=nodes)
    t.meter.reset()
    agg.aggregate(grads(t.size, numel)[t.rank].clone(), step=0)
    mine = agg.sent_nbytes_by_class(numel, t.rank)
    totals = t.meter.totals()["by_class"]
    assert totals["intra"]["bytes"] == mine["intra"] and totals["inter"]["bytes"] == mine["inter"]
    job = t.meter.job_totals(t)
    assert job["sent_by_rank"] == {r: agg.sent_nbytes(numel, r) for r in range(t.size)}
    assert job["by_class"]["intra"]["bytes"] == 2 * (t.size - t.n_nodes) * FP32().encoded_nbytes(numel)
    assert job["by_class"]["inter"]["bytes"] == sum(agg.inner.sent_nbytes(numel, k) for k in range(t.n_nodes))
    leaders = set(range(0, t.size, 2))
    for m in t.meter.messages:  # world ranks, whichever communicator sent it
        if m.phase.startswith("node-"):
            assert m.source // 2 == m.dest // 2 and m.source != m.dest
        else:
            assert m.source in leaders and m.dest in leaders | {-1}


def test_inter_node_bytes_equal_one_rank_per_node(t, nodes):
    # The leaders' exchange is the flat topology on one rank per node: run that flat job on the
    # leaders' own communicator and compare the bytes it sends.
    numel = 20_000
    agg = make_aggregator("scatter", t, make_codec("qsgd", bits=4), seed=2, nodes=nodes)
    t.meter.reset()
    agg.aggregate(grads(t.size, numel)[t.rank].clone(), step=0)
    inter = t.meter.job_totals(t)["by_class"]["inter"]["bytes"]
    flat_bytes = 0
    if nodes.is_leader:
        solo = MPITransport(nodes.leaders.comm.Dup())
        make_aggregator("scatter", solo, make_codec("qsgd", bits=4), seed=2).aggregate(
            grads(t.size, numel)[t.rank].clone(), step=0)
        flat_bytes = solo.meter.job_totals(solo)["sent"]["bytes"]
    assert inter == max(int(b) for b in t.allgather_bytes(str(flat_bytes).encode()))


def test_gradient_exchange_chooses_hierarchical_automatically(t):
    model = torch.nn.Linear(40, 30)
    exchange = GradientExchange(model.parameters(), t, make_codec("qsgd", bits=4), "scatter", min_compress_numel=100)
    flat = GradientExchange(model.parameters(), t, make_codec("qsgd", bits=4), "scatter", min_compress_numel=100,
                            hierarchical="off")
    try:
        assert exchange.nodes is not None and exchange.nodes.n_nodes == t.size // 2 and flat.nodes is None
        assert "hierarchical exchange: " in exchange.nodes.describe("scatter")
        torch.manual_seed(t.rank)
        model(torch.randn(8, 40)).square().sum().backward()
        exchange.begin(0)
        exchange.finish(0)
        assert same_on_all_ranks(t, model.weight.grad) and same_on_all_ranks(t, model.bias.grad)
    finally:
        exchange.close()
        flat.close()
