"""What a training run trains on: the dataset, its latent cache (encoding with a ComfyUI VAE) and
the seed of the degradations, and warming that cache before training.

The Cache Latents node builds and warms them in one call (``prepare_latents``); ``kontext-train
train`` builds them with ``latents_from_vae`` and leaves the warming to the run
(``run.TrainingRun.train`` calls ``warm_cache`` when nobody did).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import comfyui
from ..data.dataset import RestorationDataset
from ..data.latent_cache import LatentCache

__all__ = ["CachedLatents", "latents_from_vae", "prepare_latents", "warm_cache"]


@dataclass
class CachedLatents:
    """What a run trains on: the dataset, its latent cache and the seed of the degradations."""

    dataset: RestorationDataset
    cache: LatentCache
    seed: int
    vae_name: str
    warmed: bool = False  # every target and epoch-0 control is in the cache


def latents_from_vae(
    dataset: RestorationDataset,
    vae,
    cache_dir: Path,
    control_mode: str = "pool",
    pool_size: int = 4,
    seed: int = 0,
) -> CachedLatents:
    """A latent cache in ``cache_dir`` that encodes with the ComfyUI ``vae`` (nothing encoded yet)."""
    cache = LatentCache(
        Path(cache_dir),
        vae_id=comfyui.vae_identity(vae),
        encode=lambda images: comfyui.vae_encode(vae, images),
        control_mode=control_mode,
        pool_size=pool_size,
    )
    return CachedLatents(dataset, cache, int(seed), type(vae).__name__)


def warm_cache(
    latents: CachedLatents,
    on_progress: Callable[[int, int], None] | None = None,
    check_cancel: Callable[[], None] | None = None,
) -> str:
    """Encodes what training needs first: every target and the epoch-0 controls (the rest of a
    pool fills during training). Returns a one-line summary with the cache's statistics."""
    dataset, cache = latents.dataset, latents.cache
    samples = dataset.train + dataset.val
    started = time.perf_counter()
    for i, sample in enumerate(samples):
        if check_cancel is not None:
            check_cancel()
        cache.target(dataset, sample)
        if cache.control_mode == "pool" or not dataset.degradation.is_random:
            cache.control(dataset, sample, 0, latents.seed)
        if on_progress is not None:
            on_progress(i + 1, len(samples))
    latents.warmed = True
    seconds = time.perf_counter() - started
    return f"latent cache {cache.cache_dir}: {len(samples)} images in {seconds:.1f} s {cache.stats}"


def prepare_latents(
    dataset: RestorationDataset,
    vae,
    cache_dir: Path,
    control_mode: str = "pool",
    pool_size: int = 4,
    seed: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
    check_cancel: Callable[[], None] | None = None,
) -> tuple[CachedLatents, str]:
    """``latents_from_vae`` and ``warm_cache`` in one call: (latents, summary)."""
    latents = latents_from_vae(dataset, vae, cache_dir, control_mode, pool_size, seed)
    return latents, warm_cache(latents, on_progress, check_cancel)
