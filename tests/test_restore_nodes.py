"""Restoration sampler nodes and helpers, in-process on a tiny Flux model and a tiny VAE.

The central promise: in bridge modes ComfyUI's sampler starts *exactly* at the degraded latent
(model space) at sigma = 1, as the LoRA was trained; checked by recording the first model call.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_conditioning, make_tiny_flux
from conftest import recording_model as _recording
from toy import TOY_TRAIN_SETTINGS, ToyBatches, degrade_latent, toy_latents

from kontext_train import comfyui
from kontext_train.data.buckets import bucket_resolutions
from kontext_train.method.flow import flux_shift_mu, image_tokens, sampling_sigmas
from kontext_train.method.lora import atomic_save_safetensors, create_adapters, to_kohya_state_dict
from kontext_train.method.sampler import restore_latents
from kontext_train.restore.restore import (
    plan_restoration,
)
from kontext_train.restore.restore_settings import RestoreSettings
from kontext_train.train.trainer import TrainConfig, Trainer, lora_metadata

SCALE = 0.0625  # buckets of ~64 px: latents of a few tokens, fast on the CPU


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models' ops gain nothing from a second thread, and on a busy 2-core machine the
    threads' spin-waits made these tests 5x slower (measured): run them on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _node(pack_nodes, name):
    """The V3 node class ComfyUI registered; its ``execute`` is what ComfyUI calls."""
    return pack_nodes.NODE_CLASS_MAPPINGS[name]


def _model_space(model, raw):
    return model.get_model_object("latent_format").process_in(raw.float())


def _runs(calls):
    """Model calls grouped per sampler run (each run starts at sigma = 1)."""
    runs = []
    for call in calls:
        if float(call["sigma"].flatten()[0]) == 1.0 or not runs:
            runs.append([])
        runs[-1].append(call)
    return runs


def _images(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, h, w, 3, generator=g)


def _restore_output(
    pack_nodes, model, vae, images, mode="bridge_ref", steps=0, seed=0, lora_name="none", **kw
):
    node = _node(pack_nodes, "KontextRestoreRestore")
    args = dict(
        model=model,
        vae=vae,
        conditioning=make_conditioning(),
        images=images,
        mode=mode,
        steps=steps,
        guidance=1.5,
        sampler_name="euler",
        scheduler="as_trained",
        seed=seed,
        bucket_scale=SCALE,
        lora_name=lora_name,
    )
    args.update(kw)
    with torch.inference_mode():  # as ComfyUI runs nodes
        return node.execute(**args)


def _restore(*args, **kw):
    return _restore_output(*args, **kw).result[0]


def _write_lora(folder, name, formulation="bridge", bridge_noise=0.0, **config):
    adapters = create_adapters({"double_blocks.0.img_attn.qkv": (384, 128)}, rank=2, alpha=2)
    cfg = TrainConfig(**config)
    # Set past the training check: bridge_ref LoRAs come from earlier versions and still restore.
    cfg.formulation, cfg.bridge_noise = formulation, bridge_noise
    meta = lora_metadata(cfg, step=10)
    return atomic_save_safetensors(to_kohya_state_dict(adapters), folder / name, meta)


# ------------------------------------------------------------------ the exact degraded start


def test_restore_node_first_model_call_is_the_degraded_latent(pack_nodes, tiny_vae):
    model, calls = _recording(make_tiny_flux())
    images = _images(1, 64, 64)  # exactly the 64x64 bucket: no resize, no padding
    out = _restore(pack_nodes, model, tiny_vae, images, mode="bridge_ref")
    raw = comfyui.vae_encode(tiny_vae, images.permute(0, 3, 1, 2))
    expected = _model_space(model, raw)
    assert torch.equal(calls[0]["input"], expected)
    assert torch.all(calls[0]["sigma"] == 1.0)
    # bridge_ref also shows the degraded latent as the Kontext reference.
    assert calls[0]["refs"] is not None and torch.allclose(calls[0]["refs"][0], expected)
    assert len(calls) == 8  # steps 0 = automatic: 8 for bridge modes
    assert out.shape == images.shape


def test_sampler_custom_advanced_with_degraded_noise_and_bridge_sigmas(pack_nodes, tiny_vae):
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler as ncs

    model, calls = _recording(make_tiny_flux())
    raw = comfyui.vae_encode(tiny_vae, _images(1, 64, 96, seed=3).permute(0, 3, 1, 2))
    latent = {"samples": raw}
    with torch.inference_mode():
        (noise,) = _node(pack_nodes, "KontextRestoreDegradedNoise").execute(model, latent, 0.0, 5).result
        (sigmas,) = _node(pack_nodes, "KontextRestoreSigmas").execute(6, latent).result
        guider = ncs.Guider_Basic(model)
        guider.set_conds(make_conditioning())
        sampler = comfy.samplers.sampler_object("euler")
        result = ncs.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent)
    out = result.result[0] if hasattr(result, "result") else result[0]
    mu = flux_shift_mu(image_tokens(*raw.shape[-2:]))
    assert torch.allclose(sigmas, sampling_sigmas(6, mu)) and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert torch.equal(calls[0]["input"], _model_space(model, raw))
    assert torch.all(calls[0]["sigma"] == 1.0)
    assert len(calls) == 6
    assert out["samples"].shape == raw.shape


def test_degraded_noise_refuses_a_latent_of_another_size(comfy_root):
    noise = comfyui.DegradedStartNoise(torch.zeros(1, 16, 8, 8))
    with pytest.raises(ValueError, match="same degraded LATENT"):
        noise.generate_noise({"samples": torch.zeros(1, 16, 8, 10)})


# ------------------------------------------------------------------ a trained LoRA restores


@pytest.mark.slow
def test_trained_lora_restores_toy_latents_through_comfy_sampler(comfy_root, tmp_path):
    """A LoRA trained on the toy pairs restores held-out latents with ComfyUI's euler sampler,
    and ComfyUI's sampler agrees with the pure-torch Euler restorer given the same sigmas."""
    torch.manual_seed(0)
    model = make_tiny_flux()
    cond = make_conditioning()
    config = TrainConfig(steps=300, formulation="bridge", **TOY_TRAIN_SETTINGS)
    lora_model = comfyui.FluxLoraModel(
        model, rank=8, alpha=8.0, targets="all_linear", gradient_checkpointing=False
    )
    prepared = lora_model.prepare_conditioning(cond)
    trainer = Trainer(config, lora_model, ToyBatches(toy_latents(32, seed=1), 4), prepared, tmp_path)
    result = trainer.run(resume=False)
    assert result.step == 300

    clean = toy_latents(4, seed=1234)  # held out
    degraded = degrade_latent(clean)
    steps = 8
    mu = flux_shift_mu(image_tokens(*clean.shape[-2:]))
    sigmas = sampling_sigmas(steps, mu)

    with torch.no_grad():
        start = lora_model.to_model_space(degraded.to(lora_model.device))

        def velocity(x, sigma, reference):
            return lora_model.velocity(x, sigma, prepared, config.guidance, reference)

        pure = lora_model.from_model_space(restore_latents(velocity, start, "bridge", steps, mu)).cpu()
    lora_model.release()

    restored_model = comfyui.apply_lora(model, to_kohya_state_dict(lora_model.adapters))
    settings = RestoreSettings(formulation="bridge", sampler="euler", guidance=1.5)
    comfy = comfyui.sample_from(restored_model, cond, degraded, sigmas, settings)
    mse_degraded = torch.mean((degraded - clean) ** 2).item()
    mse_restored = torch.mean((comfy - clean) ** 2).item()
    assert mse_restored < 0.5 * mse_degraded, (mse_restored, mse_degraded)
    assert torch.allclose(comfy, pure, atol=1e-5, rtol=1e-5), (comfy - pure).abs().max()


