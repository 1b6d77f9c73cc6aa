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

This package re-exports the public names of its modules, one job each:

* :mod:`.arrays`: :class:`ImageArrays`, the in-memory form every loader returns;
* :mod:`.archives`: tar archives read in place;
* :mod:`.cifar10`: the batch files, their safe unpickling, the download;
* :mod:`.imagefolder`: image folders decoded once, and the ``.npz`` cache;
* :mod:`.synthetic`: the synthetic task;
* :mod:`.sources`: finding a dataset from its name and flags, and loading it;
* :mod:`.splits`: the stratified validation hold-out and subsets;
* :mod:`.batches`: tensors, sharding across ranks, augmentation and the batch iterator.

To replace a helper in a test, patch it in the module that uses it (e.g.
``mpiqsgd.train.data.imagefolder.decode_image``), not here.
"""

from .arrays import ImageArrays
from .batches import augment, iterate_batches, shard_indices, steps_per_epoch, to_tensor
from .cifar10 import CIFAR10_MEAN, CIFAR10_STD, load_cifar10, load_cifar10_batches
from .imagefolder import CACHE_ENV_VAR, IMAGE_EXTENSIONS, decode_image, default_cache_dir, load_image_folder
from .sources import DATASETS, DatasetSource, default_data_dirs, find_dataset, load_dataset, load_source
from .splits import split_train_val, subset
from .synthetic import make_synthetic

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
