"""Restoring images of any size: bucket geometry, tiles, and the per-image/per-tile loop.

Restoration runs at Kontext's bucket resolutions, the sizes the LoRA was trained at. Images are
handled in one of two ways, chosen by ``plan_restoration``:

* **Single pass.** The image is scaled uniformly to fit *inside* its nearest bucket and the rest
  of the bucket is filled by reflecting the border (never cropped: every input pixel comes back,
  and nothing is stretched). After restoration the padding is cut away and the result is scaled
  back to the input size.
* **Tiles.** When fitting into the bucket would shrink the image below ``TILE_BELOW_SCALE`` of its
  size (a side more than 1.25x its bucket side), scaling down and up again would throw away the
  very detail a restoration should recover. Such images are restored at their own pixel scale in
  overlapping bucket-size tiles (overlap at least ``MIN_TILE_OVERLAP`` of a tile side), which are
  blended with linear ramps across the overlaps. The tile size is the bucket that covers the image
  with the least total tile area.

Images above ``MAX_MEGAPIXELS``, images cut into more than ``MAX_TILES_PER_IMAGE`` tiles, and
requests planning more than ``MAX_REGION_STEPS`` sampling calls (tiles x steps), are refused with a
clear error before any sampling rather than run for hours.

``restore_images`` is the loop the Restore node and ``kontext-train restore/evaluate`` share: it
plans every image, runs each region through a ``RegionRestorer`` (``comfyui.region_restorer`` in
real use), reports progress per sampling step and asks the host whether to stop before each step.

Everything here is plain torch on ``(3, H, W)`` tensors in ``[0, 1]``; ComfyUI is not imported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.buckets import bucket_resolutions, nearest_bucket
from .restore_settings import RestoreSettings

Bucket = tuple[int, int]  # (width, height)

TILE_BELOW_SCALE = 0.8
MIN_TILE_OVERLAP = 1 / 8
MAX_MEGAPIXELS = 64.0
# Most sampling calls (regions x steps) one restore may plan. The megapixel cap alone ignores the
# bucket scale: 8000x8000 at bucket_scale 0.0625 is 20,449 tiny tiles, x 8 steps = 163,592 model
# calls (hours). A 64 MP image at scale 1 (81 tiles) even at the 200-step maximum stays below.
MAX_REGION_STEPS = 20_000
# Most tiles one image may be cut into. Only a bucket_scale far below the image's size gets near it
# (1024x1024 at 0.0625: 375 tiles of 48x80; 4000x3000 at 0.0625: 4,104); every image the megapixel
# cap allows at bucket_scale 1.0 (81 tiles at 64 MP) and a 24 MP photo at 0.5 (~120) stay below.
# Measured with the tiny test model on the 2-core CPU (benchmarks/restore_tiles.py): the pack's own
# work per tile (VAE encode/decode, sampler set-up, blending) is ~0.17 s before any model step, so
# 375 tiles took 63 s at 1 step and 146 s at 8; with FLUX each step adds a full model call per tile.
MAX_TILES_PER_IMAGE = 256


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def resize(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(C, H, W) -> (C, height, width), bicubic with antialiasing, values kept in [0, 1]."""
    if image.shape[-2:] == (height, width):
        return image
    out = F.interpolate(
        image[None].float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False
    )
    return out[0].clamp(0.0, 1.0)


@dataclass(frozen=True)
class Box:
    left: int
    top: int
    width: int
    height: int


def fit_inside(image: torch.Tensor, bucket: Bucket) -> tuple[torch.Tensor, Box]:
    """Scales ``image`` (3, h, w) uniformly to fit inside ``bucket`` and pads it to the bucket.

    Returns the bucket-size image and where the content sits in it. Padding reflects the border
    where it can (the model sees plausible surroundings) and repeats it where the pad is wider
    than the content.
    """
    bw, bh = bucket
    h, w = image.shape[-2:]
    scale = min(bw / w, bh / h)
    cw, ch = min(bw, max(1, round(w * scale))), min(bh, max(1, round(h * scale)))
    content = resize(image, cw, ch)
    left, top = (bw - cw) // 2, (bh - ch) // 2
    pads = (left, bw - cw - left, top, bh - ch - top)
    if any(pads):
        reflect_ok = max(pads[0], pads[1]) < cw and max(pads[2], pads[3]) < ch
        content = F.pad(content[None], pads, mode="reflect" if reflect_ok else "replicate")[0]
    return content, Box(left, top, cw, ch)


