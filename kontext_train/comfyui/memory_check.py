"""The memory check before a training run: will the run fit the GPU, and if not, what would?

``check_run_memory`` turns a run's MODEL and settings into ``PlanSettings``, plans them with
``memory_probe.plan_memory`` (once per settings in a process) and compares the plan with the
device's free memory (plus what ComfyUI's loaded models hold there); when the run will not fit,
it returns a warning naming the usual savings that would (``memory_plan.advise``). CUDA only.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace

import torch

from ..method.train_config import TrainConfig
from ..plan.memory_plan import MemoryPlan, advise, gib
from .memory_probe import WEIGHT_DTYPES, PlanSettings, plan_memory

__all__ = [
    "OFFLOAD_NOTE",
    "CheckpointChoice",
    "RunMemory",
    "cached_plan",
    "choose_checkpointing",
    "plan_run_memory",
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
        gradient_checkpointing=config.gradient_checkpointing != "off",
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
    warning = advise(planner(settings), free_bytes, alternatives)
    if warning and "None of the usual" in warning:
        smallest = replace(settings, weight_dtype="fp8_e4m3fn", gradient_checkpointing=True)
        warning += (
            f" Even fp8 weights with every block checkpointed need {gib(planner(smallest).total)}. "
            + OFFLOAD_NOTE
        )
    return warning


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


CHECKPOINT_MARGIN = 0.10  # of the free memory kept spare when choosing how many blocks to checkpoint
OFFLOAD_NOTE = (
    "ComfyUI's own offloading (--lowvram, partial loading) does not help here: training loads the whole "
    "model onto the GPU (like ComfyUI's Train LoRA node unless its 'offloading' option is on, ComfyUI 0.33 "
    "only), so use a smaller bucket_scale, or a GPU with more memory."
)


@dataclass(frozen=True)
class CheckpointChoice:
    """How many blocks (the first ones) recompute their activations, and the plan with that."""

    blocks: int
    total_blocks: int
    planned: int  # bytes
    free: int
    fits: bool

    def describe(self) -> str:
        what = (
            "every block" if self.blocks == self.total_blocks
            else "no block" if self.blocks == 0
            else f"{self.blocks} of {self.total_blocks} blocks"
        )  # fmt: skip
        verdict = "" if self.fits else "; it does not fit even so"
        return (
            f"gradient_checkpointing auto: recomputing {what} ({gib(self.planned)} planned, "
            f"{gib(self.free)} free, {CHECKPOINT_MARGIN:.0%} kept spare{verdict})"
        )


def choose_checkpointing(
    settings: PlanSettings, free_bytes: int, planner=cached_plan, margin: float = CHECKPOINT_MARGIN
) -> CheckpointChoice:
    """The fewest checkpointed blocks whose step fits ``free_bytes`` with ``margin`` spare.

    Plans all blocks checkpointed, none, and only the double blocks (the first ones); the blocks'
    costs in between are interpolated from those, and the choice is planned again to confirm it
    (one block more per failed confirmation)."""
    n, doubles = settings.blocks, settings.depth
    budget = free_bytes * (1.0 - margin)

    def plan(k: int) -> int:
        value = True if k == n else False if k == 0 else k  # the booleans share the cached plans
        return planner(replace(settings, gradient_checkpointing=value)).total

    every = plan(n)
    if every > budget:
        return CheckpointChoice(n, n, every, free_bytes, False)
    none = plan(0)
    if none <= budget:
        return CheckpointChoice(0, n, none, free_bytes, True)
    middle = plan(doubles)  # singles not checkpointed, doubles all checkpointed
    single_cost = (middle - every) / max(1, n - doubles)
    double_cost = (none - middle) / max(1, doubles)
    if middle <= budget:
        k = n - int((budget - every) // single_cost) if single_cost > 0 else doubles
    else:
        k = doubles - int((budget - middle) // double_cost) if double_cost > 0 else n
    k = min(n, max(0, k))
    while k < n and plan(k) > budget:
        k += 1
    return CheckpointChoice(k, n, plan(k), free_bytes, True)


@dataclass(frozen=True)
class RunMemory:
    """What the memory plan says before a run: a warning (None: fits), and for ``auto`` the
    number of blocks to checkpoint (``checkpointing``: True for all, an int otherwise)."""

    warning: str | None
    checkpointing: bool | int
    note: str | None = None


def plan_run_memory(model, config: TrainConfig, buckets, text_tokens: int = 512) -> RunMemory:
    """The memory plan before a training run. On CUDA it warns when the run would not fit, and
    with ``gradient_checkpointing`` auto chooses how many blocks to checkpoint so that the step
    fits the free memory with a margin; elsewhere auto checkpoints every block. Planning takes
    seconds to a minute of CPU; each setting is planned once per process."""
    mode = config.gradient_checkpointing
    fixed = mode != "off"
    device = run_device(model)
    if device.type != "cuda" or not buckets:
        note = (
            "gradient_checkpointing auto: every block (memory is planned on CUDA only)"
            if mode == "auto"
            else None
        )
        return RunMemory(None, fixed, note)
    settings = settings_for_run(model, config, buckets, text_tokens)
    free = device_free_bytes(device)
    if mode != "auto":
        return RunMemory(memory_warning(settings, free), fixed)
    choice = choose_checkpointing(settings, free)
    chosen = replace(
        settings,
        gradient_checkpointing=choice.blocks if 0 < choice.blocks < settings.blocks else choice.blocks > 0,
    )
    checkpointing = chosen.gradient_checkpointing
    return RunMemory(memory_warning(chosen, free), checkpointing, choice.describe())


def check_run_memory(model, config: TrainConfig, buckets, text_tokens: int = 512) -> str | None:
    """The warning before a CUDA training run that would not fit (None on other devices, or when
    it fits); see ``plan_run_memory``."""
    return plan_run_memory(model, config, buckets, text_tokens).warning
