"""What ``mpiqsgd train`` prints, the data source in config.json, and phase timings without the warm-up."""

import io
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import launches_jobs, mpi_run
from mpiqsgd.cli import main
from mpiqsgd.train import data as D
from mpiqsgd.train import driver
from mpiqsgd.train.config import TrainConfig
from mpiqsgd.train.console import Console, Progress, human_bytes, human_seconds, sig3

FLAGS = ["--simulate", "2", "--model", "tiny", "--dataset", "synthetic", "--synthetic-size", "1200", "--epochs", "2",
         "--batch-size", "32", "--lr", "0.05", "--threads", "1"]
EPOCH = re.compile(r"epoch (\d+)/2  loss [0-9.]+  val acc [0-9.]+%  [0-9.]+ kB/step/rank  [0-9.]+ (ms|s)/step")


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_numbers_have_three_significant_digits_and_units():
    assert [sig3(x) for x in (0.00025191, 8.588, 99.96, 1442.784, 12345, 0)] == ["0.000252", "8.59", "100", "1440",
                                                                                  "12300", "0"]
    assert [human_bytes(x) for x in (12, 8588, 1442784, 999.7)] == ["12 B", "8.59 kB", "1.44 MB", "1.00 kB"]
    assert [human_seconds(x) for x in (0.0812, 8.334, 207, 4440)] == ["81.2 ms", "8.33 s", "3.45 min", "1.23 h"]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal_and_periodic_lines_in_a_log():
    log = io.StringIO()
    quiet = Progress(100, stream=log)  # 30 s between lines: 100 quick steps write nothing
    for _ in range(100):
        quiet.update()
    quiet.close()
    assert quiet.bar is None and log.getvalue() == ""
    log = io.StringIO()
    often = Progress(10, initial=2, stream=log, every=0.0)
    for _ in range(3):
        often.update()
    lines = log.getvalue().splitlines()
    assert len(lines) == 3 and re.fullmatch(r"step 5/10, [0-9.]+ (ms|s)/step, [0-9.]+ (ms|s) left", lines[-1])
    tty = Terminal()
    bar = Progress(10, stream=tty)
    bar.update(4)
    bar.close()
    assert bar.bar is not None and "4/10" in tty.getvalue()


def test_a_slow_first_step_says_it_compiles_and_a_quick_one_says_nothing():
    out = io.StringIO()
    console = Console(out=out)
    with console.first_step(after=10.0):
        pass
    assert out.getvalue() == ""
    with console.first_step(after=0.05):
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("first step: compiling kernels") and re.fullmatch(r"first step done in \d+ ms",
                                                                                 lines[1])


