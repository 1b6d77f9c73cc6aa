"""mpiqsgd report: numbers computed from hand-made run directories, grouping, n/a cells, files, plots."""

import csv
import json
import statistics
import sys

import pytest

from mpiqsgd import report as R
from mpiqsgd.cli import main
from mpiqsgd.train import driver
from mpiqsgd.train.config import TrainConfig

STEPS_PER_EPOCH = 10


def write_run(root, name, val, wall, *, test=0.5, ranks=2, bytes_per_step=1000.0, ratio=8.0, phases=None,
              simulated=False, diag=None, **flags):
    """A finished run directory as ``mpiqsgd train`` writes it, with chosen numbers."""
    d = root / name
    d.mkdir(parents=True)
    f = TrainConfig(**{"epochs": len(val), "dataset": "synthetic", "codec": "qsgd", "bits": 4, "topology": "ring",
                       **flags}).to_dict()
    steps = len(val) * STEPS_PER_EPOCH
    total = bytes_per_step * steps * ranks
    bytes_sent = [total * (e + 1) / len(val) for e in range(len(val))]
    metrics = [{"epoch": float(e + 1), "step": (e + 1) * STEPS_PER_EPOCH, "train_loss": 1.0, "val_acc": v,
                "test_acc": test, "wall_seconds": w, "bytes_sent": b}
               for e, (v, w, b) in enumerate(zip(val, wall, bytes_sent))]
    phases = phases or {"compute": 2.0 * len(val), "encode": 1.0, "communicate": 0.5, "decode": 0.25}
    summary = {"final_val_acc": val[-1], "best_val_acc": max(val), "test_acc": test, "epochs": float(len(val)),
               "steps": steps, "wall_seconds": wall[-1], "target_acc": f["target_acc"], "steps_to_target": None,
               "seconds_to_target": None, "bytes_per_step_per_rank": bytes_per_step, "total_bytes": total,
               "compression_vs_fp32": ratio, "seconds_per_phase": phases, "n_ranks": ranks, "n_workers": ranks}
    comm = {"n_ranks": ranks, "sent": {"messages": 1, "bytes": total, "fp32_bytes": total * ratio}}
    (d / "config.json").write_text(json.dumps({"flags": f, "world_size": ranks, "simulated": simulated}))
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "comm.json").write_text(json.dumps(comm))
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if diag is not None:
        (d / "diagnostics.jsonl").write_text("".join(json.dumps({"step": s, "quant_variance": v}) + "\n"
                                                    for s, v in diag))
    return d


@pytest.fixture
def grid(tmp_path):
    """fp32 allreduce and two seeds of 4-bit QSGD over a ring; target 0.5."""
    write_run(tmp_path, "fp32", [0.30, 0.50, 0.60], [10, 20, 30], test=0.62, codec="fp32", bits=None,
              topology="allreduce", bytes_per_step=4000.0, ratio=1.0)
    write_run(tmp_path, "q4-s0", [0.35, 0.55, 0.58], [4, 8, 12], test=0.57, seed=0,
              diag=[(0, 1.5), (10, 1.2), (20, 1.1)])
    write_run(tmp_path, "q4-s1", [0.52, 0.56, 0.59], [5, 10, 15], test=0.59, seed=1)
    return tmp_path


def rows_by_codec(rep, group=0):
    return {(r.config["codec"], r.config["rounding"]): r for r in rep.groups[group].rows}


def test_seeds_are_averaged_and_speedup_is_against_fp32(grid):
    runs, skipped = R.find_runs([grid])
    assert not skipped and len(runs) == 3
    rep = R.build_report(runs, target=0.5)
    assert len(rep.groups) == 1
    rows = rows_by_codec(rep)
    q = rows[("qsgd", "stochastic")]
    assert q.config == {"model": "resnet20", "ranks": "2", "codec": "qsgd", "bits": 4, "bucket": 512,
                        "rounding": "stochastic", "EF": "no", "topology": "ring"}
    assert len(q.runs) == 2
    s = q.stats
    assert s["test_acc"].mean == pytest.approx(0.58)
    assert s["test_acc"].std == pytest.approx(statistics.stdev([.57, .59]))
    assert s["final_val_acc"].mean == pytest.approx(0.585)
    assert s["best_val_acc"].mean == pytest.approx(0.585)
    assert s["epochs_to_target"].mean == pytest.approx(1.5)  # epoch 2 and epoch 1
    assert s["seconds_to_target"].mean == pytest.approx(6.5)
    assert s["seconds_to_target"].std == pytest.approx(2 ** .5 * 1.5)
    assert s["speedup"].mean == pytest.approx(20 / 6.5)  # fp32 reaches 0.5 at 20 s
    assert s["compression_vs_fp32"].mean == pytest.approx(8.0)
    assert s["bytes_per_step_per_rank"].mean == 1000 and s["total_bytes"].mean == 1000 * 30 * 2
    assert q.phases["compute"].mean == pytest.approx(6.0 / 30) and q.phases["decode"].mean == pytest.approx(0.25 / 30)
    assert s["wall_seconds_per_step"].mean == pytest.approx((12 / 30 + 15 / 30) / 2)
    f = rows[("fp32", "-")]
    assert f.config["bits"] == 32 and f.config["bucket"] == "-" and f.stats["speedup"].mean == pytest.approx(1.0)
    text = "\n\n".join(rep.sections("text"))
    for cell in ("0.580 ± 0.014", "1.50 ± 0.71", "6.5 ± 2.1", "3.08x", "60,000", "8.00x", "1.5 / 1.2 / 1.1"):
        assert cell in text
    assert "n/a" not in text.split("Runs")[0]  # every configuration cell is filled


