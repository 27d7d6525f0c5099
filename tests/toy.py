"""A latent-space toy restoration task the tiny Flux model can learn on the CPU in seconds.

The "degradation" is per-token (``0.5 * z + 0.3``): a tiny one-block model can express its
inverse, unlike a spatial blur (measured: not learned in 300 steps). Real degradations are for
the real model; this toy checks that the method and the plumbing learn what they should.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kontext_train.data.batches import LatentBatch

# Training settings the toy is learned with (rank-8 LoRA on every Linear layer: a tiny random
# model needs its input/output projections to express the map; constant learning rate).
TOY_TRAIN_SETTINGS = dict(
    learning_rate=2e-3,
    rank=8,
    batch_size=4,
    lr_schedule="constant_with_warmup",
    warmup_steps=0,
    checkpoint_every=0,
    validate_every_epochs=0,
    lora_targets="all_linear",
    gradient_checkpointing=False,
)


def degrade_latent(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * z + 0.3


def degrade_latent_lossy(z: torch.Tensor) -> torch.Tensor:
    """A degradation that destroys information: the per-token map on channels 0-7, and channels
    8-15 quantised to even numbers (a value keeps only which bin of width 2 the clean one fell
    in), so no model can restore those exactly; the best it can do is the mean within each bin."""
    out = 0.5 * z + 0.3
    out[:, 8:] = 2.0 * torch.round(z[:, 8:] / 2.0)
    return out


# name -> degradation, for comparisons over toys
TOY_DEGRADATIONS = {"per_token": degrade_latent, "lossy": degrade_latent_lossy}


def toy_latents(n: int, seed: int, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, size, size, generator=g)


class ToyBatches:
    """Same interface as ``LatentBatches``: deterministic order per (seed, epoch)."""

    def __init__(self, clean: torch.Tensor, batch_size: int, seed: int = 0, degrade=degrade_latent) -> None:
        self.clean = clean
        self.batch_size = batch_size
        self.seed = seed
        self.degrade = degrade

    def batches_per_epoch(self) -> int:
        return (len(self.clean) + self.batch_size - 1) // self.batch_size

    def stream(self, epoch: int = 0, position: int = 0) -> Iterator[LatentBatch]:
        while True:
            order = torch.randperm(
                len(self.clean), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch)
            )
            for k in range(self.batches_per_epoch()):
                if k < position:
                    continue
                idx = order[k * self.batch_size : (k + 1) * self.batch_size]
                clean = self.clean[idx]
                yield LatentBatch(epoch, k, clean, self.degrade(clean), [str(int(i)) for i in idx])
            epoch, position = epoch + 1, 0
