"""The Restore node applies the LoRA named in its picker itself, on activations as in training
(kontext_train/comfyui/restore_lora.py), and says what its MODEL already carries.

Checked in float32 on the tiny Flux: the node-applied LoRA restores exactly what the stock
LoraLoader's merged copy restores; the MODEL passed in is left as it was; and each mismatch between
the picker and the MODEL shows a warning on the node.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_conditioning, make_tiny_flux

from kontext_train import comfyui
from kontext_train.method.lora import (
    atomic_save_safetensors,
    create_adapters,
    select_targets,
    to_kohya_state_dict,
)
from kontext_train.train.trainer import TrainConfig, lora_metadata

SCALE = 0.0625


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lora_file(folder, name: str, model, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA on every 'blocks' layer of ``model`` with random non-zero up weights."""
    modules = dict(model.model.diffusion_model.named_modules())
    paths = select_targets(modules, "blocks")
    adapters = create_adapters({p: tuple(modules[p].weight.shape) for p in paths}, rank=4, alpha=4, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for a in adapters.values():
        a.up.data = torch.randn(a.up.shape, generator=g) * 0.2
    state = to_kohya_state_dict(adapters)
    atomic_save_safetensors(state, folder / name, lora_metadata(TrainConfig(formulation="bridge"), step=1))
    return state


def _restore(pack_nodes, model, tiny_vae, lora_name="none", **kw):
    node = pack_nodes.NODE_CLASS_MAPPINGS["KontextRestoreRestore"]
    g = torch.Generator().manual_seed(5)
    args = dict(
        model=model,
        vae=tiny_vae,
        conditioning=make_conditioning(),
        images=torch.rand(1, 64, 64, 3, generator=g),
        mode="bridge",
        steps=3,
        guidance=1.5,
        sampler_name="euler",
        scheduler="as_trained",
        seed=0,
        bucket_scale=SCALE,
        lora_name=lora_name,
    )
    args.update(kw)
    with torch.inference_mode():
        out = pack_nodes.NODE_CLASS_MAPPINGS["KontextRestoreRestore"].execute(**args)
    assert node is not None
    return out.result[0], "".join(out.ui.as_dict()["text"])


def _untouched(model, patches_before) -> None:
    """No layer keeps an instance forward, no patch was added or removed, nothing stays loaded."""
    import comfy.model_management as mm

    for name, module in model.model.diffusion_model.named_modules():
        assert "forward" not in vars(module), name
    assert {k: len(v) for k, v in model.patches.items()} == patches_before
    assert not any("forward" in k for k in model.object_patches)
    assert not any(
        getattr(m.model, "model", None) is model.model and m.model is not model
        for m in mm.current_loaded_models
    ), "a clone of the MODEL is still loaded"


def test_node_applied_lora_restores_like_the_stock_loader(pack_nodes, tiny_vae, comfy_dirs):
    model = make_tiny_flux()
    state = _lora_file(comfy_dirs["loras"], "exact.safetensors", model, seed=1)
    plain, _ = _restore(pack_nodes, model, tiny_vae)
    applied, shown = _restore(pack_nodes, model, tiny_vae, lora_name="exact.safetensors")
    assert "applied on activations to" in shown and "Warning" not in shown
    _untouched(model, {})
    stock_model = comfyui.apply_lora(model, state)  # what Load LoRA (model only) gives
    stock, shown = _restore(
        pack_nodes, stock_model, tiny_vae, lora_name="exact.safetensors", lora_use="already applied"
    )
    assert "Warning" not in shown
    assert (applied - plain).abs().max() > 1e-2  # the LoRA does something
    assert torch.allclose(applied, stock, atol=2e-5), (applied - stock).abs().max()
    # The MODEL still restores as before the node ran with a LoRA.
    again, _ = _restore(pack_nodes, model, tiny_vae)
    assert torch.equal(again, plain)


def test_same_lora_from_a_loader_is_not_applied_twice(pack_nodes, tiny_vae, comfy_dirs):
    """A workflow that still has Load LoRA: the loader's merged copy is taken off a clone and the
    LoRA acts once, on activations (the same restore as without Load LoRA)."""
    model = make_tiny_flux()
    state = _lora_file(comfy_dirs["loras"], "twice.safetensors", model, seed=2)
    exact, _ = _restore(pack_nodes, model, tiny_vae, lora_name="twice")
    stock_model = comfyui.apply_lora(model, state)
    before = {k: len(v) for k, v in stock_model.patches.items()}
    merged, _ = _restore(pack_nodes, stock_model, tiny_vae, lora_name="twice", lora_use="already applied")
    out, shown = _restore(pack_nodes, stock_model, tiny_vae, lora_name="twice")
    assert "twice was also applied by a loader: that merged copy is not used (not applied twice)" in shown
    assert "applied on activations to" in shown and "Warning" not in shown
    assert torch.equal(out, exact)
    assert torch.allclose(out, merged, atol=2e-5)  # once, not twice (float32: both forms agree)
    _untouched(stock_model, before)
    again, _ = _restore(pack_nodes, stock_model, tiny_vae, lora_name="twice", lora_use="already applied")
    assert torch.equal(again, merged)  # the loader's copy acts again where it is meant to


def test_another_lora_on_the_model_is_warned_about_and_both_act(pack_nodes, tiny_vae, comfy_dirs):
    model = make_tiny_flux()
    other = _lora_file(comfy_dirs["loras"], "other.safetensors", model, seed=3)
    _lora_file(comfy_dirs["loras"], "mine.safetensors", model, seed=4)
    with_other = comfyui.apply_lora(model, other)
    only_other, _ = _restore(pack_nodes, with_other, tiny_vae)
    both, shown = _restore(pack_nodes, with_other, tiny_vae, lora_name="mine.safetensors")
    assert "already carries another LoRA" in shown and "applied on top" in shown
    assert (both - only_other).abs().max() > 1e-2
    _, shown = _restore(
        pack_nodes, with_other, tiny_vae, lora_name="mine.safetensors", lora_use="already applied"
    )
    assert "carries another LoRA" in shown and "not mine.safetensors" in shown


def test_already_applied_on_a_model_without_lora_warns(pack_nodes, tiny_vae, comfy_dirs):
    """Issue 23: lora_name set, no LoRA on the MODEL, used to restore silently with its settings."""
    model = make_tiny_flux()
    _lora_file(comfy_dirs["loras"], "missing.safetensors", model, seed=5)
    plain, _ = _restore(pack_nodes, model, tiny_vae)
    out, shown = _restore(
        pack_nodes, model, tiny_vae, lora_name="missing.safetensors", lora_use="already applied"
    )
    assert "Warning: lora use is 'already applied' but the MODEL carries no LoRA" in shown
    assert torch.equal(out, plain)


def test_a_file_that_is_not_plain_lora_falls_back_to_the_stock_loader(comfy_root):
    model = make_tiny_flux()
    modules = dict(model.model.diffusion_model.named_modules())
    state = {"lora_unet_double_blocks_0_img_attn_qkv.diff": torch.zeros(384, 128)}
    adapters, why = comfyui.restore_lora.adapters_from_state(state, modules)
    assert adapters is None and "no kohya lora_down" in why
    with comfyui.lora_for_restore(model, state, name="diffy") as applied:
        assert any("merged into the weights by ComfyUI's LoRA loader" in n for n in applied.notes)
        assert applied.model is not model


def test_unknown_lora_use_is_refused(comfy_root):
    with pytest.raises(ValueError, match="lora use must be one of apply, already applied"):
        with comfyui.lora_for_restore(make_tiny_flux(), {}, use="merge"):
            pass


def test_the_command_applies_the_lora_as_the_node_does(comfy_root, tiny_vae, tmp_path, capsys):
    """``kontext-train restore/evaluate`` restore through ``patched_with_lora``: on activations, equal
    to the stock loader's merged copy in float32, and the pipeline's MODEL untouched afterwards."""
    from types import SimpleNamespace

    from kontext_train.app.restore_command import patched_with_lora
    from kontext_train.restore.restore_settings import RestoreSettings

    model = make_tiny_flux()
    state = _lora_file(tmp_path, "cli.safetensors", model, seed=6)
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    settings = RestoreSettings(formulation="bridge", steps=3)

    def restore(m):
        with torch.inference_mode():
            return comfyui.restore_pixels(m, tiny_vae, make_conditioning(), pixels, settings)

    with patched_with_lora(SimpleNamespace(model=model), state) as patched:
        assert patched is not model
        applied = restore(patched)
    assert "applied on activations to" in capsys.readouterr().out
    _untouched(model, {})
    stock = restore(comfyui.apply_lora(model, state))
    assert torch.allclose(applied, stock, atol=2e-5) and (applied - restore(model)).abs().max() > 1e-2


def test_lora_use_choices_are_the_librarys(pack_nodes):
    from kontext_train.options import setting

    assert (
        setting("lora_use").choices == comfyui.LORA_USES and setting("lora_use").default == comfyui.LORA_APPLY
    )
    cls = pack_nodes.NODE_CLASS_MAPPINGS["KontextRestoreRestore"]
    assert cls.validate_inputs(lora_use="already applied") is True
    assert "lora_use 'merge' is not one of: apply, already applied" in cls.validate_inputs(lora_use="merge")
