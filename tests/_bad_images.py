"""Writes small image files for dataset tests: the awkward ones users really have, and broken ones."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def noise_image(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).convert(mode)


def write_good(path: Path, w: int = 96, h: int = 64, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise_image(w, h, seed).save(path)
    return path


def write_corrupt_png(path: Path) -> Path:
    """A PNG whose compressed pixel data is scrambled: the header reads, decoding fails."""
    buf = io.BytesIO()
    noise_image(96, 80).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    start = data.find(b"IDAT") + 20
    for k in range(start, start + 180):
        data[k] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


def write_truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    noise_image(96, 80).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def write_cmyk_jpeg(path: Path) -> Path:
    """Pure red in CMYK (C=0, M=Y=100%, K=0)."""
    Image.new("CMYK", (80, 72), (0, 255, 255, 0)).save(path, "JPEG", quality=95)
    return path


def write_16bit_png(path: Path) -> Path:
    """Left half 16-bit mid grey (32768), right half full white (65535)."""
    arr = np.full((64, 96), 32768, np.uint16)
    arr[:, 48:] = 65535
    Image.fromarray(arr).save(path)  # mode I;16
    return path


def write_rgba_png(path: Path) -> Path:
    """Left half fully transparent red, right half opaque blue."""
    arr = np.zeros((64, 96, 4), np.uint8)
    arr[:, :48] = (255, 0, 0, 0)
    arr[:, 48:] = (0, 0, 255, 255)
    Image.fromarray(arr, "RGBA").save(path)
    return path


def write_palette_png(path: Path) -> Path:
    """Palette image: index 0 transparent (green in the palette), index 1 opaque blue."""
    im = Image.new("P", (96, 64), 0)
    im.putpalette([0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    im.paste(1, (48, 0, 96, 64))
    im.save(path, transparency=0)
    return path


def write_exif_rotated_jpeg(path: Path) -> Path:
    """Stored 120x80 with a red block top-left and EXIF orientation 6 (display rotated 90 CW)."""
    arr = np.zeros((80, 120, 3), np.uint8)
    arr[:20, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(path, "JPEG", quality=95, exif=exif)
    return path


def write_corpus(root: Path) -> dict[str, str | None]:
    """Write every case into ``root``; returns file name -> expected skip category (None = usable)."""
    root.mkdir(parents=True, exist_ok=True)
    write_good(root / "good.png")
    write_corrupt_png(root / "corrupt.png")
    write_truncated_jpeg(root / "truncated.jpg")
    noise_image(1, 1).save(root / "tiny.png")
    write_cmyk_jpeg(root / "cmyk.jpg")
    write_16bit_png(root / "deep.png")
    write_rgba_png(root / "alpha.png")
    write_palette_png(root / "palette.png")
    write_exif_rotated_jpeg(root / "rotated.JPG")
    (root / "fake.png").write_bytes(b"this is not an image at all\n" * 10)
    (root / "notes.txt").write_text("caption")
    write_good(root / ".hidden.png")
    return {
        "good.png": None,
        "corrupt.png": "corrupt",
        "truncated.jpg": "truncated",
        "tiny.png": "too small",
        "cmyk.jpg": None,
        "deep.png": None,
        "alpha.png": None,
        "palette.png": None,
        "rotated.JPG": None,
        "fake.png": "not an image",
    }
