"""mpiqsgd report: numbers computed from hand-made run directories, grouping, n/a cells, widths, files, plots."""

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
              simulated=False, diag=None, warmup=2, summary_extra=None, **flags):
    """A finished run directory as ``mpiqsgd train`` writes it, with chosen numbers.

    ``warmup``: the summary's ``warmup_steps`` (None: a summary without the key); ``summary_extra``
    is merged into the summary (None values delete keys).
    """
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
               "compression_vs_fp32": ratio, "seconds_per_phase": phases, "n_ranks": ranks, "n_workers": ranks,
               "status": "complete", "warmup_steps": warmup}
    summary.update(summary_extra or {})
    summary = {k: v for k, v in summary.items() if v is not None}
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
    # phase seconds cover the steps after the 2 warm-up steps
    assert q.phases["compute"].mean == pytest.approx(6.0 / 28) and q.phases["decode"].mean == pytest.approx(0.25 / 28)
    assert s["step_seconds"].mean == pytest.approx((6.0 + 1.0 + 0.5 + 0.25) / 28)
    assert s["wall_seconds_per_step"].mean == pytest.approx((12 / 30 + 15 / 30) / 2)
    f = rows[("fp32", "-")]
    assert f.config["bits"] == 32 and f.config["bucket"] == "-" and f.stats["speedup"].mean == pytest.approx(1.0)
    text = "\n\n".join(rep.sections("wide"))
    for cell in ("0.580 ± 0.014", "1.50 ± 0.71", "6.50 ± 2.12 s", "3.08x", "60.0 kB", "8.00x", "1.50 / 1.20 / 1.10",
                 "214 ms", "1.00 kB"):
        assert cell in text
    assert "n/a" not in text.split("Runs")[0]  # every configuration cell is filled
    compact = "\n\n".join(rep.sections("text"))
    for cell in ("0.580 ± 0.014", "6.50 ± 2.12 s", "1.00 kB", "8.00x", "277 ms", "3.08x"):
        assert cell in compact
    assert "n/a" not in compact.split("Runs")[0] and "1.50 ± 0.71" not in compact


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
    assert "no summary.json and no evaluation in metrics.jsonl" in reasons
    assert "nowhere: no config.json (not a run directory)" in reasons
    with pytest.raises(R.MpiqsgdError, match="no run directory with anything to report"):
        R.build_report([], skipped=skipped)


