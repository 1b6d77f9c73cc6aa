"""Image-folder datasets: decoding ``train/<class>/<image>`` and ``test/<class>/<image>`` once, and the cache.

The source is a directory or a ``.tar``/``.tar.gz``/``.tgz`` archive (read in place, see
:mod:`.archives`). Decoded images are cached as ``.npz`` under the cache directory
(``~/.cache/mpiqsgd``, or ``$MPIQSGD_CACHE``), keyed by the source's absolute path, size and
modification time, so that the JPEGs are decoded only once, by one process at a time (``filelock``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import warnings
from pathlib import Path, PurePosixPath
from typing import Callable, Optional, Sequence

import numpy as np
from filelock import FileLock

from mpiqsgd.errors import ConfigError, MpiqsgdError
from mpiqsgd.fileio import atomic_write_bytes

from .archives import ARCHIVE_SUFFIXES, read_archive
from .arrays import ImageArrays, PathLike

__all__ = [
    "CACHE_ENV_VAR",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "default_cache_dir",
    "resolve_cache_dir",
    "cache_file",
    "decode_image",
    "load_image_folder",
    "cached_image_folder",
]

CACHE_ENV_VAR = "MPIQSGD_CACHE"
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "test")  # the folders an image folder holds

_CACHE_FORMAT = 1


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """Returns ``$MPIQSGD_CACHE`` if set, else ``~/.cache/mpiqsgd``."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mpiqsgd"


def resolve_cache_dir(cache_dir: Optional[PathLike]) -> Path:
    """``cache_dir`` (``~`` expanded) if given, else :func:`default_cache_dir`."""
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


def cache_file(path: Path, cache_dir: Path, limit_per_class: Optional[int]) -> Path:
    """The ``.npz`` in ``cache_dir`` for the image folder or archive ``path``, named after it and keyed by
    its fingerprint (absolute path, sizes, mtimes), ``limit_per_class`` and the cache format."""
    key = f"v{_CACHE_FORMAT}\0{_source_fingerprint(path)}\0{limit_per_class}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    stem = path.name
    for suffix in ARCHIVE_SUFFIXES:
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
    contents = read_archive(path, lambda name: name.lower().endswith(IMAGE_EXTENSIONS))
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
        if split not in SPLITS:
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
                      for member in splits[split].get(cls, [])[:limit_per_class]] for split in SPLITS}
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
    file = cache_file(path, resolve_cache_dir(cache_dir), limit_per_class)
    return cached_image_folder(path, limit_per_class, file, say)


def cached_image_folder(path: Path, limit_per_class: Optional[int], file: Path,
                        say: Optional[Callable[[str], None]]) -> tuple[ImageArrays, ImageArrays]:
    """Reads the image folder ``path`` from the cache entry ``file`` (see :func:`cache_file`), or else
    decodes it (saying so through ``say``) and writes the entry, under a file lock so that processes
    that miss together decode once."""
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
