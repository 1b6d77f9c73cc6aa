"""Checkpoints: one file per rank, written atomically, published by a marker file.

Layout under ``<run_dir>/checkpoints``::

    step-00001200/rank0.pt ... rank{n-1}.pt    each rank's state (torch.save)
    latest.json                                 {"step": 1200, "dir": "step-00001200", "world_size": n}

Every file is written to a temporary name in the same directory and renamed into
place, and ``latest.json`` is replaced only after every rank has written its file, so
a crash at any moment leaves the previous complete checkpoint in charge. Older step
directories are deleted after the new marker is in place.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import MpiqsgdError

__all__ = ["save_checkpoint", "load_checkpoint", "find_checkpoint", "atomic_write_bytes"]

MARKER = "latest.json"


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_torch_save(obj, path):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def save_checkpoint(root, step, state, transport):
    """Save this rank's ``state`` as the checkpoint of ``step`` (collective over ``transport``)."""
    root = Path(root)
    directory = root / f"step-{step:08d}"
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_torch_save(state, directory / f"rank{transport.rank}.pt")
    transport.barrier()
    if transport.rank == 0:
        marker = {"step": step, "dir": directory.name, "world_size": transport.size}
        atomic_write_bytes(root / MARKER, json.dumps(marker).encode())
        for old in root.glob("step-*"):
            if old.is_dir() and old.name != directory.name:
                shutil.rmtree(old, ignore_errors=True)
    transport.barrier()


def find_checkpoint(path):
    """The checkpoint directory named by a run directory, a checkpoints directory or a step directory."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        marker = root / MARKER
        if marker.is_file():
            try:
                info = json.loads(marker.read_text())
                return root / info["dir"], info
            except (ValueError, KeyError) as exc:
                raise MpiqsgdError(f"unreadable checkpoint marker {marker}: {exc}") from None
    if path.is_dir() and any(path.glob("rank*.pt")):
        return path, {"dir": path.name, "world_size": len(list(path.glob("rank*.pt")))}
    raise MpiqsgdError(f"no checkpoint found at {path} (looked for {path / 'checkpoints' / MARKER}, "
                       f"{path / MARKER} and {path}/rank*.pt)")


def load_checkpoint(path, rank, world_size):
    """This rank's saved state from the checkpoint at ``path`` (see :func:`find_checkpoint`)."""
    directory, info = find_checkpoint(path)
    saved = info.get("world_size")
    if saved is not None and saved != world_size:
        raise MpiqsgdError(f"checkpoint {directory} was written by {saved} ranks; this job has {world_size}")
    file = directory / f"rank{rank}.pt"
    if not file.is_file():
        raise MpiqsgdError(f"checkpoint {directory} has no file for rank {rank}")
    return torch.load(file, map_location="cpu", weights_only=False)
