"""Seeded, stratified selections of a dataset: the validation hold-out and ``--train-subset``.

Both keep each class's share of the samples and the samples' original order.
"""

from __future__ import annotations

import numpy as np

from mpiqsgd.errors import ConfigError

from .arrays import ImageArrays

__all__ = ["split_train_val", "subset"]


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
