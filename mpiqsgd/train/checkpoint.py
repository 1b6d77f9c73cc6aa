"""Checkpoints: one checksummed file per rank, written atomically, published by a manifest.

Layout under ``<run_dir>/checkpoints``::

    step-00001200/rank0.pt ... rank{n-1}.pt    each rank's state
    latest.json                                 the manifest (below)

A rank file is a fixed prefix, a JSON header and the ``torch.save`` bytes of the state::

    offset  bytes  field
    0       8      magic b"MQCKPT" + format version (2 bytes, little-endian; 1)
    8       4      header length M (uint32, at most 64 KiB)
    12      M      JSON: {"step", "rank", "world_size", "flags", "payload_bytes", "payload_sha256"}
    12+M    P      payload: torch.save(state), loaded with weights_only=True

The manifest ``latest.json`` is ``{"format": 1, "step", "dir", "world_size", "flags",
"files": {"rank0.pt": {"bytes", "sha256"}, ...}}`` with the SHA-256 of each whole rank
file. :func:`load_checkpoint` checks, on the rank that loads, in this order: the manifest
(readable, its ``dir`` a step directory inside the checkpoints directory, the world size),
then the rank file (readable, not empty, magic, header, length, payload checksum), then
that the file is this rank's, of the manifest's step and flags, and that its SHA-256 is the
manifest's. Any failure is an :class:`~mpiqsgd.errors.MpiqsgdError` naming the file and
what differs, before a byte of it is unpickled; the unpickler admits tensors and plain
types only (``weights_only=True``; numpy scalars are stored as Python numbers).

Every file is written to a temporary name in the same directory and renamed into
place, and ``latest.json`` is replaced only after every rank has written its file, so
a crash at any moment leaves the previous complete checkpoint in charge. Older step
directories are deleted after the new manifest is in place.

Run logs (``metrics.jsonl``, ``diagnostics.jsonl``) are appended a line at a time; a kill
can tear the last line, which :func:`truncate_log` drops on resume.
"""

import hashlib
import io
import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import MpiqsgdError
from ..fileio import atomic_write_bytes

__all__ = ["save_checkpoint", "load_checkpoint", "find_checkpoint", "read_state", "truncate_log", "MAGIC",
           "MARKER"]

MARKER = "latest.json"
MAGIC = b"MQCKPT" + struct.pack("<H", 1)
_PREFIX = struct.Struct("<8sI")
_MAX_HEADER_BYTES = 1 << 16
_STEP_DIR = re.compile(r"step-\d{8}")


