"""Tar archives (``.tar``, ``.tar.gz``, ``.tgz``) read in place, never extracted.

torchvision's ``ImageFolder`` helpers and ``extract_archive`` want a directory on disk, and the
data folder may be read-only; reading members into memory also means a member name such as
``../x`` cannot write anywhere.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Callable

from mpiqsgd.errors import MpiqsgdError

__all__ = ["ARCHIVE_SUFFIXES", "is_archive", "read_archive", "peek_members"]

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def is_archive(path: Path) -> bool:
    """Whether ``path`` is a file named like a tar archive (:data:`ARCHIVE_SUFFIXES`)."""
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def read_archive(path: Path, keep: Callable[[str], bool]) -> dict[str, bytes]:
    """Member name -> bytes of the regular files in a tar archive whose names pass ``keep``.

    Read in place, never extracted: the data folder may be read-only, and a member name
    such as ``../x`` cannot write anywhere.
    """
    try:
        with tarfile.open(path, "r:*") as tar:
            return {m.name: tar.extractfile(m).read() for m in tar if m.isfile() and keep(m.name)}
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise MpiqsgdError(f"cannot read archive {path}: {exc}") from exc


def peek_members(path: Path, max_members: int = 64) -> list[tarfile.TarInfo]:
    """The headers of an archive's first ``max_members`` members, without reading the rest.

    An unreadable archive, or one that breaks off, gives the members read before the fault
    (none at all if it cannot be opened).
    """
    members: list[tarfile.TarInfo] = []
    try:
        with tarfile.open(path, "r:*") as tar:
            while len(members) < max_members:
                member = tar.next()
                if member is None:
                    break
                members.append(member)
    except (tarfile.TarError, OSError, EOFError):
        pass
    return members
