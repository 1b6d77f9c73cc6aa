"""Datasets for training: loading, caching, splitting, sharding and batching.

Images are held in memory as uint8 arrays (:class:`ImageArrays`) and turned into
normalized float tensors once (:func:`to_tensor`); batches are then cut from those
tensors with batched tensor operations only (:func:`iterate_batches`, :func:`augment`).

Sources understood for CIFAR-10:

* torchvision's ``cifar-10-batches-py`` pickle folder, or the ``cifar-10-python.tar.gz``
  archive it comes in (:func:`load_cifar10_batches`), read by an unpickler that resolves
  numpy array reconstruction and nothing else, so a crafted batch file cannot run code
  (torchvision's ``CIFAR10`` would ``pickle.load`` it);
* an image folder, as a directory or a ``.tar``/``.tar.gz``/``.tgz`` archive, laid out as
  ``train/<class>/<image>`` and ``test/<class>/<image>`` (:func:`load_image_folder`);
  decoded images are cached as ``.npz`` under the cache directory (``~/.cache/mpiqsgd``,
  or ``$MPIQSGD_CACHE``) so that the JPEGs are decoded only once, by one process at a
  time (``filelock``);
* a download through torchvision (:func:`load_cifar10` with ``download=True``), which
  checks the archive's MD5; torchvision's checksums also tell a damaged batch file.

Archives are read in place, never extracted: torchvision's ``ImageFolder`` helpers and
``extract_archive`` want a directory on disk, and the data folder may be read-only.

:func:`make_synthetic` builds a small learnable task without any file, and
:func:`load_dataset` resolves a dataset name and flags to the arrays.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import pickle
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock

from mpiqsgd.errors import ConfigError, MpiqsgdError
from mpiqsgd.fileio import atomic_write_bytes

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CACHE_ENV_VAR",
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "ImageArrays",
    "DatasetSource",
    "default_cache_dir",
    "default_data_dirs",
    "decode_image",
    "load_cifar10_batches",
    "load_image_folder",
    "load_cifar10",
    "find_dataset",
    "load_dataset",
    "make_synthetic",
    "load_source",
    "split_train_val",
    "subset",
    "to_tensor",
    "augment",
    "shard_indices",
    "steps_per_epoch",
    "iterate_batches",
]

PathLike = Union[str, "os.PathLike[str]"]

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
CACHE_ENV_VAR = "MPIQSGD_CACHE"
DATASETS: tuple[str, ...] = ("cifar10", "synthetic")
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")

_CACHE_FORMAT = 1
# torchvision's CIFAR10 file names (base_folder, filename, train_list, test_list, meta), written out
# so that finding the data does not import torchvision (over a second per process); a test compares them.
_BATCHES_DIR = "cifar-10-batches-py"
_BATCHES_ARCHIVE = "cifar-10-python.tar.gz"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"
_META_BATCH = "batches.meta"
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_SPLITS = ("train", "test")


@dataclass(eq=False)
class ImageArrays:
    """Images and labels held in memory.

    Attributes:
        images: uint8 array of shape ``[N, H, W, C]`` (``[N, 32, 32, 3]`` for CIFAR-10).
        labels: int64 array of shape ``[N]``, each an index into ``classes``.
        classes: Class names; ``classes[i]`` names label ``i``.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __post_init__(self) -> None:
        self.images = np.asarray(self.images)
        self.labels = np.asarray(self.labels)
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ConfigError(
                f"images must be a uint8 array [N, H, W, C], got {self.images.dtype} "
                f"of shape {self.images.shape}"
            )
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise ConfigError(
                f"labels must be a 1-D array of {len(self.images)} entries, "
                f"got shape {self.labels.shape}"
            )
        self.labels = self.labels.astype(np.int64, copy=False)
        self.classes = [str(c) for c in self.classes]
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ConfigError(f"labels must lie in [0, {len(self.classes)})")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def take(self, indices: np.ndarray) -> "ImageArrays":
        """Returns the samples at ``indices`` (a copy), in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return ImageArrays(self.images[indices], self.labels[indices], list(self.classes))


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


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """Returns ``$MPIQSGD_CACHE`` if set, else ``~/.cache/mpiqsgd``."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mpiqsgd"