# ------------------------------------------------------------------ the Restore node


def test_restore_node_keeps_odd_sizes_and_batches(pack_nodes, tiny_vae):
    model = make_tiny_flux()
    images = _images(2, 37, 53)
    out = _restore(pack_nodes, model, tiny_vae, images, steps=2)
    assert out.shape == images.shape
    assert out.dtype == torch.float32 and 0.0 <= out.min() and out.max() <= 1.0
    # Images of a batch are restored independently (different content, different results).
    assert not torch.equal(out[0], out[1])


def test_restore_node_is_deterministic_by_seed(pack_nodes, tiny_vae):
    model = make_tiny_flux()
    images = _images(1, 48, 64, seed=1)
    a = _restore(pack_nodes, model, tiny_vae, images, mode="kontext", steps=3, seed=7)
    b = _restore(pack_nodes, model, tiny_vae, images, mode="kontext", steps=3, seed=7)
    c = _restore(pack_nodes, model, tiny_vae, images, mode="kontext", steps=3, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # kontext starts from seeded noise


def test_auto_mode_reads_formulation_and_bridge_noise_from_lora(pack_nodes, tiny_vae, comfy_dirs):
    loras = comfy_dirs["loras"]
    _write_lora(loras, "meta_bridge.safetensors", formulation="bridge")
    _write_lora(loras, "meta_kontext.safetensors", formulation="kontext")
    _write_lora(loras, "sub/meta_noisy.safetensors", formulation="bridge_ref", bridge_noise=0.1)
    images = _images(1, 64, 64, seed=2)
    raw = comfyui.vae_encode(tiny_vae, images.permute(0, 3, 1, 2))

    model, calls = _recording(make_tiny_flux())
    degraded = _model_space(model, raw)
    _restore(pack_nodes, model, tiny_vae, images, mode="auto", lora_name="meta_bridge")  # suffix optional
    assert torch.equal(calls[0]["input"], degraded) and calls[0]["refs"] is None and len(calls) == 8

    model, calls = _recording(make_tiny_flux())
    _restore(pack_nodes, model, tiny_vae, images, mode="auto", lora_name="meta_kontext.safetensors")
    assert not torch.allclose(calls[0]["input"], degraded) and calls[0]["refs"] is not None
    assert len(calls) == 28  # kontext: noise to image in the usual 28 steps

    model, calls = _recording(make_tiny_flux())
    _restore(
        pack_nodes, model, tiny_vae, images, mode="auto", seed=11, lora_name="sub/meta_noisy.safetensors"
    )
    eps = torch.randn(degraded.shape, generator=torch.Generator().manual_seed(11))
    assert torch.allclose(calls[0]["input"], degraded + 0.1 * eps, atol=1e-6)
    assert calls[0]["refs"] is not None

    # No LoRA: auto means the training default, bridge.
    model, calls = _recording(make_tiny_flux())
    _restore(pack_nodes, model, tiny_vae, images, mode="auto")
    assert torch.equal(calls[0]["input"], degraded) and calls[0]["refs"] is None


def test_lora_name_errors_are_clear(pack_nodes, tiny_vae, comfy_dirs):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(comfy_dirs["loras"] / "foreign.safetensors"), metadata={"ss_x": "1"})
    model = make_tiny_flux()
    images = _images(1, 32, 32)
    with pytest.raises(FileNotFoundError, match="no_such_lora"):
        _restore(pack_nodes, model, tiny_vae, images, mode="auto", lora_name="no_such_lora")
    with pytest.raises(ValueError, match="Choose the mode explicitly"):
        _restore(pack_nodes, model, tiny_vae, images, mode="auto", lora_name="foreign")
    # An explicit mode works with any LoRA file.
    out = _restore(pack_nodes, model, tiny_vae, images, mode="bridge", steps=1, lora_name="foreign")
    assert out.shape == images.shape


