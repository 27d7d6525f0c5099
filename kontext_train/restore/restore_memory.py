"""The memory guard before restoring: will the restore fit, and if not, which bucket scale would?

A restore runs one region (a whole image in its bucket, or one tile) at a time and without
gradients, so its peak is set by the largest *bucket* it samples in, not by the steps or the
number of images: one sampling call of the model at that bucket's tokens (plus the reference
tokens), the VAE encoding and decoding one bucket-size region, and the images themselves, kept on
the host (inputs, the restored outputs and a tile canvas). The bucket follows ``bucket_scale``:
an image is scaled into its bucket, so a 400x400 image at bucket_scale 4.0 is sampled at 4096x4096
(65,536 tokens); images larger than 1.25x their bucket are tiled at bucket size instead.

``RestoreNeed`` is that estimate for one bucket scale, split by where it lives (host, device);
``memory_refusal`` compares it with the free memory and, when it does not fit, names the largest
smaller bucket scale that does. The numbers come from ``comfyui.restore_memory_check``; nothing
here imports ComfyUI.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .restore_settings import MIN_BUCKET_SCALE

GIB = 1024**3
MARGIN = 0.10  # of the free memory kept spare: other allocations, fragmentation


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


@dataclass(frozen=True)
class RestoreNeed:
    """Estimated peak bytes of a restore at one bucket scale. ``device`` is None when the model
    runs on the host (its part is then in ``host``). ``parts`` says what the totals are made of."""

    bucket_scale: float
    bucket: tuple[int, int]  # the largest bucket sampled in (width, height)
    tokens: int  # image tokens of that bucket (reference tokens not included)
    tiles: int  # regions over all images
    host: int
    device: int | None = None
    parts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class FreeMemory:
    host: int
    device: int | None = None  # None: the model runs on the host
    device_name: str = "GPU"


def fits(need: RestoreNeed, free: FreeMemory, margin: float = MARGIN) -> bool:
    if need.host > free.host * (1 - margin):
        return False
    if need.device is not None and free.device is not None:
        return need.device <= free.device * (1 - margin)
    return True


def _candidate_scales(bucket_scale: float) -> list[float]:
    """Smaller bucket scales to suggest, largest first: 3/4, 1/2, 1/4 ... of the current one,
    rounded to the node's 0.0625 step, down to the minimum."""
    out: list[float] = []
    for factor in (0.75, 0.5, 0.375, 0.25, 0.125, 0.0625, 0.03125, 0.015625):
        scale = max(MIN_BUCKET_SCALE, round(bucket_scale * factor / MIN_BUCKET_SCALE) * MIN_BUCKET_SCALE)
        if scale < bucket_scale and scale not in out:
            out.append(scale)
    return out


def describe(need: RestoreNeed, free: FreeMemory) -> str:
    w, h = need.bucket
    where = [f"{_gib(need.host)} of host memory ({_gib(free.host)} available)"]
    if need.device is not None and free.device is not None:
        where.insert(0, f"{_gib(need.device)} of {free.device_name} memory ({_gib(free.device)} free)")
    parts = ", ".join(f"{k} {_gib(v)}" for k, v in need.parts.items() if v)
    return (
        f"bucket_scale {need.bucket_scale:g} samples in a {w}x{h} bucket ({need.tokens:,} image tokens, "
        f"{need.tiles} region(s)) and needs about {' and '.join(where)}" + (f" [{parts}]" if parts else "")
    )


def memory_refusal(
    bucket_scale: float, estimate: Callable[[float], RestoreNeed], free: FreeMemory
) -> str | None:
    """None when the restore at ``bucket_scale`` fits ``free``; else the message refusing it,
    naming the largest smaller bucket scale that fits (or saying that none does)."""
    need = estimate(bucket_scale)
    if fits(need, free):
        return None
    text = f"Not restoring: it would run out of memory. {describe(need, free)}."
    for scale in _candidate_scales(bucket_scale):
        other = estimate(scale)
        if fits(other, free):
            return (
                text + f" bucket_scale {scale:g} fits ({describe(other, free)}); images larger than 1.25x "
                "their bucket are then restored in tiles of bucket size. Or scale the images down first."
            )
    return (
        text
        + " No smaller bucket_scale fits either: free memory (close other programs) or use a smaller model."
    )


class RestoreMemoryError(ValueError):
    """A restore refused before it starts because it would not fit in memory."""


def check_restore_memory(
    bucket_scale: float, estimate: Callable[[float], RestoreNeed], free: FreeMemory
) -> None:
    """Raises ``RestoreMemoryError`` with ``memory_refusal``'s message when the restore does not fit."""
    message = memory_refusal(bucket_scale, estimate, free)
    if message:
        raise RestoreMemoryError(message)


def image_bytes(sizes: Sequence[tuple[int, int]]) -> int:
    """Host bytes of the images: float32 input, the restored output and a tile canvas (+ weights)."""
    return sum(3 * w * h * 4 * 3 + w * h * 4 for w, h in sizes)


__all__ = [
    "FreeMemory",
    "RestoreMemoryError",
    "RestoreNeed",
    "check_restore_memory",
    "describe",
    "fits",
    "image_bytes",
    "memory_refusal",
]
