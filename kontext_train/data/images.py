"""Loading images from user folders robustly, and converting between PIL, CHW and ComfyUI tensors.

User folders contain anything: phone photos with EXIF rotation, CMYK JPEGs from print work,
16-bit PNGs, transparent PNGs, palette GIF-style PNGs, half-downloaded files. ``load_rgb`` turns
each into a fully decoded 8-bit RGB image or raises ``ImageLoadError`` saying which file and why,
so a dataset build can skip it with a useful message instead of crashing mid-training.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "ImageLoadError",
    "comfy_image_to_tensors",
    "is_image_file",
    "load_rgb",
    "pil_to_tensor",
    "scan_image_folder",
    "tensor_to_pil",
    "tensors_to_comfy_image",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})

# Largest image (width x height) decoded for training. Pillow's own bomb limit (~179 MP) lets a
# 164 KB PNG decode to 169 MP (650 MB of memory) for a picture that is then shrunk to a ~1 MP
# bucket anyway; 64 MP matches the restore cap and still takes any camera's full-size photo.
MAX_IMAGE_PIXELS = 64_000_000


class ImageLoadError(ValueError):
    """An image that cannot be used; ``reason`` starts with a short category (e.g. "truncated")."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_file(path: Path) -> bool:
    """True for a non-hidden file name with one of ``IMAGE_EXTENSIONS`` (any case)."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without the usual pitfalls."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow's own convert("RGB") clips 16-bit values at 255 (a white image); scale instead.
        # Mode "I" from a file is 16-bit data in older Pillow versions, so it gets the same scale.
        arr = np.asarray(im).astype(np.float64)
        arr = np.clip(arr, 0, 65535) * (255.0 / 65535.0)
        return Image.fromarray(np.round(arr).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        arr = np.clip(np.asarray(im, dtype=np.float64), 0, 255)
        return Image.fromarray(np.round(arr).astype(np.uint8), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" or "transparency" in im.info):
        # Palette images may carry transparency, so they go through RGBA too; then composite on
        # white (what viewers show) instead of letting transparent pixels keep arbitrary colours.
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def load_rgb(
    path: str | os.PathLike, min_size: int = 64, max_pixels: int | None = MAX_IMAGE_PIXELS
) -> Image.Image:
    """Fully decode ``path`` into an upright 8-bit RGB image.

    Applies the EXIF orientation; composites transparency on white; scales 16-bit data to 8 bits.
    Raises ``ImageLoadError`` with reason "missing file", "not a regular file", "not an image", "truncated (...)",
    "corrupt (...)", "too small (WxH, minimum side N px)" or "too large (WxH ...)"; the size
    limit ``max_pixels`` (None: Pillow's own only) is checked from the header, before decoding.
    """
    path = Path(path)
    if not path.is_file():
        # A FIFO, socket or device under an image's name would block or mislead: say what it is.
        reason = "not a regular file (a pipe, socket or device)" if path.exists() else "missing file"
        raise ImageLoadError(path, reason)
    try:
        with Image.open(path) as im:
            w, h = im.size  # from the header: nothing is decoded yet
            if max_pixels is not None and w * h > max_pixels:
                raise ImageLoadError(
                    path,
                    f"too large ({w}x{h} = {w * h / 1e6:.1f} MP, above the {max_pixels / 1e6:g} MP limit on "
                    "decoded images): scale it down first",
                )
            im.load()  # decode everything now so truncated data fails here, not mid-training
            try:
                upright = ImageOps.exif_transpose(im)
            except Exception:  # a broken EXIF block should not cost a good image
                upright = im
            rgb = _to_rgb(upright)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image (Pillow cannot identify the file)") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(path, f"too large ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e) or type(e).__name__
        category = "truncated" if "truncat" in msg.lower() else "corrupt"
        raise ImageLoadError(path, f"{category} ({msg})") from None
    w, h = rgb.size
    if min(w, h) < min_size:
        raise ImageLoadError(path, f"too small ({w}x{h}, minimum side {min_size} px)")
    return rgb


def scan_image_folder(root: Path, recursive: bool = True) -> list[Path]:
    """Image files under ``root`` by extension, sorted by relative path; hidden files and folders
    (name starting with ".") are ignored. Contents are not checked here (see ``load_rgb``)."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if is_image_file(Path(f)))
        if not recursive:
            break
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> float32 tensor (3, H, W) in [0, 1]."""
    arr = np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def tensor_to_pil(t: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, H, W) tensor in [0, 1] -> 8-bit RGB PIL image (values clamped, rounded)."""
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise ValueError(f"expected a (3,H,W) or (1,H,W) tensor, got {tuple(t.shape)}")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    arr = (t.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def comfy_image_to_tensors(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) -> (B, 3, H, W) float32; alpha dropped, grey expanded."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise ValueError(f"expected a ComfyUI IMAGE shaped (B,H,W,C), got {tuple(images.shape)}")
    c = images.shape[-1]
    if c == 1:
        images = images.expand(-1, -1, -1, 3)
    elif c >= 3:
        images = images[..., :3]
    else:
        raise ValueError(f"unsupported channel count {c} in IMAGE of shape {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float().contiguous()


def tensors_to_comfy_image(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) or (C, H, W) in [0, 1] -> ComfyUI IMAGE (B, H, W, C) float32 on the CPU."""
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4:
        raise ValueError(f"expected (B,C,H,W) or (C,H,W), got {tuple(t.shape)}")
    return t.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().contiguous()


def folder_signature(root: Path) -> str:
    """A cheap fingerprint of an image folder (names, sizes, modification times), so a host can
    tell that images were added, removed or edited without decoding anything."""
    import hashlib

    h = hashlib.sha256()
    root = Path(root)
    if not root.is_dir():
        return f"missing:{root}"
    for path in scan_image_folder(root):
        st = path.stat()
        # surrogateescape: a file name that is not valid UTF-8 (e.g. Latin-1 "caf\xe9.png") is
        # hashed as its raw bytes instead of raising.
        line = f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n"
        h.update(line.encode("utf-8", "surrogateescape"))
    return h.hexdigest()
