"""The benchmarks' ComfyUI-facing pieces work on the ComfyUI under test (the scripts themselves are
run by hand: benchmarks/train_step.py, benchmarks/gpu_train_step.py --tiny)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from conftest import make_conditioning, make_tiny_flux

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import native_train_lora  # noqa: E402


def test_native_trainer_runs_with_this_comfyuis_inputs(comfy_root):
    """ComfyUI 0.33's TrainLoraNode has five more required inputs and deep-copies its model
    through the loader's reload hook, which the tiny model provides."""
    lora = native_train_lora(
        model=[make_tiny_flux()],
        latents=[{"samples": torch.randn(1, 16, 4, 4)} for _ in range(2)],
        positive=[make_conditioning()],
        batch_size=[1],
        steps=[1],
        grad_accumulation_steps=[1],
        learning_rate=[1e-4],
        rank=[2],
        optimizer=["AdamW"],
        loss_function=["MSE"],
        seed=[0],
        training_dtype=["fp32"],
        lora_dtype=["fp32"],
        algorithm=["LoRA"],
        gradient_checkpointing=[True],
        existing_lora=["[None]"],
    )
    downs = [k for k in lora if k.endswith("lora_down.weight")]
    assert any(k.startswith("diffusion_model.double_blocks.0.") for k in downs), sorted(lora)[:5]


def test_gpu_script_model_has_unit_norm_gains_and_reloads_as_a_copy(comfy_root):
    import gpu_train_step

    model = gpu_train_step.build_flux(gpu_train_step.TINY, torch.float32, None, torch.device("cpu"))
    gains = [p for p in model.model.diffusion_model.parameters() if p.ndim == 1 and torch.all(p == 1)]
    assert len(gains) == 4 * gpu_train_step.TINY["double"] + 2 * gpu_train_step.TINY["single"]
    factory, args = model.cached_patcher_init
    copy = factory(*args, disable_dynamic=True)
    assert copy.model is not model.model
    ours, theirs = model.model.diffusion_model.state_dict(), copy.model.diffusion_model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].data_ptr() != theirs[k].data_ptr() for k in ours)
