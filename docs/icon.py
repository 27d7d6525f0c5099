"""Draws docs/icon.png, the pack's Registry icon: one picture, its left half degraded (blocky,
blurred, noisy, JPEG-compressed) and its right half clean, split by a before/after slider.

    python docs/icon.py            # rewrites docs/icon.png beside this file

Pillow and numpy only (both are dependencies of the pack); the noise is seeded, so the picture is
the same on every run.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 400
SUPERSAMPLE = 4  # drawn at 4x and reduced, for smooth edges without an anti-aliasing API


def _scene(size: int) -> Image.Image:
    """A sunset over mountains and a lake: large shapes and fine edges, so damage shows."""
    w = h = size
    y = np.linspace(0.0, 1.0, h)[:, None]
    top, horizon = np.array([38, 56, 120]), np.array([250, 170, 110])
    sky = (top * (1 - y) + horizon * y).astype(np.uint8)
    img = Image.fromarray(np.repeat(sky[:, None, :], w, axis=1).reshape(h, w, 3), "RGB")
    d = ImageDraw.Draw(img)
    s = size / 400
    # Everything straddles the middle, so each half shows the same things, damaged or clean.
    d.ellipse((146 * s, 62 * s, 254 * s, 170 * s), fill=(255, 226, 140))  # the sun
    d.polygon([(0, 255 * s), (95 * s, 135 * s), (200 * s, 240 * s), (305 * s, 135 * s),
               (400 * s, 255 * s), (400 * s, 400 * s), (0, 400 * s)], fill=(70, 62, 110))  # fmt: skip
    for peak in (95, 305):  # snow caps
        d.polygon([(peak * s, 135 * s), ((peak + 26) * s, 168 * s), ((peak + 9) * s, 160 * s),
                   (peak * s, 170 * s), ((peak - 9) * s, 160 * s), ((peak - 26) * s, 168 * s)],
                  fill=(236, 236, 248))  # fmt: skip
    d.polygon([(0, 300 * s), (110 * s, 215 * s), (200 * s, 285 * s), (290 * s, 215 * s),
               (400 * s, 300 * s), (400 * s, 400 * s), (0, 400 * s)], fill=(36, 44, 78))  # fmt: skip
    d.rectangle((0, 318 * s, 400 * s, 400 * s), fill=(54, 84, 140))  # the lake
    for i, yy in enumerate(range(int(326 * s), int(396 * s), int(9 * s))):
        half = (60 - 7 * i) * s  # the sun's reflection, narrowing towards the shore
        d.rectangle((200 * s - half, yy, 200 * s + half, yy + 3 * s), fill=(250, 200, 130))
    return img


def _degrade(img: Image.Image, seed: int = 0) -> Image.Image:
    """Blocky, blurred, noisy and JPEG-compressed: the kinds of damage the pack trains against."""
    small = img.resize((img.width // 10, img.height // 10), Image.Resampling.BILINEAR)
    blocky = small.resize(img.size, Image.Resampling.NEAREST).filter(ImageFilter.GaussianBlur(2))
    arr = np.asarray(blocky).astype(np.float32)
    arr += np.random.default_rng(seed).normal(0.0, 14.0, arr.shape)
    noisy = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    noisy.save(buf, format="JPEG", quality=12)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def draw_icon(size: int = SIZE) -> Image.Image:
    big = size * SUPERSAMPLE
    clean = _scene(big)
    out = clean.copy()
    out.paste(_degrade(clean).crop((0, 0, big // 2, big)), (0, 0))
    d = ImageDraw.Draw(out)
    mid, line = big // 2, 5 * SUPERSAMPLE
    d.rectangle((mid - line // 2, 0, mid + line // 2, big), fill=(255, 255, 255))
    # The slider's handle, with arrows both ways.
    r = 34 * SUPERSAMPLE
    cy = big // 2
    d.ellipse(
        (mid - r, cy - r, mid + r, cy + r), fill=(255, 255, 255), outline=(40, 40, 40), width=3 * SUPERSAMPLE
    )
    a, t = 15 * SUPERSAMPLE, 11 * SUPERSAMPLE
    d.polygon(
        [(mid - 6 * SUPERSAMPLE, cy - t), (mid - 6 * SUPERSAMPLE - a, cy), (mid - 6 * SUPERSAMPLE, cy + t)],
        fill=(40, 40, 40),
    )
    d.polygon(
        [(mid + 6 * SUPERSAMPLE, cy - t), (mid + 6 * SUPERSAMPLE + a, cy), (mid + 6 * SUPERSAMPLE, cy + t)],
        fill=(40, 40, 40),
    )
    return out.resize((size, size), Image.Resampling.LANCZOS)


def main(argv: list[str]) -> int:
    target = Path(argv[1]) if len(argv) > 1 else Path(__file__).with_name("icon.png")
    draw_icon().save(target, format="PNG", optimize=True)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
