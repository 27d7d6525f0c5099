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
    # The LoRA forwards are object patches of the clone only (activations form, the default).
    assert lm.lora_form == "activations"
    lora_keys = {f"diffusion_model.{p}.forward" for p in lm.adapters}
    assert lora_keys <= set(lm.patcher.object_patches) and not lora_keys & set(dynamic.object_patches)
    # A second trainer reuses the copy ComfyUI keeps on the input (no second reload).
    again = comfyui.FluxLoraModel(dynamic, rank=2, alpha=2, targets="blocks")
    assert loads == [True] and again.patcher.model is lm.patcher.model


def test_dynamic_vram_model_without_a_reloader_is_a_clear_error(dynamic_patchers):
    dynamic = dynamic_patchers.make(make_tiny_flux())
    with pytest.raises(ValueError, match="--disable-dynamic-vram"):
        comfyui.FluxLoraModel(dynamic, rank=2, alpha=2, targets="blocks")


def _two_conds(method: str | None = "uxo", strengths=(1.0, 3.0)):
    out = []
    for seed, strength in zip((1, 2), strengths):
        context, extras = make_conditioning(seed)[0]
        extras = {**extras, "strength": strength}
        if method is not None:
            extras["reference_latents_method"] = method
        out.append([context, extras])
    return out


def test_training_and_sampling_give_conditioning_one_meaning(comfy_root):
    """Several conds (ComfyUI's strength-weighted mean) and the Kontext reference method: the
    trainer's velocity is the one ComfyUI's sampler steps with. One Euler step from sigma = 1 to 0
    returns x - v, so the sampler's output shows its velocity."""
    from kontext_train.restore_settings import RestoreSettings

    model = make_tiny_flux(4)
    lm = comfyui.FluxLoraModel(model, rank=2, alpha=2, targets="blocks")  # fresh LoRA: the base model
    lm.load()
    degraded = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    settings = RestoreSettings(formulation="bridge_ref", sampler="euler", guidance=1.5)

    def trainer_step(conditioning):
        x = lm.to_model_space(degraded)
        with torch.no_grad():
            v = lm.velocity(x, torch.tensor([1.0]), lm.prepare_conditioning(conditioning), 1.5, reference=x)
        return lm.from_model_space(x - v)

    conds = _two_conds()
    sampled = comfyui.sample_from(model, conds, degraded, torch.tensor([1.0, 0.0]), settings)
    trained = trainer_step(conds)
    torch.testing.assert_close(trained, sampled, rtol=1e-4, atol=1e-5)
    # Each part matters: the second cond, the method ("uxo" places the reference beside the image,
    # not on top of it as the default does with one reference) and the strengths change the step.
    assert (trainer_step(conds[:1]) - trained).abs().max() > 1e-3
    assert (trainer_step(_two_conds(method=None)) - trained).abs().max() > 1e-3
    assert (trainer_step(_two_conds(strengths=(1.0, 1.0))) - trained).abs().max() > 1e-3


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"area": (8, 8, 0, 0)}, "'area'"),
        ({"mask": torch.ones(1, 8, 8)}, "'mask'"),
        ({"start_percent": 0.5}, "from 50% to 100%"),
        ({"strength": float("nan")}, "strength"),
    ],
)
def test_conditioning_neither_can_honour_is_refused_by_both(comfy_root, extra, match):
    from kontext_train.comfyui.sampling import with_reference_and_guidance

    context, extras = make_conditioning()[0]
    conditioning = [[context, {**extras, **extra}]]
    with pytest.raises(ValueError, match=match):
        comfyui.prepare_conditioning(conditioning, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match=match):
        with_reference_and_guidance(conditioning, None, 1.5)
