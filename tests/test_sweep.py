"""mpiqsgd sweep: grid expansion, names and flags (nothing run), and one tiny grid run, resumed, repaired."""

import json
import os

import pytest

from conftest import ROOT
from mpiqsgd.errors import ConfigError
from mpiqsgd.sweep import _apply_sets, expand, load_grid, points, run_name, sweep, train_argv


def test_expand_and_points(tmp_path):
    assert expand({"a": [1, 2], "b": 3, "c": ["x", "y"]}) == [
        {"a": 1, "b": 3, "c": "x"}, {"a": 1, "b": 3, "c": "y"}, {"a": 2, "b": 3, "c": "x"}, {"a": 2, "b": 3, "c": "y"}]
    grid = load_grid(ROOT / "scripts" / "grids" / "seed.json")
    runs, dropped = points(grid)
    # 3 models x 4 rank counts x (fp32 + qsgd 3 bits x 2 roundings x 2 EF + 4 adaptive) x 3 seeds
    assert len(runs) == 3 * 4 * (1 + 12 + 4) * 3 and not dropped
    names = [n for n, _, _ in runs]
    assert names[0] == "model-alexnet_ranks-1_codec-fp32_topology-allreduce_seed-0"
    assert "model-resnet50_ranks-8_codec-qsgd_bits-2_rounding-nearest_errorfeedback_seed-2" in names
    smoke, _ = points(load_grid(ROOT / "scripts" / "grids" / "smoke.json"))
    assert len(smoke) == 3 * 17


def test_rejected_points_are_dropped_and_bad_keys_refused():
    grid = {"axes": {"ranks": [2]}, "variants": [{"codec": ["fp32", "qsgd"], "rounding": "nearest"}]}
    runs, dropped = points(grid)
    assert [f["codec"] for _, f, _ in runs] == ["qsgd"]
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
