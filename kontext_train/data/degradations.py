"""Image degradations used to synthesise the low-quality half of a training pair.

All ops take float tensors in [0, 1], shaped (C, H, W) or (B, C, H, W), and return the same shape,
dtype and device. They are plain functions so they compose; ``degrade`` chains them according to a
``DegradationConfig``:

* ``fixed``: blur -> optional down/up-scale -> noise -> JPEG, with the config's values. This is
  the original script's pipeline without its hard-coded x8 down/up-scale (``downscale=1.0`` means
  none). Only the noise is random, so a fixed pipeline is reproducible from its seed and its
  result can be cached.
* ``realesrgan``: Real-ESRGAN / BSRGAN style. Each op's strength is drawn from a range, the op
  order is shuffled with probability ``shuffle_prob`` and a second pass is applied with
  probability ``second_order_prob``. Everything is drawn from one ``torch.Generator`` seeded by
  the ``seed`` argument, so the same seed always gives the same image.

Seeds come from ``degradation_seed`` (sha256 of seed, image key and epoch) so they are the same in
every process, unlike Python's salted ``hash()``.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..setting import NODE_ONLY, WITH_DATA, Setting, check_values

__all__ = [
    "DEGRADATION_SETTINGS",
    "DegradationConfig",
    "add_gaussian_noise",
    "degradation_seed",
    "degrade",
    "describe",
    "gaussian_blur",
    "gaussian_kernel1d",
    "jpeg_roundtrip",
    "resize_down_up",
]

KINDS = ("fixed", "realesrgan")
RESIZE_MODES = ("bilinear", "bicubic", "area", "nearest")


def _with_batch(img: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run ``fn`` on a (B, C, H, W) view of ``img`` and give back ``img``'s own rank."""
    if img.ndim == 3:
        return fn(img.unsqueeze(0)).squeeze(0)
    if img.ndim == 4:
        return fn(img)
    raise ValueError(f"expected an image tensor shaped (C,H,W) or (B,C,H,W), got {tuple(img.shape)}")


