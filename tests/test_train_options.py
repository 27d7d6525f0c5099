"""The trainer's choices of issue 24 in the library: optimizers, losses, validation every N steps,
checkpoint LoRA files in the loras folder, and starting from an existing LoRA file."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import make_conditioning, make_tiny_flux
from safetensors.torch import load_file, save_file
from test_adapters import _resumes_exactly, _trainer
from toy import TOY_TRAIN_SETTINGS, degrade_latent, toy_latents

from kontext_train import comfyui
from kontext_train.data.batches import LatentBatch
from kontext_train.method.lora import create_adapters, kohya_name, to_kohya_state_dict
from kontext_train.method.lora_init import adapters_from_state
from kontext_train.train import optimizers
from kontext_train.train.checkpoints import list_checkpoints
from kontext_train.train.optimizers import (
    OPTIMIZERS,
    build_optimizer,
    loss_per_sample,
    state_bytes_per_number,
)
from kontext_train.train.trainer import TrainConfig, Trainer
from kontext_train.train.validation import ValidationItem, Validator

TOY = TOY_TRAIN_SETTINGS


# -- losses ------------------------------------------------------------------------------------
def test_losses_are_torchs_per_sample():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 5, generator=g) * 2, torch.randn(3, 4, 5, generator=g)
    F = torch.nn.functional
    for kind, expected in (
        ("mse", F.mse_loss(pred, target, reduction="none")),
        ("l1", F.l1_loss(pred, target, reduction="none")),
        ("huber", F.huber_loss(pred, target, reduction="none", delta=0.5)),
    ):
        got = loss_per_sample(pred, target, kind, huber_delta=0.5)
        torch.testing.assert_close(got, expected.mean(dim=(1, 2)), msg=kind)
    with pytest.raises(ValueError, match="loss must be one of mse, l1, huber"):
        loss_per_sample(pred, target, "l2")


class _ZeroVelocity:
    """A model whose velocity is zero: the loss is then the chosen loss of the target alone."""

    device, dtype, adapters = torch.device("cpu"), torch.float32, {}

    def to_model_space(self, z):
        return z

    def velocity(self, x, sigma, cond, guidance, reference=None):
        return torch.zeros_like(x)


@pytest.mark.parametrize("loss", ["mse", "l1", "huber"])
def test_the_trainer_uses_the_chosen_loss(loss):
    """Bridge without noise: the target is degraded - clean whatever sigma, so the step's loss is
    known exactly for a zero prediction."""
    clean = toy_latents(2, seed=1)
    degraded = degrade_latent(clean)
    cfg = TrainConfig(formulation="bridge", loss=loss, huber_delta=0.3)
    trainer = Trainer(cfg, _ZeroVelocity(), None, None, "unused")
    got = trainer.batch_loss(LatentBatch(0, 0, clean, degraded, ["a", "b"]))
    diff = degraded - clean
    expected = {
        "mse": diff.pow(2).mean(),
        "l1": diff.abs().mean(),
        "huber": torch.nn.functional.huber_loss(torch.zeros_like(diff), diff, delta=0.3),
    }[loss]
    torch.testing.assert_close(got, expected)


# -- optimizers --------------------------------------------------------------------------------
def test_every_optimizer_builds_and_its_state_is_what_the_plan_counts():
    """A step on a matrix (above bitsandbytes' 4096-number 8-bit threshold) and a vector: the
    optimizer's real state tensors have exactly ``state_bytes_per_number`` bytes (step counters
    and bitsandbytes' shared 256-entry quantisation maps aside)."""
    for name in OPTIMIZERS:
        params = [torch.nn.Parameter(torch.randn(96, 80)), torch.nn.Parameter(torch.randn(37))]
        opt = build_optimizer(name, params, lr=1.0 if name == "prodigy" else 1e-3, weight_decay=0.01)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        for p in params:
            state = opt.state[p]
            counted = sum(
                v.numel() * v.element_size()
                for k, v in state.items()
                if torch.is_tensor(v) and k != "step" and not k.startswith("qmap")
            )
            assert counted == state_bytes_per_number(name, p.shape, p.element_size()), (name, p.shape)
    zero = torch.nn.Parameter(torch.zeros(96, 80))  # Prodigy keeps one number of a zero start
    opt = build_optimizer("prodigy", [zero], lr=1.0, weight_decay=0.0)
    zero.grad = torch.randn_like(zero)
    opt.step()
    counted = sum(v.numel() * v.element_size() for v in opt.state[zero].values() if torch.is_tensor(v))
    assert counted == state_bytes_per_number("prodigy", zero.shape, 4, starts_at_zero=True)


def test_a_missing_optimizer_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        optimizers.importlib.util, "find_spec", lambda n, *a: None if n == "prodigyopt" else real(n, *a)
    )
    with pytest.raises(ValueError, match="pip install prodigyopt"):
        build_optimizer("prodigy", [torch.nn.Parameter(torch.zeros(2))], 1.0, 0.0)
    assert optimizers.optimizer_available("adafactor")


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "adamw"])
def test_resume_continues_exactly_with_each_optimizer(comfy_root, tmp_path, name):
    """AdamW's resume is tests/test_trainer.py's; the others keep their state through a
    checkpoint the same way. Prodigy at learning_rate 1.0, as its authors advise: it starts from a
    tiny step size (d0 = 1e-6) and raises it as it goes, too slowly to show in a 6-step loss."""
    lr = 1.0 if name == "prodigy" else TOY["learning_rate"]
    cfg = TrainConfig(steps=6, **{**TOY, "batch_size": 2, "learning_rate": lr}, optimizer=name)
    straight = _resumes_exactly(cfg, tmp_path)
    if name == "prodigy":
        state = torch.load(list_checkpoints(tmp_path / "straight")[-1] / "state.pt", weights_only=True)
        assert state["optimizer"]["param_groups"][0]["d"] > 1e-6  # it has raised its step size
    else:
        assert straight.losses[-1] < straight.losses[0], straight.losses


