"""mpiqsgd sweep: grid expansion, names and flags (nothing run), one tiny grid run, resumed, repaired, and
sweeps on the emulated cluster: their refusals without root or namespaces, and a real one where the machine allows."""

import json
import os
import subprocess

import pytest

from conftest import ROOT
from mpiqsgd import cluster
from mpiqsgd.cli import main
from mpiqsgd.errors import ConfigError
from mpiqsgd.sweep import (_apply_sets, _finished, expand, load_grid, points, run_name, scenario, sweep,
                           train_argv)
from test_cluster import needs_cluster


def test_expand_and_points(tmp_path):
    assert expand({"a": [1, 2], "b": 3, "c": ["x", "y"]}) == [
        {"a": 1, "b": 3, "c": "x"}, {"a": 1, "b": 3, "c": "y"}, {"a": 2, "b": 3, "c": "x"}, {"a": 2, "b": 3, "c": "y"}]
    grid = load_grid(ROOT / "scripts" / "grids" / "seed.json")
    runs, dropped = points(grid)
    # 3 models x 4 rank counts x (fp32 + qsgd 3 bits x 2 roundings x 2 EF + 4 adaptive) x 3 seeds
    assert len(runs) == 3 * 4 * (1 + 12 + 4) * 3 and not dropped
    names = [p.name for p in runs]
    assert names[0] == "model-alexnet_ranks-1_codec-fp32_topology-allreduce_seed-0"
    assert "model-resnet50_ranks-8_codec-qsgd_bits-2_rounding-nearest_errorfeedback_seed-2" in names
    smoke, _ = points(load_grid(ROOT / "scripts" / "grids" / "smoke.json"))
    assert len(smoke) == 3 * 17


def test_rejected_points_are_dropped_and_bad_keys_refused():
    grid = {"axes": {"ranks": [2]}, "variants": [{"codec": ["fp32", "qsgd"], "rounding": "nearest"}]}
    runs, dropped = points(grid)
    assert [p.flags["codec"] for p in runs] == ["qsgd"]
    assert "--rounding applies only to" in dropped[0][1]
    with pytest.raises(ConfigError, match="not a train flag"):
        points({"common": {"epoch": 3}})
    with pytest.raises(ConfigError, match="sweep sets itself"):
        points({"common": {"run_dir": "x"}})


def test_names_flags_and_overrides():
    assert run_name({"codec": "qsgd", "bits": 4, "error_feedback": True, "seed": 1}, ["codec", "bits",
                                                                                    "error_feedback"]) == \
        "codec-qsgd_bits-4_errorfeedback_seed-1"
    assert train_argv({"epochs": 2, "codec": "qsgd", "bits": None, "error_feedback": True, "nesterov": False,
                       "lr": 0.05}) == ["--epochs", "2", "--error-feedback", "--lr", "0.05"]
    grid = _apply_sets({"common": {"epochs": 20}, "axes": {"model": ["alexnet", "resnet50"], "ranks": [1, 2]}},
                       ["epochs=1", "model=tiny", "ranks=[2]", "seeds=[0,1]"])
    assert grid == {"common": {"epochs": 1, "model": "tiny"}, "axes": {"ranks": [2]}, "seeds": [0, 1]}


