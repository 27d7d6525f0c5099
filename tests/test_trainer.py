"""The flow-matching trainer on a tiny Flux model built through ComfyUI (CPU).

Toy task (see tests/toy.py): a per-token latent degradation the tiny model can learn. LoRA on
every Linear layer there, because a tiny random model needs its input/output projections to
express the map; the real model trains only the block layers by default.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_conditioning, make_tiny_flux
from safetensors.torch import load_file
from toy import TOY_TRAIN_SETTINGS, ToyBatches, degrade_latent, toy_latents

from kontext_train import comfyui
from kontext_train.method.flow import MIN_REFERENCE_BRIDGE_NOISE
from kontext_train.method.lora import sanitize_lora_name, to_kohya_state_dict
from kontext_train.train.checkpoints import latest_checkpoint, list_checkpoints
from kontext_train.train.step_losses import LOSS_READ_EVERY, NonFiniteLossError
from kontext_train.train.trainer import TrainConfig, Trainer, TrainerHooks
from kontext_train.train.validation import ValidationItem, Validator

TOY = TOY_TRAIN_SETTINGS


def _model(cfg: TrainConfig, seed: int = 0):
    return comfyui.FluxLoraModel(
        make_tiny_flux(seed),
        rank=cfg.rank,
        alpha=cfg.lora_alpha,
        targets=cfg.lora_targets,
        gradient_checkpointing=cfg.gradient_checkpointing,
        seed=cfg.seed,
    )


def _validator(n: int = 8) -> Validator:
    clean = toy_latents(n, seed=99)
    return Validator([ValidationItem(str(i), clean[i], degrade_latent(clean[i])) for i in range(n)])


def _trainer(cfg, run_dir, model=None, hooks=None, validator=None, lora_path=None, data_seed=0, n=32):
    model = model or _model(cfg)
    cond = model.prepare_conditioning(make_conditioning())
    batches = ToyBatches(toy_latents(n, seed=data_seed), cfg.batch_size, seed=cfg.seed)
    return Trainer(cfg, model, batches, cond, run_dir, lora_path=lora_path, validator=validator, hooks=hooks)


@pytest.fixture(scope="module")
def toy_runs(comfy_root, tmp_path_factory):
    """Each formulation trained once on the toy task (300 steps); reused by several tests.
    ``bridge_ref`` is no longer trainable; it is set past the check to keep the toy comparison."""
    runs = {}
    for formulation in ("bridge_ref", "bridge", "kontext"):
        noise = MIN_REFERENCE_BRIDGE_NOISE if formulation == "bridge_ref" else 0.0
        cfg = TrainConfig(steps=300, **TOY)
        cfg.formulation, cfg.bridge_noise = formulation, noise
        trainer = _trainer(cfg, tmp_path_factory.mktemp(formulation), validator=_validator())
        runs[formulation] = trainer.run()
    return runs


def test_default_formulation_learns_and_restores_held_out_pairs(toy_runs):
    default = TrainConfig().formulation
    result = toy_runs[default]
    first, last = sum(result.losses[:20]) / 20, sum(result.losses[-20:]) / 20
    assert last < 0.2 * first, (first, last)
    row = result.validation[-1]
    # Held-out latents restored with the matching sampler land much closer to the clean ones.
    assert row["latent_mse_restored"] < 0.6 * row["latent_mse_degraded"], row


def test_formulation_comparison_supports_the_default(toy_runs):
    """The toy ranking behind the default (benchmarks/formulations.py has it over seeds): the bridge
    restores; a noised bridge_ref learns far slower; noise-to-clean cannot in this budget (it must
    generate the image from noise instead of correcting it)."""
    mse = {f: r.validation[-1]["latent_mse_restored"] for f, r in toy_runs.items()}
    degraded = toy_runs["bridge"].validation[-1]["latent_mse_degraded"]
    print("held-out latent MSE after 300 steps:", mse, "degraded:", degraded)
    assert TrainConfig().formulation == "bridge"
    assert mse["bridge"] < 0.6 * degraded
    assert mse["bridge"] < mse["bridge_ref"] < mse["kontext"]


def test_resume_continues_exactly(comfy_root, tmp_path):
    cfg = TrainConfig(steps=6, **{**TOY, "batch_size": 2, "lr_schedule": "cosine", "warmup_steps": 2})
    straight = _trainer(cfg, tmp_path / "straight", n=6).run()

    calls = {"n": 0}

    def cancel_after_three():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    run_dir = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _trainer(cfg, run_dir, hooks=TrainerHooks(check_cancel=cancel_after_three), n=6).run()
    assert latest_checkpoint(run_dir).name == "step_000003"
    model = _model(cfg)
    resumed = _trainer(cfg, run_dir, model=model, n=6).run()
    assert resumed.resumed_from == 3
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5, abs=1e-7)
    a = to_kohya_state_dict(model.adapters)
    b = load_file(str(latest_checkpoint(tmp_path / "straight") / "lora.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_resume_refuses_changed_settings(comfy_root, tmp_path):
    cfg = TrainConfig(steps=2, **{**TOY, "batch_size": 2, "checkpoint_every": 1})
    _trainer(cfg, tmp_path, n=4).run()
    changed = TrainConfig(steps=4, **{**TOY, "batch_size": 2, "checkpoint_every": 1, "learning_rate": 1e-3})
    with pytest.raises(ValueError, match="learning_rate"):
        _trainer(changed, tmp_path, n=4).run()


class _NaNAfter:
    """Wraps a FluxLoraModel; its velocity turns NaN from a given call on."""

    def __init__(self, inner, bad_call: int) -> None:
        self.inner, self.bad_call, self.calls = inner, bad_call, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def velocity(self, *args, **kwargs):
        self.calls += 1
        out = self.inner.velocity(*args, **kwargs)
        return out * float("nan") if self.calls >= self.bad_call else out


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(comfy_root, tmp_path):
    cfg = TrainConfig(steps=10, **{**TOY, "batch_size": 2, "checkpoint_every": 2})
    model = _NaNAfter(_model(cfg), bad_call=5)
    lora = tmp_path / "loras" / "x.safetensors"
    with pytest.raises(NonFiniteLossError, match="step 5") as err:
        _trainer(cfg, tmp_path / "run", model=model, lora_path=lora, n=8).run()
    assert "step_000004" in str(err.value)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_000002", "step_000004"]
    assert not lora.exists()
    state = load_file(str(tmp_path / "run" / "checkpoints" / "step_000004" / "lora.safetensors"))
    assert all(torch.isfinite(t).all() for t in state.values())


def test_a_nan_loss_nobody_displays_stops_the_run_at_the_next_read(comfy_root, tmp_path):
    """Losses stay on the device until read; without a display or checkpoints the trainer still
    reads them every LOSS_READ_EVERY steps, so a NaN stops the run there, naming its step."""
    cfg = TrainConfig(steps=40, **{**TOY, "batch_size": 2})
    steps = []
    hooks = TrainerHooks(on_step=lambda info: steps.append(info.step))  # never reads info.loss
    model = _NaNAfter(_model(cfg), bad_call=3)
    with pytest.raises(NonFiniteLossError, match="at step 3;"):
        _trainer(cfg, tmp_path / "run", model=model, hooks=hooks, n=8).run()
    assert steps == list(range(1, LOSS_READ_EVERY))  # stopped by the read at step LOSS_READ_EVERY


def test_each_step_info_reads_its_own_loss_when_asked(comfy_root, tmp_path):
    cfg = TrainConfig(steps=6, **{**TOY, "batch_size": 2, "grad_accum": 2})
    infos, shown = [], []

    def on_step(info):
        infos.append(info)
        if info.step % 3 == 0:
            shown.append(info.loss)

    result = _trainer(cfg, tmp_path / "run", hooks=TrainerHooks(on_step=on_step), n=8).run()
    assert len(result.losses) == 6 and all(math.isfinite(v) for v in result.losses)
    assert shown == [result.losses[2], result.losses[5]]
    assert [info.loss for info in infos] == result.losses  # read after the run: still its own step's


def test_comfy_cancel_saves_checkpoint_and_leaves_no_lora(comfy_root, tmp_path):
    import comfy.model_management as mm

    cfg = TrainConfig(steps=50, **{**TOY, "batch_size": 2})
    hits = {"n": 0}

    def cancel_on_fourth():
        hits["n"] += 1
        if hits["n"] == 4:
            mm.interrupt_current_processing(True)
        comfyui.check_interrupted()

    hooks = TrainerHooks(check_cancel=cancel_on_fourth, cancel_exceptions=comfyui.interrupt_exception_types())
    lora = tmp_path / "x.safetensors"
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _trainer(cfg, tmp_path / "run", hooks=hooks, lora_path=lora, n=8).run()
    finally:
        mm.interrupt_current_processing(False)
    assert latest_checkpoint(tmp_path / "run").name == "step_000004"
    assert not lora.exists()
    assert not list((tmp_path / "run" / "checkpoints").glob(".*partial*"))


def _direct_velocity(patcher, x, sigma, cond, guidance=1.5, reference=None):
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)
    context, pooled = cond.batch(x.shape[0])
    options = patcher.model_options.get("transformer_options", {}).copy()
    with torch.no_grad():
        return patcher.model.diffusion_model(
            x,
            sigma,
            context,
            y=pooled,
            guidance=torch.full((x.shape[0],), guidance),
            ref_latents=[reference] if reference is not None else None,
            transformer_options=options,
        )


def test_saved_lora_loads_in_stock_loader_and_input_model_is_unchanged(pack_nodes, comfy_dirs, tmp_path):
    import nodes

    cfg = TrainConfig(steps=8, **{**TOY, "batch_size": 2, "lora_targets": "blocks"})
    base = make_tiny_flux(3)
    cond = comfyui.prepare_conditioning(make_conditioning(), torch.device("cpu"), torch.float32)
    x, ref = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    sigma = torch.tensor([0.7, 0.3])
    before = _direct_velocity(base, x, sigma, cond, reference=ref)

    name = sanitize_lora_name(f"stock_{tmp_path.name}")
    model = comfyui.FluxLoraModel(base, rank=4, alpha=4, targets="blocks")
    _trainer(cfg, tmp_path, model=model, lora_path=comfy_dirs["loras"] / name, n=8).run()
    model.release()
    trained_direct = _direct_velocity(model.patcher, x, sigma, cond, reference=ref)

    (stock,) = nodes.LoraLoaderModelOnly().load_lora_model_only(base, name, 1.0)
    via_stock = _direct_velocity(stock, x, sigma, cond, reference=ref)
    after = _direct_velocity(base, x, sigma, cond, reference=ref)

    torch.testing.assert_close(after, before)  # the shared MODEL is untouched
    assert (trained_direct - before).abs().max() > 1e-4  # training changed the clone's output
    torch.testing.assert_close(via_stock, trained_direct, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("targets", ["blocks", "all_linear"])
def test_lora_metadata_says_whether_diffusers_loads_every_layer(comfy_root, tmp_path, targets, caplog):
    from kontext_train.method.lora import read_metadata

    cfg = TrainConfig(steps=2, **{**TOY, "batch_size": 2, "lora_targets": targets})
    model = comfyui.FluxLoraModel(make_tiny_flux(3), rank=2, alpha=2, targets=targets)
    lora_path = tmp_path / "d.safetensors"
    with caplog.at_level("WARNING", logger="kontext_restore"):
        _trainer(cfg, tmp_path / "run", model=model, lora_path=lora_path, n=4).run()
    model.release()
    support = read_metadata(lora_path)["kontext_restore.diffusers"]
    warned = [r.getMessage() for r in caplog.records if "load_lora_weights" in r.getMessage()]
    if targets == "blocks":
        assert support == "full" and not warned
    else:
        assert (
            support.startswith("drops 10 layers:") and "img_in" in support and "final_layer.linear" in support
        )
        assert len(warned) == 1 and "all_linear" in warned[0] and support in warned[0]


def test_non_flux_model_is_a_clear_error(comfy_root):
    with pytest.raises(ValueError, match="MODEL"):
        comfyui.FluxLoraModel(object(), rank=4, alpha=4)
    schnell = make_tiny_flux()
    schnell.model.model_config.unet_config = {
        **schnell.model.model_config.unet_config,
        "guidance_embed": False,
    }
    with pytest.raises(ValueError, match="Schnell"):
        comfyui.FluxLoraModel(schnell, rank=4, alpha=4)


def test_crash_while_saving_lora_leaves_no_partial_file(tmp_path, monkeypatch):
    from kontext_train.method import lora as lora_mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(lora_mod, "save_file", boom)
    target = tmp_path / "x.safetensors"
    with pytest.raises(OSError):
        lora_mod.atomic_save_safetensors({"a": torch.zeros(1)}, target, {})
    assert list(tmp_path.iterdir()) == []


def test_only_lora_parameters_receive_gradients(comfy_root, tmp_path):
    """The frozen base gets no gradients (else a full-size model would carry ~22 GiB of them)."""
    cfg = TrainConfig(steps=1, **{**TOY, "batch_size": 2, "lora_targets": "blocks"})
    model = _model(cfg)
    _trainer(cfg, tmp_path, model=model, n=2).run()
    base = model.base.diffusion_model
    assert not [n for n, p in base.named_parameters() if p.requires_grad or p.grad is not None]
    assert all(p.grad is not None for p in model.parameters())


class _OOMAt(_NaNAfter):
    def velocity(self, *args, **kwargs):
        self.calls += 1
        if self.calls >= self.bad_call:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.inner.velocity(*args, **kwargs)


def test_out_of_memory_ends_with_advice_and_keeps_checkpoint(comfy_root, tmp_path):
    cfg = TrainConfig(steps=10, **{**TOY, "batch_size": 2, "checkpoint_every": 2})
    model = _OOMAt(_model(cfg), bad_call=3)
    with pytest.raises(RuntimeError, match="Out of memory at step 3") as err:
        _trainer(cfg, tmp_path, model=model, n=8).run()
    assert "batch size 1" in str(err.value) and "bucket scale" in str(err.value)
    assert "step_000002" in str(err.value)
    assert latest_checkpoint(tmp_path).name == "step_000002"


def test_validation_at_the_seed_widgets_maximum_does_not_overflow(comfy_root, tmp_path):
    """2**64 - 1 is the seed widget's maximum; adding a held-out image's index to it used to
    overflow torch's manual_seed at the first validation, after the training work was done."""
    cfg = TrainConfig(steps=1, **{**TOY, "seed": 2**64 - 1})
    model = _model(cfg)
    cond = model.prepare_conditioning(make_conditioning())
    batches = ToyBatches(toy_latents(4, seed=0), cfg.batch_size, seed=0)
    validator = _validator(2)
    validator.seed = cfg.seed  # as run.py builds it: the run's seed
    result = Trainer(cfg, model, batches, cond, tmp_path / "run", validator=validator).run()
    assert result.validation and result.validation[-1]["n_images"] == 2
    assert math.isfinite(result.validation[-1]["latent_mse_restored"])
