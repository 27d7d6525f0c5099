"""A grid of training pairs (degraded | clean) as the trainer will see them, before training.

The pairs come from the dataset exactly as the latent cache encodes them: the clean image fitted to
its bucket and its degraded twin (the real paired file, or the synthetic degradation drawn from
the same seed and epoch, ``RestorationDataset.load_pair``). Showing them first catches a wrong
folder pairing, a degradation far too strong or too weak, or a bad crop, before hours of training.
"""

from __future__ import annotations

from PIL import Image

from ..data.dataset import RestorationDataset
from ..data.images import tensor_to_pil
from .sample_grid import image_grid

PAIR_LABELS = ("degraded", "clean")


def training_pairs(dataset: RestorationDataset, seed: int, count: int, epoch: int = 0) -> list[tuple]:
    """Up to ``count`` (sample, degraded, clean) of the training split, in the dataset's order;
    ``seed`` is the Cache Latents seed (the one the degradations are drawn from)."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if not dataset.train:
        raise ValueError("The dataset has no training images: check hq_folder and the dataset summary.")
    out = []
    for sample in dataset.train[:count]:
        clean, degraded = dataset.load_pair(sample, epoch, seed)
        out.append((sample, degraded, clean))
    return out


def training_pairs_grid(
    dataset: RestorationDataset, seed: int, count: int = 8, cell: int = 256
) -> Image.Image:
    """The pairs of ``training_pairs`` as one image: a row per pair, degraded | clean, labelled."""
    rows = [
        [tensor_to_pil(degraded), tensor_to_pil(clean)]
        for _, degraded, clean in training_pairs(dataset, seed, count)
    ]
    return image_grid(rows, list(PAIR_LABELS), cell=cell)
