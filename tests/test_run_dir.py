"""Run directories and flags under hostile use: nothing on disk changes before every check has passed."""

import errno
import json

import pytest

from mpiqsgd.cli import main
from mpiqsgd.errors import MpiqsgdError
from mpiqsgd.train import driver
from mpiqsgd.train.config import TrainConfig

TINY = ["train", "--simulate", "1", "--dataset", "synthetic", "--synthetic-size", "300", "--model", "tiny",
        "--epochs", "1", "--batch-size", "32", "--threads", "1", "--no-progress"]
SMALL = dict(dataset="synthetic", synthetic_size=300, model="tiny", epochs=1, batch_size=32, progress=False,
             threads=1)


def snapshot(root):
    """Every file under ``root`` with its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def another_run(path, *names):
    """A directory that looks like another run's: the named files, each with some content."""
    path.mkdir(parents=True)
    for name in names:
        if name == "checkpoints":
            (path / name).mkdir()
            (path / name / "latest.json").write_text("{}")
        else:
            (path / name).write_text(json.dumps({"step": 1, "other": "run"}) + "\n")
    return path


def cli_error(capsys, *argv):
    code = main([*TINY, *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("mpiqsgd: error: ") and err.count("\n") == 1, err  # one line, no traceback
    return err


@pytest.mark.parametrize("argv,flag", [
    (["--bits", "0"], "bits must be between 2 and 8"), (["--device", "tpu"], "--device"), (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"), (["--lr=-inf"], "--lr"), (["--momentum", "nan"], "--momentum"),
    (["--weight-decay", "nan"], "--weight-decay"), (["--bucket-mb", "inf"], "--bucket-mb"),
    (["--warmup-epochs", "nan"], "--warmup-epochs"), (["--lr-decay-factor", "inf"], "--lr-decay-factor"),
    (["--lr-decay-epochs", "1,nan"], "--lr-decay-epochs"), (["--val-fraction", "nan"], "--val-fraction"),
    (["--target-acc", "nan"], "--target-acc"), (["--model", "nope"], "--model"),
])
def test_bad_flags_are_refused_before_an_existing_run_is_touched(capsys, tmp_path, argv, flag):
    run = another_run(tmp_path / "old", "config.json", "metrics.jsonl", "diagnostics.jsonl", "summary.json")
    before = snapshot(tmp_path)
    assert flag in cli_error(capsys, "--run-dir", str(run), *argv)
    assert snapshot(tmp_path) == before
    assert flag in cli_error(capsys, "--run-dir", str(tmp_path / "new"), *argv)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("held", driver.RUN_FILES)
def test_a_directory_holding_another_run_is_refused(capsys, tmp_path, held):
    run = another_run(tmp_path / "old", held)
    before = snapshot(tmp_path)
    err = cli_error(capsys, "--run-dir", str(run))
    assert f"--run-dir {run} already holds a run ({held})" in err and "new --run-dir" in err
    assert (f"pass --resume {run}" in err) == (held == "checkpoints")
    assert snapshot(tmp_path) == before


def test_resume_needs_a_checkpoint_and_writes_nothing_without_one(capsys, tmp_path):
    run = another_run(tmp_path / "old", "config.json", "metrics.jsonl")
    before = snapshot(tmp_path)
    assert "no checkpoint found at" in cli_error(capsys, "--resume", str(run))
    assert "no checkpoint found at" in cli_error(capsys, "--resume", str(run), "--run-dir", str(run))
    assert snapshot(tmp_path) == before
    missing = tmp_path / "missing" / "path"
    assert f"--resume {missing}: no such directory" in cli_error(capsys, "--resume", str(missing))
    assert not (tmp_path / "missing").exists()


def test_resume_into_a_new_directory_or_its_own_but_never_over_another_run(tmp_path):
    a = tmp_path / "a"
    driver.train(TrainConfig(**SMALL, simulate=1, max_steps=3, checkpoint_every=3, run_dir=str(a)))
    other = another_run(tmp_path / "other", "metrics.jsonl")
    before = snapshot(tmp_path)
    with pytest.raises(MpiqsgdError, match="already holds a run"):
        driver.train(TrainConfig(**SMALL, simulate=1, resume=str(a), run_dir=str(other)))
    with pytest.raises(MpiqsgdError, match="written with --batch-size 32, this run has --batch-size 16"):
        driver.train(TrainConfig(**{**SMALL, "batch_size": 16}, simulate=1, resume=str(a)))
    with pytest.raises(MpiqsgdError, match="written by 1 ranks; this job has 2"):
        driver.train(TrainConfig(**SMALL, simulate=2, resume=str(a / "checkpoints")))
    assert snapshot(tmp_path) == before  # refused resumes leave config.json as it was
    summary = driver.train(TrainConfig(**SMALL, simulate=1, resume=str(a), run_dir=str(tmp_path / "b")))
    assert summary["steps"] == 8 and (tmp_path / "b" / "summary.json").exists()


def test_an_unwritable_run_directory_is_one_line(capsys, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert "is a file, not a directory" in cli_error(capsys, "--run-dir", str(blocker))
    err = cli_error(capsys, "--run-dir", str(blocker / "run"))
    assert f"cannot write the run directory {blocker / 'run'}" in err and "writable --run-dir" in err

    def read_only(path, data):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(driver, "atomic_write_bytes", read_only)
    assert "Permission denied" in cli_error(capsys, "--run-dir", str(tmp_path / "ro"))


def test_a_full_disk_mid_run_is_one_line(capsys, tmp_path, monkeypatch):
    def full(root, *args):
        raise OSError(errno.ENOSPC, "No space left on device", str(root / "step-00000002" / "rank0.pt"))

    monkeypatch.setattr(driver, "save_checkpoint", full)
    err = cli_error(capsys, "--run-dir", str(tmp_path / "run"), "--checkpoint-every", "2")
    assert "I/O error on" in err and "rank0.pt: No space left on device" in err