def test_target_defaults_to_the_runs_own_and_none_says_so(grid, tmp_path):
    rep = R.build_report(R.find_runs([grid])[0])
    assert rep.groups[0].target is None
    text = "\n".join(rep.sections("markdown"))
    assert "n/a [1]" in text and "[1] no --target-acc given" in text
    for d in grid.iterdir():
        s = json.loads((d / "summary.json").read_text())
        (d / "summary.json").write_text(json.dumps({**s, "target_acc": 0.55}))
    rep = R.build_report(R.find_runs([grid])[0])
    assert rep.groups[0].target == 0.55
    assert rows_by_codec(rep)[("qsgd", "stochastic")].stats["seconds_to_target"].mean == pytest.approx((8 + 10) / 2)


def test_unreached_target_is_na_with_its_reason(grid):
    write_run(grid, "q4-nearest", [0.30, 0.40, 0.45], [4, 8, 12], rounding="nearest")
    write_run(grid, "q4-s2", [0.30, 0.40, 0.45], [4, 8, 12], seed=2)
    rep = R.build_report(R.find_runs([grid])[0], target=0.5)
    rows = rows_by_codec(rep)
    near = rows[("qsgd", "nearest")]
    assert near.stats["seconds_to_target"].mean is None and near.stats["speedup"].mean is None
    assert near.stats["seconds_to_target"].why == "validation accuracy never reached 0.5"
    stoch = rows[("qsgd", "stochastic")]
    assert len(stoch.runs) == 3
    assert stoch.stats["seconds_to_target"].why == "validation accuracy never reached 0.5 in 1 of 3 seeds"
    assert stoch.stats["test_acc"].mean is not None  # other columns still filled
    text = "\n".join(rep.sections("text"))
    assert "never reached 0.5 in 1 of 3 seeds" in text and "n/a [" in text


def test_different_schedules_are_separate_groups(grid):
    write_run(grid, "q4-5ep", [0.3, 0.4, 0.5, 0.6, 0.7], [1, 2, 3, 4, 5])
    write_run(grid, "q4-b64", [0.35, 0.55, 0.58], [4, 8, 12], batch_size=64)
    rep = R.build_report(R.find_runs([grid])[0], target=0.5)
    assert len(rep.groups) == 3
    sizes = sorted(len(g.runs) for g in rep.groups)
    assert sizes == [1, 1, 3]
    lone = [g for g in rep.groups if len(g.runs) == 1]
    for g in lone:  # the fp32 run of another schedule is not its baseline
        assert g.rows[0].baseline is None
        assert g.rows[0].stats["speedup"].why == "no fp32 run with the same model and ranks"
    text = "\n".join(rep.sections("text"))
    assert "3 comparison groups" in text and "epochs (3 / 5)" in text and "batch_size (128 / 64)" in text


def test_ranks_and_hidden_flags_split_rows(grid):
    write_run(grid, "fp32-4", [0.30, 0.50, 0.60], [10, 20, 30], ranks=4, codec="fp32", bits=None,
              topology="allreduce")
    write_run(grid, "q4-4", [0.52, 0.56, 0.59], [2, 4, 6], ranks=4)
    write_run(grid, "q4-all", [0.52, 0.56, 0.59], [2, 4, 6], min_compress_numel=0)
    rep = R.build_report(R.find_runs([grid])[0], target=0.5)
    rows = rep.groups[0].rows
    four = [r for r in rows if r.config["ranks"] == "4" and r.config["codec"] == "qsgd"][0]
    assert four.baseline.runs[0].name == "fp32-4" and four.stats["speedup"].mean == pytest.approx(20 / 2)
    two = [r for r in rows if r.config["ranks"] == "2" and r.config["codec"] == "qsgd"]
    assert sorted(len(r.runs) for r in two) == [1, 2]
    assert {r.notes for r in two} == {"min_compress_numel=0", "min_compress_numel=1024"}


