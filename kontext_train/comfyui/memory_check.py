"""The memory check before a training run: will the run fit the GPU, and if not, what would?

``check_run_memory`` turns a run's MODEL and settings into ``PlanSettings``, plans them with
``memory_probe.plan_memory`` (once per settings in a process) and compares the plan with the
device's free memory (plus what ComfyUI's loaded models hold there); when the run will not fit,
it returns a warning naming the usual savings that would (``memory_plan.advise``). CUDA only.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import replace

import torch

from ..plan.memory_plan import MemoryPlan, advise
from ..method.train_config import TrainConfig
from .memory_probe import WEIGHT_DTYPES, PlanSettings, plan_memory

__all__ = [
    "cached_plan",
    "check_run_memory",
    "device_free_bytes",
    "memory_warning",
    "run_device",
    "savings",
    "settings_for_run",
]


_DTYPE_NAMES = {v: k for k, v in WEIGHT_DTYPES.items()}


@functools.lru_cache(maxsize=32)
def cached_plan(settings: PlanSettings) -> MemoryPlan:
    """``plan_memory`` for a CUDA step, once per settings in this process. The trainer uses
    autocast on CUDA unless the model computes in float32."""
    return plan_memory(settings, autocast=settings.weight_dtype != "fp32")


def settings_for_run(model, config: TrainConfig, buckets, text_tokens: int) -> PlanSettings:
    """The plan settings of a run: the MODEL's size and weight dtype, the largest bucket used."""
    from ..method.flow import uses_reference

    unet = model.model.model_config.unet_config
    dtype = model.model.get_dtype()
    width, height = max(buckets, key=lambda b: b[0] * b[1])
    return PlanSettings(
        weight_dtype=_DTYPE_NAMES.get(dtype, "bf16"),
        width=width,
        height=height,
        reference=uses_reference(config.formulation),
        rank=config.rank,
        lora_targets=config.lora_targets,
        batch_size=config.batch_size,
        gradient_checkpointing=config.gradient_checkpointing,
        lora_dtype=config.lora_dtype,
        text_tokens=text_tokens,
        hidden_size=unet["hidden_size"],
        num_heads=unet["num_heads"],
        depth=unet["depth"],
        depth_single_blocks=unet["depth_single_blocks"],
        context_in_dim=unet["context_in_dim"],
        adapter=config.adapter,
        optimizer=config.optimizer,
    )


def savings(s: PlanSettings) -> list[tuple[str, PlanSettings]]:
    """The usual ways to need less memory that differ from ``s``, cheapest in quality first."""
    out = []
    if s.weight_dtype not in ("fp8_e4m3fn", "fp8_e5m2"):
        out.append(("fp8 base weights (weight_dtype fp8_e4m3fn)", replace(s, weight_dtype="fp8_e4m3fn")))
    if not s.gradient_checkpointing:
        out.append(("gradient_checkpointing on", replace(s, gradient_checkpointing=True)))
    if s.batch_size > 1:
        out.append(("batch_size 1", replace(s, batch_size=1)))
    for scale in (0.75, 0.5):
        w, h = (max(16, round(v * scale / 16) * 16) for v in (s.width, s.height))
        if w * h >= 256 * 256:
            out.append((f"bucket_scale x{scale:g} ({w}x{h})", replace(s, width=w, height=h)))
    if s.rank > 16:
        out.append(("rank 16", replace(s, rank=16)))
    return out


def memory_warning(settings: PlanSettings, free_bytes: int, planner=cached_plan) -> str | None:
    """The warning for a run with ``settings`` on a device with ``free_bytes`` free (None: fits)."""
    alternatives = [(change, functools.partial(planner, other)) for change, other in savings(settings)]
    return advise(planner(settings), free_bytes, alternatives)


def device_free_bytes(device) -> int:
    """Free memory of ``device`` for a training run: free now, plus what ComfyUI's loaded models
    hold there (it unloads them to load the training model)."""
    import comfy.model_management as mm

    free = int(mm.get_free_memory(device))
    for loaded in list(mm.current_loaded_models):
        with contextlib.suppress(Exception):
            if torch.device(loaded.device) == torch.device(device):
                free += int(loaded.model_loaded_memory())
    return free


def run_device(model) -> torch.device:
    """Where training will load ``model``: its patcher's load device."""
    return torch.device(model.load_device)


def check_run_memory(model, config: TrainConfig, buckets, text_tokens: int = 512) -> str | None:
    """The warning before a CUDA training run that would not fit (None on other devices, or when
    it fits). Planning takes seconds to a minute of CPU; each setting is planned once per process."""
    device = run_device(model)
    if device.type != "cuda" or not buckets:
        return None
    settings = settings_for_run(model, config, buckets, text_tokens)
    return memory_warning(settings, device_free_bytes(device))