def _resolve_cache_dir(cache_dir: Optional[PathLike]) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _source_fingerprint(path: Path) -> str:
    """Absolute path, size and mtime of a file, or of every image file under a folder."""
    path = path.resolve()
    parts = [str(path)]
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    st = os.stat(os.path.join(root, name))
                    rel = os.path.relpath(os.path.join(root, name), path)
                    parts.append(f"{rel}:{st.st_size}:{st.st_mtime_ns}")
    else:
        st = path.stat()
        parts.append(f"{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _cache_file(path: Path, cache_dir: Path, limit_per_class: Optional[int]) -> Path:
    key = f"v{_CACHE_FORMAT}\0{_source_fingerprint(path)}\0{limit_per_class}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    stem = path.name
    for suffix in _ARCHIVE_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem) or "data"
    return cache_dir / f"{stem}-{digest}.npz"


def _read_cache(file: Path) -> Optional[tuple[ImageArrays, ImageArrays]]:
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            classes = [str(c) for c in z["classes"]]
            return (
                ImageArrays(z["train_images"], z["train_labels"], classes),
                ImageArrays(z["test_images"], z["test_labels"], classes),
            )
    except Exception as exc:  # corrupt or foreign file: rebuild it
        warnings.warn(f"ignoring unreadable dataset cache {file}: {exc}", stacklevel=3)
        return None


def _write_cache(file: Path, train: ImageArrays, test: ImageArrays) -> None:
    """Writes the arrays atomically, readable as a plainly created file would be; failure only warns."""
    buffer = io.BytesIO()
    np.savez(buffer, train_images=train.images, train_labels=train.labels, test_images=test.images,
             test_labels=test.labels, classes=np.array(train.classes, dtype=str))
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(file, buffer.getbuffer(), plain_mode=True)  # a cache folder may be shared
    except OSError as exc:
        warnings.warn(f"could not write dataset cache {file}: {exc}", stacklevel=3)


# ---------------------------------------------------------------------------- archives


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(_ARCHIVE_SUFFIXES)


def _read_archive(path: Path, keep: Callable[[str], bool]) -> dict[str, bytes]:
    """Member name -> bytes of the regular files in a tar archive whose names pass ``keep``.

    Read in place, never extracted: the data folder may be read-only, and a member name
    such as ``../x`` cannot write anywhere.
    """
    try:
        with tarfile.open(path, "r:*") as tar:
            return {m.name: tar.extractfile(m).read() for m in tar if m.isfile() and keep(m.name)}
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise MpiqsgdError(f"cannot read archive {path}: {exc}") from exc


def _probe_archive(path: Path, max_members: int = 64) -> Optional[str]:
    """Guesses an archive's kind from its first few member names, without reading it all."""
    try:
        with tarfile.open(path, "r:*") as tar:
            for _ in range(max_members):
                member = tar.next()
                if member is None:
                    break
                parts = PurePosixPath(member.name).parts
                if _BATCHES_DIR in parts or (parts and parts[-1] in _TRAIN_BATCHES):
                    return "cifar10-batches"
                if member.isfile() and any(p in _SPLITS for p in parts[:-2]):
                    if parts[-1].lower().endswith(IMAGE_EXTENSIONS):
                        return "image-folder"
    except (tarfile.TarError, OSError, EOFError):
        return None
    return None


# --------------------------------------------------------------------- image folders