def test_cli_writes_markdown_and_csv(grid, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", str(grid), "--target-acc", "0.5", "--out", str(out), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "s/step" in printed and "s/step compute" not in printed and "3.08x" in printed and "wrote" in printed
    md = (out / "report.md").read_text()
    assert md.count("\n|---") == 2 and "| qsgd |" in md and "s/step compute" in md
    rows = list(csv.DictReader((out / "report.csv").open()))
    q = [r for r in rows if r["codec"] == "qsgd"][0]
    assert float(q["seconds_to_target"]) == pytest.approx(6.5) and float(q["speedup"]) == pytest.approx(20 / 6.5)
    assert q["seeds"] == "0 1" and q["n_runs"] == "2" and q["baseline"] == "fp32 allreduce"
    assert float(q["seconds_per_step_encode"]) == pytest.approx(1 / 28)
    runs = list(csv.DictReader((out / "runs.csv").open()))
    assert len(runs) == 3 and {r["quant_variance_first"] for r in runs} == {"", "1.5"}


def test_cli_error_for_no_runs(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no run directory with anything to report" in capsys.readouterr().err


def test_plots_are_written(grid, tmp_path):
    pytest.importorskip("matplotlib")
    rep = R.build_report(R.find_runs([grid])[0], target=0.5)
    written, message = R.write_report(rep, tmp_path / "out")
    assert message is None
    names = {p.name for p in written}
    assert {"accuracy.png", "results.png", "phases.png", "variance.png"} <= names
    for n in names:
        if n.endswith(".png"):
            data = (tmp_path / "out" / n).read_bytes()
            assert data[:4] == b"\x89PNG" and len(data) > 10_000, n


def test_missing_matplotlib_gives_a_clear_message(grid, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    rep = R.build_report(R.find_runs([grid])[0], target=0.5)
    written, message = R.write_report(rep, tmp_path / "out")
    assert message == R.PLOT_HINT and "pip install" in message and "matplotlib" in message
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
        assert row.phases["compute"].mean == pytest.approx(s["seconds_per_phase"]["compute"]
                                                           / (s["steps"] - s.get("warmup_steps", 0)))
    q = rows_by_codec(rep)[("qsgd", "stochastic")]
    fp = rows_by_codec(rep)[("fp32", "-")]
    assert q.baseline is fp
    assert q.stats["speedup"].mean == pytest.approx(fp.runs[0].summary["seconds_to_target"]
                                                    / q.runs[0].summary["seconds_to_target"])


# ---------------------------------------------------------------- widths, units, formats

def test_numbers_are_three_significant_digits_in_human_units():
    from mpiqsgd.report.text import quantity, sig3

    assert [sig3(v) for v in (0.0002519, 6.5, 123.4, 999.7, 1234.5, 0)] == ["0.000252", "6.50", "123", "1,000",
                                                                           "1,234", "0"]
    assert quantity(40_900, kind="bytes") == "40.9 kB" and quantity(999_700, kind="bytes") == "1.00 MB"
    assert quantity(512, kind="bytes") == "512 B"
    assert quantity(0.0002519, kind="seconds") == "252 µs" and quantity(0.592, kind="seconds") == "592 ms"
    assert quantity(6.5, 2.1213, "seconds") == "6.50 ± 2.12 s" and quantity(4000, kind="seconds") == "66.7 min"
    assert quantity(0.58, 0.01414, "acc") == "0.580 ± 0.014" and quantity(4.7666, kind="ratio") == "4.77x"


def realistic(root):
    """A report a person would print: two comparison groups, 8 configurations with seeds, sweep-style long run
    names, 20 epochs, a long PS topology label, a hidden flag, an interrupted and an incomplete run."""
    for seed in (0, 1, 2):
        val = [0.1 + 0.02 * e for e in range(20)]
        wall = [10.0 * (e + 1) for e in range(20)]
        write_run(root, f"ranks-4_codec-fp32_topology-allreduce_seed-{seed}", val, wall, codec="fp32", bits=None,
                  topology="allreduce", ranks=4, bytes_per_step=1.1e6, ratio=1.0, seed=seed, warmup=None)
        for bits in (2, 4, 8):
            for rounding in ("stochastic", "nearest"):
                write_run(root, f"ranks-4_codec-qsgd_bits-{bits}_rounding-{rounding}_ef-on_seed-{seed}", val,
                          [0.6 * w for w in wall], bits=bits, rounding=rounding, error_feedback=True, ranks=4,
                          bytes_per_step=1.1e6 * bits / 32, diag=[(s, 0.0123 / bits) for s in range(0, 200, 20)],
                          seed=seed)
    write_run(root, "ranks-4_codec-qsgd_bits-4_topology-ps-downlink-codec-dedicated-overlap_seed-0", val, wall,
              ranks=4, topology="ps", downlink="codec", server_error_feedback=True, dedicated_server=True,
              overlap=True, min_compress_numel=0)
    write_run(root, "ranks-4_codec-qsgd_bits-4_interrupted_seed-3", val[:7], wall[:7], ranks=4, seed=3, epochs=20,
              summary_extra={"status": "interrupted", "interrupted_at_step": 72})
    d = write_run(root, "ranks-4_codec-qsgd_bits-4_killed_seed-4", val[:5], wall[:5], ranks=4, seed=4, epochs=20)
    (d / "summary.json").unlink()
    write_run(root, "other-schedule-fp32", [0.2, 0.3], [5, 10], codec="fp32", bits=None, topology="allreduce",
              batch_size=64)
    return root


def test_printed_report_fits_120_columns_and_wide_keeps_every_column(tmp_path, capsys):
    root = realistic(tmp_path / "runs")
    assert main(["report", str(root), "--target-acc", "0.3", "--link", "100mbit,1gbit,10gbit"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert len(lines) > 60 and max(map(len, lines)) <= 120, max(lines, key=len)
    assert "2 comparison groups" in text and "interrupted at step 72" in text and "incomplete at step 50" in text
    assert "PROJECTION" in text and "on 10gbit" in text and "…" in text  # long run names lost their middle
    assert main(["report", str(root), "--target-acc", "0.3", "--wide"]) == 0
    wide = capsys.readouterr().out
    assert max(map(len, wide.splitlines())) > 200
    for header in ("s/step compute", "s/step wall", "val@20", "epochs to target", "total bytes", "warm-up steps",
                   "ranks-4_codec-qsgd_bits-4_topology-ps-downlink-codec-dedicated-overlap_seed-0"):
        assert header in wide


def test_format_markdown_and_csv(grid, tmp_path, capsys):
    assert main(["report", str(grid), "--target-acc", "0.5", "--format", "markdown"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("## ") and "| s/step compute |" in md and "| val@3 |" in md
    out = tmp_path / "out"
    assert main(["report", str(grid), "--target-acc", "0.5", "--format", "csv", "--out", str(out), "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert captured.out == (out / "report.csv").read_text() and "wrote" in captured.err
    rows = list(csv.DictReader(captured.out.splitlines()))
    assert len(rows) == 2 and {r["state"] for r in rows} == {"complete"}


# ---------------------------------------------------------------- interrupted runs, warm-up

def test_interrupted_run_is_listed_with_what_it_has(grid):
    write_run(grid, "q4-s2", [0.35, 0.45], [4, 8], seed=2, epochs=3,
              summary_extra={"status": "interrupted", "interrupted_at_step": 20, "test_acc": None,
                             "seconds_per_phase": None})
    rep = R.build_report(R.find_runs([grid])[0], target=0.5)
    rows = [r for r in rep.groups[0].rows if r.config["codec"] == "qsgd"]
    done, stopped = sorted(rows, key=lambda r: r.state)
    assert len(done.runs) == 2 and done.stats["test_acc"].mean == pytest.approx(0.58)  # not averaged with it
    assert stopped.state == "interrupted at step 20" and stopped.runs[0].stopped_at == 20
    assert stopped.stats["final_val_acc"].mean == pytest.approx(0.45)
    assert stopped.stats["test_acc"].why == "not in summary.json"
    for fmt in ("text", "wide", "markdown"):
        text = "\n".join(rep.sections(fmt))
        assert "interrupted at step 20 (q4-s2)" in text and "not a run directory" not in text


def test_run_interrupted_before_its_first_evaluation_is_listed(grid, tmp_path):
    d = write_run(grid, "q4-early", [0.35], [4], seed=3, epochs=3,
                  summary_extra={"status": "interrupted", "interrupted_at_step": 7, "steps": 7, "final_val_acc": None,
                                 "best_val_acc": None, "test_acc": None})
    (d / "metrics.jsonl").unlink()
    rep = R.build_report(R.find_runs([grid])[0], target=0.5)
    text = "\n".join(rep.sections("text"))
    assert "interrupted at step 7 (q4-early)" in text and max(map(len, text.splitlines())) <= 120
    pytest.importorskip("matplotlib")
    written, _ = R.write_report(rep, tmp_path / "out")
    assert (tmp_path / "out" / "results.png").exists() and len(written) == 7


def test_run_without_summary_is_incomplete_at_its_last_logged_step(grid):
    (grid / "q4-s1" / "summary.json").unlink()
    (grid / "q4-s1" / "comm.json").unlink()
    runs, skipped = R.find_runs([grid])
    assert not skipped and len(runs) == 3
    run = [r for r in runs if r.name == "q4-s1"][0]
    assert run.status == "incomplete" and run.stopped_at == 30 and run.state == "incomplete at step 30"
    assert run.summary["bytes_per_step_per_rank"] == pytest.approx(1000.0) and run.summary["best_val_acc"] == 0.59
    rep = R.build_report(runs, target=0.5)
    row = [r for r in rep.groups[0].rows if r.state][0]
    assert row.stats["seconds_to_target"].mean == 5 and row.stats["speedup"].mean == pytest.approx(20 / 5)
    assert row.stats["compression_vs_fp32"].why == "no summary.json (the run did not finish)"
    text = "\n".join(rep.sections("text"))
    assert "incomplete at step 30 (q4-s1)" in text
    (grid / "q4-s1" / "metrics.jsonl").write_text("")
    why = dict(R.find_runs([grid])[1])[grid / "q4-s1"]
    assert "stopped before its first evaluation" in why


def test_timings_with_compilation_are_flagged(grid):
    write_run(grid, "q8-old", [0.35, 0.55, 0.58], [4, 8, 12], bits=8, warmup=None)
    write_run(grid, "q2-zero", [0.35, 0.55, 0.58], [4, 8, 12], bits=2, warmup=0)
    rep = R.build_report(R.find_runs([grid])[0], target=0.5)
    flagged = {r.config["bits"] for r in rep.groups[0].rows if r.timings_include_compilation}
    assert flagged == {8, 2}
    q8 = [r for r in rep.groups[0].rows if r.config["bits"] == 8][0]
    assert q8.phases["compute"].mean == pytest.approx(6.0 / 30)  # no warm-up: every step counted
    text = "\n".join(rep.sections("text"))
    assert "timings include kernel compilation" in text
    ref = text.split("timings include kernel compilation")[0].rsplit("[", 1)[1].split("]")[0]
    step_cells = [line.split()[-2] for line in text.splitlines() if f"[{ref}]" in line and "qsgd" in line]
    assert len(step_cells) == 2  # the two flagged rows, marked on their s/step
    wide = "\n".join(rep.sections("wide"))
    assert "warm-up steps" in wide and "timings include kernel compilation" in wide


# ---------------------------------------------------------------- figures

def test_one_sample_run_is_a_point_and_legends_sit_outside(grid, tmp_path):
    pytest.importorskip("matplotlib")
    from mpiqsgd.report import plots

    write_run(grid, "q2-one", [0.35, 0.55, 0.58], [4, 8, 12], bits=2, diag=[(0, 0.9)])
    rep = R.build_report(R.find_runs([grid])[0], target=0.5)
    g = rep.groups[0]
    fig = plots.variance_figure(g)
    (ax,) = fig.axes
    one = [line for line in ax.get_lines() if len(line.get_xdata()) == 1]
    assert len(one) == 1 and one[0].get_marker() not in (None, "", "None") and one[0].get_markersize() > 0
    assert ax.get_legend() is None and len(fig.legends) == 1
    for make in (plots.accuracy_figure, plots.phases_figure, plots.variance_figure):
        fig = make(g)
        fig.canvas.draw()
        legend = fig.legends[0].get_window_extent()
        for ax in fig.axes:
            assert ax.get_legend() is None
            assert legend.x0 >= ax.get_window_extent().x1 - 1, make.__name__  # beside the data, not on it
            data = [line for line in ax.get_lines() if line.get_gid() != "target"]
            assert all(line.get_marker() not in (None, "", "None") for line in data)
    fig = plots.results_figure(g)
    _, tab = fig.axes
    (table,) = tab.tables
    cells = table.get_celld()
    assert max(r for r, _ in cells) == len(g.rows)  # a header row and one row per configuration
    assert "qsgd 2b" in "".join(cells[i, 0].get_text().get_text() for i in range(1, len(g.rows) + 1))
    assert cells[0, 5].get_text().get_text() == "speedup"


def test_the_heading_names_the_emulated_cluster_a_sweep_recorded(tmp_path, capsys):
    from mpiqsgd.sweep import scenario

    grid = {"cluster": "10mbit", "cluster_burst": "8kb"}
    for name, ranks in (("one-node", 1), ("two-nodes", 2)):
        d = write_run(tmp_path, name, [0.5], [10], ranks=ranks)
        config = json.loads((d / "config.json").read_text())
        config["scenario"] = scenario(grid, ranks)
        (d / "config.json").write_text(json.dumps(config))
    assert main(["report", str(tmp_path)]) == 0
    heading = capsys.readouterr().out.replace("\n", " ")
    burst = scenario(grid, 2)["tbf_burst_bytes"]
    assert f"emulated switched cluster, one rank per node, 10mbit per node (tbf burst {burst:,} B)" in heading
    assert "1-node runs: no link" in heading
    write_run(tmp_path / "plain", "mpi", [0.5], [10])
    assert main(["report", str(tmp_path / "plain")]) == 0
    assert "emulated" not in capsys.readouterr().out
