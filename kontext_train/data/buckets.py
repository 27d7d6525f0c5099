"""Aspect-ratio buckets at Kontext's preferred resolutions, and a sampler that never mixes sizes.

Kontext was trained on 17 resolutions of about one megapixel (the list ComfyUI's
``FluxKontextImageScale`` uses). Every image is assigned the bucket whose aspect ratio is nearest
(in log space, so 2:1 and 1:2 are equally far from 1:1), resized to cover it and centre-cropped.
A batch is a stack of latents, so all images of a batch must share one bucket.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence

from PIL import Image

from ..setting import Setting, arg_default

__all__ = [
    "BUCKET_SCALE",
    "KONTEXT_RESOLUTIONS",
    "BucketBatchSampler",
    "bucket_histogram",
    "bucket_resolutions",
    "fit_to_bucket",
    "format_histogram",
    "nearest_bucket",
]

Bucket = tuple[int, int]

# (width, height), from tallest to widest.
KONTEXT_RESOLUTIONS: tuple[Bucket, ...] = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)


def bucket_resolutions(scale: float = 1.0) -> list[Bucket]:
    """The preferred resolutions scaled by ``scale`` (e.g. 0.5 for ~512 px training).

    Sides are rounded to multiples of 16 (the VAE's 8x times Flux's 2x2 patches), at least 16;
    duplicates created by rounding are dropped, keeping the tall-to-wide order.
    """
    BUCKET_SCALE.check(scale)
    out: list[Bucket] = []
    for w, h in KONTEXT_RESOLUTIONS:
        b = (max(16, round(w * scale / 16) * 16), max(16, round(h * scale / 16) * 16))
        if b not in out:
            out.append(b)
    return out


# The scale's row of the settings table: training, restoring and evaluating all take it.
BUCKET_SCALE = Setting("bucket_scale", "float", arg_default(bucket_resolutions, "scale"),
    "Size of Kontext's ~1 megapixel resolutions: 1.0 is native, 0.5 gives ~512 px and needs "
    "far less memory; restore at the scale the LoRA was trained at.",
    "scale of Kontext's ~1 MP buckets (0.5: ~512 px; restore/evaluate: the LoRA's)",
    min=0.0625, max=4.0, step=0.0625)  # fmt: skip


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket with the nearest aspect ratio, compared as |log(w/h) - log(bw/bh)|.

    Ties go to the bucket listed first, so the choice never depends on anything but the inputs.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("no buckets to choose from")
    target = math.log(width / height)
    best = min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - target), i))
    return tuple(buckets[best])  # type: ignore[return-value]


def fit_to_bucket(image: Image.Image, bucket: Bucket) -> Image.Image:
    """Resize (LANCZOS) to cover ``bucket`` keeping the aspect ratio, then centre-crop to it."""
    bw, bh = bucket
    w, h = image.size
    if (w, h) == (bw, bh):
        return image.copy()
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    resized = image.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return resized.crop((left, top, left + bw, top + bh))


def _epoch_rng(seed: int, epoch: int) -> random.Random:
    # Seeded from sha256 so every process (and every rank) draws the same permutation.
    digest = hashlib.sha256(f"bucket-sampler\x00{int(seed)}\x00{int(epoch)}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


class BucketBatchSampler:
    """Yields lists of dataset indices; all indices of a batch share one bucket.

    Each epoch the indices of every bucket are shuffled, cut into batches and the batches are
    shuffled, all from (seed, epoch): call ``set_epoch`` before iterating, as with PyTorch's
    ``DistributedSampler``.

    Single process: a bucket's last batch may be smaller than ``batch_size`` (dropped with
    ``drop_last``).

    Distributed (``world_size`` > 1): every rank computes the same list of *global* batches of
    ``batch_size * world_size`` indices, each from one bucket, and rank ``r`` takes slice ``r`` of
    each. So every rank gets the same number of batches, all of ``batch_size``, and the batches at
    one position come from one bucket on every rank. A bucket's last global batch that is short is
    padded by repeating indices of that bucket (cycling through its shuffled order), so some images
    are seen twice in that epoch; with ``drop_last`` it is dropped instead.
    """

    def __init__(
        self,
        buckets_of: Sequence[Bucket],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        groups: dict[Bucket, list[int]] = {}
        for i, b in enumerate(buckets_of):
            groups.setdefault((int(b[0]), int(b[1])), []).append(i)
        # Sorted so the grouping does not depend on which bucket happened to come first.
        self._groups = [groups[b] for b in sorted(groups)]

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle for ``epoch`` (the same on every rank)."""
        self.epoch = int(epoch)

    def _global_batches(self) -> list[list[int]]:
        rng = _epoch_rng(self.seed, self.epoch)
        size = self.batch_size * self.world_size
        batches: list[list[int]] = []
        for members in self._groups:
            order = list(members)
            rng.shuffle(order)
            for start in range(0, len(order), size):
                chunk = order[start : start + size]
                if len(chunk) < size:
                    if self.drop_last:
                        continue
                    if self.world_size > 1:
                        chunk = chunk + [order[i % len(order)] for i in range(size - len(chunk))]
                batches.append(chunk)
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._global_batches():
            if self.world_size == 1:
                yield batch
            else:
                yield batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __len__(self) -> int:
        size = self.batch_size * self.world_size
        if self.drop_last:
            return sum(len(m) // size for m in self._groups)
        return sum(math.ceil(len(m) / size) for m in self._groups)


def bucket_histogram(buckets_of: Sequence[Bucket]) -> dict[str, int]:
    """Images per bucket, keyed "WxH", ordered from tallest to widest."""
    counts = Counter((int(w), int(h)) for w, h in buckets_of)
    return {f"{w}x{h}": counts[(w, h)] for w, h in sorted(counts, key=lambda b: (b[0] / b[1], b))}


def format_histogram(hist: dict[str, int]) -> str:
    """Aligned text lines with a bar each, for logs and node output."""
    if not hist:
        return "(no images)"
    top = max(hist.values())
    width = max(len(k) for k in hist)
    lines = []
    for key, n in hist.items():
        bar = "#" * max(1, round(20 * n / top)) if n else ""
        lines.append(f"{key:>{width}} {n:6d} {bar}")
    return "\n".join(lines)
