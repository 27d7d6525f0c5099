"""The training model against ComfyUI: the velocity it trains is the one ComfyUI samples, and the
clone it trains is a plain ModelPatcher whatever the input MODEL's loader (dynamic VRAM)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_conditioning, make_tiny_flux

from kontext_train import comfyui
from kontext_train.comfyui.training_model import training_clone


def test_velocity_equals_comfyuis_apply_model_in_bf16(comfy_root):
    """ComfyUI's sampler calls the model through ``apply_model`` (timestep in float32, x0 out); the
    trainer calls the transformer directly. At the same sigma both must give the same velocity, or
    training would fit other timesteps than sampling uses. In bf16 a rounded sigma (0.537 becomes
    0.5390625) moves the x1000 timestep embedding and shows here."""
    lm = comfyui.FluxLoraModel(make_tiny_flux(3, dtype=torch.bfloat16), rank=2, alpha=2, targets="blocks")
    lm.load()
    assert lm.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in lm.adapters.values():  # non-zero adapters: the LoRA path is part of both calls
            a.up.copy_(torch.randn(a.up.shape, generator=g) * 0.05)
    cond = lm.prepare_conditioning(make_conditioning())
    context, pooled = cond.batch(2)
    x = torch.randn(2, 16, 4, 4, generator=g)
    ref = torch.randn(2, 16, 4, 4, generator=g)
    sigma = torch.tensor([0.537, 0.537])
    with torch.no_grad():
        ours = lm.velocity(x, sigma, cond, 1.5, reference=ref)
        denoised = lm.base.apply_model(
            x,
            sigma,
            c_crossattn=context,
            y=pooled,
            guidance=torch.full((2,), 1.5),
            ref_latents=[ref],
            transformer_options=lm.patcher.model_options["transformer_options"],
        )
    theirs = (x - denoised) / sigma.view(-1, 1, 1, 1)  # CONST: denoised = x - sigma * v
    assert ours.dtype == torch.float32
    # Both come from the same bf16 output; only float32 rounding of x - sigma*v separates them.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    lm.release()


def test_training_clone_of_a_plain_model_shares_its_weights(comfy_root):
    model = make_tiny_flux()
    clone = training_clone(model)
    assert clone is not model and clone.model is model.model


class _NoAimdo:
    """Builds a real ``ModelPatcherDynamic`` on a CPU-only machine: its per-device pinned host
    buffers need comfy-aimdo's native library, which only loads with CUDA; the rest of the class is
    ComfyUI's own."""

    def __init__(self, monkeypatch):
        import comfy.model_patcher as cmp

        self.cls = cmp.ModelPatcherDynamic
        monkeypatch.setattr(self.cls, "register_load_device", lambda self, device: None)
        self.made = []

    def make(self, model):
        patcher = self.cls(model.model, torch.device("cuda", 0), torch.device("cpu"))
        self.made.append(patcher)
        return patcher

    def close(self):
        # Its __del__ would unpin host buffers that were never made.
        for p in self.made:
            p.model.dynamic_patchers.discard(id(p))


@pytest.fixture
def dynamic_patchers(comfy_root, monkeypatch):
    import comfy.model_patcher as cmp

    if not hasattr(cmp, "ModelPatcherDynamic"):
        pytest.skip("this ComfyUI predates dynamic VRAM (ModelPatcherDynamic, 0.33+)")
    maker = _NoAimdo(monkeypatch)
    yield maker
    maker.close()


def test_training_clone_of_a_dynamic_vram_model_is_a_plain_reloaded_model(dynamic_patchers):
    """ComfyUI 0.33 on CUDA hands nodes ModelPatcherDynamic models; the trainer trains a plain
    ModelPatcher reloaded through the model's loader (``get_non_dynamic_delegate``), with the
    input's patches and the LoRA adapters on the clone only."""
    import comfy.model_patcher as cmp

    plain = make_tiny_flux(4)
    dynamic = dynamic_patchers.make(plain)
    loads = []

    def reload(disable_dynamic=False):
        loads.append(disable_dynamic)
        return make_tiny_flux(4)

    dynamic.cached_patcher_init = (reload, ())
    dynamic.add_patches(
        {"diffusion_model.img_in.weight": (torch.zeros_like(plain.model.diffusion_model.img_in.weight),)}
    )
    lm = comfyui.FluxLoraModel(dynamic, rank=2, alpha=2, targets="blocks")
    assert type(lm.patcher) is cmp.ModelPatcher and not lm.patcher.is_dynamic()
    assert loads == [True]  # reloaded once, asking the loader for a non-dynamic model
    assert lm.patcher.model is not dynamic.model
    assert "diffusion_model.img_in.weight" in lm.patcher.patches  # the input's patches carry over
    assert lm.patcher.weight_wrapper_patches and not dynamic.weight_wrapper_patches
    # A second trainer reuses the copy ComfyUI keeps on the input (no second reload).
    again = comfyui.FluxLoraModel(dynamic, rank=2, alpha=2, targets="blocks")
    assert loads == [True] and again.patcher.model is lm.patcher.model


def test_dynamic_vram_model_without_a_reloader_is_a_clear_error(dynamic_patchers):
    dynamic = dynamic_patchers.make(make_tiny_flux())
    with pytest.raises(ValueError, match="--disable-dynamic-vram"):
        comfyui.FluxLoraModel(dynamic, rank=2, alpha=2, targets="blocks")