def add_gaussian_noise(img: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Add i.i.d. Gaussian noise with standard deviation ``sigma`` (in [0,1] units) and clamp.

    The noise is drawn on the generator's device (so a CPU generator gives the same noise whatever
    device the image lives on), then moved to the image.
    """
    if sigma < 0:
        raise ValueError(f"noise sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return img.clone()
    noise = torch.randn(img.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return (img + sigma * noise.to(device=img.device, dtype=img.dtype)).clamp_(0.0, 1.0)


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian with standard deviation ``sigma``, truncated at 4 sigma.

    4 sigma keeps the truncated tail below 1e-4 of the mass, far under one 8-bit step.
    """
    half = max(1, math.ceil(4.0 * sigma))
    x = torch.arange(-half, half + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(torch.float32)


def gaussian_blur(img: torch.Tensor, radius: float) -> torch.Tensor:
    """Gaussian blur with Pillow's meaning of ``radius``: the kernel's standard deviation.

    Pillow's ``ImageFilter.GaussianBlur(radius)`` approximates this Gaussian with three extended
    box filters of the same variance; here the exact (separable, sum-1) kernel is used. Borders
    are reflect-padded (Pillow repeats the edge pixel instead, so only the outermost few pixels
    differ). Images too small to reflect fall back to edge replication.
    """
    if radius < 0:
        raise ValueError(f"blur radius must be >= 0, got {radius}")
    if radius == 0:
        return img.clone()
    k = gaussian_kernel1d(radius).to(device=img.device, dtype=img.dtype)
    half = k.numel() // 2

    def run(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        pad_mode = "reflect" if half < min(x.shape[-2:]) else "replicate"
        x = F.pad(x, (half, half, half, half), mode=pad_mode)
        # Contiguous weights: an expanded (stride-0) weight sends conv2d down a slow path.
        x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
        x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)
        return x.clamp_(0.0, 1.0)

    return _with_batch(img, run)


def jpeg_roundtrip(img: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode to JPEG with Pillow (default 4:2:0 chroma subsampling) in memory and decode again.

    The image is quantised to 8 bits first, exactly as saving a file would.
    """
    quality = int(quality)
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")

    def one(chw: torch.Tensor) -> torch.Tensor:
        arr = (chw.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0)
        arr_np = arr.cpu().numpy()
        mode = "L" if arr_np.shape[2] == 1 else "RGB"
        pil = Image.fromarray(arr_np[..., 0] if mode == "L" else arr_np, mode=mode)
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as decoded:
            out = np.asarray(decoded.convert(mode), dtype=np.uint8)
        if out.ndim == 2:
            out = out[..., None]
        return torch.from_numpy(out.copy()).permute(2, 0, 1).to(device=chw.device, dtype=chw.dtype) / 255.0

    if img.shape[-3] not in (1, 3):
        raise ValueError(f"JPEG needs 1 or 3 channels, got shape {tuple(img.shape)}")
    return _with_batch(img, lambda x: torch.stack([one(chw) for chw in x]))


def resize_down_up(img: torch.Tensor, factor: float, mode: str = "bicubic") -> torch.Tensor:
    """Downscale by ``factor`` and scale back to the original size with the same ``mode``.

    This removes the frequencies above the reduced Nyquist limit (and, with ``nearest``, aliases
    them), which is what a low-resolution source looks like after upscaling. Downscaling uses
    antialiasing for bilinear/bicubic, as image libraries do.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if factor < 1.0:
        raise ValueError(f"downscale factor must be >= 1 (1 = unchanged), got {factor}")
    if factor == 1.0:
        return img.clone()

    def run(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        small = (max(1, round(h / factor)), max(1, round(w / factor)))
        aa = mode in ("bilinear", "bicubic")
        extra = {"align_corners": False} if aa else {}
        down = F.interpolate(x, size=small, mode=mode, antialias=aa, **extra)
        up = F.interpolate(down, size=(h, w), mode=mode, **extra)
        return up.clamp_(0.0, 1.0)

    return _with_batch(img, run)


@dataclass(frozen=True)
class DegradationConfig:
    """How the degraded half of a pair is made. JSON-able through ``to_dict``/``from_dict``.

    Fixed pipeline: ``noise_sigma`` (std in [0,1] units), ``blur_radius`` (Gaussian std in px),
    ``jpeg_quality`` (1..100, 0 disables JPEG), ``downscale`` (down/up factor, 1.0 = none).
    Real-ESRGAN pipeline: the ``*_range`` fields are inclusive (low, high) ranges sampled
    uniformly; ``resize_modes`` are picked uniformly.
    """

    kind: str = "fixed"
    noise_sigma: float = 0.02
    blur_radius: float = 1.5
    jpeg_quality: int = 85
    downscale: float = 1.0
    blur_radius_range: tuple[float, float] = (0.2, 3.0)
    resize_range: tuple[float, float] = (1.0, 4.0)
    resize_modes: tuple[str, ...] = ("bilinear", "bicubic", "area")
    noise_sigma_range: tuple[float, float] = (0.0, 0.08)
    jpeg_quality_range: tuple[int, int] = (30, 95)
    second_order_prob: float = 0.5
    shuffle_prob: float = 0.3

    def __post_init__(self) -> None:
        # Normalise lists (from JSON) to tuples so equal configs hash and compare equal.
        for name in ("blur_radius_range", "resize_range", "noise_sigma_range", "jpeg_quality_range"):
            value = tuple(getattr(self, name))
            if len(value) != 2 or value[0] > value[1]:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {value}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "resize_modes", tuple(self.resize_modes))
        check_values(
            {
                "degradation": self.kind,
                "noise_sigma": self.noise_sigma,
                "blur_radius": self.blur_radius,
                "jpeg_quality": self.jpeg_quality,
                "downscale": self.downscale,
                "second_order_prob": self.second_order_prob,
                "shuffle_prob": self.shuffle_prob,
            },
            DEGRADATION_SETTINGS,
        )
        # Each end of a random range obeys its fixed setting's range.
        rows = {s.name: s for s in DEGRADATION_SETTINGS}
        for setting, name in (
            ("noise_sigma", "noise_sigma_range"),
            ("blur_radius", "blur_radius_range"),
            ("downscale", "resize_range"),
        ):
            for value in getattr(self, name):
                rows[setting].check(value, label=name)
        if not all(isinstance(q, int) and 1 <= q <= 100 for q in self.jpeg_quality_range):
            raise ValueError(
                f"jpeg_quality_range must be whole numbers in 1..100, got {self.jpeg_quality_range}"
            )
        if not self.resize_modes or any(m not in RESIZE_MODES for m in self.resize_modes):
            raise ValueError(f"resize_modes must be a non-empty subset of {RESIZE_MODES}")

    @property
    def is_random(self) -> bool:
        """True when every call samples new strengths (so results depend on the epoch)."""
        return self.kind == "realesrgan"

    def to_dict(self) -> dict:
        """Plain JSON types only (tuples become lists), stable for cache keys and metadata."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> DegradationConfig:
        """Inverse of ``to_dict``; missing keys take defaults, unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown degradation setting(s): {', '.join(unknown)}")
        return cls(**data)


_D = DegradationConfig  # the rows read the field defaults from the class

# The rows of the settings table for the fields a user sets (``kind`` is the setting
# ``degradation``; the ``*_range`` fields obey the rows of their fixed settings).
DEGRADATION_SETTINGS: tuple[Setting, ...] = (
    Setting("degradation", "choice", _D.kind,
        "fixed: the same blur, down/up-scale, noise and JPEG on every image (the values below); "
        "realesrgan: random strengths and order with a second pass, closer to real photos.",
        "synthetic degradation pipeline", choices=KINDS, commands=WITH_DATA, node_name="kind"),
    Setting("noise_sigma", "float", _D.noise_sigma,
        "Gaussian noise added to the clean image, as a fraction of full brightness (0: none; 0.02 "
        "is light grain).", "Gaussian noise std (fixed pipeline)",
        min=0.0, max=0.5, step=0.005, commands=WITH_DATA),
    Setting("blur_radius", "float", _D.blur_radius,
        "Gaussian blur radius in pixels (0: none; 1.5 looks slightly out of focus).",
        "Gaussian blur radius in px (fixed pipeline)", min=0.0, max=10.0, step=0.1, commands=WITH_DATA),
    Setting("jpeg_quality", "int", _D.jpeg_quality,
        "JPEG quality the degraded image is saved at (0: no JPEG; 85 gives mild artifacts, 30 heavy).",
        "JPEG quality, 0 = off (fixed pipeline)", min=0, max=100, commands=WITH_DATA),
    Setting("downscale", "float", _D.downscale,
        "Shrink by this factor and scale back up, losing fine detail (1: off; 2 halves the resolution).",
        "down/up-scale factor, 1 = none (fixed pipeline)", min=1.0, max=8.0, step=0.25,
        commands=WITH_DATA),
    Setting("second_order_prob", "float", _D.second_order_prob,
        "realesrgan only: chance of a second degradation pass (0.5 typical).",
        min=0.0, max=1.0, step=0.05, surfaces=NODE_ONLY),
    Setting("shuffle_prob", "float", _D.shuffle_prob,
        "realesrgan only: chance that blur, resize, noise and JPEG run in random order (0.3 typical).",
        min=0.0, max=1.0, step=0.05, surfaces=NODE_ONLY),
)  # fmt: skip


def degradation_seed(seed: int, image_key: str, epoch: int) -> int:
    """A 63-bit seed derived from (seed, image key, epoch), identical in every process."""
    digest = hashlib.sha256(f"{int(seed)}\x00{image_key}\x00{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()


def _chance(g: torch.Generator, p: float) -> bool:
    return torch.rand((), generator=g, dtype=torch.float64).item() < p


def _random_pass(img: torch.Tensor, cfg: DegradationConfig, g: torch.Generator) -> torch.Tensor:
    """One Real-ESRGAN style pass: sample every strength first, then apply in (maybe shuffled) order."""
    order = ["blur", "resize", "noise", "jpeg"]
    if _chance(g, cfg.shuffle_prob):
        order = [order[i] for i in torch.randperm(4, generator=g).tolist()]
    radius = _uniform(g, *cfg.blur_radius_range)
    factor = _uniform(g, *cfg.resize_range)
    mode = cfg.resize_modes[int(torch.randint(len(cfg.resize_modes), (), generator=g))]
    sigma = _uniform(g, *cfg.noise_sigma_range)
    lo, hi = cfg.jpeg_quality_range
    quality = int(torch.randint(lo, hi + 1, (), generator=g))
    ops = {
        "blur": lambda x: gaussian_blur(x, radius),
        "resize": lambda x: resize_down_up(x, factor, mode),
        "noise": lambda x: add_gaussian_noise(x, sigma, g),
        "jpeg": lambda x: jpeg_roundtrip(x, quality),
    }
    for name in order:
        img = ops[name](img)
    return img


def degrade(img: torch.Tensor, config: DegradationConfig, seed: int) -> torch.Tensor:
    """Apply ``config`` to ``img`` ((C,H,W) or (B,C,H,W) in [0,1]); deterministic for a seed."""
    g = torch.Generator(device="cpu").manual_seed(int(seed) & ((1 << 63) - 1))
    if config.kind == "fixed":
        out = gaussian_blur(img, config.blur_radius)
        if config.downscale > 1.0:
            out = resize_down_up(out, config.downscale, "bicubic")
        out = add_gaussian_noise(out, config.noise_sigma, g)
        if config.jpeg_quality:
            out = jpeg_roundtrip(out, config.jpeg_quality)
        return out
    out = _random_pass(img, config, g)
    if _chance(g, config.second_order_prob):
        out = _random_pass(out, config, g)
    return out


def describe(config: DegradationConfig) -> str:
    """One line for logs and node output."""
    if config.kind == "fixed":
        parts = [f"blur r={config.blur_radius:g}"]
        if config.downscale > 1.0:
            parts.append(f"down/up x{config.downscale:g}")
        parts.append(f"noise sigma={config.noise_sigma:g}")
        parts.append(f"JPEG q{config.jpeg_quality}" if config.jpeg_quality else "no JPEG")
        return "fixed: " + ", ".join(parts)

    def rng(r: tuple) -> str:
        return f"{r[0]:g}-{r[1]:g}"

    return (
        f"realesrgan: blur r {rng(config.blur_radius_range)}, down/up x{rng(config.resize_range)} "
        f"({'/'.join(config.resize_modes)}), noise sigma {rng(config.noise_sigma_range)}, "
        f"JPEG q{rng(config.jpeg_quality_range)}, shuffle p={config.shuffle_prob:g}, "
        f"second pass p={config.second_order_prob:g}"
    )
