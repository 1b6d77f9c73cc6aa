"""Ranks started with different flags are refused at start-up, naming the flags (unit, then mpiexec MPMD)."""

import sys
import time

import pytest

from conftest import launches_jobs, mpi_run
from mpiqsgd.errors import ConfigError
from mpiqsgd.train.config import RUN_LOCAL, TrainConfig, agreement_digest, check_agreement


def digests(*configs, world_size=None):
    return [agreement_digest(c, world_size or len(configs)) for c in configs]


def test_same_flags_agree_and_run_local_flags_may_differ():
    check_agreement(digests(TrainConfig(), TrainConfig()))
    local = dict(progress=False, threads=3, device="cpu", wait="spin", comm_timeout=5.0, run_dir="elsewhere",
                 data_dir="/data", download=True, target_acc=0.5, diag_every=7, nvar_every=9, nvar_batches=3,
                 resume="here")
    assert set(local) == set(RUN_LOCAL)
    base = TrainConfig(resume="there")
    check_agreement(digests(base, TrainConfig(**local)))


@pytest.mark.parametrize("flag,value", [
    ("topology", "allgather"), ("codec", "sign"), ("bits", 2), ("epochs", 3), ("max_steps", 5), ("batch_size", 64),
    ("lr", 0.2), ("lr_schedule", "cosine"), ("momentum", 0.5), ("seed", 1), ("error_feedback", True),
    ("checkpoint_every", 10), ("eval_every", 10), ("check_sync_every", 4), ("adapt_at", "0,5"), ("bucket_mb", 1.0),
    ("min_compress_numel", 10), ("overlap", True), ("model", "tiny"), ("synthetic_size", 99), ("piece_numel", 4096),
])
def test_every_flag_that_changes_messages_or_math_must_agree(flag, value):
    name = "--" + flag.replace("_", "-")
    default = getattr(TrainConfig(), flag)
    with pytest.raises(ConfigError) as info:
        check_agreement(digests(TrainConfig(), TrainConfig(), TrainConfig(**{flag: value}), TrainConfig()))
    message = str(info.value)
    assert f"{name} (ranks 0, 1, 3 {default!r}, rank 2 {value!r})" in message, message
    assert message.count("(") == 1 and "same flags" in message


def test_resuming_on_some_ranks_only_world_size_and_version_are_named():
    resumes = [agreement_digest(TrainConfig(resume="a" if r else None), 2) for r in range(2)]
    with pytest.raises(ConfigError, match=r"--resume \(rank 0 False, rank 1 True\)"):
        check_agreement(resumes)
    with pytest.raises(ConfigError, match=r"world_size \(rank 0 2, rank 1 3\)"):
        check_agreement([agreement_digest(TrainConfig(), 2), agreement_digest(TrainConfig(), 3)])
    other = agreement_digest(TrainConfig(), 2).replace(b'"mpiqsgd": "', b'"mpiqsgd": "9.9-')
    with pytest.raises(ConfigError, match=r"mpiqsgd version \(rank 0 '.*', rank 1 '9.9-"):
        check_agreement([agreement_digest(TrainConfig(), 2), other])


def test_many_differences_are_capped_and_garbage_is_named():
    many = TrainConfig(epochs=3, lr=1.0, seed=4, bits=3, batch_size=7, momentum=0.1, topology="ps", eval_every=2)
    with pytest.raises(ConfigError, match="and 2 more; start every rank"):
        check_agreement(digests(TrainConfig(), many))
    for junk in (b"\xff\xfe", b"[1, 2]", b""):
        with pytest.raises(ConfigError, match="rank 1 sent an unreadable flag digest"):
            check_agreement([agreement_digest(TrainConfig(), 2), junk])


# -- real ranks with different command lines (MPMD), under a timeout --------------------

TRAIN = ["-m", "mpi4py", "-m", "mpiqsgd", "train", "--dataset", "synthetic", "--synthetic-size", "600", "--model",
         "tiny", "--epochs", "1", "--batch-size", "32", "--no-progress", "--threads", "1"]


def mpmd(*argvs, timeout=90):
    """``mpiexec -n 1 python ARGV0 : -n 1 python ARGV1 ...``: one rank per command line."""
    start = time.perf_counter()
    first, *more = [[sys.executable, *argv] for argv in argvs]
    proc = mpi_run(1, first, timeout, contexts=[(1, argv) for argv in more])
    return proc, time.perf_counter() - start


@launches_jobs
@pytest.mark.parametrize("flags,named", [
    ((["--topology", "ring"], ["--topology", "allgather"]), "--topology (rank 0 'ring', rank 1 'allgather')"),
    ((["--seed", "0"], ["--seed", "1"]), "--seed (rank 0 0, rank 1 1)"),
])
def test_ranks_with_different_flags_are_refused_under_mpiexec(tmp_path, flags, named):
    run_dir = tmp_path / "run"
    proc, seconds = mpmd(*[[*TRAIN, "--run-dir", str(run_dir), *f] for f in flags])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert f"mpiqsgd: error: the ranks were started with different flags: {named}" in out, out[-3000:]
    assert "Traceback" not in out and not run_dir.exists()
    assert seconds < 60


@launches_jobs
def test_an_unwritable_run_directory_is_one_line_on_one_rank(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc, _ = mpmd(*[[*TRAIN, "--run-dir", str(blocker / "run")]] * 2)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert out.count(f"mpiqsgd: error: cannot write the run directory {blocker / 'run'}") == 1, out[-3000:]
    assert "mpiqsgd: rank 0 failed; aborting all ranks" in out and "Traceback" not in out
