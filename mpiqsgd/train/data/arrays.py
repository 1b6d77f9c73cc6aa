"""The in-memory form of a dataset: images and labels as uint8/int64 arrays (:class:`ImageArrays`).

Every loader returns a ``(train, test)`` pair of these; :data:`PathLike` is the path type the loaders accept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union

import numpy as np

from mpiqsgd.errors import ConfigError

__all__ = ["ImageArrays", "PathLike"]

PathLike = Union[str, "os.PathLike[str]"]


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
