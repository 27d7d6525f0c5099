"""The memory plan before a training run: will it fit the GPU, and how many blocks
``gradient_checkpointing`` auto recomputes. Kept apart from ``run.py``, which calls it once."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from ..method.train_config import TrainConfig


def check_run_memory(
    model, latents, conditioning, config: TrainConfig, say: Callable[[str], None], ctx
) -> bool | int:
    """The memory plan before a run (``comfyui.memory_check.plan_run_memory``): says through
    ``say`` when the run will not fit the GPU's free memory, naming settings that would, and
    how many blocks ``gradient_checkpointing`` auto checkpoints. Returns the checkpointing for the
    model (True: every block; an int: that many). CUDA only; the plan costs seconds of CPU once
    per settings. ``KONTEXT_MEMORY_PLAN=0`` skips it; so do data-parallel runs (every process must
    checkpoint alike: auto checkpoints every block there)."""
    fixed = config.gradient_checkpointing != "off"
    if not ctx.is_main or ctx.enabled or os.environ.get("KONTEXT_MEMORY_PLAN") == "0":
        return fixed
    try:
        from ..comfyui.memory_check import plan_run_memory

        buckets = sorted({s.bucket for s in latents.dataset.train})
        planned = plan_run_memory(model, config, buckets, int(conditioning[0][0].shape[1]))
    except Exception as e:  # a planning failure must never stop a run
        logging.getLogger("kontext_restore").warning("Kontext Restore: no memory plan (%s)", e)
        return fixed
    if planned.note:
        logging.getLogger("kontext_restore").info("Kontext Restore: %s", planned.note)
        say(planned.note)
    if planned.warning:
        say(planned.warning)
    return planned.checkpointing


def checkpointing_text(checkpointing: bool | int, config: TrainConfig) -> str:
    """What the run checkpoints, for the LoRA's metadata: "auto: 20 blocks", "on", "off"."""
    mode = config.gradient_checkpointing
    if mode != "auto":
        return mode
    return "auto: every block" if checkpointing is True else f"auto: {int(checkpointing)} blocks"
