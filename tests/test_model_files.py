"""The shipped templates on model files in the layouts users download, through ComfyUI's stock
loaders, in a real headless server.

tests/model_files.py writes the BFL Kontext transformer (bf16), Comfy-Org's fp8 "scaled" repack
of it and the Flux VAE with random weights; the transformer keeps Flux's width (both hosts
hard-code 24 heads of 128) with one double and one single block. The templates run as shipped:
``UNETLoader`` and ``VAELoader`` load those files, only the file name and ``weight_dtype`` of
``UNETLoader`` change per case, and the CPU settings of tests/tiny_templates.py (tiny buckets,
one step). The one swap is the text encoders: ComfyUI builds T5-XXL from its own config
(``comfy/text_encoders/t5_config_xxl.json``: 24 layers of width 4096, about 4.8B parameters)
whatever the file holds, so it cannot be shrunk and no CPU test can load it;
``DualCLIPLoader`` becomes the test-only ``KontextRestoreTestTinyClip`` (64-wide text, matching
the files' ``txt_in``).

Each format and ``weight_dtype`` trains with LoRA on activations (the log must not say it fell
back to weight wrappers) and saves a LoRA that ComfyUI's LoRA loading takes whole. Two pairs go
through both templates in the server (train, then the stock ``LoraLoaderModelOnly`` and Restore);
the other four train in this process, to keep the suite's time down: one step at this width
takes seconds on a CPU, and merging a LoRA into fp8 weights at restore time much longer.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from model_files import (
    BFL_FILE,
    SCALED_FP8_FILE,
    VAE_FILE,
    random_flux,
    write_bfl_flux,
    write_flux_vae,
    write_scaled_fp8_flux,
)
from server_host import server_fixture, write_png
from tiny_templates import TINY_LOADERS, shrink_api

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflows"))
import build_workflows  # noqa: E402

comfy_server = server_fixture()

# The only loader swapped: T5-XXL cannot be made smaller (see the module docstring).
TEXT_ENCODERS_ONLY = {"DualCLIPLoader": TINY_LOADERS["DualCLIPLoader"]}
FORMATS = {"bfl_bf16": BFL_FILE, "comfy_org_fp8_scaled": SCALED_FP8_FILE}
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e5m2")
# Through both templates in the server (format, training weight_dtype, restoring weight_dtype):
# the templates as shipped, which train on the BFL file in fp8_e4m3fn and restore in the default,
# and the file ComfyUI's own Kontext example downloads, the Comfy-Org fp8 scaled one, as loaded.
SERVER_CASES = [("bfl_bf16", "fp8_e4m3fn", "default"), ("comfy_org_fp8_scaled", "default", "default")]
# Every other pair trains in this process (one step at Flux's width costs seconds on a CPU, a
# LoRA merged into fp8 weights at restore time much more); one Comfy-Org case is also restored
# from there through the stock LoRA patching (the LoRA merged into its scaled fp8 layers).
IN_PROCESS_CASES = [
    (fmt, dtype)
    for fmt in FORMATS
    for dtype in WEIGHT_DTYPES
    if not any(case[:2] == (fmt, dtype) for case in SERVER_CASES)
]
MERGE_CASES = [("comfy_org_fp8_scaled", "fp8_e4m3fn")]
# Smallest buckets (64 px: 16 image tokens), one step, no held-out images (no validation runs).
FAST = {
    "KontextRestoreDataset": {"bucket_scale": 0.0625, "val_count": 0},
    "KontextRestoreTrainLoRA": {"steps": 1, "batch_size": 1, "rank": 4, "warmup_steps": 0},
    "KontextRestoreRestore": {"steps": 1, "bucket_scale": 0.0},  # 0: the LoRA's scale
}
CONTEXT_DIM = 64  # KontextRestoreTestTinyClip's text width
FALLBACK_MESSAGE = "LoRA applied as weight wrappers"
DATASET = "model_files_dataset"
IMAGE = "model_files_degraded.png"
IMAGES = {"degraded_photo.png": IMAGE, "clean_photo.png": IMAGE}


def load_api(name: str) -> dict:
    return json.loads(build_workflows.api_path(name).read_text())


def real_files_api(name: str, run: str, unet: str, weight_dtype: str) -> dict:
    """A shipped API template with the stock model loaders kept: the text encoders swapped,
    the CPU settings, and ``unet``/``weight_dtype`` on its UNETLoader."""
    api = shrink_api(load_api(name), DATASET, IMAGES, run, loaders=TEXT_ENCODERS_ONLY)
    for node in api.values():
        node["inputs"].update(FAST.get(node["class_type"], {}))
        if node["class_type"] == "UNETLoader":
            node["inputs"].update(unet_name=unet, weight_dtype=weight_dtype)
    return api


def test_templates_load_the_model_and_vae_through_the_stock_loaders():
    """Fails if a template (UI or API file) or the graphs this module runs load the diffusion
    model or the VAE with anything but ComfyUI's own UNETLoader and VAELoader."""
    for name in sorted(build_workflows.WORKFLOWS):
        ui = json.loads(build_workflows.ui_path(name).read_text())
        for types in (
            [n["class_type"] for n in load_api(name).values()],
            [n["type"] for n in ui["nodes"]],
            [n["class_type"] for n in real_files_api(name, "run", BFL_FILE, "default").values()],
        ):
            assert types.count("UNETLoader") == 1 and types.count("VAELoader") == 1, (name, types)
            assert not [
                t for t in types if t in TINY_LOADERS.values() and t != TEXT_ENCODERS_ONLY["DualCLIPLoader"]
            ]


