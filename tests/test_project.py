"""The projection model (mpiqsgd.project): closed forms, exact bytes, monotonicity, the CLI and the
validation script, on built-in rates (deterministic, nothing timed)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mpiqsgd.cli import main
from mpiqsgd.codecs import make_codec, summable
from mpiqsgd.linkmodel import Link
from mpiqsgd.project import (TOPOLOGY_NAMES, Scenario, _shared, builtin_rates, exchange, parse_nodes, project,
                             rates_from_bench)
from mpiqsgd.topology import chunk_bounds, make_aggregator
from mpiqsgd.topology.hierarchical import LeaderShape

ROOT = Path(__file__).resolve().parents[1]
QSGD4 = make_codec("qsgd", bits=4)


def scenario(link=Link("1gbit", 0.0, 125e6), codec=QSGD4, numel=1_000_000, **kw):
    return Scenario(numel, codec, link, builtin_rates(codec), payload_fraction=1.0, **kw)


def test_fp32_allreduce_at_two_nodes_is_the_closed_form():
    alpha, beta, numel = 1e-4, 125e6, 1_000_000
    sc = scenario(Link("l", alpha, beta), numel=numel)
    x = exchange("allreduce", 2, sc)
    r = sc.rates
    # reduce-scatter + allgather: 2 messages of 2 MB (> eager: 3 alpha each), half the buffer summed,
    # then the result filled and divided by 2
    expected = 2 * 3 * alpha + 4 * numel / beta + (numel / 2) / r.add + numel / r.fill + numel / r.add
    assert x["exchange_seconds"] == pytest.approx(expected)
    assert x["bytes_per_rank"] == 4 * numel and x["messages_per_rank"] == 2


@pytest.mark.parametrize("topology", ["scatter", "ring", "allgather", "intsum", "ps", "allreduce"])
@pytest.mark.parametrize("p", [2, 3, 8, 64])
def test_bytes_per_rank_equal_the_topologys_own_formula(topology, p):
    numel = 1_234_567
    x = exchange(topology, p, scenario(numel=numel))
    agg = make_aggregator(topology, LeaderShape(p), None if topology == "allreduce" else QSGD4)
    assert x["bytes_per_rank"] == agg._sent_nbytes(numel, 0)


@pytest.mark.parametrize("topology", ["scatter", "intsum"])
@pytest.mark.parametrize("piece_numel", [0, 1 << 19])
def test_pieces_bytes_and_messages_equal_the_topologys(topology, piece_numel):
    numel, p = 5_000_000, 4
    x = exchange(topology, p, scenario(numel=numel, piece_numel=piece_numel))
    agg = make_aggregator(topology, LeaderShape(p), QSGD4, piece_numel=piece_numel)
    assert x["bytes_per_rank"] == agg._sent_nbytes(numel, 0)
    if topology == "scatter":  # rank 0: its pieces of the 3 other chunks, then its own chunk's pieces 3 times
        chunks = [b - a for a, b in chunk_bounds(numel, p)]
        assert x["messages_per_rank"] == sum(len(agg.pieces(c)) for c in chunks[1:]) + 3 * len(agg.pieces(chunks[0]))


def test_scatter_of_one_message_a_chunk_at_two_nodes_is_the_closed_form():
    alpha, beta, numel = 1e-4, 125e6, 2_000_000
    sc = scenario(Link("l", alpha, beta), numel=numel, piece_numel=0)
    r, c = sc.rates, numel // 2
    link = 3 * alpha + QSGD4.encoded_nbytes(c) / beta  # one message of the chunk (> eager)
    up = c / r.encode + link  # the other chunk encoded and sent
    cpu = max(c / r.encode, up) + c / r.decode  # its contribution arrives as its own left; decoded
    cpu += c / r.encode + c / r.decode  # own chunk, encoded and decoded at the first contribution
    cpu += c / r.copy + 2 * c / r.add + c / r.encode + c / r.decode + c / r.copy  # sum, divide, the mean
    mean_left = max(up, cpu) + link
    expected = mean_left + c / r.decode + c / r.copy + c / r.fill  # the peer's mean, as it arrives
    assert exchange("scatter", 2, sc)["exchange_seconds"] == pytest.approx(expected)


def test_scatter_pieces_overlap_link_and_cpu():
    """Pieces let the link carry piece k while piece k+1 is encoded: faster than one message a chunk when
    CPU and link are of the same order, and never more bytes than a few frames."""
    sc = dict(link=Link("1gbit", 2e-4, 125e6), numel=25_000_000)
    whole, pieces = (exchange("scatter", p, scenario(**sc, piece_numel=k)) for p, k in ((4, 0), (4, 1 << 20)))
    assert pieces["exchange_seconds"] < 0.85 * whole["exchange_seconds"]
    assert pieces["bytes_per_rank"] - whole["bytes_per_rank"] < 100 * pieces["messages_per_rank"]
    assert pieces["cpu_seconds"] == pytest.approx(whole["cpu_seconds"], rel=0.01)  # the same work, reordered


def test_messages_are_the_codecs_encoded_nbytes():
    numel, p = 1_000_003, 4
    sc = scenario(Link("l", 0.0, 1.0), numel=numel, hub=False)  # 1 byte/s: link seconds = bytes
    x = exchange("allgather", p, sc)
    assert x["link_seconds"] == pytest.approx((p - 1) * QSGD4.encoded_nbytes(numel))


def test_intsum_field_width_and_bytes_grow_with_nodes():
    previous = 0
    for p in (2, 4, 8, 16, 64, 1024):
        width = summable.SummableLayout(7, p).width
        assert width == math.ceil(math.log2(2 * 7 * p + 1))
        nbytes = exchange("intsum", p, scenario(numel=4_000_000))["bytes_per_rank"]
        assert nbytes > previous
        previous = nbytes
    assert exchange("intsum", 2, scenario(codec=make_codec("sign"))) is None  # dense qsgd only


@pytest.mark.parametrize("topology", TOPOLOGY_NAMES)
def test_hub_never_faster_and_bandwidth_never_slower(topology):
    for p in (2, 4, 16, 128):
        switch = exchange(topology, p, scenario(Link("l", 5e-5, 125e6)))["exchange_seconds"]
        hub = exchange(topology, p, scenario(Link("l", 5e-5, 125e6), hub=True))["exchange_seconds"]
        faster = exchange(topology, p, scenario(Link("l", 5e-5, 1250e6)))["exchange_seconds"]
        assert hub >= switch >= faster > 0


def test_cpu_share_slows_cpu_only_and_overlap_bounds_the_step():
    sc, shared = scenario(), scenario(cores=2)
    assert shared.slowdown(8) == 4 and shared.slowdown(2) == 1 and scenario(ranks_per_node=4,
                                                                            cores_per_node=2).slowdown(8) == 2
    a, b = exchange("scatter", 8, sc), exchange("scatter", 8, shared)
    assert b["cpu_seconds"] == pytest.approx(4 * a["cpu_seconds"]) and b["link_seconds"] == a["link_seconds"]
    rows = project(scenario(compute_seconds=0.12), [2, 8], ["scatter"])
    over = project(scenario(compute_seconds=0.12, overlap=True), [2, 8], ["scatter"])
    for r, o in zip(rows, over):
        assert r["step_seconds"] == pytest.approx(0.12 + r["exchange_seconds"])
        assert o["step_seconds"] == pytest.approx(max(0.12, o["exchange_seconds"]))
    assert rows[0]["topology"] == "allreduce" and rows[0]["speedup_step"] == 1.0


def test_shared_link_is_work_conserving():
    done = _shared([0, 1, 2], [3, 3, 3])
    assert done == {0: 6.5, 1: 8.5, 2: 9.0}


def test_node_ranges():
    assert parse_nodes("2-1024") == [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    assert parse_nodes("3-10") == [3, 4, 8, 10] and parse_nodes("2,6,3") == [2, 3, 6]


def test_cli_json_parses(capsys):
    assert main(["project", "--numel", "1000000", "--nodes", "2-8", "--compute-ms", "120", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {(r["nodes"], r["topology"]) for r in out["rows"]} == {(p, t) for p in (2, 4, 8) for t in TOPOLOGY_NAMES}
    assert out["projection"]["rate_sources"]["encode"].startswith("built-in")
    assert main(["project", "--numel", "1000000", "--nodes", "2,4", "--topology", "scatter,intsum",
                 "--link", "10gbit@20us", "--hub", "--cores", "2"]) == 0
    text = capsys.readouterr().out
    assert "hub" in text and "scatter" in text and "ring" not in text


@pytest.mark.parametrize("argv, words", [
    (["--nodes", "1-0"], "--nodes"), (["--nodes", "1"], "between 2"), (["--topology", "mesh"], "unknown mesh"),
    (["--link", "fast"], "not a rate"), (["--codec", "nuqsgd-zero", "--codec-rate", "builtin"], "no built-in"),
    (["--codec-rate", "/nonexistent.json"], "not a `mpiqsgd bench codec"),
])
def test_bad_input_refused_in_one_line(capsys, argv, words):
    assert main(["project", "--numel", "1000", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("mpiqsgd: error:") and words in err


def test_rates_from_bench_codec_json(tmp_path):
    path = tmp_path / "codec.json"
    path.write_text(json.dumps({"benchmark": "codec", "codec": repr(QSGD4), "numel": 1000, "encode_seconds": 1e-6,
                                "decode_new_seconds": 2e-6, "machine": {"cpu_model": "x"},
                                "scaling": [{"threads": 1, "encode_seconds": 2e-6, "decode_new_seconds": 4e-6}]}))
    r = rates_from_bench(path, QSGD4)
    assert (r.encode, r.decode) == pytest.approx((5e8, 2.5e8))  # the 1-thread row
    with pytest.raises(Exception, match="no result"):
        rates_from_bench(path, make_codec("sign"))


def test_validation_script_on_a_bench_exchange_json(tmp_path):
    job = {"benchmark": "exchange", "n_ranks": 2, "n_nodes": 2, "ranks_per_node": [1, 1], "numel": 25_000_000,
           "machine": {"cpu_count": 2},
           "baseline": {"topology": "allreduce", "codec": "FP32()", "median_seconds": 0.88,
                        "seconds_per_repeat": [0.88, 0.9]},
           "candidate": {"topology": "scatter", "codec": repr(QSGD4), "median_seconds": 0.29,
                         "seconds_per_repeat": [0.28, 0.3]}}
    (tmp_path / "cluster-2x1-scatter.json").write_text(json.dumps(job))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "validate_projection.py"), str(tmp_path), "--json"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    rows = json.loads(out)
    assert {r["topology"] for r in rows} == {"scatter", "allreduce"}
    for r in rows:
        assert r["error"] == pytest.approx(r["projected_seconds"] / r["measured_seconds"] - 1)
        assert abs(r["error"]) < 0.5  # the model is near these measured figures (docs/projection.md)
