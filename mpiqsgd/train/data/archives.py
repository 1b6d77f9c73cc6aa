"""Tar archives (``.tar``, ``.tar.gz``, ``.tgz``) read in place, never extracted.

torchvision's ``ImageFolder`` helpers and ``extract_archive`` want a directory on disk, and the
data folder may be read-only; reading members into memory also means a member name such as
``../x`` cannot write anywhere.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Callable, Optional, TypeVar

from mpiqsgd.errors import MpiqsgdError

__all__ = ["ARCHIVE_SUFFIXES", "is_archive", "read_archive", "probe_archive"]

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")

_T = TypeVar("_T")


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


def probe_archive(
    path: Path, classify: Callable[[tarfile.TarInfo], Optional[_T]], max_members: int = 64
) -> Optional[_T]:
    """The first non-None ``classify(member)`` among an archive's first ``max_members`` members.

    Stops reading at the first answer, so a large archive is not decompressed through;
    None if no member answers or the archive cannot be read.
    """
    try:
        with tarfile.open(path, "r:*") as tar:
            for _ in range(max_members):
                member = tar.next()
                if member is None:
                    break
                found = classify(member)
                if found is not None:
                    return found
    except (tarfile.TarError, OSError, EOFError):
        return None
    return None