# -- validation every N steps -------------------------------------------------------------------
def test_validation_every_n_steps_instead_of_epochs(comfy_root, tmp_path):
    cfg = TrainConfig(steps=5, **{**TOY, "batch_size": 2, "validate_every_epochs": 1}, validate_every_steps=2)
    trainer = _trainer(cfg, tmp_path, n=8)  # 4 batches an epoch: epochs would validate at step 4 only
    clean = toy_latents(2, seed=99)
    trainer.validator = Validator(
        [ValidationItem(str(i), clean[i], degrade_latent(clean[i])) for i in range(2)]
    )
    result = trainer.run()
    assert [row["step"] for row in result.validation] == [2, 4, 5]  # 5: the final one


# -- checkpoints as LoRA files --------------------------------------------------------------------
def test_checkpoints_also_appear_as_lora_files_and_are_pruned_with_them(comfy_root, tmp_path):
    cfg = TrainConfig(steps=4, **{**TOY, "batch_size": 2, "checkpoint_every": 1, "keep_checkpoints": 2})
    loras = tmp_path / "loras"
    trainer = _trainer(cfg, tmp_path / "run", lora_path=loras / "mine.safetensors")
    trainer.checkpoint_lora_dir = loras / "mine"
    trainer.run()
    kept = [p.name for p in list_checkpoints(tmp_path / "run")]
    assert kept == ["step_000003", "step_000004"]
    files = sorted(p.name for p in (loras / "mine").iterdir())
    assert files == ["mine_step_000003.safetensors", "mine_step_000004.safetensors"]
    for step in (3, 4):
        copy = load_file(str(loras / "mine" / f"mine_step_{step:06d}.safetensors"))
        original = load_file(str(tmp_path / "run" / "checkpoints" / f"step_{step:06d}" / "lora.safetensors"))
        assert copy.keys() == original.keys() and all(torch.equal(copy[k], original[k]) for k in copy)

    off = TrainConfig(steps=2, **{**TOY, "batch_size": 2, "checkpoint_every": 1}, checkpoint_loras=False)
    trainer = _trainer(off, tmp_path / "run_off", lora_path=loras / "off.safetensors")
    trainer.checkpoint_lora_dir = loras / "off"
    trainer.run()
    assert list_checkpoints(tmp_path / "run_off") and not (loras / "off").exists()