def test_oversize_images_are_restored_in_bucket_tiles(pack_nodes, tiny_vae):
    images = _images(1, 70, 150, seed=4)
    plan = plan_restoration(150, 70, bucket_resolutions(SCALE))
    assert plan.tiled and len(plan.tiles) > 1
    model, calls = _recording(make_tiny_flux())
    out = _restore(pack_nodes, model, tiny_vae, images, steps=2)
    assert out.shape == images.shape
    runs = _runs(calls)
    assert len(runs) == len(plan.tiles)
    bw, bh = plan.bucket
    assert all(run[0]["input"].shape[-2:] == (bh // 8, bw // 8) for run in runs)


def _combo(spec, name):
    """(options, default) of a V3 combo input as ComfyUI's V1 view of the node shows it."""
    kind, extra = spec[name]
    assert kind == "COMBO" or (kind == "COMBO,STRING" and extra["widgetType"] == "COMBO"), (name, kind)
    return extra["options"], extra.get("default")


def test_node_defaults_are_valid_choices(pack_nodes):
    spec = pack_nodes.NODE_CLASS_MAPPINGS["KontextRestoreRestore"].INPUT_TYPES()
    for name in ("mode", "sampler_name", "scheduler"):
        options, default = _combo(spec["required"], name)
        assert default in options
    assert _combo(spec["required"], "scheduler")[0][0] == "as_trained"
    assert "simple" in _combo(spec["required"], "scheduler")[0]
    options, default = _combo(spec["optional"], "lora_name")
    assert options[0] == default == "none"
    # A combo widget whose socket also takes a STRING link (the trainer's lora_name output).
    assert spec["optional"]["lora_name"][0] == "COMBO,STRING"
    assert pack_nodes.NODE_DISPLAY_NAME_MAPPINGS["KontextRestoreSigmas"] == "Kontext Restore: Bridge Sigmas"


def test_lora_name_is_a_picker_of_the_loras_folder(pack_nodes, comfy_dirs):
    cls = pack_nodes.NODE_CLASS_MAPPINGS["KontextRestoreRestore"]
    before, _ = _combo(cls.INPUT_TYPES()["optional"], "lora_name")
    assert "picked/placed.safetensors" not in before
    _write_lora(comfy_dirs["loras"], "picked/placed.safetensors", formulation="bridge")
    # ComfyUI caches folder listings by the folders' modification times; a new file shows up.
    options, _ = _combo(cls.INPUT_TYPES()["optional"], "lora_name")
    assert "picked/placed.safetensors" in options and options[0] == "none"
    # Queued values are checked against the list: a clear error names the input and the folder.
    assert cls.validate_inputs(lora_name="picked/placed.safetensors") is True
    assert cls.validate_inputs(lora_name="none") is True
    # Workflows saved when lora_name was text: "" (no LoRA) and a name without its suffix.
    assert cls.validate_inputs(lora_name="") is True
    assert cls.validate_inputs(lora_name="picked/placed") is True
    message = cls.validate_inputs(lora_name="not_there.safetensors")
    assert isinstance(message, str) and "lora_name 'not_there.safetensors'" in message
    assert "loras folder" in message


def test_existing_reference_latents_are_replaced_not_appended(comfy_root):
    cond = make_conditioning()
    cond[0][1]["reference_latents"] = [torch.ones(1, 16, 4, 4)]
    degraded = torch.zeros(1, 16, 4, 4)
    with_ref = comfyui.with_reference_and_guidance(cond, degraded, 2.5)
    assert len(with_ref[0][1]["reference_latents"]) == 1
    assert torch.equal(with_ref[0][1]["reference_latents"][0], degraded)
    assert with_ref[0][1]["guidance"] == 2.5
    without = comfyui.with_reference_and_guidance(cond, None, 1.5)
    assert without[0][1]["reference_latents"] is None
    assert len(cond[0][1]["reference_latents"]) == 1  # the input conditioning is not modified


# ------------------------------------------------------------------ settings from the LoRA, clock, progress


def _write_run_lora(folder, name, bucket_scale, **config):
    adapters = create_adapters({"double_blocks.0.img_attn.qkv": (384, 128)}, rank=2, alpha=2)
    meta = lora_metadata(TrainConfig(**config), step=10, extra={"bucket_scale": bucket_scale})
    return atomic_save_safetensors(to_kohya_state_dict(adapters), folder / name, meta)


def test_guidance_and_bucket_scale_0_come_from_the_lora_and_other_values_override_it(
    pack_nodes, tiny_vae, comfy_dirs
):
    _write_run_lora(comfy_dirs["loras"], "run_meta.safetensors", 0.125, formulation="bridge", guidance=2.5)
    images = _images(1, 48, 80, seed=5)
    spec = pack_nodes.NODE_CLASS_MAPPINGS["KontextRestoreRestore"].INPUT_TYPES()["required"]
    assert spec["guidance"][1]["default"] == 0.0 and spec["bucket_scale"][1]["default"] == 0.0
    assert "0: the guidance the LoRA was trained with" in spec["guidance"][1]["tooltip"]
    assert "0: the scale the LoRA was trained at" in spec["bucket_scale"][1]["tooltip"]
    # 0 (the defaults): the values the LoRA recorded.
    model, calls = _recording(make_tiny_flux())
    out = _restore_output(
        pack_nodes,
        model,
        tiny_vae,
        images,
        mode="auto",
        steps=1,
        guidance=0.0,
        bucket_scale=0.0,
        lora_name="run_meta.safetensors",
    )
    bw, bh = plan_restoration(80, 48, bucket_resolutions(0.125)).bucket
    assert calls[0]["input"].shape[-2:] == (bh // 8, bw // 8)
    assert calls[0]["guidance"] == 2.5 and calls[0]["refs"] is None  # bridge, as recorded
    shown = "".join(out.ui.as_dict()["text"])
    assert "guidance 2.5 (LoRA metadata)" in shown and "bucket scale 0.125 (LoRA metadata)" in shown
    assert "Warning" not in shown
    # Any other value overrides the LoRA, and the node shows the difference as a warning.
    model, calls = _recording(make_tiny_flux())
    out = _restore_output(
        pack_nodes,
        model,
        tiny_vae,
        images,
        mode="auto",
        steps=1,
        guidance=1.5,
        bucket_scale=SCALE,
        lora_name="run_meta.safetensors",
    )
    bw, bh = plan_restoration(80, 48, bucket_resolutions(SCALE)).bucket
    assert calls[0]["input"].shape[-2:] == (bh // 8, bw // 8) and calls[0]["guidance"] == 1.5
    shown = "".join(out.ui.as_dict()["text"])
    assert "guidance 1.5 (user)" in shown
    assert "Warning: guidance 1.5 differs from the 2.5" in shown and "Warning: bucket_scale" in shown
    # Without a LoRA, 0 means the defaults (guidance 1.5, bucket scale 1.0) and a value is used as is.
    model, calls = _recording(make_tiny_flux())
    out = _restore_output(
        pack_nodes, model, tiny_vae, _images(1, 64, 64), steps=1, guidance=0.0, bucket_scale=0.0
    )
    assert calls[0]["guidance"] == 1.5
    assert "guidance 1.5 (default)" in "".join(out.ui.as_dict()["text"])
    model, calls = _recording(make_tiny_flux())
    _restore(pack_nodes, model, tiny_vae, _images(1, 64, 64), steps=1, guidance=3.0)
    assert calls[0]["guidance"] == 3.0


def test_restore_node_shows_a_prompt_other_than_the_training_prompt(
    pack_nodes, tiny_vae, comfy_dirs, monkeypatch
):
    from comfy_api.latest import io

    from kontext_train.method.training_prompt import PROMPT_KEY

    adapters = create_adapters({"double_blocks.0.img_attn.qkv": (384, 128)}, rank=2, alpha=2)
    meta = lora_metadata(
        TrainConfig(formulation="bridge"), step=10, extra={PROMPT_KEY: "Restore this old photo."}
    )
    atomic_save_safetensors(to_kohya_state_dict(adapters), comfy_dirs["loras"] / "prompted.safetensors", meta)
    cls = pack_nodes.NODE_CLASS_MAPPINGS["KontextRestoreRestore"]

    def shown_for(text: str) -> str:
        # What ComfyUI hands the node as its hidden PROMPT: the queued API workflow.
        graph = {
            "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0], "text": text}},
            "6": {"class_type": "KontextRestoreRestore", "inputs": {"conditioning": ["4", 0]}},
        }
        hidden = io.HiddenHolder.from_dict({io.Hidden.prompt: graph, io.Hidden.unique_id: "6"})
        monkeypatch.setattr(cls, "hidden", hidden)
        out = _restore_output(
            pack_nodes,
            make_tiny_flux(),
            tiny_vae,
            _images(1, 32, 32),
            mode="auto",
            steps=1,
            lora_name="prompted.safetensors",
        )
        return "".join(out.ui.as_dict()["text"])

    assert "Warning" not in shown_for("Restore  this old photo.")  # whitespace aside, the same
    shown = shown_for("Make it sharp.")
    assert "Warning: The prompt" in shown and "Make it sharp." in shown and "Restore this old photo." in shown


def test_restore_inputs_are_checked_when_queued(pack_nodes):
    cls = pack_nodes.NODE_CLASS_MAPPINGS["KontextRestoreRestore"]
    assert cls.validate_inputs(guidance=0.0, bucket_scale=0.0, mode="auto") is True
    message = cls.validate_inputs(bucket_scale=0.03, guidance=float("nan"), mode="sideways", scheduler="nope")
    assert "bucket_scale" in message and "0.0625..4" in message  # 0 or a real scale
    assert "guidance" in message and "mode 'sideways'" in message and "scheduler 'nope'" in message


def test_restore_node_runs_comfy_schedulers_on_the_trained_clock(pack_nodes, tiny_vae):
    model, calls = _recording(make_tiny_flux())
    images = _images(1, 64, 64)  # the 64x64 bucket: an 8x8 latent
    _restore(pack_nodes, model, tiny_vae, images, steps=4, scheduler="simple")
    trained = sampling_sigmas(4, flux_shift_mu(image_tokens(8, 8)))[:-1]
    got = torch.stack([c["sigma"].flatten()[0] for c in calls])
    assert torch.allclose(got, trained, atol=1e-6)


def test_restore_node_reports_progress_and_stops_on_cancel(pack_nodes, tiny_vae):
    import comfy.model_management as mm
    import comfy.utils

    updates = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: updates.append((value, total))
    )
    try:
        _restore(pack_nodes, make_tiny_flux(), tiny_vae, _images(2, 64, 64), steps=3)
        assert updates[-1] == (6, 6) and {t for _, t in updates} == {6}  # 2 images x 3 steps

        def cancel_after_first(value, total, preview, node_id=None):
            mm.interrupt_current_processing(True)

        comfy.utils.set_progress_bar_global_hook(cancel_after_first)
        model, calls = _recording(make_tiny_flux())
        with pytest.raises(mm.InterruptProcessingException):
            _restore(pack_nodes, model, tiny_vae, _images(2, 64, 64), steps=3)
        assert len(calls) == 1  # stopped after the first sampling step, not after the batch
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        mm.interrupt_current_processing(False)
