"""Tests of mpiqsgd.fileio: atomic writes, their permissions, and no leftovers on failure."""

import os
import stat

import pytest

from mpiqsgd.fileio import atomic_write_bytes, atomic_write_text


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    target.write_bytes(b"old contents, longer than the new")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_private_by_default_plain_on_request(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "private", b"x")
        atomic_write_text(tmp_path / "plain", "é", plain_mode=True)
    finally:
        os.umask(umask)
    assert _mode(tmp_path / "private") == 0o600
    assert _mode(tmp_path / "plain") == 0o644
    assert (tmp_path / "plain").read_text(encoding="utf-8") == "é"


def test_failed_write_keeps_old_file_and_removes_temporary(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_missing_directory_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "no" / "such" / "file", b"x")