def decode_image(data: bytes) -> np.ndarray:
    """Decodes one encoded image (JPEG, PNG, ...) to an RGB uint8 array ``[H, W, 3]``.

    Args:
        data: The encoded file's bytes.

    Returns:
        The pixels.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _image_files(path: Path) -> tuple[list[str], Callable[[str], bytes]]:
    """Relative paths of the image files in a folder or archive, and how to read one."""
    if path.is_dir():
        rel_paths = [Path(root, name).relative_to(path).as_posix()
                     for root, _, files in os.walk(path) for name in files]
        return rel_paths, lambda rel: (path / rel).read_bytes()
    contents = _read_archive(path, lambda name: name.lower().endswith(IMAGE_EXTENSIONS))
    return list(contents), contents.__getitem__


def _layout(rel_paths: Sequence[str], source: Path) -> dict[str, dict[str, list[str]]]:
    """Maps split -> class -> sorted member paths, finding an optional wrapping folder."""
    by_prefix: dict[tuple[str, ...], dict[str, dict[str, list[str]]]] = {}
    for rel in rel_paths:
        parts = PurePosixPath(rel).parts
        if len(parts) < 3 or not parts[-1].lower().endswith(IMAGE_EXTENSIONS):
            continue
        if any(p.startswith(".") or p == "__MACOSX" for p in parts):
            continue
        split, cls = parts[-3], parts[-2]
        if split not in _SPLITS:
            continue
        splits = by_prefix.setdefault(parts[:-3], {})
        splits.setdefault(split, {}).setdefault(cls, []).append(rel)
    candidates = {p: s for p, s in by_prefix.items() if "train" in s}
    if not candidates:
        raise MpiqsgdError(
            f"{source} is not an image folder: no train/<class>/<image> files "
            f"({', '.join(IMAGE_EXTENSIONS)}) found in it"
        )
    if len(candidates) > 1:
        roots = ", ".join("/".join(p) or "." for p in sorted(candidates))
        raise MpiqsgdError(f"{source} holds several image folders ({roots}); point at one of them")
    prefix, splits = next(iter(candidates.items()))
    if "test" not in splits:
        where = "/".join(prefix + ("test",))
        raise MpiqsgdError(f"{source} has train/ but no {where}/<class>/<image> files")
    for cls_map in splits.values():
        for members in cls_map.values():
            members.sort()
    return splits


def _decode_all(members: Sequence[str], read: Callable[[str], bytes], source: Path) -> np.ndarray:
    """The decoded images ``[N, H, W, 3]``, checked to share one size."""
    images: Optional[np.ndarray] = None
    for i, member in enumerate(members):
        try:
            pixels = decode_image(read(member))
        except Exception as exc:
            raise MpiqsgdError(f"cannot decode {member} in {source}: {exc}") from exc
        if images is None:
            images = np.empty((len(members),) + pixels.shape, dtype=np.uint8)
        elif pixels.shape != images.shape[1:]:
            raise MpiqsgdError(
                f"{member} in {source} is {pixels.shape[1]}x{pixels.shape[0]} but earlier "
                f"images are {images.shape[2]}x{images.shape[1]}; all images must share one size"
            )
        images[i] = pixels
    assert images is not None  # _layout found a train image
    return images


def _decode_image_folder(path: Path, limit_per_class: Optional[int]) -> tuple[ImageArrays, ImageArrays]:
    rel_paths, read = _image_files(path)
    splits = _layout(rel_paths, path)
    classes = sorted(splits["train"])
    unknown = sorted(set(splits["test"]) - set(classes))
    if unknown:
        raise MpiqsgdError(f"{path}: test classes {unknown} have no train/ folder")
    chosen = {split: [(member, label) for label, cls in enumerate(classes)
                      for member in splits[split].get(cls, [])[:limit_per_class]] for split in _SPLITS}
    members = chosen["train"] + chosen["test"]
    images = _decode_all([member for member, _ in members], read, path)
    labels = np.array([label for _, label in members], dtype=np.int64)
    n = len(chosen["train"])
    return ImageArrays(images[:n], labels[:n], classes), ImageArrays(images[n:], labels[n:], classes)


def load_image_folder(
    path: PathLike,
    limit_per_class: Optional[int] = None,
    *,
    cache: bool = False,
    cache_dir: Optional[PathLike] = None,
    say: Optional[Callable[[str], None]] = None,
) -> tuple[ImageArrays, ImageArrays]:
    """Loads an image-folder dataset: ``train/<class>/<image>`` and ``test/<class>/<image>``.

    The source is a directory or a ``.tar``/``.tar.gz``/``.tgz`` archive (read in place,
    never extracted), optionally with one folder wrapping ``train/`` and ``test/``.
    Images (.jpg, .jpeg, .png) are decoded to RGB and must all share one size. Labels are
    positions of the class names in sorted order; within a class, images are in path order.

    Args:
        path: The directory or archive.
        limit_per_class: Load only the first this many images of each class and split.
        cache: Reuse, or else write, a ``.npz`` of the decoded arrays in ``cache_dir``,
            keyed by the source's absolute path, size and modification time. Processes
            that miss the cache together decode once: the others wait on a file lock.
        cache_dir: Cache folder; defaults to :func:`default_cache_dir`.
        say: Called with one line before a cache miss is decoded (it takes a while).

    Returns:
        The ``(train, test)`` arrays.

    Raises:
        MpiqsgdError: The source is missing, unreadable or not laid out as above.
        ConfigError: ``limit_per_class`` is not positive.
    """
    path = Path(path).expanduser()
    if limit_per_class is not None and limit_per_class < 1:
        raise ConfigError(f"limit_per_class must be positive, got {limit_per_class}")
    if not (path.is_dir() or path.is_file()):
        raise MpiqsgdError(f"image folder {path} does not exist")
    if not cache:
        return _decode_image_folder(path, limit_per_class)
    file = _cache_file(path, _resolve_cache_dir(cache_dir), limit_per_class)
    return _cached_image_folder(path, limit_per_class, file, say)


def _cached_image_folder(path: Path, limit_per_class: Optional[int], file: Path,
                         say: Optional[Callable[[str], None]]) -> tuple[ImageArrays, ImageArrays]:
    cached = _read_cache(file)
    if cached is not None:
        return cached
    if say is not None:
        say(f"preparing data: decoding the images of {path} into the cache {file} (once; the next runs read it)")
    with contextlib.ExitStack() as stack:
        # A cache folder that cannot hold a lock (read-only, no locking) only costs duplicate decoding.
        with contextlib.suppress(OSError, NotImplementedError):
            file.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(FileLock(f"{file}.lock"))
        cached = _read_cache(file)
        if cached is not None:
            return cached
        train, test = _decode_image_folder(path, limit_per_class)
        _write_cache(file, train, test)
    return train, test


# ------------------------------------------------------------------ CIFAR-10 batches


def _batches_location(root: Path) -> Optional[Path]:
    """The ``cifar-10-batches-py`` folder or ``cifar-10-python.tar.gz`` at or under root."""
    if root.is_dir():
        if (root / _META_BATCH).is_file():
            return root
        if (root / _BATCHES_DIR / _META_BATCH).is_file():
            return root / _BATCHES_DIR
        if (root / _BATCHES_ARCHIVE).is_file():
            return root / _BATCHES_ARCHIVE
    elif _is_archive(root):
        return root
    return None


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 pickles ``bytes`` at protocol 2, and for nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode of {type(text).__name__} to {encoding!r} is not allowed")
    return text.encode("latin1")


# The only globals a CIFAR-10 batch file may name: numpy array reconstruction (under the
# numpy 1 and numpy 2 module names) and the latin-1 encoding of bytes. Dicts, lists,
# strings, bytes and numbers need no global at all.
_BATCH_GLOBALS = {
    **{(module, "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0]
       for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays, and refuses every other global,
    so that a crafted batch file cannot run code."""

    def find_class(self, module: str, name: str):
        found = _BATCH_GLOBALS.get((module, name))
        if found is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return found


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global that a CIFAR-10 batch never holds."""


def _official_md5(name: str) -> Optional[str]:
    """The MD5 of the official CIFAR-10 batch file ``name``, from torchvision's table."""
    from torchvision.datasets import CIFAR10

    files = CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
    return dict(files).get(name)


