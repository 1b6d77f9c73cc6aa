"""The alpha-beta link model: the fit, rates, and the projection of a hand-made comm.json."""

import csv
import json

import numpy as np
import pytest

from mpiqsgd.cli import main
from mpiqsgd.errors import ConfigError
from mpiqsgd.linkmodel import Link, fit, parse_link, parse_rate, project, sweep_sizes
from mpiqsgd.meter import Meter, merge
from mpiqsgd.report.text import quantity
from test_report import write_run


def test_fit_recovers_alpha_and_beta_from_noisy_sweep():
    sizes = sweep_sizes()
    assert sizes[0] == 1000 and sizes[-1] == 100_000_000 and len(sizes) == 11
    alpha, beta = 50e-6, 117e6
    noise = 1 + 0.03 * np.random.default_rng(0).standard_normal(len(sizes))
    f = fit(sizes, [(alpha + b / beta) * e for b, e in zip(sizes, noise)])
    assert f["alpha_seconds"] == pytest.approx(alpha, rel=0.1)
    assert f["beta_bytes_per_second"] == pytest.approx(beta, rel=0.05)
    assert f["max_relative_error"] < 0.1
    exact = fit(sizes, [alpha + b / beta for b in sizes])
    assert exact["alpha_seconds"] == pytest.approx(alpha) and exact["max_relative_error"] < 1e-9
    # latency below resolution: alpha clamps to 0, beta still fits
    assert fit([1000, 10_000], [1e-5, 1e-4 * 1.2])["alpha_seconds"] == 0.0


def test_rates_and_links():
    assert parse_rate("100mbit") == 12.5e6 and parse_rate("1gbit") == 125e6 and parse_rate("117MB/s") == 117e6
    for bad in ("100", "fast", "10 mbps"):
        with pytest.raises(ConfigError, match="rate"):
            parse_rate(bad)
    model = {"alpha_seconds": 1e-4, "beta_bytes_per_second": 1e9}
    link = parse_link("1gbit", model)
    assert (link.alpha, link.beta) == (1e-4, 125e6)  # the rate replaces beta, alpha stays
    assert parse_link("1gbit@20us").alpha == pytest.approx(20e-6) and parse_link("1gbit").alpha == 0
    assert parse_link("model", model).beta == 1e9
    with pytest.raises(ConfigError, match="link-model"):
        parse_link("model")


def ps_comm():
    """3 ranks, 10 steps: workers push 1000 B to rank 0 per step, rank 0 pulls 4000 B to each; one allreduce."""
    meters = [Meter(r) for r in range(3)]
    for _ in range(10):
        for w in (1, 2):
            meters[w].record("push", w, 0, 10, 990, 4000)
            meters[0].record("pull", 0, w, 0, 4000, 4000)
    for m in meters:
        m.record("allreduce", m.rank, -1, 0, 800, 800)
    return json.loads(json.dumps(merge([m.totals() for m in meters])))


def test_projection_serializes_each_rank_and_takes_the_slowest():
    comm = ps_comm()
    link = Link("l", 1e-3, 1e6)  # 1 ms per message, 1 MB/s
    p = project(comm, 10, [link])
    # rank 0: 20 pulls + an allreduce as 2 (3 - 1) = 4 messages; 80,000 + 800 bytes
    assert p["rank"] == 0 and p["messages_per_step"] == pytest.approx(2.4)
    assert p["seconds_per_step"]["l"] == pytest.approx((24 * 1e-3 + 80_800 / 1e6) / 10)
    shared = project(comm, 10, [link], shared=True)
    msgs, nbytes = 24 + 2 * (10 + 4), 80_800 + 2 * (10_000 + 800)
    assert shared["rank"] is None and shared["bytes_per_step"] == nbytes / 10
    assert shared["seconds_per_step"]["l"] == pytest.approx((msgs * 1e-3 + nbytes / 1e6) / 10)