def _plain(obj):
    """``obj`` with numpy scalars as Python numbers, so that ``weights_only`` loading admits it."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _rank_file_bytes(state, step, rank, world_size):
    buf = io.BytesIO()
    torch.save(_plain(state), buf)
    payload = buf.getvalue()
    header = json.dumps({"step": step, "rank": rank, "world_size": world_size, "flags": state.get("flags"),
                         "payload_bytes": len(payload), "payload_sha256": _sha256(payload)},
                        sort_keys=True).encode()
    return b"".join((_PREFIX.pack(MAGIC, len(header)), header, payload))


def save_checkpoint(root, step, state, transport):
    """Save this rank's ``state`` as the checkpoint of ``step`` (collective over ``transport``).

    ``state["flags"]`` (a JSON-able dict), when present, is recorded in the file and the manifest.
    """
    root = Path(root)
    directory = root / f"step-{step:08d}"
    directory.mkdir(parents=True, exist_ok=True)
    data = _rank_file_bytes(state, step, transport.rank, transport.size)
    atomic_write_bytes(directory / f"rank{transport.rank}.pt", data)
    # Every rank's file is in place once every digest has arrived.
    digests = transport.allgather_bytes(json.dumps({"bytes": len(data), "sha256": _sha256(data)}).encode())
    if transport.rank == 0:
        marker = {"format": 1, "step": step, "dir": directory.name, "world_size": transport.size,
                  "flags": state.get("flags"),
                  "files": {f"rank{r}.pt": json.loads(d) for r, d in enumerate(digests)}}
        atomic_write_bytes(root / MARKER, json.dumps(marker, indent=1).encode())
        for old in root.glob("step-*"):
            if old.is_dir() and old.name != directory.name:
                shutil.rmtree(old, ignore_errors=True)
    transport.barrier()


def _read_marker(root, marker):
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        raise MpiqsgdError(f"unreadable checkpoint manifest {marker}: {exc}") from None
    name = info.get("dir") if isinstance(info, dict) else None
    if not isinstance(name, str) or not _STEP_DIR.fullmatch(name):
        raise MpiqsgdError(f"checkpoint manifest {marker} names {name!r:.80} as its directory; expected "
                           "step-NNNNNNNN inside the checkpoints directory")
    step = info.get("step")
    if type(step) is not int or name != f"step-{step:08d}":
        raise MpiqsgdError(f"checkpoint manifest {marker}: step {step!r:.40} does not match its directory {name}")
    directory = root / name
    if directory.resolve().parent != root.resolve():  # a symlinked step directory leading elsewhere
        raise MpiqsgdError(f"checkpoint directory {directory} leads outside {root}")
    return directory, info


def find_checkpoint(path):
    """The checkpoint directory named by a run directory, a checkpoints directory or a step directory.

    Returns:
        (directory, manifest dict); a bare step directory has a manifest of its own name and file count.
    """
    path = Path(path)
    for root in (path / "checkpoints", path):
        marker = root / MARKER
        if marker.is_file():
            return _read_marker(root, marker)
    if path.is_dir() and any(path.glob("rank*.pt")):
        return path, {"dir": path.name, "world_size": len(list(path.glob("rank*.pt")))}
    raise MpiqsgdError(f"no checkpoint found at {path} (looked for {path / 'checkpoints' / MARKER}, "
                       f"{path / MARKER} and {path}/rank*.pt)")


def _read_bytes(file):
    try:
        return file.read_bytes()
    except OSError as exc:
        raise MpiqsgdError(f"cannot read checkpoint file {file}: {exc.strerror or exc}") from None


def _parse_rank_file(file, data):
    """(header, payload) of a rank file's bytes; MpiqsgdError for anything but an intact file."""
    if not data:
        raise MpiqsgdError(f"checkpoint file {file} is empty (0 bytes): its write was cut short")
    if len(data) < _PREFIX.size or data[:6] != MAGIC[:6]:
        raise MpiqsgdError(f"checkpoint file {file} is not an mpiqsgd checkpoint (or was written by a version "
                           "without checksums, which cannot be verified)")
    magic, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise MpiqsgdError(f"checkpoint file {file} has format version {struct.unpack('<H', magic[6:])[0]}; "
                           f"this build reads {struct.unpack('<H', MAGIC[6:])[0]}")
    if hlen > _MAX_HEADER_BYTES or _PREFIX.size + hlen > len(data):
        raise MpiqsgdError(f"checkpoint file {file} is truncated or corrupted ({len(data)} bytes, "
                           f"header of {hlen})")
    try:
        header = json.loads(data[_PREFIX.size:_PREFIX.size + hlen])
        expected_bytes, expected_sha = header["payload_bytes"], header["payload_sha256"]
    except (ValueError, TypeError, KeyError) as exc:
        raise MpiqsgdError(f"checkpoint file {file} has a corrupted header: {exc}") from None
    payload = data[_PREFIX.size + hlen:]
    if len(payload) != expected_bytes:
        raise MpiqsgdError(f"checkpoint file {file} is truncated or overlong: {len(payload)} bytes of state, "
                           f"its header says {expected_bytes}")
    if _sha256(payload) != expected_sha:
        raise MpiqsgdError(f"checkpoint file {file} is corrupted: its content does not match its checksum")
    return header, payload


