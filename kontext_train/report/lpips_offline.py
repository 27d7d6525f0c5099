"""The LPIPS (AlexNet) model, built only from files already on disk.

LPIPS is optional: the ``lpips`` package is not a dependency of the pack, and it would fetch its
torchvision backbone from the internet on first use. ``load_lpips`` checks both weight files first
and raises ``LPIPSUnavailable`` when either is missing, so nothing is ever downloaded;
``metrics.lpips_distance`` turns that into ``None``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["LPIPSUnavailable", "load_lpips"]


class LPIPSUnavailable(RuntimeError):
    """LPIPS cannot run here: the package or one of its weight files is missing locally."""


_LPIPS_CACHE: dict[tuple[str, str], Any] = {}


def load_lpips(weights_path: str | None, device: torch.device) -> Any:
    """Build an AlexNet LPIPS model from files already on disk, or raise ``LPIPSUnavailable``.

    Both files are checked before anything is constructed because the ``lpips`` package would
    otherwise fetch the torchvision backbone from the internet on first use.
    """
    try:
        import lpips  # optional extra; not a dependency of the pack
        import torchvision
    except ImportError as exc:
        raise LPIPSUnavailable(f"the lpips package is not installed ({exc})") from exc

    if weights_path is None:
        # The pip package ships its linear-layer weights next to the code.
        weights_path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
    if not os.path.isfile(weights_path):
        raise LPIPSUnavailable(f"LPIPS weights not found at {weights_path}")

    backbone_url = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
    backbone = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(backbone_url))
    if not os.path.isfile(backbone):
        raise LPIPSUnavailable(f"AlexNet backbone weights not found at {backbone} (never downloaded here)")

    key = (os.path.abspath(weights_path), str(device))
    if key not in _LPIPS_CACHE:
        # torch.hub finds the checkpoint checked above in its cache, so nothing is downloaded.
        model = lpips.LPIPS(net="alex", model_path=weights_path, verbose=False)
        _LPIPS_CACHE[key] = model.eval().to(device)
    return _LPIPS_CACHE[key]
