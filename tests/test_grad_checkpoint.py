"""Backward through Flux blocks (kontext_train/method/grad_checkpoint.py): LoRA gradients with and without
activation checkpointing match finite differences, with the LoRA on activations and on weights."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_conditioning, make_tiny_flux

from kontext_train import comfyui


def _lora_gradients(checkpointing: bool, lora_form: str = "activations"):
    torch.manual_seed(0)
    model = comfyui.FluxLoraModel(
        make_tiny_flux(5, dtype=torch.float64),
        rank=2,
        alpha=2,
        targets="blocks",
        gradient_checkpointing=checkpointing,
        lora_dtype=torch.float64,
        lora_form=lora_form,
    )
    assert model.lora_form == lora_form
    model.load()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for a in model.adapters.values():
            a.up.copy_(torch.randn(a.up.shape, generator=g, dtype=torch.float64) * 0.05)
    cond = model.prepare_conditioning(make_conditioning())
    x = torch.randn(1, 16, 4, 4, generator=g, dtype=torch.float64)
    ref = torch.randn(1, 16, 4, 4, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.6], dtype=torch.float64)

    def loss_fn():
        return model.velocity(x, sigma, cond, 1.5, ref).pow(2).sum()

    with model.training():
        loss_fn().backward()
    return model, loss_fn


@pytest.mark.parametrize("lora_form", ["activations", "weights"])
def test_checkpointed_gradients_match_finite_differences(comfy_root, lora_form):
    """Backward through Flux blocks (in-place residual adds) with checkpointing is exact.

    Checked as a directional derivative along a random direction over every LoRA parameter:
    ComfyUI's RoPE runs in float32 even in a float64 model, so single-element differences drown
    in rounding, while a whole-direction difference is well above it.
    """
    model, loss_fn = _lora_gradients(checkpointing=True, lora_form=lora_form)
    params = model.parameters()
    g = torch.Generator().manual_seed(1)
    dirs = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    analytic = sum((p.grad * d).sum() for p, d in zip(params, dirs)).item()
    t = 1e-4
    # The finite differences run inside training() as the backward did: newer ComfyUI routes RoPE
    # through comfy-kitchen (no float64) unless its training flag is set.
    with model.training(), torch.no_grad():
        for p, d in zip(params, dirs):
            p.add_(t * d)
        up = loss_fn().item()
        for p, d in zip(params, dirs):
            p.sub_(2 * t * d)
        down = loss_fn().item()
    numeric = (up - down) / (2 * t)
    assert abs(analytic) > 1e-3
    assert math.isclose(analytic, numeric, rel_tol=1e-4), (analytic, numeric)

    plain, _ = _lora_gradients(checkpointing=False, lora_form=lora_form)
    for a, b in zip(params, plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)
