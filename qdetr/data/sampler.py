"""A resumable, rank-aware sampler that also hands each sample its augmentation seed."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableDistributedSampler"]


class ResumableDistributedSampler(Sampler):
    """Epoch-seeded shuffling over ``num_replicas`` ranks, resumable mid-epoch.

    The order of an epoch depends only on ``(seed, epoch)``, like
    :class:`torch.utils.data.DistributedSampler`. Each yielded key is ``(index, sample_seed)``
    where ``sample_seed`` depends only on ``(seed, epoch, position)``; datasets such as
    :class:`qdetr.data.coco.CocoDetectionDataset` run their random augmentation under it, so
    a run resumed at any step sees exactly the samples and augmentations it would have seen.

    Args:
        dataset_size: number of samples.
        num_replicas: world size.
        rank: this process's rank.
        shuffle: shuffle each epoch (training) or keep order (evaluation).
        seed: base seed shared by all ranks.
        drop_last: drop the tail that does not divide evenly over ranks instead of padding
            it with repeated samples. Evaluation must not pad (repeated images would be
            counted twice), so evaluation uses ``pad=False``.
        pad: pad to an equal count per rank by repeating samples (training default).

    Raises:
        ValueError: for a rank outside [0, num_replicas).

    Examples:
        >>> from qdetr.data import ResumableDistributedSampler
        >>> sampler = ResumableDistributedSampler(5, num_replicas=2, rank=0, seed=0)
        >>> sampler.set_epoch(1)
        >>> keys = list(sampler)  # (index, sample_seed) pairs
        >>> len(keys), len(sampler), all(0 <= index < 5 for index, _ in keys)
        (3, 3, True)
        >>> sampler.set_epoch(1, start=1)  # resume after this rank's first sample
        >>> list(sampler) == keys[1:]
        True
        >>> other_rank = ResumableDistributedSampler(5, num_replicas=2, rank=1, seed=0)
        >>> other_rank.set_epoch(1)
        >>> sorted({index for index, _ in keys} | {index for index, _ in other_rank}) == list(range(5))
        True
    """

    def __init__(
        self,
        dataset_size: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        pad: bool = True,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}); got {rank}")
        self.dataset_size = int(dataset_size)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.pad = pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Selects the epoch and skips the first ``start`` samples of this rank (for resuming).

        Args:
            epoch: epoch whose order (and sample seeds) to produce.
            start: samples of this rank already consumed in the epoch.

        Examples:
            >>> from qdetr.data import ResumableDistributedSampler
            >>> sampler = ResumableDistributedSampler(4, shuffle=False)
            >>> sampler.set_epoch(0, start=3)
            >>> [index for index, _ in sampler]
            [3]
        """
        self.epoch = int(epoch)
        self.start = int(start)

    def _indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        if self.drop_last:
            usable = (len(order) // self.num_replicas) * self.num_replicas
            order = order[:usable]
        elif self.pad and len(order) % self.num_replicas:
            extra = self.num_replicas - len(order) % self.num_replicas
            order = order + (order * (extra // max(len(order), 1) + 1))[:extra]
        return order

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._indices()
        positions = range(self.rank, len(order), self.num_replicas)
        for k, position in enumerate(positions):
            if k < self.start:
                continue
            sample_seed = (self.seed * 1_000_003 + self.epoch * 10_007 + position) % (2**31 - 1)
            yield order[position], sample_seed

    def __len__(self) -> int:
        total = len(self._indices())
        return max(0, len(range(self.rank, total, self.num_replicas)) - self.start)
