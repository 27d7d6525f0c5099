"""Before/after image grids drawn with Pillow: restoration samples side by side, one row per image.

Also the two text helpers the plots share (Pillow's scalable default font and text extents)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

__all__ = ["SAMPLE_COLUMNS", "font", "image_grid", "sample_rows", "text_size"]

BACKGROUND = (255, 255, 255)
TEXT_COLOR = (40, 40, 40)

# Columns of a restoration samples grid. The VAE round trip (the clean image encoded and decoded
# by the same VAE) is the best any restoration through that VAE can look: with the demo's random
# VAE it shows why PSNR stays low whatever the LoRA learns.
SAMPLE_COLUMNS = ("degraded", "restored", "VAE round trip", "clean")


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow >= 10.1 has a scalable built-in font; older builds or ones without FreeType only have
    # the fixed bitmap font, which is still readable.
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _fit(img: Image.Image, cell: int) -> Image.Image:
    """Scale ``img`` to fit a ``cell`` square, keeping its aspect ratio."""
    if img.mode != "RGB":
        # Composite transparency onto the grid background instead of turning it black.
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        img = Image.alpha_composite(base, rgba).convert("RGB")
    w, h = img.size
    scale = cell / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == img.size:
        return img
    # Enlarging with NEAREST shows the real pixels of small crops, which is what a before/after
    # comparison is for; shrinking uses LANCZOS to avoid aliasing.
    return img.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)


def image_grid(
    rows: Sequence[Sequence[Image.Image]],
    labels: Sequence[str] | None = None,
    cell: int = 256,
    gap: int = 4,
) -> Image.Image:
    """Paste images into a grid of ``cell`` x ``cell`` squares, with column labels on top.

    Each image is scaled to fit its cell (aspect kept, centred). Rows may be ragged; missing
    cells stay blank. Size: ``cols * cell + (cols - 1) * gap`` wide, ``rows * cell +
    (rows - 1) * gap`` high plus a label band when ``labels`` is given.
    """
    if cell < 1:
        raise ValueError(f"cell must be positive, got {cell}")
    n_rows = len(rows)
    n_cols = max((len(r) for r in rows), default=0)
    if n_rows == 0 or n_cols == 0:
        raise ValueError("image_grid needs at least one image")
    if labels is not None and len(labels) > n_cols:
        raise ValueError(f"got {len(labels)} labels for {n_cols} columns; pass at most one label per column")

    label_font = font(max(10, min(18, cell // 12)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    band = text_size(probe, "Ag", label_font)[1] + 12 if labels is not None else 0

    width = n_cols * cell + (n_cols - 1) * gap
    height = band + n_rows * cell + (n_rows - 1) * gap
    grid = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(grid)

    for c, text in enumerate(labels or []):
        base = text = str(text)
        # Shorten labels wider than their column rather than letting them overlap.
        while text and text_size(draw, text, label_font)[0] > cell - 4:
            base = base[:-1]
            text = base + "..." if base else ""
        w, _ = text_size(draw, text, label_font)
        draw.text((c * (cell + gap) + (cell - w) / 2, 4), text, fill=TEXT_COLOR, font=label_font)

    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            if im is None:
                continue
            fitted = _fit(im, cell)
            x = c * (cell + gap) + (cell - fitted.width) // 2
            y = band + r * (cell + gap) + (cell - fitted.height) // 2
            grid.paste(fitted, (x, y))
    return grid


def sample_rows(
    triples: Sequence[Sequence[Image.Image]], roundtrips: Sequence[Image.Image | None] = ()
) -> list[list[Image.Image | None]]:
    """Rows in ``SAMPLE_COLUMNS`` order from (degraded, restored, clean) triples and the clean
    images' VAE round trips (a missing one leaves its cell blank)."""
    rows = []
    for i, (degraded, restored, clean) in enumerate(triples):
        rt = roundtrips[i] if i < len(roundtrips) else None
        rows.append([degraded, restored, rt, clean])
    return rows


def before_after(degraded: Image.Image, restored: Image.Image, cell: int = 256) -> Image.Image:
    """One image's degraded and restored versions side by side, labelled: the demo writes it as
    ``before_after.png`` (the templates' thumbnails use it)."""
    return image_grid([[degraded, restored]], ["before (degraded)", "after (restored)"], cell=cell)
