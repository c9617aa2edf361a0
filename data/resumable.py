"""Training data that can resume inside an epoch: a sampler that starts at any batch, and
per-sample augmentation seeds, so the rest of an epoch is the same whoever loads it.

Each sample's augmentation randomness comes from a seed derived from (SEED, epoch, sample
index), set just before its transform, rather than from the state of whichever DataLoader
worker happens to load it. The sampler hands out ``(index, seed)`` pairs and can skip the
batches already trained, without reading them; ``SeededDataset`` seeds Python, NumPy and torch
with the pair's seed and returns the wrapped dataset's sample.
"""
from __future__ import annotations

from typing import Iterator

from torch.utils.data import Dataset, DistributedSampler

from utils import derive_seed, seed_everything


class ResumableSampler(DistributedSampler):
    """A shuffling DistributedSampler whose epoch can start after its first samples.

    ``set_epoch(epoch, start)`` skips this rank's first ``start`` samples of that epoch (the
    batches a step checkpoint already holds); iteration yields ``(index, seed)`` for
    ``SeededDataset``, and ``len`` counts the samples still to come.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.start:]
        return ((index, derive_seed(self.seed, self.epoch, index)) for index in indices)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


class SeededDataset(Dataset):
    """``dataset[index]`` with its randomness seeded by the key's seed: ``self[(index, seed)]``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        seed_everything(seed)
        return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)
