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
    from kontext_train.restore.restore_settings import RestoreSettings

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


# -- how the adapters act: on activations (default) or as weight wrappers ---------------------


def _nonzero_forms(model, targets="all_linear"):
    """The two forms on one model, with the same non-zero adapters (float64)."""
    lms = {
        form: comfyui.FluxLoraModel(
            model, rank=2, alpha=3, targets=targets, lora_dtype=torch.float64, lora_form=form
        )
        for form in ("activations", "weights")
    }
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for path, a in lms["activations"].adapters.items():
            a.up.copy_(torch.randn(a.up.shape, generator=g, dtype=torch.float64) * 0.1)
            lms["weights"].adapters[path].up.copy_(a.up)
            lms["weights"].adapters[path].down.copy_(a.down)
    return lms


def test_activations_and_weights_forms_give_the_same_velocity_and_gradients(comfy_root):
    """``base(x) + scale * (x @ down.T) @ up.T`` is ``x @ (W + scale * up @ down).T``: the same
    velocity and the same LoRA gradients, through checkpointed blocks, on every Linear layer."""
    model = make_tiny_flux(6, dtype=torch.float64)
    lms = _nonzero_forms(model)
    assert [lm.lora_form for lm in lms.values()] == ["activations", "weights"]
    g = torch.Generator().manual_seed(4)
    x, ref = (torch.randn(2, 16, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    sigma = torch.tensor([0.3, 0.8], dtype=torch.float64)
    out, grads = {}, {}
    for form, lm in lms.items():
        lm.load()
        with lm.training():
            v = lm.velocity(x, sigma, lm.prepare_conditioning(make_conditioning()), 1.5, reference=ref)
            v.pow(2).sum().backward()
        out[form], grads[form] = v.detach(), [p.grad for p in lm.parameters()]
        lm.release()
    assert out["activations"].dtype == torch.float64
    torch.testing.assert_close(out["activations"], out["weights"], rtol=1e-12, atol=1e-12)
    assert all(g is not None and g.abs().max() > 0 for g in grads["activations"])
    for a, b in zip(grads["activations"], grads["weights"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _base_output(model, x):
    """The input MODEL run the way ComfyUI's sampler runs it (loaded through its memory manager)."""
    import comfy.model_management as mm

    mm.load_models_gpu([model], force_full_load=True)
    context, pooled = comfyui.prepare_conditioning(make_conditioning(), x.device, x.dtype).batch(1)
    with torch.no_grad():
        return model.model.apply_model(
            x, torch.tensor([0.7]), c_crossattn=context, y=pooled, guidance=torch.full((1,), 1.5)
        )


def test_shared_model_is_untouched_by_training_and_release(comfy_root):
    """The LoRA forwards exist only while the training clone is ComfyUI's loaded copy: running the
    input MODEL meanwhile gives its own output, the trainer's next call brings its LoRA back (as
    validation does after the VAE took the memory), and release leaves no instance forward."""
    model = make_tiny_flux(7)
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(8))
    before = _base_output(model, x)
    lm = comfyui.FluxLoraModel(model, rank=2, alpha=2, targets="all_linear")
    lm.load()
    with torch.no_grad():
        for a in lm.adapters.values():
            a.up.fill_(0.05)
    cond = lm.prepare_conditioning(make_conditioning())
    sigma = torch.tensor([0.7])
    with torch.no_grad():
        trained = lm.velocity(x, sigma, cond, 1.5)
    layers = [m for p, m in model.model.diffusion_model.named_modules() if p in lm.adapters]
    assert all("forward" in vars(m) for m in layers)  # on the shared modules while it is loaded

    torch.testing.assert_close(_base_output(model, x), before, rtol=0, atol=0)
    with torch.no_grad():
        again = lm.velocity(x, sigma, cond, 1.5)
    torch.testing.assert_close(again, trained, rtol=0, atol=0)
    lm.release()
    assert not any("forward" in vars(m) for m in model.model.diffusion_model.modules())
    torch.testing.assert_close(_base_output(model, x), before, rtol=0, atol=0)
    # The LoRA does change the velocity (denoised = x - sigma * v), so the checks above can fail.
    assert (trained - (x - before) / 0.7).abs().max() > 1e-3


def _fp8_tiny_flux(seed: int):
    """The tiny Flux stored in float8_e4m3fn, computed in float32 by ComfyUI's manual-cast ops, as
    an fp8 checkpoint loads on a GPU without fp8 matmuls."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    from kontext_train.comfyui.tiny_models import flux_unet_config

    source = make_tiny_flux(seed).model.diffusion_model.state_dict()
    cfg = comfy.supported_models.Flux(flux_unet_config(128, 1, 1, 1, context_in_dim=64))
    cfg.set_inference_dtype(torch.float8_e4m3fn, torch.float32)
    with torch.inference_mode(False):
        base = cfg.get_model({})
        base.diffusion_model.load_state_dict(source, strict=True)
    return comfy.model_patcher.ModelPatcher(
        base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def test_fp8_stored_model_trains_on_activations(comfy_root):
    model = _fp8_tiny_flux(9)
    qkv = model.model.diffusion_model.double_blocks[0].img_attn.qkv
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.comfy_cast_weights
    lm = comfyui.FluxLoraModel(model, rank=2, alpha=2, targets="blocks")
    lm.load()
    assert lm.lora_form == "activations" and lm.dtype == torch.float32
    g = torch.Generator().manual_seed(10)
    x, target = (torch.randn(1, 16, 4, 4, generator=g) for _ in range(2))
    cond = lm.prepare_conditioning(make_conditioning())
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    losses = []
    with lm.training():
        for _ in range(4):
            optimizer.zero_grad()
            loss = (lm.velocity(x, torch.tensor([0.6]), cond, 1.5) - target).pow(2).mean()
            loss.backward()
            grads = [p.grad for p in lm.parameters()]
            assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert qkv.weight.dtype == torch.float8_e4m3fn  # the base weights stay as stored
    lm.release()


def test_a_layer_whose_forward_is_already_replaced_falls_back_to_weights(comfy_root, caplog):
    model = make_tiny_flux(11)
    layer = model.model.diffusion_model.single_blocks[0].linear2
    layer.forward = layer.forward  # as another custom node would leave it
    try:
        with caplog.at_level("WARNING", logger="kontext_restore"):
            lm = comfyui.FluxLoraModel(model, rank=2, alpha=2, targets="blocks")
        assert lm.lora_form == "weights"
        assert "single_blocks.0.linear2" in caplog.text and "weight wrappers" in caplog.text
        assert f"diffusion_model.{next(iter(lm.adapters))}.weight" in lm.patcher.weight_wrapper_patches
    finally:
        del layer.forward
    assert comfyui.FluxLoraModel(model, rank=2, alpha=2, targets="blocks").lora_form == "activations"
    patched = model.clone()  # another node's object patch of a target's forward: kept, LoRA on weights
    patched.add_object_patch("diffusion_model.single_blocks.0.linear2.forward", layer.forward)
    lm = comfyui.FluxLoraModel(patched, rank=2, alpha=2, targets="blocks")
    assert lm.lora_form == "weights" and lm.patcher.object_patches == patched.object_patches
    with pytest.raises(ValueError, match="lora_form must be one of activations, weights"):
        comfyui.FluxLoraModel(model, rank=2, alpha=2, lora_form="bypass")
