"""CIFAR-10 in torchvision's ``cifar-10-batches-py`` pickle format: finding, safely unpickling, downloading.

The batch files come as a folder or as the ``cifar-10-python.tar.gz`` archive they ship in (read
in place, see :mod:`.archives`). They are read by an unpickler that resolves numpy array
reconstruction and nothing else, so a crafted batch file cannot run code (torchvision's
``CIFAR10`` would ``pickle.load`` it). A download goes through torchvision, which checks the
archive's MD5; torchvision's checksums also tell a damaged batch file.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path, PurePosixPath
from typing import Callable, Optional

import numpy as np

from mpiqsgd.errors import MpiqsgdError

from .archives import is_archive, read_archive
from .arrays import ImageArrays, PathLike

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "BATCHES_DIR",
    "BATCHES_ARCHIVE",
    "TRAIN_BATCHES",
    "TEST_BATCH",
    "META_BATCH",
    "batches_location",
    "load_cifar10_batches",
    "download_cifar10",
    "load_cifar10",
]

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

# torchvision's CIFAR10 file names (base_folder, filename, train_list, test_list, meta), written out
# so that finding the data does not import torchvision (over a second per process); a test compares them.
BATCHES_DIR = "cifar-10-batches-py"
BATCHES_ARCHIVE = "cifar-10-python.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_BATCH = "batches.meta"


def batches_location(root: Path) -> Optional[Path]:
    """The ``cifar-10-batches-py`` folder or ``cifar-10-python.tar.gz`` at or under root."""
    if root.is_dir():
        if (root / META_BATCH).is_file():
            return root
        if (root / BATCHES_DIR / META_BATCH).is_file():
            return root / BATCHES_DIR
        if (root / BATCHES_ARCHIVE).is_file():
            return root / BATCHES_ARCHIVE
    elif is_archive(root):
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
    wanted = (*TRAIN_BATCHES, TEST_BATCH, META_BATCH)
    if location.is_dir():
        found = {name: (location / name).read_bytes() for name in wanted if (location / name).is_file()}
    else:
        found = {}
        for member, data in read_archive(location, lambda m: PurePosixPath(m).name in wanted).items():
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
    location = batches_location(root)
    if location is None:
        raise MpiqsgdError(
            f"no CIFAR-10 batches at {root}: expected {BATCHES_DIR}/ (data_batch_1..5, "
            f"test_batch, batches.meta) or {BATCHES_ARCHIVE}"
        )
    files = _read_batch_files(location)
    meta = _unpickle(files[META_BATCH], META_BATCH, location)
    try:
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"]]
    except KeyError as exc:
        raise MpiqsgdError(f"{META_BATCH} in {location} lacks label_names") from exc
    parts = [
        _batch_arrays(_unpickle(files[n], n, location), n, location) for n in TRAIN_BATCHES
    ]
    train = ImageArrays(
        np.ascontiguousarray(np.concatenate([p[0] for p in parts])),
        np.concatenate([p[1] for p in parts]),
        classes,
    )
    test_images, test_labels = _batch_arrays(
        _unpickle(files[TEST_BATCH], TEST_BATCH, location), TEST_BATCH, location
    )
    return train, ImageArrays(np.ascontiguousarray(test_images), test_labels, classes)


def _torchvision_cifar10() -> Callable[..., object]:
    from torchvision.datasets import CIFAR10

    return CIFAR10


def download_cifar10(root: Path) -> None:
    """Fetches and unpacks ``cifar-10-python.tar.gz`` into ``root`` with torchvision, which checks its MD5."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        _torchvision_cifar10()(str(root), train=True, download=True)  # one archive holds both splits
    except Exception as exc:
        raise MpiqsgdError(
            f"could not download CIFAR-10 into {root} ({type(exc).__name__}: {exc}). "
            f"Without network access, put {BATCHES_ARCHIVE}, {BATCHES_DIR}/ or an image folder "
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
        download_cifar10(root)
    return load_cifar10_batches(root)
