"""Each process's batches of each epoch, cut from uint8 images held on the device.

Each epoch has a fresh permutation derived from (seed, epoch), identical on every process. Global step s of an
epoch takes images [s·G, (s+1)·G) of the permutation, G = batch × processes, and process r takes the r-th slice of
those. So each image is used at most once per epoch over all processes, and the position in an epoch is one
number, the images already consumed, whatever the process count. The remainder of an epoch that fills no
global batch (96 images at G = 128 on MNIST) is dropped; the next epoch's permutation differs.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor


def derived_seed(seed: int, *keys: int) -> int:
    """A 64-bit seed for the stream that (seed, *keys) names, e.g. (seed, epoch): numpy's SeedSequence hashes
    them, so nearby tuples give unrelated streams, the same on every machine and Python version."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0])


def epoch_permutation(num_images: int, seed: int, epoch: int) -> Tensor:
    """The order of the training set in one epoch: a function of (seed, epoch) alone."""
    generator = torch.Generator().manual_seed(derived_seed(seed, epoch))
    return torch.randperm(num_images, generator=generator)


class ShardedBatches:
    """This process's batches of one epoch, cut from uint8 images held on the device."""

    def __init__(self, images: Tensor, batch_size: int, num_processes: int, process_index: int,
                 seed: int) -> None:
        self.images = images.reshape(images.shape[0], -1)
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes

    def steps_per_epoch(self, images_seen: int = 0) -> int:
        """Global steps left in an epoch of which `images_seen` images are already consumed."""
        return (self.images.shape[0] - images_seen) // self.global_batch

    def indices(self, epoch: int, images_seen: int = 0) -> Iterator[Tensor]:
        """This process's image indices for each remaining step of the epoch."""
        order = epoch_permutation(self.images.shape[0], self.seed, epoch).to(self.images.device)
        first = images_seen + self.process_index * self.batch_size
        for step in range(self.steps_per_epoch(images_seen)):
            start = first + step * self.global_batch
            yield order[start: start + self.batch_size]

    def batches(self, epoch: int, images_seen: int = 0) -> Iterator[Tensor]:
        """This process's uint8 batches (B, C·H·W) for each remaining step of the epoch."""
        for index in self.indices(epoch, images_seen):
            yield self.images[index]