def unfit(restored: torch.Tensor, box: Box, width: int, height: int) -> torch.Tensor:
    """The inverse of ``fit_inside``: cut the content out and scale it to (width, height)."""
    content = restored[..., box.top : box.top + box.height, box.left : box.left + box.width]
    return resize(content, width, height)


def axis_tiles(length: int, tile: int, min_overlap: int) -> list[tuple[int, int]]:
    """(start, size) of evenly spaced tiles covering ``length``, neighbours overlapping by at
    least ``min_overlap``. An axis no longer than the tile is one tile of the whole length."""
    if length <= tile:
        return [(0, length)]
    if not 0 <= min_overlap < tile:
        raise ValueError(f"tile overlap must be in [0, {tile}), got {min_overlap}")
    n = math.ceil((length - min_overlap) / (tile - min_overlap))
    n = max(n, 2)
    return [(round(i * (length - tile) / (n - 1)), tile) for i in range(n)]


@dataclass(frozen=True)
class RestorePlan:
    """How one image is restored: one bucket, and the regions (x, y, w, h) run through it."""

    width: int
    height: int
    bucket: Bucket
    tiles: tuple[Box, ...]

    @property
    def tiled(self) -> bool:
        return len(self.tiles) > 1 or (self.tiles[0].width, self.tiles[0].height) != (self.width, self.height)


def check_size(width: int, height: int, max_megapixels: float = MAX_MEGAPIXELS) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    mp = width * height / 1e6
    if mp > max_megapixels:
        raise ValueError(
            f"The image is {width}x{height} ({mp:.1f} MP), above the {max_megapixels:g} MP this node restores "
            "(even in tiles that would take very long). Scale it down or crop it first (e.g. 'Upscale Image By' < 1)."
        )


def check_work(
    plans: Sequence[RestorePlan], steps: int, bucket_scale: float, limit: int = MAX_REGION_STEPS
) -> None:
    """Refuses a restore whose plans add up to more than ``limit`` sampling calls."""
    regions = sum(len(p.tiles) for p in plans)
    if regions * steps > limit:
        raise ValueError(
            f"Restoring {len(plans)} image(s) at bucket_scale {bucket_scale:g} needs {regions:,} tile(s) x {steps} "
            f"step(s) = {regions * steps:,} sampling calls, above the limit of {limit:,}. Raise bucket_scale "
            "(fewer, larger tiles; 1.0 is what FLUX was trained at), lower steps, or scale the image down first."
        )


def check_tiles(plans: Sequence[RestorePlan], bucket_scale: float, limit: int = MAX_TILES_PER_IMAGE) -> None:
    """Refuses an image that would be restored in more than ``limit`` tiles, naming the smallest
    bucket scale at which it would not be."""
    for i, p in enumerate(plans):
        if len(p.tiles) <= limit:
            continue
        suggestion = ""
        scale = bucket_scale
        while scale < 4.0:
            scale = min(4.0, scale + 0.0625)
            n = len(plan_restoration(p.width, p.height, bucket_resolutions(scale)).tiles)
            if n <= limit:
                suggestion = f"bucket_scale {scale:g} makes {n} tile(s); "
                break
        bw, bh = p.bucket
        raise ValueError(
            f"Image {i + 1} ({p.width}x{p.height}) at bucket_scale {bucket_scale:g} would be restored in "
            f"{len(p.tiles):,} tiles of {bw}x{bh}, above the limit of {limit} tiles per image (each tile is a "
            "VAE encode, every sampling step of the model and a decode). "
            f"{suggestion}or scale the image down first."
        )


