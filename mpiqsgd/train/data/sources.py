"""Finding a dataset from its name and the data flags (:class:`DatasetSource`), and loading what was found.

:func:`find_dataset` looks in ``--data-dir`` or in :func:`default_data_dirs` for CIFAR-10 as
batches (:mod:`.cifar10`) or as an image folder (:mod:`.imagefolder`), recognizing archives by
their first few member names, and downloads it through torchvision if asked;
:func:`load_source` reads the result, and :func:`load_dataset` does both.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Optional, Sequence

from mpiqsgd.errors import ConfigError, MpiqsgdError

from .archives import is_archive, probe_archive
from .arrays import ImageArrays, PathLike
from .cifar10 import (
    BATCHES_ARCHIVE,
    BATCHES_DIR,
    TRAIN_BATCHES,
    batches_location,
    download_cifar10,
    load_cifar10_batches,
)
from .imagefolder import IMAGE_EXTENSIONS, SPLITS, cache_file, cached_image_folder, resolve_cache_dir
from .synthetic import make_synthetic

__all__ = [
    "DATASETS",
    "DatasetSource",
    "default_data_dirs",
    "find_dataset",
    "load_dataset",
    "load_source",
]

DATASETS: tuple[str, ...] = ("cifar10", "synthetic")


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset was found.

    Attributes:
        name: Dataset name, one of :data:`DATASETS`.
        kind: ``"cifar10-batches"`` (pickle folder or its archive), ``"image-folder"``
            (directory or archive) or ``"synthetic"``.
        path: The folder or archive to read; None for ``"synthetic"``.
    """

    name: str
    kind: str
    path: Optional[Path]


def _archive_kind(member: tarfile.TarInfo) -> Optional[str]:
    """``"cifar10-batches"`` or ``"image-folder"`` if an archive member's name tells its archive's kind, else None."""
    parts = PurePosixPath(member.name).parts
    if BATCHES_DIR in parts or (parts and parts[-1] in TRAIN_BATCHES):
        return "cifar10-batches"
    if member.isfile() and any(p in SPLITS for p in parts[:-2]):
        if parts[-1].lower().endswith(IMAGE_EXTENSIONS):
            return "image-folder"
    return None


def default_data_dirs(cache_dir: Optional[PathLike] = None) -> list[Path]:
    """Folders searched when no data folder is given.

    ``./data``, ``../shared/datasets`` (from the working directory, then from the
    project root) and ``<cache dir>/data``, without duplicates.

    Args:
        cache_dir: Cache folder; defaults to :func:`default_cache_dir`.
    """
    project_root = Path(__file__).resolve().parents[3]
    candidates = [
        Path("data"),
        Path("..") / "shared" / "datasets",
        project_root / ".." / "shared" / "datasets",
        resolve_cache_dir(cache_dir) / "data",
    ]
    out: list[Path] = []
    seen: set[str] = set()
    for c in candidates:
        key = os.path.normpath(os.path.abspath(c))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _is_image_folder_dir(path: Path) -> bool:
    if (path / "train").is_dir() and (path / "test").is_dir():
        return True
    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return len(subdirs) == 1 and (subdirs[0] / "train").is_dir() and (subdirs[0] / "test").is_dir()


def _find_cifar10_in(folder: Path) -> Optional[DatasetSource]:
    def source(kind: str, path: Path) -> DatasetSource:
        return DatasetSource("cifar10", kind, Path(os.path.abspath(path)))

    if is_archive(folder):
        kind = probe_archive(folder, _archive_kind)
        return source(kind, folder) if kind is not None else None
    if not folder.is_dir():
        return None
    batches = batches_location(folder)
    if batches is not None:
        return source("cifar10-batches", batches)
    for name in ("cifar10-jpeg.tar.gz", "cifar10-jpeg.tgz", "cifar10-jpeg.tar"):
        if (folder / name).is_file():
            return source("image-folder", folder / name)
    for name in ("cifar10-jpeg", "cifar10", "CIFAR-10-images"):
        if (folder / name).is_dir() and _is_image_folder_dir(folder / name):
            return source("image-folder", folder / name)
    if _is_image_folder_dir(folder):
        return source("image-folder", folder)
    archives = sorted((p for p in folder.iterdir() if is_archive(p)),
                      key=lambda p: ("cifar" not in p.name.lower(), p.name))
    for archive in archives:
        kind = probe_archive(archive, _archive_kind)
        if kind is not None:
            return source(kind, archive)
    return None


def _not_found(places: Sequence[Path], explicit: bool) -> MpiqsgdError:
    listed = "\n".join(f"  - {os.path.abspath(p)}" for p in places)
    where = "the given --data-dir" if explicit else "the default places"
    return MpiqsgdError(
        f"CIFAR-10 not found in {where}. Looked in:\n{listed}\n"
        f"for {BATCHES_DIR}/, {BATCHES_ARCHIVE}, cifar10-jpeg.tar.gz or another image-folder "
        "archive or folder (train/<class>/*.jpg, test/<class>/*.jpg).\n"
        "Fix: pass --data-dir PATH pointing at one of those, or --download to fetch it with "
        "torchvision (needs network), or --dataset synthetic to run without data files."
    )


