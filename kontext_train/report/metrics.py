"""Full-reference image-quality metrics for judging a restoration LoRA.

Everything works on float tensors shaped ``(B, C, H, W)`` with values in ``[0, 1]`` (a single
``(C, H, W)`` image is accepted too) and returns one value per image, so a validation batch can be
scored in one call and reported image by image.

* ``psnr`` / ``ssim`` on RGB or on BT.601 luma (``channel="y"``), the convention of
  super-resolution papers, so numbers can be compared with published tables.
* ``lpips_distance`` only when the ``lpips`` package *and* its weights are already on disk; it never
  downloads anything and returns ``None`` otherwise.
* ``evaluate_restoration`` scores restored (and optionally degraded, as a baseline) images against
  the reference and returns a ``RestorationScores`` with a text table and a JSON-able dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .lpips_offline import LPIPSUnavailable, load_lpips

__all__ = [
    "RestorationScores",
    "evaluate_restoration",
    "lpips_distance",
    "psnr",
    "rgb_to_y",
    "ssim",
]

# BT.601 "studio swing" luma, as used by the MATLAB rgb2ycbcr that SR papers report Y-PSNR with.
_Y_OFFSET = 16.0 / 255.0
_Y_WEIGHTS = (65.481 / 255.0, 128.553 / 255.0, 24.966 / 255.0)


def _as_batch(img: torch.Tensor, name: str) -> torch.Tensor:
    """Return ``img`` as a floating ``(B, C, H, W)`` tensor, adding a batch axis to ``(C, H, W)``."""
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(img).__name__}")
    if img.ndim == 3:
        img = img.unsqueeze(0)
    if img.ndim != 4:
        raise ValueError(
            f"{name} must be shaped (B, C, H, W) or (C, H, W), got {tuple(img.shape)}; "
            "ComfyUI IMAGE tensors are (B, H, W, C) and need .permute(0, 3, 1, 2) first"
        )
    # Half precision loses too much in the squared differences; compute in at least float32.
    if not img.is_floating_point() or img.dtype in (torch.float16, torch.bfloat16):
        img = img.float()
    return img


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = _as_batch(a, "a")
    b = _as_batch(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(device=a.device, dtype=dtype)


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma of RGB images in ``[0, 1]``: ``(B, 3, H, W) -> (B, 1, H, W)``.

    ``Y = 16/255 + (65.481 R + 128.553 G + 24.966 B) / 255``, so white maps to 235/255 and black
    to 16/255. A one-channel image is taken to be grey (R = G = B) and converted the same way, so
    Y-metrics of grey and RGB copies of one picture agree.
    """
    img = _as_batch(img, "img")
    channels = img.shape[1]
    if channels == 1:
        img = img.expand(-1, 3, -1, -1)
    elif channels != 3:
        raise ValueError(f"rgb_to_y needs 1 or 3 channels, got {channels} (shape {tuple(img.shape)})")
    w = torch.tensor(_Y_WEIGHTS, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    return (img * w).sum(dim=1, keepdim=True) + _Y_OFFSET


def _select_channel(a: torch.Tensor, b: torch.Tensor, channel: str) -> tuple[torch.Tensor, torch.Tensor]:
    if channel == "rgb":
        return a, b
    if channel == "y":
        return rgb_to_y(a), rgb_to_y(b)
    raise ValueError(f'channel must be "rgb" or "y", got {channel!r}')


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, channel: str = "rgb") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, one value per image (shape ``(B,)``).

    ``10 * log10(data_range**2 / MSE)`` with the MSE over all channels and pixels of an image.
    Identical images give ``+inf`` on purpose: capping would invent a number, and the reports
    print it as "inf".
    """
    a, b = _check_pair(a, b)
    a, b = _select_channel(a, b, channel)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    # mse == 0 divides to +inf, which log10 keeps as +inf: no special case needed.
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_kernel(window: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    coords = torch.arange(window, dtype=dtype, device=device) - (window - 1) / 2.0
    g = torch.exp(-0.5 * (coords / sigma) ** 2)
    return g / g.sum()


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 1.0,
    window: int = 11,
    sigma: float = 1.5,
    channel: str = "rgb",
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004), one value per image (shape ``(B,)``).

    Gaussian-weighted local statistics (``window`` x ``window``, std ``sigma``), K1 = 0.01,
    K2 = 0.03, population (not sample) covariance; the SSIM map is averaged over the *valid*
    region, i.e. only where the window lies fully inside the image, then over channels. That is
    exactly what scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)`` reports: it filters with reflect padding but crops the
    ``(window - 1) / 2`` border before averaging, so the padding never reaches the mean.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number, got {window}")
    a, b = _check_pair(a, b)
    a, b = _select_channel(a, b, channel)
    _, c, h, w = a.shape
    if h < window or w < window:
        raise ValueError(
            f"ssim needs images at least {window}x{window} pixels (the window size), got {h}x{w}; "
            "pass a smaller window or larger images"
        )
    g = _gaussian_kernel(window, sigma, a.dtype, a.device)
    # Means and second moments of a, b and a*b, filtered in one pass: a separable Gaussian as two
    # depthwise (one group per channel) convolutions without padding, i.e. the valid region.
    stacked = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    n = stacked.shape[1]
    kx = g.view(1, 1, 1, window).expand(n, 1, 1, window).contiguous()
    ky = g.view(1, 1, window, 1).expand(n, 1, window, 1).contiguous()
    filtered = F.conv2d(F.conv2d(stacked, kx, groups=n), ky, groups=n)
    mu_a, mu_b, e_aa, e_bb, e_ab = filtered.split(c, dim=1)

    var_a = e_aa - mu_a * mu_a
    var_b = e_bb - mu_b * mu_b
    cov = e_ab - mu_a * mu_b
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    # Every channel has the same number of valid pixels, so one flat mean equals the channel mean.
    return (num / den).flatten(1).mean(dim=1)


def lpips_distance(a: torch.Tensor, b: torch.Tensor, weights_path: str | None = None) -> torch.Tensor | None:
    """LPIPS (AlexNet) distance per image, lower is better; ``None`` when it cannot run offline.

    ``weights_path`` is the LPIPS linear-layer file (``alex.pth``); ``None`` uses the copy shipped
    inside the ``lpips`` package. The backbone must already be in torch.hub's cache.
    """
    a, b = _check_pair(a, b)
    try:
        model = load_lpips(weights_path, a.device)
    except LPIPSUnavailable:
        return None
    with torch.no_grad():
        # normalize=True maps [0, 1] inputs to the [-1, 1] range LPIPS was trained on.
        return model(a.float(), b.float(), normalize=True).flatten()


def _to_floats(t: torch.Tensor | None) -> list[float] | None:
    return None if t is None else [float(v) for v in t.detach().cpu().tolist()]


def _mean(values: list[float] | None) -> float | None:
    if not values:
        return None
    # Plain Python sum keeps a single inf PSNR as an inf mean, which is the honest answer.
    return sum(values) / len(values)


def _jsonable(v: float | None) -> float | str | None:
    if v is None or math.isnan(v):
        return None
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


# (key, header, number format, higher_is_better)
_METRICS = (
    ("psnr", "PSNR dB", "{:.2f}", True),
    ("ssim", "SSIM", "{:.4f}", True),
    ("psnr_y", "PSNR-Y dB", "{:.2f}", True),
    ("ssim_y", "SSIM-Y", "{:.4f}", True),
    ("lpips", "LPIPS", "{:.4f}", False),  # lower is better; its gain is degraded - restored
)


@dataclass
class RestorationScores:
    """Per-image scores of restored (and optionally degraded) images against the reference.

    ``*_restored`` lists compare the restoration with the reference; ``*_degraded`` lists compare
    the degraded input with the reference (the baseline the LoRA must beat) and are ``None`` when
    no degraded images were given. LPIPS lists are ``None`` when LPIPS was not computed.
    """

    psnr_restored: list[float]
    ssim_restored: list[float]
    psnr_y_restored: list[float]
    ssim_y_restored: list[float]
    psnr_degraded: list[float] | None = None
    ssim_degraded: list[float] | None = None
    psnr_y_degraded: list[float] | None = None
    ssim_y_degraded: list[float] | None = None
    lpips_restored: list[float] | None = None
    lpips_degraded: list[float] | None = None

    def __len__(self) -> int:
        return len(self.psnr_restored)

    @property
    def has_baseline(self) -> bool:
        return self.psnr_degraded is not None

    def means(self) -> dict[str, float | None]:
        """Mean of every per-image list, keyed like the fields (``None`` where a list is absent)."""
        out: dict[str, float | None] = {}
        for key, *_ in _METRICS:
            for side in ("restored", "degraded"):
                out[f"{key}_{side}"] = _mean(getattr(self, f"{key}_{side}"))
        return out

    def gain(self, key: str, index: int | None = None) -> float | None:
        """Improvement of restored over degraded for metric ``key``; positive is better.

        For LPIPS (lower is better) that is ``degraded - restored``; for the others
        ``restored - degraded``. ``index=None`` gives the gain of the means.
        """
        restored = getattr(self, f"{key}_restored")
        degraded = getattr(self, f"{key}_degraded")
        if restored is None or degraded is None:
            return None
        r, d = (_mean(restored), _mean(degraded)) if index is None else (restored[index], degraded[index])
        if r is None or d is None:
            return None
        higher_better = next(m[3] for m in _METRICS if m[0] == key)
        g = r - d if higher_better else d - r
        return None if math.isnan(g) else g  # inf - inf (both perfect) has no meaningful gain

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary; infinities become the strings "inf"/"-inf", NaN becomes null."""
        per_image = []
        for i in range(len(self)):
            row: dict[str, Any] = {"index": i}
            for key, *_ in _METRICS:
                for side in ("restored", "degraded"):
                    values = getattr(self, f"{key}_{side}")
                    if values is not None:
                        row[f"{key}_{side}"] = _jsonable(values[i])
                if self.has_baseline and getattr(self, f"{key}_restored") is not None:
                    row[f"{key}_gain"] = _jsonable(self.gain(key, i))
            per_image.append(row)
        mean = {k: _jsonable(v) for k, v in self.means().items() if v is not None}
        for key, *_ in _METRICS:
            g = self.gain(key)
            if g is not None:
                mean[f"{key}_gain"] = _jsonable(g)
        return {
            "n_images": len(self),
            "has_baseline": self.has_baseline,
            "per_image": per_image,
            "mean": mean,
        }

    def table(self) -> str:
        """A Markdown table whose columns are also aligned as plain text: a row per metric for
        the mean over the images, then, with more than one image, a row per image and metric.

        Columns: restored, baseline and gain (restored only without a baseline). LPIPS shows
        "n/a" when it was not available; its gain is degraded - restored, as lower is better.
        A row per metric keeps the table narrow enough for a node or a terminal; Markdown
        because ComfyUI's Preview as Text draws Markdown on some frontends (1.32).
        """
        sides = ["restored", "baseline", "gain"] if self.has_baseline else ["restored"]

        def fmt(v: float | None, spec: str) -> str:
            if v is None:
                return "n/a"
            if math.isinf(v):
                return "inf" if v > 0 else "-inf"
            return spec.format(v)

        rows = [["image", "metric", *sides]]
        for index in [None] if len(self) == 1 else [None, *range(len(self))]:
            for key, title, spec, _ in _METRICS:
                restored = getattr(self, f"{key}_restored")
                degraded = getattr(self, f"{key}_degraded")
                if index is None:
                    r, d = _mean(restored), _mean(degraded)
                else:
                    r = restored[index] if restored is not None else None
                    d = degraded[index] if degraded is not None else None
                gain_spec = "{:+.2f}" if spec == "{:.2f}" else "{:+.4f}"
                values = [fmt(r, spec), fmt(d, spec), fmt(self.gain(key, index), gain_spec)]
                rows.append(["mean" if index is None else str(index), title, *values[: len(sides)]])
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]

        def line(row: list[str]) -> str:
            # The first two columns are labels (left), the rest numbers (right).
            cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
            return "| " + " | ".join(cells) + " |"

        rule = (
            "|"
            + "|".join(":" + "-" * (w + 1) if i < 2 else "-" * (w + 1) + ":" for i, w in enumerate(widths))
            + "|"
        )
        return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:])])

    def __str__(self) -> str:
        return self.table()


