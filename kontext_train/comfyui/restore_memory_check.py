"""The numbers behind the restore memory guard (``restore.restore_memory``), from ComfyUI's objects.

For a bucket scale, ``restore_estimator`` plans every image (``restore.plan_restoration``) and
estimates the peak of its largest region:
- the model: one sampling call at that bucket, counted on the meta device by
  ``memory_probe.plan_forward`` (the real Flux forward of this MODEL's size and dtype, reference
  tokens included when the formulation uses them; attention modelled with a flash-style footprint,
  which is what CUDA runs and close to ComfyUI's memory-bounded sub-quadratic attention on the CPU);
- the VAE: ComfyUI's own estimates for this VAE (``memory_used_encode``/``memory_used_decode``,
  what ComfyUI sizes its VAE batches by). On a GPU ComfyUI falls back to tiled VAE decoding when
  it runs out of memory, so the VAE counts only where it runs on the host, which has no fallback;
- the images, on the host (``restore_memory.image_bytes``).

``restore_memory_guard`` returns the check ``restore.restore_images`` runs before any sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..data.buckets import bucket_resolutions
from ..method.flow import uses_reference
from ..restore.restore import plan_restoration
from ..restore.restore_memory import FreeMemory, RestoreNeed, check_restore_memory, image_bytes
from ..restore.restore_settings import RestoreSettings
from .memory_check import _DTYPE_NAMES, device_free_bytes
from .memory_probe import PlanSettings, plan_forward

__all__ = ["free_memory", "restore_estimator", "restore_memory_guard"]


def _text_tokens(conditioning) -> int:
    tokens = [
        int(c[0].shape[1]) for c in conditioning or [] if isinstance(c[0], torch.Tensor) and c[0].ndim == 3
    ]
    return max(tokens, default=512)


def _model_settings(model, reference: bool, text_tokens: int, bucket: tuple[int, int]) -> PlanSettings:
    unet = model.model.model_config.unet_config
    return PlanSettings(
        weight_dtype=_DTYPE_NAMES.get(model.model.get_dtype(), "bf16"),
        width=bucket[0],
        height=bucket[1],
        reference=reference,
        text_tokens=text_tokens,
        hidden_size=unet["hidden_size"],
        num_heads=unet["num_heads"],
        depth=unet["depth"],
        depth_single_blocks=unet["depth_single_blocks"],
        context_in_dim=unet["context_in_dim"],
    )


def _device(obj, name: str) -> torch.device:
    return torch.device(getattr(obj, name, None) or "cpu")


def restore_estimator(
    model, vae, conditioning, settings: RestoreSettings, sizes: Sequence[tuple[int, int]]
) -> Callable[[float], RestoreNeed]:
    """``estimate(bucket_scale)`` for restoring images of ``sizes`` (width, height)."""
    reference = uses_reference(settings.formulation)
    text_tokens = _text_tokens(conditioning)
    model_on_host = _device(model, "load_device").type == "cpu"
    vae_on_host = _device(vae, "device").type == "cpu"
    vae_dtype = getattr(vae, "vae_dtype", torch.float32)

    def estimate(scale: float) -> RestoreNeed:
        buckets = bucket_resolutions(scale)
        plans = [plan_restoration(w, h, buckets) for w, h in sizes]
        bw, bh = max((p.bucket for p in plans), key=lambda b: b[0] * b[1])
        forward = plan_forward(_model_settings(model, reference, text_tokens, (bw, bh)), autocast=False)
        encode = vae.memory_used_encode((1, 3, bh, bw), vae_dtype)
        decode = vae.memory_used_decode((1, 16, bh // 8, bw // 8), vae_dtype)
        vae_bytes = int(max(encode, decode))
        images = image_bytes(sizes) + 4 * 3 * bw * bh * 4  # plus a few bucket-size copies per region
        parts = {"model call": forward, "VAE": vae_bytes, "images": images}
        host = images + (forward if model_on_host else 0) + (vae_bytes if vae_on_host else 0)
        device = None if model_on_host else forward
        tiles = sum(len(p.tiles) for p in plans)
        return RestoreNeed(scale, (bw, bh), (bw // 16) * (bh // 16), tiles, host, device, parts)

    return estimate


def free_memory(model) -> FreeMemory:
    """Available host memory (psutil, as ComfyUI reads it) and, for a GPU model, the device's free
    memory plus what ComfyUI's loaded models hold there (it unloads them to make room)."""
    import comfy.model_management as mm

    host = int(mm.get_free_memory(torch.device("cpu")))
    device = _device(model, "load_device")
    if device.type == "cpu":
        return FreeMemory(host)
    return FreeMemory(host, device_free_bytes(device), device.type.upper())


def restore_memory_guard(model, vae, conditioning, settings: RestoreSettings):
    """The check ``restore_images(check_memory=...)`` runs with the images' sizes before sampling:
    raises ``RestoreMemoryError`` naming a bucket scale that fits when this restore would not."""

    def check(sizes: Sequence[tuple[int, int]], bucket_scale: float) -> None:
        estimate = restore_estimator(model, vae, conditioning, settings, sizes)
        check_restore_memory(bucket_scale, estimate, free_memory(model))

    return check