def test_train_console_lines_then_json(capsys, tmp_path):
    run_dir = tmp_path / "human"
    assert main(["train", *FLAGS, "--run-dir", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == f"run directory: {run_dir}"
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [EPOCH.fullmatch(line).group(1) for line in epochs] == ["1", "2"], out
    assert re.search(r"^done: validation accuracy [0-9.]+% \(best [0-9.]+%\), test [0-9.]+%$", out, re.M), out
    assert re.search(r"^communication: [0-9.]+ kB/step/rank, [0-9.]+x smaller than fp32", out, re.M), out
    assert lines[-1] == f"report: mpiqsgd report {run_dir}"
    assert "%|" not in err and "step/s" not in err  # stderr is not a terminal here: no tqdm bar
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"{summary['steps']} steps" in out and not out.lstrip().startswith("{")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["data"] == {"dataset": "synthetic", "kind": "synthetic", "path": "synthetic", "cache": None}

    assert main(["train", *FLAGS, "--json", "--run-dir", str(tmp_path / "json")]) == 0
    out, err = capsys.readouterr()
    again = json.loads(out)  # stdout is the JSON alone; the lines for a person went to stderr
    assert again == json.loads((tmp_path / "json" / "summary.json").read_text())
    assert again["total_bytes"] == summary["total_bytes"] and again["warmup_steps"] == 1
    assert f"run directory: {tmp_path / 'json'}" in err and sum(line.startswith("epoch ") for line in
                                                                 err.splitlines()) == 2


def test_warmup_steps_leave_the_phase_timings_and_no_byte_count(tmp_path, monkeypatch):
    cfg = dict(dataset="synthetic", synthetic_size=1200, model="tiny", epochs=1, batch_size=32, lr=0.05,
               progress=False, threads=1, simulate=2, uncompressed_warmup_steps=2)
    quiet = Console(out=io.StringIO())
    summary = driver.train(TrainConfig(**cfg, run_dir=str(tmp_path / "a")), console=quiet)
    comm = json.loads((tmp_path / "a" / "comm.json").read_text())
    assert summary["warmup_steps"] == comm["warmup_steps"] == 3  # two fp32 steps, then the codec's first
    assert summary["warmup_seconds_per_phase"]["encode"] > 0
    for phase, total in comm["seconds"].items():  # comm.json keeps the true totals
        timed, warm = summary["seconds_per_phase"][phase], summary["warmup_seconds_per_phase"].get(phase, 0.0)
        assert 0 <= timed <= total / 2 and timed + warm == pytest.approx(total / 2)
        assert warm == pytest.approx(comm["warmup_seconds"].get(phase, 0.0) / 2)
    assert [r["warmup_seconds"] for r in comm["per_rank"]] and all(r["warmup_seconds"] for r in comm["per_rank"])

    monkeypatch.setattr(driver.Worker, "_timing_warmup_end", lambda self: self.st["step"])  # no warm-up
    plain = driver.train(TrainConfig(**cfg, run_dir=str(tmp_path / "b")), console=quiet)
    assert plain["warmup_steps"] == 0 and plain["warmup_seconds_per_phase"] == {}
    comm_b = json.loads((tmp_path / "b" / "comm.json").read_text())
    for key in ("sent", "by_phase", "by_link", "sizes", "sent_by_rank"):
        assert comm[key] == comm_b[key], key
    assert summary["total_bytes"] == plain["total_bytes"]
    assert summary["bytes_per_step_per_rank"] == plain["bytes_per_step_per_rank"]


def test_image_folder_origin_and_the_preparing_line(tmp_path):
    for split, n in (("train", 2), ("test", 1)):
        for name in ("cat", "dog"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / "data" / split / name / f"{i}.png")
    source = D.find_dataset("cifar10", tmp_path / "data")
    said = []
    train, _, origin = D.load_source(source, tmp_path / "cache", say=said.append)
    assert len(train) == 4 and len(said) == 1 and said[0].startswith("preparing data: decoding the images of")
    assert origin["kind"] == "image-folder" and origin["path"] == str(tmp_path / "data")
    assert origin["cache"].endswith(".npz") and (tmp_path / "cache").resolve() in map(lambda p: p.resolve(), [
        Path(origin["cache"]).parent])
    _, _, again = D.load_source(source, tmp_path / "cache", say=said.append)
    assert again == origin and len(said) == 1  # read from the cache: nothing to say


@launches_jobs
def test_mpi_console_speaks_once(tmp_path):
    flags = [f for f in FLAGS[2:]]
    proc = mpi_run(2, [sys.executable, "-m", "mpi4py", "-m", "mpiqsgd", "train", *flags, "--run-dir",
                       str(tmp_path / "mpi")], 300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == f"run directory: {tmp_path / 'mpi'}" and proc.stdout.count("run directory:") == 1
    assert [EPOCH.fullmatch(line).group(1) for line in lines if line.startswith("epoch ")] == ["1", "2"]
    assert lines[-1] == f"report: mpiqsgd report {tmp_path / 'mpi'}" and "2 ranks" in proc.stdout
    assert "%|" not in proc.stderr
