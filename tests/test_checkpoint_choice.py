"""Checkpointing only what memory requires (issue 19): gradient_checkpointing auto / on / off,
partial checkpointing of the first N blocks, the planner's choice, and what it says when even
the smallest setting does not fit."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import make_conditioning, make_tiny_flux

from kontext_train.method.train_config import TrainConfig, checkpointing_mode
from kontext_train.plan.memory_plan import GIB, MemoryPlan


# -- the setting ---------------------------------------------------------------------------------
def test_auto_is_the_default_and_saved_true_false_mean_on_off():
    assert TrainConfig().gradient_checkpointing == "auto"
    assert TrainConfig(gradient_checkpointing=True).gradient_checkpointing == "on"
    assert TrainConfig(gradient_checkpointing=False).gradient_checkpointing == "off"
    assert TrainConfig.from_dict({"gradient_checkpointing": False}).gradient_checkpointing == "off"
    assert checkpointing_mode("true") == "on" and checkpointing_mode("auto") == "auto"
    with pytest.raises(ValueError, match="gradient_checkpointing must be one of auto, on, off"):
        TrainConfig(gradient_checkpointing="sometimes")


def test_the_trainer_node_accepts_saved_true_false_and_refuses_other_values(pack_nodes):
    node = pack_nodes.NODE_CLASS_MAPPINGS["KontextRestoreTrainLoRA"]
    for value in (True, False, "auto", "on", "off"):
        assert node.validate_inputs(gradient_checkpointing=value) is True, value
    problem = node.validate_inputs(gradient_checkpointing="maybe")
    assert isinstance(problem, str) and "gradient_checkpointing 'maybe'" in problem


# -- partial checkpointing -------------------------------------------------------------------------
def _gradients(checkpointing, monkeypatch):
    from kontext_train import comfyui
    from kontext_train.method import grad_checkpoint

    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(grad_checkpoint.torch.utils.checkpoint, "checkpoint", counting)
    model = comfyui.FluxLoraModel(
        make_tiny_flux(5, depth=2, depth_single_blocks=2),
        rank=2,
        alpha=2,
        gradient_checkpointing=checkpointing,
    )
    model.load()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for a in model.adapters.values():
            a.up.copy_(torch.randn(a.up.shape, generator=g) * 0.05)
    cond = model.prepare_conditioning(make_conditioning())
    x = torch.randn(1, 16, 4, 4, generator=g)
    with model.training():
        model.velocity(x, torch.tensor([0.6]), cond, 1.5, x).pow(2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.release()
    return grads, len(calls), model.checkpoint_blocks


@pytest.mark.parametrize(("value", "blocks"), [(True, 4), ("auto", 4), ("off", 0), (1, 1), (3, 3)])
def test_the_first_n_blocks_are_checkpointed_and_gradients_do_not_change(
    comfy_root, monkeypatch, value, blocks
):
    reference, _, _ = _gradients(False, monkeypatch)
    grads, calls, count = _gradients(value, monkeypatch)
    assert count == blocks and calls == blocks
    for a, b in zip(grads, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# -- the planner's choice ----------------------------------------------------------------------------
def _linear_planner(settings, base_gib=10.0, per_double=0.5, per_single=0.25):
    """A stand-in planner: every uncheckpointed double block costs 0.5 GiB, single 0.25 GiB."""
    tried = []

    def planner(s):
        k = (
            s.blocks
            if s.gradient_checkpointing is True
            else 0
            if s.gradient_checkpointing is False
            else s.gradient_checkpointing
        )
        tried.append(k)
        free_doubles = max(0, s.depth - k)
        free_singles = min(s.depth_single_blocks, s.blocks - k)
        total = base_gib + per_double * free_doubles + per_single * free_singles
        return MemoryPlan({}, int(total * GIB), 0, 0, overhead=0)

    return planner, tried


def test_the_planner_checkpoints_the_fewest_blocks_that_fit():
    from kontext_train.comfyui.memory_check import choose_checkpointing
    from kontext_train.comfyui.memory_probe import full_size

    s = full_size()  # 19 double + 38 single blocks
    planner, tried = _linear_planner(s)
    # All: 10 GiB; none: 10 + 9.5 + 9.5 = 29 GiB; 22 GiB free, 10% spare: 19.8 GiB budget.
    choice = choose_checkpointing(s, 22 * GIB, planner=planner)
    assert choice.fits and 0 < choice.blocks < 57
    assert (
        choice.planned <= 19.8 * GIB
        and planner(replace(s, gradient_checkpointing=choice.blocks - 1)).total > 19.8 * GIB
    )
    assert "recomputing" in choice.describe() and f"{choice.blocks} of 57 blocks" in choice.describe()
    assert choose_checkpointing(s, 40 * GIB, planner=planner).blocks == 0  # everything fits
    short = choose_checkpointing(s, 8 * GIB, planner=planner)
    assert short.blocks == 57 and not short.fits and "does not fit even so" in short.describe()


def test_the_real_planner_choice_fits_and_the_run_uses_it(comfy_root, monkeypatch):
    """The tiny model planned for real: a budget between all and none checkpointed gives a partial
    choice whose own plan fits; a training run on a (pretend) CUDA device says it and uses it."""
    from kontext_train import comfyui
    from kontext_train.comfyui import memory_check

    model = comfyui.build_tiny_flux(
        hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2, context_in_dim=64
    )
    config = TrainConfig(rank=4, formulation="kontext")
    s = memory_check.settings_for_run(model, config, [(256, 256)], 64)
    every = memory_check.cached_plan(replace(s, gradient_checkpointing=True)).total
    none = memory_check.cached_plan(replace(s, gradient_checkpointing=False)).total
    assert none > every
    free = int((every + none) / 2 / 0.9)
    choice = memory_check.choose_checkpointing(s, free)
    assert 0 < choice.blocks < 4 and choice.planned <= free * 0.9
    monkeypatch.setattr(memory_check, "run_device", lambda model: torch.device("cuda"))
    monkeypatch.setattr(memory_check, "device_free_bytes", lambda device: free)
    planned = memory_check.plan_run_memory(model, config, [(256, 256)], 64)
    assert planned.checkpointing == choice.blocks and planned.warning is None
    assert planned.note.startswith("gradient_checkpointing auto: recomputing")
    on = memory_check.plan_run_memory(model, replace(config, gradient_checkpointing="on"), [(256, 256)], 64)
    assert on.checkpointing is True and on.note is None


# -- when nothing fits -------------------------------------------------------------------------------
def test_when_nothing_fits_the_warning_says_so_and_that_comfyui_offloading_does_not_apply():
    from kontext_train.comfyui.memory_check import memory_warning
    from kontext_train.comfyui.memory_probe import full_size

    def planner(s):  # 30 GiB whatever the settings: nothing fits 16 GiB
        return MemoryPlan(s.label(), 30 * GIB, 0, 0, overhead=0)

    text = memory_warning(full_size(weight_dtype="bf16"), 16 * GIB, planner=planner)
    assert (
        "None of the usual savings" in text
        and "Even fp8 weights with every block checkpointed need 30.0 GiB" in text
    )
    assert "--lowvram" in text and "does not help here: training loads the whole model" in text


def test_training_loads_the_whole_model_so_partial_loading_cannot_help(comfy_root, monkeypatch):
    """What the offload note rests on: the trainer asks ComfyUI for a full load."""
    import comfy.model_management as mm

    from kontext_train import comfyui

    calls = []
    original = mm.load_models_gpu
    monkeypatch.setattr(mm, "load_models_gpu", lambda *a, **k: calls.append(k) or original(*a, **k))
    model = comfyui.FluxLoraModel(make_tiny_flux(), rank=2, alpha=2)
    model.load()
    model.release()
    assert calls and all(c.get("force_full_load") is True for c in calls)