def _unpickle(file, payload):
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler raises many types; none may escape as a traceback
        raise MpiqsgdError(f"checkpoint file {file} holds state this build does not load safely "
                           f"(weights_only): {str(exc).splitlines()[-1] if str(exc) else type(exc).__name__}") \
            from None


def read_state(file):
    """The state saved in one rank file, its own checksum verified (no manifest checks)."""
    file = Path(file)
    data = _read_bytes(file)
    return _unpickle(file, _parse_rank_file(file, data)[1])


def _differing_flags(a, b):
    keys = sorted(set(a or {}) | set(b or {}))
    return [f"--{k.replace('_', '-')} {(a or {}).get(k)!r} vs {(b or {}).get(k)!r}" for k in keys
            if (a or {}).get(k) != (b or {}).get(k)]


def load_checkpoint(path, rank, world_size):
    """This rank's saved state from the checkpoint at ``path`` (see :func:`find_checkpoint`), verified.

    Raises:
        MpiqsgdError: no checkpoint, another world size, or a rank file that is missing,
            unreadable, corrupted, truncated, or not the one the manifest records (another
            rank's, step's or run's), each naming the file.
    """
    directory, info = find_checkpoint(path)
    saved = info.get("world_size")
    if saved is not None and saved != world_size:
        raise MpiqsgdError(f"checkpoint {directory} was written by {saved} ranks; this job has {world_size}")
    name = f"rank{rank}.pt"
    file = directory / name
    if not file.is_file():
        raise MpiqsgdError(f"checkpoint {directory} has no file for rank {rank}")
    data = _read_bytes(file)
    header, payload = _parse_rank_file(file, data)
    if header.get("rank") != rank:
        raise MpiqsgdError(f"checkpoint file {file} is rank {header.get('rank')}'s file, not rank {rank}'s")
    if header.get("world_size") != world_size:
        raise MpiqsgdError(f"checkpoint file {file} was written by a job of {header.get('world_size')} ranks; "
                           f"this job has {world_size}")
    if "files" in info:  # a manifest: the file must be the one it recorded
        if header.get("step") != info["step"]:
            raise MpiqsgdError(f"checkpoint file {file} is from step {header.get('step')}, but the manifest "
                               f"{directory.parent / MARKER} is for step {info['step']}")
        differ = _differing_flags(header.get("flags"), info.get("flags"))
        if differ:
            raise MpiqsgdError(f"checkpoint file {file} was written by another run than the manifest's "
                               f"(flags differ: {'; '.join(differ[:4])})")
        recorded = info["files"].get(name) if isinstance(info["files"], dict) else None
        if not isinstance(recorded, dict) or recorded.get("sha256") != _sha256(data):
            raise MpiqsgdError(f"checkpoint file {file} is not the file the manifest {directory.parent / MARKER} "
                               "recorded (its checksum differs): it was replaced after the checkpoint was written")
    return _unpickle(file, payload)


def truncate_log(path, step, keep_equal):
    """Keep the JSON lines of ``path`` whose step is below ``step`` (or equal, with ``keep_equal``).

    A last line torn by a kill (no newline, or not JSON) is dropped; an unreadable line
    before it is an :class:`MpiqsgdError` naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise MpiqsgdError(f"cannot read run log {path}: {exc.strerror or exc}") from None
    lines = text.split("\n")  # a complete file ends with "\n": its last element is ""
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row_step = json.loads(line)["step"]
            if isinstance(row_step, bool) or not isinstance(row_step, (int, float)):
                raise TypeError("step is not a number")
        except (ValueError, TypeError, KeyError, IndexError):
            if number == len(lines):  # the last line, unterminated: torn by a kill
                continue
            raise MpiqsgdError(f"run log {path} line {number} is not a JSON row with a step: {line[:80]!r}") \
                from None
        if number == len(lines):  # parsed, but the kill came before its newline: keep it whole
            line = line.rstrip()
        if row_step < step or (keep_equal and row_step == step):
            kept.append(line)
    atomic_write_bytes(path, "".join(r + "\n" for r in kept).encode())