# -- init_lora -------------------------------------------------------------------------------------
def _kohya_file(tmp_path, layers: dict, name="other.safetensors", alpha=True):
    """A kohya-format LoRA as another trainer writes it: chosen layers, per-layer ranks."""
    g = torch.Generator().manual_seed(3)
    state = {}
    for path, (out_f, in_f, rank) in layers.items():
        state[f"{kohya_name(path)}.lora_down.weight"] = torch.randn(rank, in_f, generator=g)
        state[f"{kohya_name(path)}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.1
        if alpha:
            state[f"{kohya_name(path)}.alpha"] = torch.tensor(float(rank) / 2)
    save_file(state, str(tmp_path / name))
    return tmp_path / name, state


def test_another_trainers_lora_is_continued_with_its_layers_ranks_and_alphas(comfy_root, tmp_path):
    model = make_tiny_flux(2)
    qkv = model.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.shape
    lin2 = model.model.diffusion_model.single_blocks[0].linear2.weight.shape
    layers = {"double_blocks.0.img_attn.qkv": (*qkv, 3), "single_blocks.0.linear2": (*lin2, 5)}
    path, state = _kohya_file(tmp_path, layers)
    lm = comfyui.FluxLoraModel(model, rank=16, alpha=16, targets="blocks", init_state=load_file(str(path)))
    assert set(lm.adapters) == set(layers)  # the file's layers, not the 'blocks' set of the settings
    assert lm.init_info.ranks == (3, 5) and lm.init_info.alphas == (1.5, 2.5)
    saved = to_kohya_state_dict(lm.adapters)
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    # The stock loader applies the file as the training model starts from it.
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = lm.prepare_conditioning(make_conditioning())
    lm.load()
    with torch.no_grad():
        ours = lm.velocity(x, torch.tensor([0.5]), cond, 1.5)
    lm.release()
    stock = comfyui.apply_lora(model, state)
    import comfy.model_management as mm

    mm.load_models_gpu([stock], force_full_load=True)
    context, pooled = cond.batch(1)
    with torch.no_grad():
        theirs = stock.model.diffusion_model(
            x, torch.tensor([0.5]), context, y=pooled, guidance=torch.full((1,), 1.5),
            transformer_options=stock.model_options.get("transformer_options", {}).copy(),
        )  # fmt: skip
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-5)


def test_init_file_without_alpha_means_scale_one(comfy_root, tmp_path):
    path, _ = _kohya_file(tmp_path, {"a": (8, 6, 2)}, alpha=False)
    adapters, info = adapters_from_state(load_file(str(path)), {"a": (8, 6)}, "lora", path.name)
    assert adapters["a"].scale == 1.0 and info.describe() == "lora, 1 layers, rank 2, alpha 2"


@pytest.mark.parametrize(
    "state,kind,match",
    [
        ({"transformer.x.lora_A.weight": torch.zeros(2, 6)}, "lora", "not in kohya format"),
        ({"lora_te1_text_model_x.lora_down.weight": torch.zeros(2, 6)}, "lora", "text encoder"),
        ({"lora_unet_a.lora_down.weight": torch.zeros(2, 6), "lora_unet_a.dora_scale": torch.zeros(8)}, "lora", "no DoRA"),
        ({"lora_unet_zz.lora_down.weight": torch.zeros(2, 6), "lora_unet_zz.lora_up.weight": torch.zeros(8, 2)}, "lora", "another base model"),
        ({"lora_unet_a.lora_down.weight": torch.zeros(2, 7), "lora_unet_a.lora_up.weight": torch.zeros(8, 2)}, "lora", "shape"),
        ({"lora_unet_a.lora_down.weight": torch.zeros(2, 6), "lora_unet_a.lora_up.weight": torch.zeros(8, 2)}, "lokr", "set adapter to lora"),
    ],
)  # fmt: skip
def test_files_the_trainer_cannot_continue_are_refused_naming_why(state, kind, match):
    with pytest.raises(ValueError, match=match) as err:
        adapters_from_state(state, {"a": (8, 6)}, kind, "bad.safetensors")
    assert "bad.safetensors" in str(err.value)


def test_init_from_our_own_lokr_file(comfy_root):
    made = create_adapters({"a": (8, 6)}, 2, 3.0, kind="lokr", seed=1)
    with torch.no_grad():
        made["a"].w2_b.normal_()
    adapters, info = adapters_from_state(to_kohya_state_dict(made), {"a": (8, 6)}, "lokr", "mine")
    torch.testing.assert_close(adapters["a"].delta(), made["a"].delta())
    assert info.kind == "lokr" and info.ranks == (2,)