def _check_name(name: str) -> str:
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choices: {', '.join(DATASETS)}")
    return key


def find_dataset(
    name: str,
    data_dir: Optional[PathLike] = None,
    download: bool = False,
    cache_dir: Optional[PathLike] = None,
) -> DatasetSource:
    """Finds where a dataset is, downloading CIFAR-10 if asked and not found.

    With ``data_dir`` given, only it is searched (it may also be the data folder or
    archive itself); otherwise :func:`default_data_dirs` are searched in order.

    Args:
        name: One of :data:`DATASETS`.
        data_dir: Folder holding the data (the ``--data-dir`` flag).
        download: If nothing is found, download CIFAR-10 with torchvision into
            ``data_dir`` (or ``<cache dir>/data``).
        cache_dir: Cache folder; defaults to :func:`default_cache_dir`.

    Returns:
        The source to load.

    Raises:
        ConfigError: Unknown dataset name.
        MpiqsgdError: Nothing found (the message lists where it looked and which flags
            fix it), or the download failed.
    """
    key = _check_name(name)
    if key == "synthetic":
        return DatasetSource("synthetic", "synthetic", None)
    places = [Path(data_dir).expanduser()] if data_dir is not None else default_data_dirs(cache_dir)
    for place in places:
        found = _find_cifar10_in(place)
        if found is not None:
            return found
    if download:
        target = places[0] if data_dir is not None else resolve_cache_dir(cache_dir) / "data"
        download_cifar10(target)
        found = _find_cifar10_in(target)
        if found is not None:
            return found
        raise MpiqsgdError(f"downloaded CIFAR-10 into {target} but cannot find it there")
    raise _not_found(places, explicit=data_dir is not None)


def load_dataset(
    name: str,
    data_dir: Optional[PathLike] = None,
    download: bool = False,
    cache_dir: Optional[PathLike] = None,
    *,
    synthetic_train: int = 10_000,
    synthetic_test: int = 2_000,
    seed: int = 0,
) -> tuple[ImageArrays, ImageArrays]:
    """Resolves a dataset name and flags to its ``(train, test)`` arrays.

    Image folders are decoded once and cached (see :func:`load_image_folder`).

    Args:
        name: One of :data:`DATASETS`: ``"cifar10"`` or ``"synthetic"``.
        data_dir: Folder holding the data; None searches :func:`default_data_dirs`.
        download: Download CIFAR-10 through torchvision when it is not found.
        cache_dir: Cache folder; defaults to :func:`default_cache_dir`.
        synthetic_train: Training-set size of ``"synthetic"``.
        synthetic_test: Test-set size of ``"synthetic"``.
        seed: Seed of ``"synthetic"``.

    Returns:
        The ``(train, test)`` arrays.

    Raises:
        ConfigError: Unknown dataset name.
        MpiqsgdError: Data not found or unreadable.
    """
    source = find_dataset(name, data_dir, download, cache_dir)
    train, test, _ = load_source(source, cache_dir, synthetic_train=synthetic_train, synthetic_test=synthetic_test,
                                 seed=seed)
    return train, test


def load_source(
    source: DatasetSource,
    cache_dir: Optional[PathLike] = None,
    *,
    synthetic_train: int = 10_000,
    synthetic_test: int = 2_000,
    seed: int = 0,
    say: Optional[Callable[[str], None]] = None,
) -> tuple[ImageArrays, ImageArrays, dict]:
    """Loads a :func:`find_dataset` result, saying what it prepares, and tells what was read.

    Args:
        source: Where the data is.
        cache_dir, synthetic_train, synthetic_test, seed: As in :func:`load_dataset`.
        say: Called with one line before slow preparation (decoding images into the cache).

    Returns:
        ``(train, test, origin)``; ``origin`` is JSON-ready: ``dataset``, ``kind``, ``path``
        (the folder or archive read, or ``"synthetic"``) and ``cache`` (the ``.npz`` of
        decoded images, or None).
    """
    origin = {"dataset": source.name, "kind": source.kind, "path": "synthetic", "cache": None}
    if source.kind == "synthetic":
        return (*make_synthetic(synthetic_train, synthetic_test, seed=seed), origin)
    assert source.path is not None
    origin["path"] = str(source.path)
    if source.kind == "cifar10-batches":
        return (*load_cifar10_batches(source.path), origin)
    file = cache_file(source.path, resolve_cache_dir(cache_dir), None)
    origin["cache"] = os.path.abspath(file)
    return (*cached_image_folder(source.path, None, file, say), origin)