def _unpickle(data: bytes, name: str, source: Path) -> dict:
    try:
        obj = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise MpiqsgdError(f"refusing {name} in {source}: its pickle calls {exc}, which a CIFAR-10 batch never "
                           "holds (only dicts, lists, strings, numbers and numpy arrays are loaded)") from None
    except Exception as exc:
        damaged = hashlib.md5(data, usedforsecurity=False).hexdigest() != _official_md5(name)
        hint = "; it is not the official file (its MD5 differs): copy or download it again" if damaged else ""
        raise MpiqsgdError(f"cannot read {name} in {source}: {exc}{hint}") from exc
    if not isinstance(obj, dict):
        raise MpiqsgdError(f"{name} in {source} is not a CIFAR-10 batch")
    return obj


def _read_batch_files(location: Path) -> dict[str, bytes]:
    wanted = (*_TRAIN_BATCHES, _TEST_BATCH, _META_BATCH)
    if location.is_dir():
        found = {name: (location / name).read_bytes() for name in wanted if (location / name).is_file()}
    else:
        found = {}
        for member, data in _read_archive(location, lambda m: PurePosixPath(m).name in wanted).items():
            found.setdefault(PurePosixPath(member).name, data)
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise MpiqsgdError(f"{location} lacks the CIFAR-10 batch files {missing}")
    return found


