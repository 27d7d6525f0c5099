"""Batches of (clean, degraded) latents for training, in bucket order, resumable by position."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .buckets import BucketBatchSampler


@dataclass
class LatentBatch:
    epoch: int
    position: int  # index of this batch within its epoch
    clean: torch.Tensor  # raw VAE latents (B, 16, h, w)
    degraded: torch.Tensor
    keys: list[str]
    first_index: int = 0  # index of this batch's first sample within the global (all-rank) batch


class LatentBatches:
    """Streams latent batches from a dataset through the latent cache.

    Batches never mix bucket sizes; the order depends only on (seed, epoch), so a run can resume
    at (epoch, position) and see the same batches it would have seen.
    """

    def __init__(
        self, dataset, cache, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.dataset = dataset
        self.cache = cache
        self.seed = seed
        self.first_index = rank * batch_size
        self.samples = dataset.train
        if not self.samples:
            raise ValueError("The dataset has no training images.")
        self.sampler = BucketBatchSampler(
            [s.bucket for s in self.samples], batch_size, seed=seed, rank=rank, world_size=world_size
        )

    def batches_per_epoch(self) -> int:
        return len(self.sampler)

    def _load(self, epoch: int, position: int, indices: list[int]) -> LatentBatch:
        picked = [self.samples[i] for i in indices]
        clean = torch.stack([self.cache.target(self.dataset, s) for s in picked])
        degraded = torch.stack([self.cache.control(self.dataset, s, epoch, self.seed) for s in picked])
        return LatentBatch(epoch, position, clean, degraded, [s.key for s in picked], self.first_index)

    def stream(self, epoch: int = 0, position: int = 0) -> Iterator[LatentBatch]:
        """Endless: epoch after epoch, starting at (epoch, position)."""
        while True:
            self.sampler.set_epoch(epoch)
            for k, indices in enumerate(self.sampler):
                if k >= position:
                    yield self._load(epoch, k, list(indices))
            epoch, position = epoch + 1, 0
