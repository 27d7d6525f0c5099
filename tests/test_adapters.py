"""LoKr and LoHa adapters (kontext_train/method/lycoris.py) on the tests LoRA has: both forms agree,
gradients match finite differences, the stock loader rebuilds the trained model, resume is exact."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_conditioning, make_tiny_flux
from safetensors.torch import load_file
from toy import TOY_TRAIN_SETTINGS, ToyBatches, toy_latents

from kontext_train import comfyui
from kontext_train.method.lora import (
    adapter_class,
    create_adapters,
    load_kohya_into,
    sanitize_lora_name,
    to_kohya_state_dict,
)
from kontext_train.method.lycoris import adapter_parameter_count, split_dimension
from kontext_train.train.checkpoints import latest_checkpoint
from kontext_train.train.trainer import TrainConfig, Trainer, TrainerHooks

KINDS = ("lokr", "loha")


def _nonzero(adapter, seed: int = 0, dtype=torch.float64):
    """Every parameter random (a fresh adapter's delta is zero and would prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.3)
    return adapter


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_adapter_is_zero_and_has_the_counted_parameters(kind):
    adapter = adapter_class(kind)(24, 40, rank=3, alpha=5.0, generator=torch.Generator().manual_seed(0))
    assert adapter.delta().shape == (24, 40)
    assert torch.count_nonzero(adapter.delta()) == 0
    assert sum(p.numel() for p in adapter.parameters()) == adapter_parameter_count(kind, 24, 40, 3)
    assert [p.abs().max() > 0 for p in adapter.parameters()].count(False) == 1  # only one factor zero


@pytest.mark.parametrize("kind", KINDS)
def test_on_activations_adds_to_an_input_what_the_weight_wrapper_adds_to_the_weight(kind):
    adapter = _nonzero(adapter_class(kind)(24, 40, rank=3, alpha=5.0, dtype=torch.float64))
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(24, 40, generator=g, dtype=torch.float64)
    x = torch.randn(2, 7, 40, generator=g, dtype=torch.float64)
    term = adapter.on_activations(x)
    assert term.dtype == torch.float64 and term.abs().max() > 0.1
    torch.testing.assert_close(x @ weight.T + term, x @ adapter(weight).T, rtol=1e-12, atol=1e-12)
    assert adapter.on_activations(x.bfloat16()).dtype == torch.bfloat16


def test_lokr_delta_is_the_kronecker_product_comfyui_builds(comfy_root):
    """ComfyUI's own LoKr adapter, loaded from our keys, adds exactly ``delta()`` to a weight."""
    from comfy.weight_adapter import adapters as stock

    by_name = {a.name: a for a in stock}
    for kind in KINDS:
        adapter = _nonzero(adapter_class(kind)(48, 20, rank=2, alpha=3.0, dtype=torch.float64), seed=4)
        state = to_kohya_state_dict({"x": adapter})
        keys = {k.replace("lora_unet_x.", "k."): v for k, v in state.items()}
        loaded = by_name[kind].load("k", keys, float(keys["k.alpha"]), None)
        weight = torch.zeros(48, 20, dtype=torch.float64)
        rebuilt = loaded.calculate_weight(weight.clone(), "k", 1.0, 1.0, 0, lambda w: w, torch.float64)
        torch.testing.assert_close(rebuilt, adapter.delta(), rtol=1e-12, atol=1e-12, msg=kind)


def test_split_dimension_is_near_the_square_root():
    assert split_dimension(3072) == (48, 64)
    assert split_dimension(12288) == (96, 128)
    assert split_dimension(127) == (1, 127)
    assert split_dimension(64) == (8, 8)


@pytest.mark.parametrize("kind", KINDS)
def test_saved_adapters_load_back_and_a_wrong_kind_is_refused(kind):
    shapes = {"a.b": (16, 12), "c": (8, 8)}
    made = {
        p: _nonzero(a, i, torch.float32)
        for i, (p, a) in enumerate(create_adapters(shapes, 2, 2.0, kind=kind).items())
    }
    state = to_kohya_state_dict(made)
    fresh = create_adapters(shapes, 2, 1.0, kind=kind, seed=9)
    load_kohya_into(fresh, state)
    for p in shapes:
        torch.testing.assert_close(fresh[p].delta(), made[p].delta())
    with pytest.raises(ValueError, match="adapter type differs"):
        load_kohya_into(create_adapters(shapes, 2, 2.0, kind="lora"), state)


def _flux_model(kind: str, form: str = "activations", seed: int = 5, **kw):
    return comfyui.FluxLoraModel(
        make_tiny_flux(seed, dtype=torch.float64),
        rank=2,
        alpha=3,
        targets="blocks",
        lora_dtype=torch.float64,
        lora_form=form,
        adapter=kind,
        **kw,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_finite_differences(comfy_root, kind):
    """As tests/test_grad_checkpoint.py does for LoRA: a directional derivative over every adapter
    parameter, through checkpointed Flux blocks, with the adapters on activations."""
    model = _flux_model(kind, gradient_checkpointing=True)
    model.load()
    for i, a in enumerate(model.adapters.values()):
        _nonzero(a, i)  # factors of std 0.3: a delta large enough to dwarf float32 RoPE's rounding
    cond = model.prepare_conditioning(make_conditioning())
    g = torch.Generator().manual_seed(7)
    x, ref = (torch.randn(1, 16, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    sigma = torch.tensor([0.6], dtype=torch.float64)

    def loss_fn():
        return model.velocity(x, sigma, cond, 1.5, ref).pow(2).sum()

    with model.training():
        loss_fn().backward()
    params = model.parameters()
    dirs = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    analytic = sum((p.grad * d).sum() for p, d in zip(params, dirs)).item()
    t = 1e-4
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
    model.release()


@pytest.mark.parametrize("kind", KINDS)
def test_activations_and_weights_forms_give_the_same_velocity_and_gradients(comfy_root, kind):
    model = make_tiny_flux(6, dtype=torch.float64)
    lms = {
        form: comfyui.FluxLoraModel(
            model,
            rank=2,
            alpha=3,
            targets="all_linear",
            lora_dtype=torch.float64,
            lora_form=form,
            adapter=kind,
        )
        for form in ("activations", "weights")
    }
    for i, path in enumerate(lms["activations"].adapters):
        _nonzero(lms["activations"].adapters[path], i)
        lms["weights"].adapters[path].load_state_dict(lms["activations"].adapters[path].state_dict())
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
    torch.testing.assert_close(out["activations"], out["weights"], rtol=1e-10, atol=1e-10)
    assert all(g is not None and g.abs().max() > 0 for g in grads["activations"])
    for a, b in zip(grads["activations"], grads["weights"]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


TOY = TOY_TRAIN_SETTINGS


def _trainer(cfg, run_dir, model=None, hooks=None, lora_path=None, n=6):
    model = model or comfyui.FluxLoraModel(
        make_tiny_flux(0), rank=cfg.rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
        gradient_checkpointing=False, seed=cfg.seed, adapter=cfg.adapter,
    )  # fmt: skip
    cond = model.prepare_conditioning(make_conditioning())
    batches = ToyBatches(toy_latents(n, seed=0), cfg.batch_size, seed=cfg.seed)
    return Trainer(cfg, model, batches, cond, run_dir, lora_path=lora_path, hooks=hooks)


def _resumes_exactly(cfg, tmp_path):
    """Six steps straight, and three + cancel + three resumed: the same losses and LoRA."""
    straight = _trainer(cfg, tmp_path / "straight").run()
    calls = {"n": 0}

    def cancel_after_three():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    run_dir = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _trainer(cfg, run_dir, hooks=TrainerHooks(check_cancel=cancel_after_three)).run()
    resumed_trainer = _trainer(cfg, run_dir)
    resumed = resumed_trainer.run()
    assert resumed.resumed_from == 3
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5, abs=1e-7)
    a = to_kohya_state_dict(resumed_trainer.model.adapters)
    b = load_file(str(latest_checkpoint(tmp_path / "straight") / "lora.safetensors"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    return straight


@pytest.mark.parametrize("kind", KINDS)
def test_resume_continues_exactly(comfy_root, tmp_path, kind):
    cfg = TrainConfig(
        steps=6, **{**TOY, "batch_size": 2, "lr_schedule": "cosine", "warmup_steps": 2}, adapter=kind
    )
    straight = _resumes_exactly(cfg, tmp_path)
    assert straight.losses[-1] < straight.losses[0]  # and it learns


def _direct_velocity(patcher, x, sigma, cond, reference):
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)
    context, pooled = cond.batch(x.shape[0])
    options = patcher.model_options.get("transformer_options", {}).copy()
    with torch.no_grad():
        return patcher.model.diffusion_model(
            x, sigma, context, y=pooled, guidance=torch.full((x.shape[0],), 1.5),
            ref_latents=[reference], transformer_options=options,
        )  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_saved_file_loads_in_the_stock_loader_as_trained(pack_nodes, comfy_dirs, tmp_path, kind):
    import nodes

    cfg = TrainConfig(steps=6, **{**TOY, "batch_size": 2, "lora_targets": "blocks"}, adapter=kind)
    base = make_tiny_flux(3)
    cond = comfyui.prepare_conditioning(make_conditioning(), torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(1)
    x, ref = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    sigma = torch.tensor([0.7, 0.3])
    before = _direct_velocity(base, x, sigma, cond, ref)
    name = sanitize_lora_name(f"stock_{kind}_{tmp_path.name}")
    model = comfyui.FluxLoraModel(base, rank=4, alpha=4, targets="blocks", adapter=kind)
    _trainer(cfg, tmp_path, model=model, lora_path=comfy_dirs["loras"] / name, n=8).run()
    model.release()
    trained = _direct_velocity(model.patcher, x, sigma, cond, ref)
    (stock,) = nodes.LoraLoaderModelOnly().load_lora_model_only(base, name, 1.0)
    via_stock = _direct_velocity(stock, x, sigma, cond, ref)
    assert (trained - before).abs().max() > 1e-4
    torch.testing.assert_close(via_stock, trained, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_direct_velocity(base, x, sigma, cond, ref), before)