def plan_restoration(
    width: int,
    height: int,
    buckets: Sequence[Bucket],
    tile_below_scale: float = TILE_BELOW_SCALE,
    min_overlap: float = MIN_TILE_OVERLAP,
    max_megapixels: float = MAX_MEGAPIXELS,
) -> RestorePlan:
    """One pass in the nearest bucket, or tiles when that would shrink the image too much."""
    check_size(width, height, max_megapixels)
    bucket = nearest_bucket(width, height, buckets)
    if min(bucket[0] / width, bucket[1] / height) >= tile_below_scale:
        return RestorePlan(width, height, bucket, (Box(0, 0, width, height),))
    best = None
    for index, (bw, bh) in enumerate(buckets):
        xs = axis_tiles(width, bw, math.ceil(bw * min_overlap))
        ys = axis_tiles(height, bh, math.ceil(bh * min_overlap))
        n = len(xs) * len(ys)
        key = (n * bw * bh, n, index)
        if best is None or key < best[0]:
            best = (key, (bw, bh), xs, ys)
    assert best is not None
    _, tile_bucket, xs, ys = best
    tiles = tuple(Box(x, y, w, h) for y, h in ys for x, w in xs)
    return RestorePlan(width, height, tile_bucket, tiles)


def _ramp(size: int, before: int, after: int) -> torch.Tensor:
    """1 inside, falling linearly to ~0 across the overlaps with the previous/next tile.

    Never exactly 0 (the +0.5 centres the ramp on pixels), so every pixel has some weight.
    """
    idx = torch.arange(size, dtype=torch.float32)
    w = torch.ones(size)
    if before > 0:
        w = torch.minimum(w, (idx + 0.5) / before)
    if after > 0:
        w = torch.minimum(w, (size - idx - 0.5) / after)
    return w


