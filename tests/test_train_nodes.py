"""The trainer node end to end on a tiny model, through the pack as ComfyUI loaded it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_conditioning, make_tiny_flux
from PIL import Image
from safetensors.torch import load_file


def _photo_like(seed: int, w: int = 96, h: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.random((h // 8, w // 8, 3))
    img = Image.fromarray((base * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    return img


@pytest.fixture
def image_folder(comfy_dirs, tmp_path):
    folder = comfy_dirs["input"] / f"hq_{tmp_path.name}"
    folder.mkdir()
    for i in range(6):
        _photo_like(i).save(folder / f"img_{i}.png")
    return folder


def _node(pack_nodes, name):
    """The V3 node class ComfyUI registered; its ``execute`` is what ComfyUI calls."""
    return pack_nodes.NODE_CLASS_MAPPINGS[name]


def _cached_latents(pack_nodes, folder, tiny_vae, seed=0):
    out = _node(pack_nodes, "KontextRestoreDataset").execute(folder.name, 0.0625, 2, seed)
    dataset, summary = out.result
    assert list(out.ui.as_dict()["text"]) == [summary]  # shown on the node
    assert "6" in summary
    latents, stats = (
        _node(pack_nodes, "KontextRestoreCacheLatents").execute(dataset, tiny_vae, "pool", 2, seed).result
    )
    return dataset, latents, stats


def _train(pack_nodes, model, latents, tiny_vae, name, steps=4, resume=True, **kw):
    node = _node(pack_nodes, "KontextRestoreTrainLoRA")
    with torch.inference_mode():  # ComfyUI runs nodes in inference mode
        out = node.execute(
            model,
            make_conditioning(),
            latents,
            tiny_vae,
            name,
            steps,
            1e-3,
            4,
            2,
            1,
            1,
            1.5,
            2,
            1,
            "bridge",
            0,
            resume,
            **kw,
        )
    assert list(out.ui.as_dict()["text"]) == [out.result[3]]  # the validation report, on the node
    return out.result[:4]  # the fifth, the LORA output, is tested in test_train_options_nodes.py


def test_train_node_writes_lora_checkpoints_and_report(pack_nodes, comfy_dirs, image_folder, tiny_vae):
    model = make_tiny_flux()
    _, latents, stats = _cached_latents(pack_nodes, image_folder, tiny_vae)
    assert "misses" in stats
    trained, name, loss, report = _train(pack_nodes, model, latents, tiny_vae, f"t/{image_folder.name}")
    lora_file = comfy_dirs["loras"] / name
    assert lora_file.is_file()
    state = load_file(str(lora_file))
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in state)
    assert len(loss["loss"]) == 4 and all(np.isfinite(loss["loss"]))
    assert loss["validation"], "validation should have run on the held-out images"
    assert "psnr_restored" in loss["validation"][-1]
    report_json = lora_file.with_name(lora_file.name.replace(".safetensors", ".validation.json"))
    assert json.loads(report_json.read_text())[-1]["step"] == 4
    run_dir = comfy_dirs["output"] / "kontext_restore" / name.replace(".safetensors", "")
    assert (run_dir / "checkpoints" / "step_000004" / "lora.safetensors").is_file()
    assert "PSNR" in report
    # Resume with more steps continues from step 4 instead of starting over.
    _, _, loss2, _ = _train(pack_nodes, model, latents, tiny_vae, f"t/{image_folder.name}", steps=6)
    assert len(loss2["loss"]) == 6 and loss2["loss"][:4] == loss["loss"]


def test_train_node_records_the_prompt_of_the_queued_workflow(
    pack_nodes, comfy_dirs, image_folder, tiny_vae, monkeypatch
):
    from comfy_api.latest import io
    from safetensors import safe_open

    cls = _node(pack_nodes, "KontextRestoreTrainLoRA")
    graph = {  # what ComfyUI hands the node as its hidden PROMPT: the queued API workflow
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "Restore this photo."}},
        "8": {"class_type": "KontextRestoreTrainLoRA", "inputs": {"conditioning": ["4", 0]}},
    }
    monkeypatch.setattr(
        cls, "hidden", io.HiddenHolder.from_dict({io.Hidden.prompt: graph, io.Hidden.unique_id: "8"})
    )
    _, latents, _ = _cached_latents(pack_nodes, image_folder, tiny_vae)
    _, name, _, _ = _train(
        pack_nodes, make_tiny_flux(), latents, tiny_vae, f"prompted_{image_folder.name}", steps=1
    )
    with safe_open(str(comfy_dirs["loras"] / name), "pt") as f:
        assert f.metadata()["kontext_restore.prompt"] == "Restore this photo."


def test_existing_run_without_resume_is_refused(pack_nodes, image_folder, tiny_vae):
    model = make_tiny_flux()
    _, latents, _ = _cached_latents(pack_nodes, image_folder, tiny_vae)
    _train(pack_nodes, model, latents, tiny_vae, f"again_{image_folder.name}", steps=2)
    with pytest.raises(ValueError, match="resume"):
        _train(pack_nodes, model, latents, tiny_vae, f"again_{image_folder.name}", steps=2, resume=False)


def test_dataset_node_reruns_when_the_folder_changes(pack_nodes, image_folder):
    from comfy_api.internal import first_real_override

    cls = pack_nodes.NODE_CLASS_MAPPINGS["KontextRestoreDataset"]
    # What ComfyUI's IsChangedCache calls for a V3 node (execution.py) instead of IS_CHANGED.
    assert first_real_override(cls, "fingerprint_inputs") is not None
    before = cls.fingerprint_inputs(image_folder.name, 1.0, 2, 0)
    assert cls.fingerprint_inputs(image_folder.name, 1.0, 2, 0) == before
    _photo_like(99).save(image_folder / "new.png")
    assert cls.fingerprint_inputs(image_folder.name, 1.0, 2, 0) != before


def test_validation_shows_a_preview_grid_on_the_node(pack_nodes, image_folder, tiny_vae, monkeypatch):
    import sys

    updates = []

    class RecordingProgress:
        def __init__(self, total, node_id=None):
            self.total = total

        def update(self, value, text=None, preview=None):
            updates.append((value, text, preview))

    node_module = sys.modules[_node(pack_nodes, "KontextRestoreTrainLoRA").__module__]
    monkeypatch.setattr(node_module.comfyui, "NodeProgress", RecordingProgress)
    _, latents, _ = _cached_latents(pack_nodes, image_folder, tiny_vae)
    _train(pack_nodes, make_tiny_flux(), latents, tiny_vae, f"preview_{image_folder.name}", steps=3)
    previews = [(v, t, p) for v, t, p in updates if p is not None]
    assert previews, "validation should push a preview image to the node"
    value, text, image = previews[-1]
    assert value == 3 and "\nvalidation at step 3: PSNR" in text
    assert image.size[0] >= 3 * 192  # degraded | restored | clean
    assert sorted({v for v, t, p in updates if t and t.startswith("step ")}) == [1, 2, 3]


def test_node_status_shows_speed_time_left_checkpoints_resume_and_the_lora(
    pack_nodes, comfy_dirs, image_folder, tiny_vae, monkeypatch
):
    """What the node draws on itself (ComfyUI's progress text): s/step and ETA with the step,
    "checkpoint saved at step N" (checkpoint_every 2), "resumed from step N" when queued again
    with more steps, and where the LoRA went when done."""
    import re
    import sys

    updates = []

    class RecordingProgress:
        def __init__(self, total, node_id=None):
            self.total = total

        def update(self, value, text=None, preview=None):
            if text is not None:  # a bare progress-bar update (latent cache)
                updates.append(text)

    node_module = sys.modules[_node(pack_nodes, "KontextRestoreTrainLoRA").__module__]
    monkeypatch.setattr(node_module.comfyui, "NodeProgress", RecordingProgress)
    _, latents, _ = _cached_latents(pack_nodes, image_folder, tiny_vae)
    name = f"status_{image_folder.name}"
    model = make_tiny_flux()
    _train(pack_nodes, model, latents, tiny_vae, name, steps=4)
    step_1 = next(t for t in updates if t.startswith("step 1/4"))
    assert re.search(r"^[\d.]+ s/step, ETA \d+s$", step_1.splitlines()[1], re.M), step_1
    saved = [t for t in updates if "checkpoint saved at step 2" in t]
    assert saved and "checkpoint saved at step 4" in updates[-1]
    assert (
        updates[-1].startswith("done: step 4/4")
        and f"LoRA: {comfy_dirs['loras'] / name}.safetensors" in updates[-1]
    )
    updates.clear()
    _train(pack_nodes, model, latents, tiny_vae, name, steps=6)
    assert "resumed from step 4" in updates[0], updates[0]
    assert any(t.startswith("step 5/6") and "resumed from step 4" in t for t in updates)


def test_a_lora_name_too_long_for_its_files_fails_at_once(pack_nodes, comfy_dirs, image_folder, tiny_vae):
    _, latents, _ = _cached_latents(pack_nodes, image_folder, tiny_vae)
    name = "n" * 225
    with pytest.raises(ValueError, match="too long"):
        _train(pack_nodes, make_tiny_flux(), latents, tiny_vae, name, steps=2)
    assert not (comfy_dirs["output"] / "kontext_restore" / name).exists()
    assert not any(p.name.startswith(name[:50]) for p in comfy_dirs["loras"].iterdir())


def test_a_finished_run_queued_again_reports_it_and_writes_nothing(
    pack_nodes, comfy_dirs, image_folder, tiny_vae
):
    _, latents, _ = _cached_latents(pack_nodes, image_folder, tiny_vae)
    name = f"done_{image_folder.name}"
    _train(pack_nodes, make_tiny_flux(), latents, tiny_vae, name, steps=2)
    lora = comfy_dirs["loras"] / f"{name}.safetensors"
    stamp = lora.stat().st_mtime_ns
    trained, _, loss, report = _train(pack_nodes, make_tiny_flux(), latents, tiny_vae, name, steps=2)
    assert "already trained to step 2" in report and len(loss["loss"]) == 2
    assert lora.stat().st_mtime_ns == stamp
    assert trained is not None