def _batch_arrays(batch: dict, name: str, source: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except KeyError as exc:
        raise MpiqsgdError(f"{name} in {source} lacks the key {exc}") from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise MpiqsgdError(
            f"{name} in {source}: expected data [N, 3072] and N labels, "
            f"got {data.shape} and {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def load_cifar10_batches(root: PathLike) -> tuple[ImageArrays, ImageArrays]:
    """Loads CIFAR-10 in torchvision's ``cifar-10-batches-py`` pickle format.

    The batch files are unpickled by a loader that resolves numpy array reconstruction and
    nothing else (torchvision's own ``CIFAR10`` runs plain ``pickle.load``), so a crafted
    file is refused before it can run code.

    Args:
        root: The ``cifar-10-batches-py`` folder, a folder holding it (or holding
            ``cifar-10-python.tar.gz``), or that ``.tar.gz`` archive itself.

    Returns:
        The ``(train, test)`` arrays: 50,000 and 10,000 images ``[N, 32, 32, 3]`` for the
        real data set.

    Raises:
        MpiqsgdError: No batch files at ``root``, or they are malformed.
    """
    root = Path(root).expanduser()
    location = _batches_location(root)
    if location is None:
        raise MpiqsgdError(
            f"no CIFAR-10 batches at {root}: expected {_BATCHES_DIR}/ (data_batch_1..5, "
            f"test_batch, batches.meta) or {_BATCHES_ARCHIVE}"
        )
    files = _read_batch_files(location)
    meta = _unpickle(files[_META_BATCH], _META_BATCH, location)
    try:
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"]]
    except KeyError as exc:
        raise MpiqsgdError(f"{_META_BATCH} in {location} lacks label_names") from exc
    parts = [
        _batch_arrays(_unpickle(files[n], n, location), n, location) for n in _TRAIN_BATCHES
    ]
    train = ImageArrays(
        np.ascontiguousarray(np.concatenate([p[0] for p in parts])),
        np.concatenate([p[1] for p in parts]),
        classes,
    )
    test_images, test_labels = _batch_arrays(
        _unpickle(files[_TEST_BATCH], _TEST_BATCH, location), _TEST_BATCH, location
    )
    return train, ImageArrays(np.ascontiguousarray(test_images), test_labels, classes)


def _torchvision_cifar10() -> Callable[..., object]:
    from torchvision.datasets import CIFAR10

    return CIFAR10


def _download_cifar10(root: Path) -> None:
    """Fetches and unpacks ``cifar-10-python.tar.gz`` into ``root`` with torchvision, which checks its MD5."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        _torchvision_cifar10()(str(root), train=True, download=True)  # one archive holds both splits
    except Exception as exc:
        raise MpiqsgdError(
            f"could not download CIFAR-10 into {root} ({type(exc).__name__}: {exc}). "
            f"Without network access, put {_BATCHES_ARCHIVE}, {_BATCHES_DIR}/ or an image folder "
            f"(train/<class>/*.jpg, test/<class>/*.jpg) into {root} yourself, or pass --data-dir PATH "
            "to where it is, or run with --dataset synthetic"
        ) from exc


def load_cifar10(root: PathLike, download: bool = False) -> tuple[ImageArrays, ImageArrays]:
    """Loads CIFAR-10 batches from ``root``, downloading them with torchvision if asked.

    Args:
        root: Folder that holds, or is to hold, ``cifar-10-batches-py``.
        download: Fetch the data set with ``torchvision.datasets.CIFAR10`` first (a no-op
            when it is already there and intact).

    Returns:
        The ``(train, test)`` arrays.

    Raises:
        MpiqsgdError: The download failed (e.g. no network) or no data is at ``root``.
    """
    root = Path(root).expanduser()
    if download:
        _download_cifar10(root)
    return load_cifar10_batches(root)


# ------------------------------------------------------------------------ resolution


def default_data_dirs(cache_dir: Optional[PathLike] = None) -> list[Path]:
    """Folders searched when no data folder is given.

    ``./data``, ``../shared/datasets`` (from the working directory, then from the
    project root) and ``<cache dir>/data``, without duplicates.

    Args:
        cache_dir: Cache folder; defaults to :func:`default_cache_dir`.
    """
    project_root = Path(__file__).resolve().parents[2]
    candidates = [
        Path("data"),
        Path("..") / "shared" / "datasets",
        project_root / ".." / "shared" / "datasets",
        _resolve_cache_dir(cache_dir) / "data",
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

    if _is_archive(folder):
        kind = _probe_archive(folder)
        return source(kind, folder) if kind is not None else None
    if not folder.is_dir():
        return None
    batches = _batches_location(folder)
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
    archives = sorted((p for p in folder.iterdir() if _is_archive(p)),
                      key=lambda p: ("cifar" not in p.name.lower(), p.name))
    for archive in archives:
        kind = _probe_archive(archive)
        if kind is not None:
            return source(kind, archive)
    return None


def _not_found(places: Sequence[Path], explicit: bool) -> MpiqsgdError:
    listed = "\n".join(f"  - {os.path.abspath(p)}" for p in places)
    where = "the given --data-dir" if explicit else "the default places"
    return MpiqsgdError(
        f"CIFAR-10 not found in {where}. Looked in:\n{listed}\n"
        f"for {_BATCHES_DIR}/, {_BATCHES_ARCHIVE}, cifar10-jpeg.tar.gz or another image-folder "
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
        target = places[0] if data_dir is not None else _resolve_cache_dir(cache_dir) / "data"
        _download_cifar10(target)
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
    file = _cache_file(source.path, _resolve_cache_dir(cache_dir), None)
    origin["cache"] = os.path.abspath(file)
    return (*_cached_image_folder(source.path, None, file, say), origin)


# ------------------------------------------------------------------------- synthetic


def make_synthetic(
    n_train: int,
    n_test: int,
    seed: int = 0,
    num_classes: int = 10,
    image_size: int = 32,
) -> tuple[ImageArrays, ImageArrays]:
    """Builds a learnable image-classification task without any file.

    Each class has a fixed smooth template (a sum of random low-frequency waves per
    channel); an image is its class template, randomly shifted by up to an eighth of the
    image, scaled by a random contrast, plus a random brightness offset and strong pixel
    noise. A small CNN learns it well above chance within a few hundred steps, without
    reaching perfect accuracy at once.

    Args:
        n_train: Number of training images.
        n_test: Number of test images.
        seed: Same seed, same arrays.
        num_classes: Number of classes (labels are balanced to within one image).
        image_size: Height and width.

    Returns:
        The ``(train, test)`` arrays, uint8 images ``[N, image_size, image_size, 3]``.

    Raises:
        ConfigError: Non-positive sizes or fewer than 2 classes.
    """
    if n_train < 1 or n_test < 0 or num_classes < 2 or image_size < 4:
        raise ConfigError(
            "make_synthetic needs n_train >= 1, n_test >= 0, num_classes >= 2, image_size >= 4"
        )
    tmpl_ss, train_ss, test_ss = np.random.SeedSequence(seed).spawn(3)
    rng = np.random.default_rng(tmpl_ss)
    waves = 6
    freq = rng.integers(0, 3, size=(num_classes, waves, 2))
    phase = rng.uniform(0.0, 2 * math.pi, size=(num_classes, waves, 3))
    amp = rng.normal(size=(num_classes, waves, 3))
    grid = np.arange(image_size) / image_size
    angle = 2 * math.pi * (
        freq[:, :, 0, None, None] * grid[:, None] + freq[:, :, 1, None, None] * grid[None, :]
    )  # [classes, waves, H, W]
    templates = np.einsum(
        "kwhxc,kwc->khxc", np.cos(angle[..., None] + phase[:, :, None, None, :]), amp
    )
    templates -= templates.mean(axis=(1, 2, 3), keepdims=True)
    templates /= templates.std(axis=(1, 2, 3), keepdims=True) + 1e-8
    templates = templates.astype(np.float32)
    max_shift = max(1, image_size // 8)
    classes = [f"class{i}" for i in range(num_classes)]

    def make(n: int, ss: np.random.SeedSequence) -> ImageArrays:
        r = np.random.default_rng(ss)
        labels = r.permutation(np.arange(n, dtype=np.int64) % num_classes)
        images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
        chunk = 2048
        for start in range(0, n, chunk):
            lab = labels[start : start + chunk]
            m = len(lab)
            shifts = r.integers(-max_shift, max_shift + 1, size=(m, 2))
            rows = (np.arange(image_size)[None, :] - shifts[:, :1]) % image_size
            cols = (np.arange(image_size)[None, :] - shifts[:, 1:]) % image_size
            base = templates[lab[:, None, None], rows[:, :, None], cols[:, None, :]]
            contrast = r.uniform(0.5, 1.2, size=(m, 1, 1, 1)).astype(np.float32)
            offset = r.normal(0.0, 20.0, size=(m, 1, 1, 3)).astype(np.float32)
            noise = r.standard_normal((m, image_size, image_size, 3), dtype=np.float32)
            pixels = 128.0 + 16.0 * contrast * base + offset + 60.0 * noise
            images[start : start + m] = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
        return ImageArrays(images, labels, classes)

    return make(n_train, train_ss), make(n_test, test_ss)


# -------------------------------------------------------------------------- splitting


def _stratified_pick(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``n`` samples, spread over classes in proportion to their counts."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (n / len(labels))
    take = np.floor(quota).astype(np.int64)
    short = n - int(take.sum())
    if short:
        order = np.lexsort((np.arange(len(classes)), -(quota - take)))
        take[order[:short]] += 1
    picked = []
    for cls, k in zip(classes, take):
        members = np.flatnonzero(labels == cls)
        picked.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(picked)) if picked else np.empty(0, dtype=np.int64)


def split_train_val(
    train: ImageArrays, val_fraction: float = 0.1, seed: int = 0
) -> tuple[ImageArrays, ImageArrays]:
    """Holds out a stratified, seeded validation set from the training set.

    On CIFAR-10's 50,000 training images the default gives 45,000 / 5,000 (500 per class).
    Both parts keep the original order of the samples they hold.

    Args:
        train: The full training set.
        val_fraction: Share held out, in ``[0, 1)``; the validation size is
            ``round(val_fraction * len(train))``.
        seed: Same seed, same split.

    Returns:
        ``(train, val)``.

    Raises:
        ConfigError: ``val_fraction`` outside ``[0, 1)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(val_fraction * len(train)))
    val_idx = _stratified_pick(train.labels, n_val, np.random.default_rng([seed, 1]))
    mask = np.ones(len(train), dtype=bool)
    mask[val_idx] = False
    return train.take(np.flatnonzero(mask)), train.take(val_idx)


def subset(arrays: ImageArrays, n: int, seed: int = 0) -> ImageArrays:
    """Takes ``n`` samples, stratified by class and seeded (``--train-subset N``).

    Args:
        arrays: Samples to pick from.
        n: How many to keep, ``1 <= n <= len(arrays)``.
        seed: Same seed, same subset.

    Returns:
        The subset, in the original order.

    Raises:
        ConfigError: ``n`` out of range.
    """
    if not 1 <= n <= len(arrays):
        raise ConfigError(f"subset size must be in [1, {len(arrays)}], got {n}")
    return arrays.take(_stratified_pick(arrays.labels, n, np.random.default_rng([seed, 2])))


# ------------------------------------------------------------------------ tensor side


def to_tensor(
    images: Union[np.ndarray, torch.Tensor],
    device: Union[str, torch.device] = "cpu",
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> torch.Tensor:
    """Converts uint8 ``[N, H, W, C]`` images to normalized float32 ``[N, C, H, W]``.

    Args:
        images: uint8 images, channels last.
        device: Device of the result.
        mean: Per-channel mean, on the 0..1 scale.
        std: Per-channel standard deviation, on the 0..1 scale.

    Returns:
        ``(images / 255 - mean) / std``, contiguous, channels first.
    """
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ConfigError(f"to_tensor expects uint8 [N, H, W, C], got {x.dtype} {tuple(x.shape)}")
    x = x.to(device).permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.div_(255.0).sub_(m).div_(s)


def augment(
    batch: torch.Tensor,
    generator: torch.Generator,
    padding: int = 4,
    flip: bool = True,
) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, for a whole batch at once.

    The batch is padded once with zeros (the mean colour, for normalized inputs); each
    sample then gets its own crop offset and a coin flip, gathered with one indexing op.
    Randomness comes only from ``generator``: one ``randint`` of shape ``[N, 2]``, then
    one ``rand`` of shape ``[N]`` when ``flip``.

    Args:
        batch: Images ``[N, C, H, W]``.
        generator: Source of randomness (on the CPU or on ``batch``'s device).
        padding: Pixels of padding on each side; crops are offset by ``0..2*padding``.
        flip: Mirror each image left-right with probability 1/2.

    Returns:
        A new tensor of the same shape, dtype and device.
    """
    if batch.ndim != 4:
        raise ConfigError(f"augment expects [N, C, H, W], got {tuple(batch.shape)}")
    n, c, h, w = batch.shape
    gen_device = generator.device
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=gen_device)
    offsets = offsets.to(batch.device)
    rows = offsets[:, :1] + torch.arange(h, device=batch.device)
    cols = offsets[:, 1:] + torch.arange(w, device=batch.device)
    if flip:
        mirror = torch.rand(n, generator=generator, device=gen_device).to(batch.device) < 0.5
        cols = torch.where(mirror[:, None], cols.flip(1), cols)
    padded = F.pad(batch, (padding, padding, padding, padding)) if padding else batch
    n_idx = torch.arange(n, device=batch.device)[:, None, None, None]
    c_idx = torch.arange(c, device=batch.device)[None, :, None, None]
    return padded[n_idx, c_idx, rows[:, None, :, None], cols[:, None, None, :]]


_augment = augment


def shard_indices(n: int, rank: int, world_size: int, epoch: int, seed: int = 0) -> np.ndarray:
    """This rank's share of an epoch's shuffled sample order.

    Every rank draws the same permutation of ``range(n)`` from ``(seed, epoch)`` and takes
    its contiguous slice of ``n // world_size`` indices; the last ``n % world_size`` of the
    permutation are dropped, so all ranks hold equal, disjoint shards.

    Args:
        n: Dataset size.
        rank: This rank, ``0 <= rank < world_size``.
        world_size: Number of ranks.
        epoch: Epoch number; each epoch has its own permutation.
        seed: Seed shared by all ranks.

    Returns:
        int64 indices, ``n // world_size`` of them.

    Raises:
        ConfigError: Bad rank or world size, or fewer samples than ranks.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if epoch < 0 or seed < 0:
        raise ConfigError(f"epoch and seed must be non-negative, got {epoch} and {seed}")
    per_rank = n // world_size
    if per_rank < 1:
        raise ConfigError(f"{n} samples cannot be shared over {world_size} ranks")
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[rank * per_rank : (rank + 1) * per_rank].astype(np.int64, copy=False)


def steps_per_epoch(n: int, world_size: int, batch_size: int) -> int:
    """Number of batches each rank runs per epoch (incomplete batches are dropped).

    Args:
        n: Dataset size.
        world_size: Number of ranks.
        batch_size: Per-rank batch size.
    """
    if batch_size < 1 or world_size < 1:
        raise ConfigError("batch_size and world_size must be positive")
    return (n // world_size) // batch_size


def iterate_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: Union[np.ndarray, torch.Tensor, Sequence[int]],
    batch_size: int,
    generator: Optional[torch.Generator] = None,
    augment: bool = True,
    start_batch: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields ``(x, y)`` batches of the samples at ``indices``, in that order.

    The last incomplete batch is dropped. Batches are cut with one ``index_select`` each
    and augmented with :func:`augment`. ``start_batch`` resumes mid-epoch: batches before
    it are skipped without touching ``generator``, so a bit-exact resume restores the
    generator's state saved at the checkpoint (``get_state``/``set_state``).

    Args:
        images: Normalized images ``[N, C, H, W]`` (see :func:`to_tensor`).
        labels: int64 labels ``[N]`` on the same device.
        indices: Sample order, e.g. from :func:`shard_indices`.
        batch_size: Samples per batch.
        generator: Randomness for augmentation; required when ``augment``.
        augment: Apply random crop and flip.
        start_batch: Index of the first batch to yield.

    Yields:
        ``(x, y)``: images ``[batch_size, C, H, W]`` and labels ``[batch_size]``.

    Raises:
        ConfigError: Bad batch size or start, or ``augment`` without a generator.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if augment and generator is None:
        raise ConfigError("iterate_batches needs a generator when augment=True")
    if isinstance(indices, torch.Tensor):
        idx = indices.to(device=images.device, dtype=torch.int64)
    else:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64), device=images.device)
    if idx.ndim != 1:
        raise ConfigError("indices must be one-dimensional")
    num_batches = len(idx) // batch_size
    if not 0 <= start_batch <= num_batches:
        raise ConfigError(f"start_batch must be in [0, {num_batches}], got {start_batch}")
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(images)):
        raise ConfigError(f"indices must lie in [0, {len(images)})")
    labels = labels.to(images.device)
    for b in range(start_batch, num_batches):
        sel = idx[b * batch_size : (b + 1) * batch_size]
        x = images.index_select(0, sel)
        if augment:
            assert generator is not None
            x = _augment(x, generator)
        yield x, labels.index_select(0, sel)