@pytest.fixture(scope="module")
def model_files(comfy_server):
    """The three model files in the server's models folders, a two-image dataset and a photo."""
    models = comfy_server.base / "models"
    weights = random_flux(context_dim=CONTEXT_DIM)
    write_bfl_flux(models / "diffusion_models" / BFL_FILE, weights)
    write_scaled_fp8_flux(models / "diffusion_models" / SCALED_FP8_FILE, weights)
    del weights
    write_flux_vae(models / "vae" / VAE_FILE)
    for i in range(2):
        write_png(comfy_server.input_dir / DATASET / f"photo_{i}.png", 96, 64, seed=300 + i)
    write_png(comfy_server.input_dir / IMAGE, 96, 64, seed=310)
    return models


def _run(server, api: dict) -> tuple[dict, str]:
    """Runs a graph; (history entry, the server log it wrote). Then unloads the models and
    drops the cached node outputs: several real-width models at once would not fit a CI runner."""
    start = len(server.log_text())
    try:
        entry = server.run_prompt(api, timeout=900)
    finally:
        if server.process.poll() is None:
            server.post("/free", {"unload_models": True, "free_memory": True})
    return entry, server.log_text()[start:]


def _assert_read_as(log: str, fmt: str, weight_dtype: str) -> None:
    """The loader's log shows the file read as the format it is."""
    assert "model_type FLUX" in log, log[-3000:]
    if fmt == "comfy_org_fp8_scaled":
        # 0.3.75: the scaled_fp8 marker -> scaled_fp8_ops; 0.33: converted to mixed precision.
        assert "Using scaled fp8" in log or "Detected mixed precision quantization" in log, log[-3000:]
    elif weight_dtype != "default":
        assert f"model weight dtype torch.float8_{weight_dtype.removeprefix('fp8_')}" in log, log[-3000:]


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("fmt,train_dtype,restore_dtype", SERVER_CASES)
def test_templates_train_and_restore_on_real_file_layouts(
    comfy_server, model_files, fmt, train_dtype, restore_dtype
):
    from safetensors.torch import load_file

    unet = FORMATS[fmt]
    run = f"files_{fmt}_{train_dtype}"
    _, log = _run(comfy_server, real_files_api("train_restoration_lora", run, unet, train_dtype))
    _assert_read_as(log, fmt, train_dtype)
    assert FALLBACK_MESSAGE not in log, log[-3000:]
    lora_file = comfy_server.loras_dir / f"{run}.safetensors"
    lora = load_file(str(lora_file))
    ups = [v for k, v in lora.items() if k.endswith(".lora_up.weight")]
    assert ups and any(v.abs().max() > 0 for v in ups), "one step moved no LoRA weight"

    restore = real_files_api("restore_with_lora", run, unet, restore_dtype)
    for node in restore.values():
        if node["class_type"] in ("LoraLoaderModelOnly", "KontextRestoreRestore"):
            node["inputs"]["lora_name"] = lora_file.name
    entry, log = _run(comfy_server, restore)
    assert "lora key not loaded" not in log, log[-3000:]
    saved = entry["outputs"]["8"]["images"][0]
    from PIL import Image

    with Image.open(comfy_server.base / saved["type"] / saved["subfolder"] / saved["filename"]) as img:
        assert img.size == (96, 64)


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("fmt,weight_dtype", IN_PROCESS_CASES)
def test_other_weight_dtypes_train_on_activations_and_save_a_lora_comfyui_loads(
    comfy_root, model_files, fmt, weight_dtype, tmp_path, caplog
):
    """The rest of the format x weight_dtype matrix, in this process (no sampling: the server
    test restores through the templates): the stock UNETLoader on the same files, one training
    step, the LoRA on activations as Restore Image applies it (a model call), and the LoRA file
    through ComfyUI's LoRA loading (every key matched)."""
    import comfy.model_management
    import folder_paths
    from conftest import make_conditioning
    from safetensors.torch import load_file
    from toy import ToyBatches, toy_latents

    import nodes
    from kontext_train import comfyui
    from kontext_train.train.trainer import TrainConfig, Trainer

    folder_paths.add_model_folder_path("diffusion_models", str(model_files / "diffusion_models"))
    caplog.set_level(logging.INFO)
    (model,) = nodes.UNETLoader().load_unet(FORMATS[fmt], weight_dtype)
    _assert_read_as(caplog.text, fmt, weight_dtype)
    cfg = TrainConfig(
        steps=1, rank=4, batch_size=1, warmup_steps=0, checkpoint_every=0, validate_every_epochs=0
    )
    lora = comfyui.FluxLoraModel(model, rank=cfg.rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets)
    assert lora.lora_form == "activations" and FALLBACK_MESSAGE not in caplog.text
    cond = lora.prepare_conditioning(make_conditioning())
    batches = ToyBatches(toy_latents(1, seed=0), cfg.batch_size, seed=cfg.seed)
    path = tmp_path / "lora.safetensors"
    result = Trainer(cfg, lora, batches, cond, tmp_path / "run", lora_path=path).run(resume=False)
    lora.release()
    assert result.step == 1 and all(math.isfinite(v) for v in result.losses)
    # Restore's path: the LoRA on the activations of this model (no merge, whatever its dtype),
    # and it changes the model's output.
    state = load_file(str(path))
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))

    def model_output(m) -> torch.Tensor:
        comfy.model_management.load_models_gpu([m])
        with torch.no_grad():
            return m.model.diffusion_model(
                x, torch.tensor([0.5]), cond.context, y=cond.pooled, guidance=torch.tensor([1.5])
            ).float()

    plain = model_output(model)
    with comfyui.lora_for_restore(model, state, name="lora", use=comfyui.LORA_APPLY) as applied:
        assert any("applied on activations" in note for note in applied.notes), applied.notes
        restored = model_output(applied.model)
    assert torch.isfinite(restored).all() and not torch.equal(restored, plain)
    caplog.clear()
    patched = comfyui.apply_lora(model, state)
    assert len(patched.patches) == len(lora.adapters) and "lora key not loaded" not in caplog.text
    if (fmt, weight_dtype) in MERGE_CASES:
        # ComfyUI merges the LoRA into the stored weights when it loads the patched MODEL.
        out = model_output(patched)
        assert out.shape == x.shape and torch.isfinite(out).all()
    del model, patched, lora
    comfy.model_management.unload_all_models()
    gc.collect()
