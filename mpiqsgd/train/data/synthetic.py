"""Synthetic data: a small learnable image-classification task built without any file (``--dataset synthetic``)."""

from __future__ import annotations

import math

import numpy as np

from mpiqsgd.errors import ConfigError

from .arrays import ImageArrays

__all__ = ["make_synthetic"]


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