@pytest.mark.slow
def test_tiny_grid_runs_resumes_and_reruns_broken_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    grid = {"out": str(tmp_path / "grid"), "mode": "simulate", "target_acc": 0.05,
            "common": {"model": "tiny", "dataset": "synthetic", "synthetic_size": 300, "epochs": 1,
                       "batch_size": 32, "threads": 1},
            "axes": {"ranks": [2]},
            "variants": [{"codec": "fp32", "topology": "allreduce"}, {"codec": "qsgd", "bits": 4},
                         {"codec": "qsgd", "bits": 2, "batch_size": 400}]}  # 270 images: too few for 2 x 400
    lines = []
    done, failed, _ = sweep(grid, log=lines.append)
    assert len(done) == 2 and [n for n, _ in failed] == ["codec-qsgd_bits-2_batchsize-400_seed-0"]
    assert "FAILED" in failed[0][1] and "too few" in failed[0][1]
    assert any("FAILED" in line and "too few" in line for line in lines)  # and the sweep went on
    out = tmp_path / "grid"
    rows = (out / "report" / "report.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("group,model,ranks,codec")
    md = (out / "report" / "report.md").read_text()
    assert "qsgd" in md and "Skipped:" in md and "too few" in md
    grid["variants"].pop()
    lines.clear()
    assert sweep(grid, log=lines.append)[0] == done
    assert sum("finished before, skipped" in line for line in lines) == 2
    broken = out / done[1]
    (broken / "summary.json").unlink()
    lines.clear()
    assert sweep(grid, log=lines.append)[1] == []
    assert any("finished before" in line for line in lines if done[0] in line)
    assert any("running it again" in line for line in lines if done[1] in line)
    assert (broken / "summary.json").exists()
    flags = json.loads((broken / "config.json").read_text())["flags"]
    assert flags["codec"] == "qsgd" and flags["bits"] == 4 and flags["simulate"] == 2 and flags["target_acc"] == 0.05


# -- on the emulated cluster ---------------------------------------------------------------------

def _grid_file(tmp_path, **keys):
    grid = {"out": str(tmp_path / "grid"), "mode": "mpi", "target_acc": 0.05,
            "common": {"model": "tiny", "dataset": "synthetic", "synthetic_size": 300, "epochs": 1,
                       "batch_size": 32, "threads": 1, "diag_every": 0, "nvar_every": 0},
            "axes": {"ranks": [1, 2]}, "variants": [{"codec": "qsgd", "bits": 4}], **keys}
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid))
    return path