def _overlaps(starts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for i, (s, n) in enumerate(starts):
        before = max(0, starts[i - 1][0] + starts[i - 1][1] - s) if i > 0 else 0
        after = max(0, s + n - starts[i + 1][0]) if i + 1 < len(starts) else 0
        out.append((before, after))
    return out


def restore_image(
    image: torch.Tensor,
    plan: RestorePlan,
    restore_bucket: Callable[[torch.Tensor, int], torch.Tensor],
    on_tile: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Runs ``restore_bucket`` on every region of ``plan`` and assembles a (3, H, W) result.

    ``restore_bucket(pixels, tile_index)`` receives a (1, 3, bh, bw) bucket-size image and returns
    the restored one of the same size. ``on_tile(i, n)`` runs before each tile (progress, cancel).
    """
    c, h, w = image.shape
    if (w, h) != (plan.width, plan.height):
        raise ValueError(f"plan is for {plan.width}x{plan.height} but the image is {w}x{h}")
    bw, bh = plan.bucket

    def run(region: torch.Tensor, index: int) -> torch.Tensor:
        padded, box = fit_inside(region, plan.bucket)
        out = restore_bucket(padded[None], index)
        if tuple(out.shape) != (1, c, bh, bw):
            raise RuntimeError(f"restoration returned shape {tuple(out.shape)}, expected {(1, c, bh, bw)}")
        return unfit(out[0].float(), box, region.shape[-1], region.shape[-2])

    if not plan.tiled:
        if on_tile:
            on_tile(0, 1)
        return run(image, 0)

    xs = sorted({(t.left, t.width) for t in plan.tiles})
    ys = sorted({(t.top, t.height) for t in plan.tiles})
    ramps_x = dict(zip(xs, (_ramp(n, *o) for (_, n), o in zip(xs, _overlaps(xs)))))
    ramps_y = dict(zip(ys, (_ramp(n, *o) for (_, n), o in zip(ys, _overlaps(ys)))))
    canvas = torch.zeros(c, h, w)
    weight = torch.zeros(1, h, w)
    for i, t in enumerate(plan.tiles):
        if on_tile:
            on_tile(i, len(plan.tiles))
        region = image[:, t.top : t.top + t.height, t.left : t.left + t.width]
        out = run(region, i)
        wt = ramps_y[(t.top, t.height)][:, None] * ramps_x[(t.left, t.width)][None, :]
        canvas[:, t.top : t.top + t.height, t.left : t.left + t.width] += out * wt
        weight[:, t.top : t.top + t.height, t.left : t.left + t.width] += wt
    return (canvas / weight).clamp(0.0, 1.0)


def tile_seed(seed: int, image_index: int, tile_index: int) -> int:
    """Seed for one tile: tiles of one image get different noise (a repeated noise pattern would
    show as a grid in ``kontext`` mode), and the result stays a function of the node's seed."""
    return (seed + image_index + 0x9E3779B1 * tile_index) % (2**64)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

StepCallback = Callable[[int], None]
# (pixels (1, 3, bh, bw), seed, on_step) -> restored pixels of the same shape; calls
# ``on_step(i)`` after sampling step i (0-based) so the loop can report progress and cancel.
RegionRestorer = Callable[[torch.Tensor, int, StepCallback], torch.Tensor]


@dataclass(frozen=True)
class RestoreProgress:
    """Where a ``restore_images`` call is; ``done``/``total`` count sampling steps over all regions."""

    done: int
    total: int
    image: int  # 0-based, within this call
    images: int
    tile: int  # 0-based
    tiles: int
    step: int  # steps finished in this region
    steps: int

    @property
    def text(self) -> str:
        tile = f", tile {self.tile + 1}/{self.tiles}" if self.tiles > 1 else ""
        return f"image {self.image + 1}/{self.images}{tile}, step {self.step}/{self.steps}"


def restore_images(
    images: torch.Tensor | Sequence[torch.Tensor],
    settings: RestoreSettings,
    restore_region: RegionRestorer,
    *,
    on_progress: Callable[[RestoreProgress], None] | None = None,
    check_cancel: Callable[[], None] | None = None,
    first_index: int = 0,
    check_memory: Callable[[list[tuple[int, int]], float], None] | None = None,
) -> list[torch.Tensor]:
    """Restores each (3, H, W) image at its own size, in one bucket pass or in tiles.

    Every image is planned before any sampling, so a size that will be refused fails at once.
    Region ``t`` of image ``i`` is sampled with ``tile_seed(settings.seed, first_index + i, t)``:
    the same image restored alone (``first_index`` = its position) or in a batch gets the same
    result. ``check_cancel`` runs before every region and after every step; it stops the loop by
    raising. ``check_memory(sizes, bucket_scale)`` runs once the images are planned, before any
    sampling, and refuses by raising (``comfyui.restore_memory_guard``).
    """
    buckets = bucket_resolutions(settings.bucket_scale)
    plans = [plan_restoration(int(im.shape[-1]), int(im.shape[-2]), buckets) for im in images]
    steps = settings.steps
    check_tiles(plans, settings.bucket_scale)
    check_work(plans, steps, settings.bucket_scale)
    if check_memory is not None:
        check_memory([(p.width, p.height) for p in plans], settings.bucket_scale)
    total = sum(len(p.tiles) for p in plans) * steps
    done = 0
    outputs = []
    for i, (image, plan) in enumerate(zip(images, plans)):
        n_tiles = len(plan.tiles)

        def report(tile: int, step: int, i=i, n_tiles=n_tiles) -> None:
            if on_progress is not None:
                on_progress(
                    RestoreProgress(min(done, total), total, i, len(plans), tile, n_tiles, step, steps)
                )

        def restore_bucket(pixels: torch.Tensor, tile: int, i=i, report=report) -> torch.Tensor:
            nonlocal done
            if check_cancel is not None:
                check_cancel()
            region_start = done

            def on_step(step: int) -> None:
                nonlocal done
                done = region_start + min(step + 1, steps)
                report(tile, min(step + 1, steps))
                if check_cancel is not None:
                    check_cancel()

            out = restore_region(pixels, tile_seed(settings.seed, first_index + i, tile), on_step)
            done = region_start + steps
            report(tile, steps)
            return out

        with torch.no_grad():
            outputs.append(restore_image(image.float(), plan, restore_bucket))
    return outputs