def _check_against_reference(name: str, img: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    img = _as_batch(img, name)
    if img.shape[0] != reference.shape[0]:
        raise ValueError(
            f"{name} has {img.shape[0]} image(s) but reference has {reference.shape[0]} "
            f"(shapes {tuple(img.shape)} vs {tuple(reference.shape)}); pass the same number of images"
        )
    if img.shape[1] != reference.shape[1]:
        raise ValueError(
            f"{name} has {img.shape[1]} channel(s) but reference has {reference.shape[1]} "
            f"(shapes {tuple(img.shape)} vs {tuple(reference.shape)}); convert both to RGB"
        )
    if img.shape[2:] != reference.shape[2:]:
        rh, rw = reference.shape[2:]
        h, w = img.shape[2:]
        raise ValueError(
            f"{name} is {h}x{w} (HxW) but reference is {rh}x{rw} "
            f"(shapes {tuple(img.shape)} vs {tuple(reference.shape)}); "
            f"resize the reference to the {name} size ({h}x{w}) before scoring"
        )
    return img.to(device=reference.device, dtype=reference.dtype)


def evaluate_restoration(
    restored: torch.Tensor,
    degraded: torch.Tensor | None,
    reference: torch.Tensor,
    *,
    with_lpips: bool = False,
    lpips_weights: str | None = None,
) -> RestorationScores:
    """Score ``restored`` (and ``degraded`` as a baseline, if given) against ``reference``.

    All inputs are ``(B, C, H, W)`` in ``[0, 1]`` with matching shapes; mismatches raise
    ``ValueError`` naming both shapes and the fix. Values are clamped to ``[0, 1]`` first because
    VAE decodes overshoot slightly and the metrics assume ``data_range=1``. LPIPS is attempted only
    with ``with_lpips=True`` and stays ``None`` when it cannot run offline.
    """
    reference = _as_batch(reference, "reference").float()
    restored = _check_against_reference("restored", restored, reference)
    if degraded is not None:
        degraded = _check_against_reference("degraded", degraded, reference)

    reference = reference.clamp(0, 1)
    with torch.no_grad():

        def score(img: torch.Tensor) -> dict[str, list[float] | None]:
            img = img.clamp(0, 1)
            return {
                "psnr": _to_floats(psnr(img, reference)),
                "ssim": _to_floats(ssim(img, reference)),
                "psnr_y": _to_floats(psnr(img, reference, channel="y")),
                "ssim_y": _to_floats(ssim(img, reference, channel="y")),
                "lpips": _to_floats(lpips_distance(img, reference, lpips_weights)) if with_lpips else None,
            }

        r = score(restored)
        d = score(degraded) if degraded is not None else None

    kwargs: dict[str, Any] = {f"{k}_restored": v for k, v in r.items()}
    if d is not None:
        kwargs.update({f"{k}_degraded": v for k, v in d.items()})
    return RestorationScores(**kwargs)
