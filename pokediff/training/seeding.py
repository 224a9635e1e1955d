"""Determinism: per-step seeds and per-(epoch, item) augmentation seeds, so a resumed run repeats an
uninterrupted one bit for bit."""

from __future__ import annotations

import hashlib

import torch
from accelerate import Accelerator


def seed_step(seed: int, step: int, process_index: int = 0, stream: str = "") -> int:
    """Seed torch's global RNG from (seed, step, process): noise, timesteps and dropout of a step do not
    depend on what ran before it, so a resumed run repeats an uninterrupted one bit for bit."""
    digest = hashlib.sha256(f"{seed}:{stream}:{step}:{process_index}".encode()).digest()
    value = int.from_bytes(digest[:8], "little") % (2**63 - 1)
    torch.manual_seed(value)
    return value


class EpochSeededDataset(torch.utils.data.Dataset):
    """Wraps a map-style dataset so random augmentation of item ``i`` in epoch ``e`` depends on (seed, e, i) only.

    accelerate calls ``set_epoch`` on the dataset; the global RNG is forked, so loading never disturbs the
    training step's RNG (and vice versa), whatever the prefetching or the resume point.
    """

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + int(index))
            return self.dataset[index]

    def __getattr__(self, name):  # captions, type_ids, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def wrap_dataloader_seeded(loader: torch.utils.data.DataLoader, seed: int) -> torch.utils.data.DataLoader:
    """A copy of ``loader`` over ``EpochSeededDataset(loader.dataset, seed)`` (same batching and collation).

    Workers are not persistent: a persistent worker keeps the dataset copy of the first epoch and would never
    see ``set_epoch``, repeating the same augmentation every epoch.
    """
    return torch.utils.data.DataLoader(
        EpochSeededDataset(loader.dataset, seed),
        batch_size=loader.batch_size,
        shuffle=isinstance(loader.sampler, torch.utils.data.RandomSampler),
        drop_last=loader.drop_last,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        persistent_workers=False,
        pin_memory=loader.pin_memory,
    )


def epoch_batches(accelerator: Accelerator, loader, epoch: int, skip: int = 0):
    """The batches of ``epoch`` (shuffled by (seed, epoch)), minus the first ``skip`` already consumed."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    return accelerator.skip_first_batches(loader, skip) if skip else loader
