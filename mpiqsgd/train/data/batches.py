"""The tensor side: normalizing images once, sharding an epoch across ranks, and cutting augmented batches.

Images become normalized float tensors once (:func:`to_tensor`); each rank takes its shard of
the epoch's seeded permutation (:func:`shard_indices`), and batches are cut from the tensors
and augmented with batched tensor operations only (:func:`iterate_batches`, :func:`augment`).
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from mpiqsgd.errors import ConfigError

from .cifar10 import CIFAR10_MEAN, CIFAR10_STD

__all__ = ["to_tensor", "augment", "shard_indices", "steps_per_epoch", "iterate_batches"]


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