def test_report_prints_the_projection(tmp_path, capsys):
    d = write_run(tmp_path / "runs", "ps", [0.5], [10], ranks=3, topology="ps")
    summary = json.loads((d / "summary.json").read_text())
    (d / "comm.json").write_text(json.dumps(ps_comm()))
    model = tmp_path / "link.json"
    model.write_text(json.dumps({"fit": {"pingpong": {"alpha_seconds": 1e-3, "beta_bytes_per_second": 1e9}}}))
    out = tmp_path / "rep"
    assert main(["report", str(tmp_path / "runs"), "--link", "8mbit,model", "--link-model", str(model),
                 "--out", str(out), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "PROJECTION, not a measurement" in text and "on 8mbit" in text
    steps = summary["steps"]
    rows = list(csv.DictReader((out / "projection.csv").open()))
    assert len(rows) == 1
    expect = (24 * 1e-3 + 80_800 / 1e6) / steps
    assert float(rows[0]["projected_seconds_per_step_8mbit"]) == pytest.approx(expect)
    assert quantity(expect, kind="seconds") in text
    md = (out / "report.md").read_text()
    assert "PROJECTION" in md and "projected s/step 8mbit" in md
    assert main(["report", str(tmp_path / "runs"), "--link", "8mbit", "--wide"]) == 0
    assert "projected s/step 8mbit" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "runs"), "--link", "fast"]) == 2


def hierarchical_comm():
    """2 nodes x 2 ranks, 10 steps: followers send 4000 B to their leader (node-reduce) and get 4000 B back
    (node-bcast); the two leaders (ranks 0, 2) exchange 500 B compressed messages between nodes."""
    meters = [Meter(r) for r in range(4)]
    for _ in range(10):
        for leader, follower in ((0, 1), (2, 3)):
            meters[follower].record("node-reduce", follower, leader, 0, 4000, 4000)
            meters[leader].record("node-bcast", leader, follower, 0, 4000, 4000)
            meters[leader].record("reduce-scatter", leader, 2 - leader, 20, 480, 4000)
    return json.loads(json.dumps(merge([m.totals() for m in meters])))


def test_projection_prices_bytes_inside_a_node_on_their_own_link():
    comm = hierarchical_comm()
    net, shm = Link("net", 1e-4, 1e6), Link("shm", 0.0, 1e9)
    flat = project(comm, 10, [net])  # every byte on the network link
    assert flat["bytes_per_step"] == 4500 and flat["seconds_per_step"]["net"] == pytest.approx(2e-4 + 4500 / 1e6)
    split = project(comm, 10, [net], intra=shm)
    # a leader's network link carries its 500 B; its 4000 B to the follower move in memory
    assert split["rank"] in (0, 2) and split["bytes_per_step"] == 500 and split["intra_bytes_per_step"] == 4000
    assert split["seconds_per_step"]["net"] == pytest.approx(1e-4 + 500 / 1e6 + 4000 / 1e9)
    # the same link for both classes is the projection without classes
    same = project(comm, 10, [net], intra=net)
    assert same["seconds_per_step"]["net"] == pytest.approx(flat["seconds_per_step"]["net"])
    # one shared network link: both leaders' 500 B on it, the worst node's memory beside it
    hub = project(comm, 10, [net], shared=True, intra=shm)
    assert hub["bytes_per_step"] == 1000
    assert hub["seconds_per_step"]["net"] == pytest.approx(2e-4 + 1000 / 1e6 + 4000 / 1e9)


def test_report_prices_a_hierarchical_run_on_the_node_and_the_network(tmp_path, capsys):
    d = write_run(tmp_path / "runs", "hier", [0.5], [10], ranks=4, topology="scatter")
    (d / "comm.json").write_text(json.dumps(hierarchical_comm()))
    assert main(["report", str(tmp_path / "runs"), "--link", "8mbit", "--intra-link", "8mbit", "--wide"]) == 0
    same = capsys.readouterr().out
    assert main(["report", str(tmp_path / "runs"), "--link", "8mbit", "--wide"]) == 0
    shm = capsys.readouterr().out
    assert "priced on 8mbit" in same.replace("\n", " ") and "priced on shm" in shm.replace("\n", " ")
    # on 8 Mbit/s (1 MB/s): 4500 B per step when memory is as slow as the network; else 500 B + 4000 B at 6.8 GB/s
    assert "4.50 ms" in same and "501 µs" in shm