def test_a_run_started_from_a_file_trains_on_from_its_weights(comfy_root, tmp_path):
    """Step 0 of the new run is the file: its first loss is the loss of the file's LoRA."""
    cfg = TrainConfig(steps=3, **{**TOY, "batch_size": 2, "lora_targets": "blocks"})
    first = _trainer(cfg, tmp_path / "a", lora_path=tmp_path / "a.safetensors").run()
    state = load_file(str(tmp_path / "a.safetensors"))
    model = comfyui.FluxLoraModel(make_tiny_flux(0), rank=8, alpha=8, targets="blocks", init_state=state)
    continued = _trainer(cfg, tmp_path / "b", model=model).run()
    fresh = _trainer(cfg, tmp_path / "c").run()
    assert continued.losses[0] != pytest.approx(fresh.losses[0], rel=1e-6)
    assert continued.losses[0] < first.losses[0]  # it starts where the first run ended


# -- the memory plan ------------------------------------------------------------------------------
def test_the_plan_counts_each_adapters_parameters_and_each_optimizers_real_state(comfy_root):
    """The planner's adapter + optimizer-state bytes (``lora_state_bytes``, shapes only) equal what
    fresh adapters and the optimizer hold for real after a step on the CPU; ``plan_memory`` (on
    the meta device) counts the same for a run's adapter and optimizer settings."""
    from kontext_train.comfyui.memory_probe import PlanSettings, lora_state_bytes, plan_memory

    tiny = dict(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1, context_in_dim=64)
    counted = {}
    for adapter in ("lora", "lokr", "loha"):
        for optimizer in OPTIMIZERS:
            model = comfyui.FluxLoraModel(comfyui.build_tiny_flux(**tiny), rank=4, alpha=4.0, adapter=adapter)
            params = model.parameters()
            lr = 1.0 if optimizer == "prodigy" else 1e-3
            opt = build_optimizer(optimizer, params, lr=lr, weight_decay=0.0)
            planned = lora_state_bytes(model, optimizer)  # before the step: the fresh adapters
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
            real = sum(p.numel() * p.element_size() for p in params)
            real += sum(
                v.numel() * v.element_size()
                for p in params
                for k, v in opt.state[p].items()
                if torch.is_tensor(v) and k != "step" and not k.startswith("qmap")
            )
            assert planned == real, (adapter, optimizer, planned, real)
            counted[(adapter, optimizer)] = real
    assert counted[("lokr", "adamw")] < counted[("lora", "adamw")] < counted[("loha", "adamw")]
    assert counted[("lora", "adafactor")] < counted[("lora", "adamw8bit")] < counted[("lora", "adamw")]
    assert counted[("lora", "prodigy")] > counted[("lora", "adamw")]
    settings = PlanSettings(
        weight_dtype="fp32", width=64, height=64, reference=False, rank=4, text_tokens=16,
        adapter="lokr", optimizer="prodigy", **tiny,
    )  # fmt: skip
    plan = plan_memory(settings, attention="native", autocast=False)
    assert plan.lora == counted[("lokr", "prodigy")]
    assert plan.settings["adapter"] == "lokr" and plan.settings["optimizer"] == "prodigy"


def test_the_command_takes_the_new_options(capsys):
    from kontext_train.app import cli

    argv = ["train", "--unet", "x", "--optimizer", "adafactor", "--adapter", "lokr", "--loss", "huber"]
    argv += ["--validate-every-steps", "50", "--no-checkpoint-loras", "--init-lora", "/tmp/start.safetensors"]
    assert cli.main([*argv, "--print-config"]) == 0
    shown = capsys.readouterr().out
    for expected in ("adafactor", "lokr", "huber", "50", "/tmp/start.safetensors"):
        assert expected in shown, expected
    with pytest.raises(SystemExit):  # argparse refuses a choice it does not know
        cli.main(["train", "--unet", "x", "--optimizer", "sgd", "--print-config"])
    assert "--optimizer: invalid choice: 'sgd'" in capsys.readouterr().err


def test_an_init_file_that_is_missing_or_not_safetensors_is_a_run_error(tmp_path):
    from kontext_train.train.run_checks import RunError
    from kontext_train.train.run_init import init_state

    assert init_state(None, None) is None
    with pytest.raises(RunError, match="no such file"):
        init_state(None, tmp_path / "gone.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RunError, match="junk.safetensors cannot be read"):
        init_state(None, tmp_path / "junk.safetensors")
    save_file({"lora_unet_a.alpha": torch.tensor(1.0)}, str(tmp_path / "ok.safetensors"))
    state, name, from_checkpoint = init_state(None, tmp_path / "ok.safetensors")
    assert name == "ok.safetensors" and not from_checkpoint and set(state) == {"lora_unet_a.alpha"}