def test_broken_directories_are_skipped_and_said(grid, tmp_path):
    broken = grid / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "metrics.jsonl").write_text("")
    runs, skipped = R.find_runs([grid, tmp_path / "nowhere"])
    assert len(runs) == 3
    reasons = " ".join(why for _, why in skipped)
    assert "no summary.json (unfinished or broken run)" in reasons and "nowhere: no config.json" in reasons
    with pytest.raises(R.MpiqsgdError, match="no finished run directory"):
        R.build_report([], skipped=skipped)


def test_cli_writes_markdown_and_csv(grid, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", str(grid), "--target-acc", "0.5", "--out", str(out), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "s/step compute" in printed and "3.08x" in printed and "wrote" in printed
    md = (out / "report.md").read_text()
    assert md.count("\n|---") == 2 and "| qsgd |" in md
    rows = list(csv.DictReader((out / "report.csv").open()))
    q = [r for r in rows if r["codec"] == "qsgd"][0]
    assert float(q["seconds_to_target"]) == pytest.approx(6.5) and float(q["speedup"]) == pytest.approx(20 / 6.5)
    assert q["seeds"] == "0 1" and q["n_runs"] == "2" and q["baseline"] == "fp32 allreduce"
    assert float(q["seconds_per_step_encode"]) == pytest.approx(1 / 30)
    runs = list(csv.DictReader((out / "runs.csv").open()))
    assert len(runs) == 3 and {r["quant_variance_first"] for r in runs} == {"", "1.5"}


def test_cli_error_for_no_runs(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished run directory" in capsys.readouterr().err


def test_plots_are_written(grid, tmp_path):
    pytest.importorskip("matplotlib")
    rep = R.build_report(R.find_runs([grid])[0], target=0.5)
    written, message = R.write_report(rep, tmp_path / "out")
    assert message is None
    names = {p.name for p in written}
    assert {"accuracy.png", "phases.png", "variance.png"} <= names
    assert all((tmp_path / "out" / n).read_bytes()[:4] == b"\x89PNG" for n in names if n.endswith(".png"))


def test_missing_matplotlib_gives_a_clear_message(grid, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    rep = R.build_report(R.find_runs([grid])[0], target=0.5)
    written, message = R.write_report(rep, tmp_path / "out")
    assert message == R.PLOT_HINT and 'pip install -e ".[plot]"' in message
    assert {p.name for p in written} == {"report.md", "report.csv", "runs.csv"}


def test_report_of_real_runs_agrees_with_their_summaries(tmp_path):
    small = dict(dataset="synthetic", synthetic_size=600, model="tiny", epochs=2, batch_size=32, progress=False,
                 threads=1, simulate=2, target_acc=0.05, diag_every=4)
    for name, flags in (("fp32", dict(codec="fp32", topology="allreduce")), ("q4", dict(codec="qsgd", bits=4))):
        driver.train(TrainConfig(**small, **flags, run_dir=str(tmp_path / name)))
    runs, _ = R.find_runs([tmp_path])
    rep = R.build_report(runs)
    assert len(rep.groups) == 1 and rep.groups[0].target == 0.05
    for row in rep.groups[0].rows:
        s = row.runs[0].summary
        assert row.config["ranks"] == "2 sim"
        assert row.stats["seconds_to_target"].mean == pytest.approx(s["seconds_to_target"])
        assert row.stats["epochs_to_target"].mean == pytest.approx(s["steps_to_target"] / (s["steps"] / s["epochs"]))
        assert row.stats["total_bytes"].mean == s["total_bytes"]
        assert row.stats["compression_vs_fp32"].mean == pytest.approx(s["compression_vs_fp32"])
        assert row.phases["compute"].mean == pytest.approx(s["seconds_per_phase"]["compute"] / s["steps"])
    q = rows_by_codec(rep)[("qsgd", "stochastic")]
    fp = rows_by_codec(rep)[("fp32", "-")]
    assert q.baseline is fp
    assert q.stats["speedup"].mean == pytest.approx(fp.runs[0].summary["seconds_to_target"]
                                                    / q.runs[0].summary["seconds_to_target"])