def test_cluster_key_and_flag(tmp_path, capsys):
    path = _grid_file(tmp_path, cluster="10mbit")
    assert load_grid(path)["cluster"] == "10mbit"
    assert main(["sweep", str(path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # one rank: no link, launched as before; two: on a 2-node cluster at the grid's rate
    assert "ranks-1_codec-qsgd_bits-4_seed-0: mpiexec -n 1 " in lines[0] and "nodes" not in lines[0]
    assert "ranks-2_codec-qsgd_bits-4_seed-0: on 2 nodes x 1 at 10mbit: mpiexec -n 2 " in lines[1]
    assert main(["sweep", str(path), "--dry-run", "--cluster", "1gbit"]) == 0
    assert "on 2 nodes x 1 at 1gbit" in capsys.readouterr().out
    assert scenario({"cluster": "10mbit", "cluster_burst": "8kb"}, 2)["tbf_burst_bytes"] == 8192
    assert scenario(load_grid(path), 2)["tbf_burst_bytes"] == 65536  # tbf's floor at 10mbit
    assert main(["sweep", str(path), "--dry-run", "--cluster-burst=-1kb"]) == 2
    assert "size '-1kb': want a positive number of bytes" in capsys.readouterr().err
    assert main(["sweep", str(path), "--dry-run", "--cluster", "off"]) == 0
    assert "nodes" not in capsys.readouterr().out
    assert main(["sweep", str(_grid_file(tmp_path)), "--dry-run", "--set", "cluster=100mbit"]) == 0
    assert "on 2 nodes x 1 at 100mbit" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="drop \"mode\": \"simulate\""):
        load_grid(_grid_file(tmp_path, cluster="1gbit", mode="simulate"))


@pytest.mark.parametrize("rate,message", [("1mbps", "write the rate in bits"), ("fast", "want a number of bits")])
def test_bad_rates_are_refused_before_anything_runs(tmp_path, capsys, rate, message):
    path = _grid_file(tmp_path)
    for argv in (["--cluster", rate], ["--cluster", rate, "--dry-run"]):
        assert main(["sweep", str(path), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "grid").exists()


def test_cluster_sweeps_are_refused_without_root_or_namespaces(tmp_path, capsys, monkeypatch):
    path = _grid_file(tmp_path, cluster="1gbit")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mpiqsgd: error: cannot sweep on an emulated cluster: the emulated cluster needs root")
    assert err.count("\n") == 1
    monkeypatch.setattr(cluster, "preflight", lambda: ("ip", "tc"))

    def no_netns(ip):
        raise cluster.ClusterError("`ip netns list` failed: Operation not permitted (this system needs network "
                                   "namespaces)")

    monkeypatch.setattr(cluster, "netns_list", no_netns)
    assert main(["sweep", str(path)]) == 2
    assert "cannot sweep on an emulated cluster: `ip netns list` failed" in capsys.readouterr().err
    assert main(["sweep", str(path), "--cluster", "off", "--dry-run"]) == 0  # no cluster: nothing to refuse
    assert not (tmp_path / "grid").exists()


def test_ranks_per_node_places_ranks_on_a_cluster_and_the_scenario_names_it():
    grid = {"cluster": "1gbit", "axes": {"ranks": [1, 2, 4]}, "common": {"ranks_per_node": 2},
            "variants": [{"codec": "fp32", "topology": "allreduce"}]}
    runs, dropped = points(grid)
    assert [(p.ranks, p.ranks_per_node) for p in runs] == [(2, 2), (4, 2)]
    assert "ranks_per_node" not in runs[0].flags and runs[0].name == "ranks-2_codec-fp32_topology-allreduce_seed-0"
    assert dropped[0][0]["ranks"] == 1 and dropped[0][1] == "1 ranks do not fill nodes of 2"
    four = scenario(grid, 4, 2)
    assert four["network"] == "switch" and (four["nodes"], four["ranks_per_node"], four["ranks"]) == (2, 2, 4)
    assert four["link_rate"] == "1gbit" and four["link_bits_per_second"] == 10**9
    assert four["tbf_burst_bytes"] == 250_000 and four["tbf_latency_seconds"] == 0.05
    one = scenario(grid, 2, 2)
    assert one["nodes"] == 1 and one["link_rate"] is None and "no emulated link" in one["note"]
    assert one["cluster_rate"] == "1gbit"
    assert scenario({"mode": "mpi"}, 2) == {"network": "one machine", "ranks": 2}
    assert scenario({}, 2) == {"network": "simulated", "ranks": 2}
    # off the cluster ranks_per_node stays a train flag: --simulate's, refused by mpiexec runs
    simulated = {"axes": {"ranks": [4]}, "common": {"ranks_per_node": 2}}
    assert points(simulated)[0][0].flags["ranks_per_node"] == 2
    assert "--simulate" in points({**simulated, "mode": "mpi"})[1][0][1]


def test_a_finished_run_counts_only_in_its_own_scenario(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    switch = scenario({"cluster": "1gbit"}, 2)
    (run / "config.json").write_text(json.dumps({"flags": {"seed": 0}}))  # before scenarios were recorded
    assert _finished(run, {"seed": 0}, scenario({"mode": "mpi"}, 2))
    assert not _finished(run, {"seed": 0}, switch)
    (run / "config.json").write_text(json.dumps({"flags": {"seed": 0}, "scenario": switch}))
    assert _finished(run, {"seed": 0}, switch)
    assert not _finished(run, {"seed": 0}, scenario({"cluster": "100mbit"}, 2))
    assert not _finished(run, {"seed": 0}, scenario({"mode": "mpi"}, 2))


@pytest.mark.slow
@needs_cluster
def test_two_point_sweep_on_a_two_node_cluster(tmp_path, monkeypatch):
    # One point runs, one fails (400 images per step: too few); each had its own cluster, gone afterwards.
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    grid = load_grid(_grid_file(tmp_path, cluster="1gbit"))
    grid["axes"] = {"ranks": [2]}
    grid["variants"] = [{"codec": "qsgd", "bits": 4}, {"codec": "qsgd", "bits": 4, "batch_size": 400}]
    lines = []
    done, failed, _ = sweep(grid, timeout=150, log=lines.append)
    assert done == ["codec-qsgd_bits-4_seed-0"], "\n".join(lines)[-3000:]
    assert [n for n, _ in failed] == ["codec-qsgd_bits-4_batchsize-400_seed-0"]
    assert "too few" in (tmp_path / "grid" / f"{failed[0][0]}.log").read_text()
    config = json.loads((tmp_path / "grid" / done[0] / "config.json").read_text())
    assert config["world_size"] == 2 and config["scenario"] == {**scenario(grid, 2), "nodes": 2, "ranks": 2}
    assert config["scenario"]["network"] == "switch" and config["scenario"]["link_rate"] == "1gbit"
    name = f"mpiqsgd-sweep-{os.getpid()}"
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not (cluster.STATE_ROOT / name).exists()
    lines.clear()
    grid["variants"].pop()
    assert sweep(grid, timeout=150, log=lines.append)[0] == done
    assert any("finished before, skipped" in line for line in lines)
