"""Checkpoint integrity: every damaged, foreign or misplaced rank file is a clear refusal naming it."""

import hashlib
import io
import json
import os
import pickle
import shutil
import struct

import numpy as np
import pytest
import torch

from mpiqsgd.errors import MpiqsgdError
from mpiqsgd.train import checkpoint as ck
from mpiqsgd.transport import LocalGroup


def state_of(rank, step, lr=0.1):
    g = torch.Generator().manual_seed(rank * 1000 + step)
    return {"flags": {"lr": lr, "seed": 0, "codec": "qsgd"},
            "model": {"w": torch.randn(64, generator=g), "b": torch.randn(3, generator=g)},
            "optimizer": {"state": {0: {"momentum_buffer": torch.randn(64, generator=g)}},
                          "param_groups": [{"lr": lr, "params": [0, 1]}]},
            "rng": torch.Generator().manual_seed(rank).get_state(),
            "progress": {"step": step, "best_val": np.float64(0.25), "history": [{"step": step, "x": 1.5}]}}


def save(root, step, n=2, lr=0.1):
    group = LocalGroup(n)
    group.run(lambda t: ck.save_checkpoint(root, step, state_of(t.rank, step, lr), t), group.transports())
    return root / f"step-{step:08d}"


def load(root, rank, n=2):
    return ck.load_checkpoint(root, rank, n)


@pytest.fixture
def saved(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    return root, save(root, 6)


def refused(root, rank, *match):
    with pytest.raises(MpiqsgdError) as info:
        load(root, rank)
    for m in match:
        assert m in str(info.value), str(info.value)
    return str(info.value)


def test_round_trip_and_manifest(saved):
    root, directory = saved
    for rank in (0, 1):
        got, want = load(root, rank), state_of(rank, 6)
        assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])
        assert torch.equal(got["rng"], want["rng"])
        assert got["progress"]["best_val"] == 0.25 and type(got["progress"]["best_val"]) is float
        assert got["optimizer"]["state"][0]["momentum_buffer"].shape == (64,)
    manifest = json.loads((root / ck.MARKER).read_text())
    assert manifest["step"] == 6 and manifest["world_size"] == 2 and manifest["flags"]["lr"] == 0.1
    assert manifest["dir"] == directory.name
    for rank in (0, 1):
        data = (directory / f"rank{rank}.pt").read_bytes()
        assert manifest["files"][f"rank{rank}.pt"] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert len(list(root.glob("step-*"))) == 1
    save(root, 9)  # the next checkpoint replaces this one
    assert [p.name for p in root.glob("step-*")] == ["step-00000009"] and load(root, 1)["progress"]["step"] == 9


