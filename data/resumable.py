"""Training data that can resume inside an epoch, for every trainer here: a sampler that starts
at any batch, per-sample augmentation seeds, so the rest of an epoch is the same whoever loads
it, and the loaders built on them.

Each sample's augmentation randomness comes from a seed derived from (SEED, epoch, sample
index), set just before its transform, rather than from the state of whichever DataLoader
worker happens to load it. The sampler hands out ``(index, seed)`` pairs and can skip the
batches already trained, without reading them; ``SeededDataset`` seeds Python, NumPy and torch
with the pair's seed and returns the wrapped dataset's sample (a dataset may also take the pairs
itself and draw from a generator of that seed, as segmentation's does).
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from yacs.config import CfgNode

from config import UserError
from training import ignore_stop_signals
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


def loader_options(config: CfgNode, batch_size: int | None = None, collate_fn: Callable | None = None) -> dict:
    """DataLoader options every loader here shares: DATA.BATCH_SIZE (or ``batch_size``),
    DATA.NUM_WORKERS, pinned memory on CUDA, and workers that ignore the stop signals (a
    terminal's Ctrl-C reaches them too; the main process stops them when it has saved)."""
    return dict(batch_size=batch_size or config.DATA.BATCH_SIZE, num_workers=config.DATA.NUM_WORKERS,
                pin_memory=config.DATA.PIN_MEMORY and torch.cuda.is_available(), persistent_workers=False,
                worker_init_fn=ignore_stop_signals, collate_fn=collate_fn)


def resumable_loader(dataset: Dataset, config: CfgNode, rank: int, world_size: int, collate_fn: Callable | None = None,
                     seeded: bool = True) -> DataLoader:
    """The training loader of every trainer: a ResumableSampler seeded by SEED (the training
    loop calls its ``set_epoch(epoch, start)``), the last partial batch dropped, each sample
    seeded from (SEED, epoch, index) through ``SeededDataset`` (or, with ``seeded=False``, by
    the dataset itself from the ``(index, seed)`` keys)."""
    sampler = ResumableSampler(dataset, world_size, rank, config.SEED)
    if len(sampler) < config.DATA.BATCH_SIZE:
        raise UserError(f"DATA.BATCH_SIZE {config.DATA.BATCH_SIZE} is larger than the {len(sampler)} "
                        f"training images per process ({len(dataset)} images, {world_size} processes)")
    return DataLoader(SeededDataset(dataset) if seeded else dataset, sampler=sampler, drop_last=True,
                      **loader_options(config, collate_fn=collate_fn))