def test_flipped_bytes_anywhere_are_refused(saved):
    root, directory = saved
    file = directory / "rank1.pt"
    original = file.read_bytes()
    hlen = struct.unpack_from("<I", original, 8)[0]
    payload_at = 12 + hlen
    # prefix, JSON header, the pickle frame at the start of the zip, tensor data near the end, the last byte
    offsets = [0, 7, 9, 12, 12 + hlen // 2, payload_at, payload_at + 40, len(original) - 300, len(original) - 1]
    for at in offsets:
        damaged = bytearray(original)
        damaged[at] ^= 0x10
        file.write_bytes(bytes(damaged))
        message = refused(root, 1, str(file))
        assert "Traceback" not in message
    file.write_bytes(original)
    load(root, 1)


@pytest.mark.parametrize("cut", [0, 1, 11, 12, 40, -500, -1])
def test_truncated_and_empty_files_are_refused(saved, cut):
    root, directory = saved
    file = directory / "rank0.pt"
    data = file.read_bytes()
    file.write_bytes(data[:cut] if cut >= 0 else data[:len(data) + cut])
    refused(root, 0, str(file), "empty" if cut == 0 else "")


def test_rank_zeros_file_in_rank_ones_place(saved):
    root, directory = saved
    shutil.copy(directory / "rank0.pt", directory / "rank1.pt")
    refused(root, 1, str(directory / "rank1.pt"), "rank 0's file, not rank 1's")


def test_another_steps_file(saved, tmp_path):
    root, directory = saved
    other = save(tmp_path / "other" / "checkpoints", 3)
    shutil.copy(other / "rank1.pt", directory / "rank1.pt")
    refused(root, 1, str(directory / "rank1.pt"), "from step 3", "for step 6")


def test_another_runs_file(saved, tmp_path):
    root, directory = saved
    other = save(tmp_path / "other" / "checkpoints", 6, lr=0.2)
    shutil.copy(other / "rank1.pt", directory / "rank1.pt")
    refused(root, 1, str(directory / "rank1.pt"), "another run", "--lr 0.2 vs 0.1")


def test_same_flags_other_content_is_refused_by_the_manifest_checksum(saved, tmp_path):
    """A file intact in itself, of the right rank, step and flags, but not the one recorded."""
    root, directory = saved
    state = state_of(1, 6)
    state["model"]["w"] += 1
    (directory / "rank1.pt").write_bytes(ck._rank_file_bytes(state, 6, 1, 2))
    refused(root, 1, str(directory / "rank1.pt"), "not the file the manifest")


def test_missing_file_and_world_size(saved):
    root, directory = saved
    with pytest.raises(MpiqsgdError, match="written by 2 ranks; this job has 3"):
        load(root, 0, 3)
    (directory / "rank1.pt").unlink()
    refused(root, 1, "no file for rank 1")


@pytest.mark.parametrize("name", ["../../elsewhere", "/tmp", "step-1", "step-00000006/../..", 6, None])
def test_manifest_cannot_point_outside(saved, name):
    root, _ = saved
    manifest = json.loads((root / ck.MARKER).read_text())
    manifest["dir"] = name
    (root / ck.MARKER).write_text(json.dumps(manifest))
    refused(root, 0, "step-NNNNNNNN")


def test_symlinked_step_directory_is_refused(saved, tmp_path):
    root, directory = saved
    outside = tmp_path / "outside"
    shutil.move(directory, outside)
    os.symlink(outside, directory)
    refused(root, 0, "leads outside")


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", '{"dir": "step-00000006", "step": "6"}'])
def test_unreadable_manifest(saved, text):
    root, _ = saved
    (root / ck.MARKER).write_text(text)
    refused(root, 0, str(root / ck.MARKER))


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


def test_pickled_code_does_not_run(saved, tmp_path):
    """A rank file with an intact checksum whose pickle calls os.system: refused, nothing runs."""
    root, directory = saved
    _Payload.marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"model": _Payload()}, buf, pickle_module=pickle)
    payload = buf.getvalue()
    header = json.dumps({"step": 6, "rank": 0, "world_size": 2, "flags": state_of(0, 6)["flags"],
                         "payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest()}).encode()
    data = ck.MAGIC + struct.pack("<I", len(header)) + header + payload
    (directory / "rank0.pt").write_bytes(data)
    manifest = json.loads((root / ck.MARKER).read_text())
    manifest["files"]["rank0.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (root / ck.MARKER).write_text(json.dumps(manifest))
    refused(root, 0, "weights_only")
    assert not _Payload.marker.exists()


def test_a_plain_torch_file_is_refused(saved):
    root, directory = saved
    torch.save(state_of(0, 6), directory / "rank0.pt")
    refused(root, 0, "not an mpiqsgd checkpoint")


def test_step_directory_without_manifest_still_checks_each_file(saved):
    root, directory = saved
    (root / ck.MARKER).unlink()
    assert load(directory, 1)["progress"]["step"] == 6
    shutil.copy(directory / "rank0.pt", directory / "rank1.pt")
    with pytest.raises(MpiqsgdError, match="rank 0's file"):
        load(directory, 1)


def final_state(run_dir, rank):
    latest = json.loads((run_dir / "checkpoints" / ck.MARKER).read_text())
    return ck.read_state(run_dir / "checkpoints" / latest["dir"] / f"rank{rank}.pt")


# -- run logs --------------------------------------------------------------------------------

def rows(*steps):
    return "".join(json.dumps({"step": s, "v": s / 3}) + "\n" for s in steps)


@pytest.mark.parametrize("tail", ['{"step": 9, "v"', '{"st', "{", '\x00\x00\x00', '{"step": 9, "v": 3.0}'])
def test_a_torn_last_line_is_dropped(tmp_path, tail):
    log = tmp_path / "metrics.jsonl"
    log.write_text(rows(1, 2, 3) + tail)
    ck.truncate_log(log, 3, keep_equal=True)
    assert log.read_text() == rows(1, 2, 3)
    log.write_text(rows(1, 2, 3) + tail)
    ck.truncate_log(log, 10, keep_equal=False)
    complete = tail.endswith("}") and tail.startswith('{"step": 9')
    assert log.read_text() == rows(1, 2, 3) + (tail + "\n" if complete else "")


def test_rows_after_the_checkpoint_are_dropped(tmp_path):
    log = tmp_path / "diagnostics.jsonl"
    log.write_text(rows(0, 5, 10, 15))
    ck.truncate_log(log, 10, keep_equal=False)
    assert log.read_text() == rows(0, 5)
    ck.truncate_log(tmp_path / "absent.jsonl", 3, keep_equal=True)  # nothing to do
    assert not (tmp_path / "absent.jsonl").exists()


def test_a_damaged_line_inside_the_log_is_named(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text(rows(1) + "garbage\n" + rows(2))
    with pytest.raises(MpiqsgdError, match="metrics.jsonl line 2"):
        ck.truncate_log(log, 5, keep_equal=True)


def test_resume_after_a_kill_tore_the_logs_and_refuses_a_damaged_rank_file(tmp_path):
    """End to end (--simulate 2): a torn metrics/diagnostics line resumes bit-identically; a flipped byte refuses."""
    from mpiqsgd.train import driver
    from mpiqsgd.train.config import TrainConfig

    flags = dict(dataset="synthetic", synthetic_size=600, model="tiny", epochs=1, batch_size=32, lr=0.05,
                 progress=False, threads=1, simulate=2, codec="qsgd", bits=4, checkpoint_every=4, eval_every=3,
                 diag_every=2)
    full = driver.train(TrainConfig(**flags, run_dir=str(tmp_path / "full")))
    part = tmp_path / "part"
    driver.train(TrainConfig(**flags, run_dir=str(part), max_steps=5))
    for name in ("metrics.jsonl", "diagnostics.jsonl"):
        with open(part / name, "a") as f:
            f.write('{"step": 6, "train_lo')  # the kill came mid-write
    latest = json.loads((part / "checkpoints" / ck.MARKER).read_text())
    file = part / "checkpoints" / latest["dir"] / "rank1.pt"
    good = file.read_bytes()
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 1
    file.write_bytes(bytes(damaged))
    with pytest.raises(MpiqsgdError, match="rank1.pt is corrupted"):
        driver.train(TrainConfig(**flags, run_dir=str(part), resume=str(part)))
    file.write_bytes(good)
    resumed = driver.train(TrainConfig(**flags, run_dir=str(part), resume=str(part)))
    assert resumed["steps"] == full["steps"] and resumed["total_bytes"] == full["total_bytes"]
    for rank in (0, 1):
        a, b = (final_state(run, rank)["model"] for run in (tmp_path / "full", part))
        assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("metrics.jsonl", "diagnostics.jsonl"):  # the torn rows are gone, every line is whole
        steps = [json.loads(line)["step"] for line in (part / name).read_text().splitlines()]
        assert steps == sorted(set(steps)) and 6 in steps, (name, steps)
