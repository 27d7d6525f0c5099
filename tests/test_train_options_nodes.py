"""Issue 24's options through the nodes as ComfyUI loaded them: the trainer's LORA output in core
Save LoRA Weights / Load LoRA Model, checkpoint LoRA files in the loras folder, init_lora, the new
choices, and the Preview Training Pairs node."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_conditioning, make_tiny_flux
from safetensors.torch import load_file
from test_train_nodes import _cached_latents, _node, _photo_like


@pytest.fixture
def image_folder(comfy_dirs, tmp_path):
    folder = comfy_dirs["input"] / f"hq_{tmp_path.name}"
    folder.mkdir()
    for i in range(6):
        _photo_like(i).save(folder / f"img_{i}.png")
    return folder


def _train_full(pack_nodes, model, latents, vae, name, steps=2, rank=4, **kw):
    """The trainer node's whole result (model, lora_name, loss, report, lora)."""
    node = _node(pack_nodes, "KontextRestoreTrainLoRA")
    args = (steps, 1e-3, rank, 2, 1, 1, 1.5, 1, 1, "bridge", 0, True)
    with torch.inference_mode():
        return node.execute(model, make_conditioning(), latents, vae, name, *args, **kw).result


def _velocity(patcher, seed=0):
    import comfy.model_management as mm

    from kontext_train import comfyui

    mm.load_models_gpu([patcher], force_full_load=True)
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(seed))
    cond = comfyui.prepare_conditioning(make_conditioning(), torch.device("cpu"), torch.float32)
    context, pooled = cond.batch(1)
    with torch.no_grad():
        return patcher.model.diffusion_model(
            x, torch.tensor([0.5]), context, y=pooled, guidance=torch.full((1,), 1.5),
            transformer_options=patcher.model_options.get("transformer_options", {}).copy(),
        )  # fmt: skip


def _core_node(name):
    """A core node of comfy_extras/nodes_train.py (on 0.3.75 and 0.33.0 alike)."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS.get(name)
    assert cls is not None, f"core node {name} is not registered"
    return cls


@pytest.mark.parametrize("adapter", ["lora", "lokr"])
def test_lora_output_goes_into_core_load_lora_model_and_save_lora(
    pack_nodes, comfy_dirs, image_folder, tiny_vae, adapter
):
    import folder_paths

    model = make_tiny_flux()
    _, latents, _ = _cached_latents(pack_nodes, image_folder, tiny_vae)
    name = f"out_{adapter}_{image_folder.name}"
    trained, lora_name, _, _, lora = _train_full(pack_nodes, model, latents, tiny_vae, name, adapter=adapter)
    on_disk = load_file(str(comfy_dirs["loras"] / lora_name))
    assert lora.keys() == on_disk.keys() and all(torch.equal(lora[k], on_disk[k]) for k in lora)
    # core Load LoRA Model applies the output as the trainer's own model output has it
    loader = _core_node("LoraModelLoader")
    (via_core,) = loader.execute(model, lora, 1.0).result
    torch.testing.assert_close(_velocity(via_core), _velocity(trained), rtol=1e-5, atol=1e-6)
    assert (_velocity(via_core) - _velocity(model)).abs().max() > 1e-5
    # core Save LoRA Weights writes it under output/ as a file the stock loader reads
    saver = _core_node("SaveLoRA")
    saver.execute(lora, f"loras/saved_{name}", 2)
    saved = list((comfy_dirs["output"] / "loras").glob(f"saved_{name}_2_steps_*.safetensors"))
    assert len(saved) == 1 and load_file(str(saved[0])).keys() == lora.keys()
    assert folder_paths.get_output_directory() == str(comfy_dirs["output"])


def test_checkpoints_appear_in_the_lora_picker_and_init_lora_continues_a_file(
    pack_nodes, comfy_dirs, image_folder, tiny_vae
):
    from kontext_train import comfyui
    from kontext_train.method.lora import read_metadata

    model = make_tiny_flux()
    _, latents, _ = _cached_latents(pack_nodes, image_folder, tiny_vae)
    name = f"ck_{image_folder.name}"
    _, lora_name, loss, _, _ = _train_full(
        pack_nodes, model, latents, tiny_vae, name, steps=3, optimizer="adam", loss="huber"
    )
    listed = comfyui.lora_names()
    assert f"{name}/{name}_step_000001.safetensors" in listed  # checkpoint_every 1, keep 3
    assert f"{name}/{name}_step_000003.safetensors" in listed
    config = read_metadata(comfy_dirs["loras"] / lora_name)["kontext_restore.config"]
    assert '"optimizer": "adam"' in config and '"loss": "huber"' in config

    # A new run from that file: it starts from its weights (rank 4), whatever its rank input says.
    _, second, loss2, _, lora2 = _train_full(
        pack_nodes, model, latents, tiny_vae, f"{name}_more", steps=1, init_lora=lora_name, rank=8
    )
    assert loss2["loss"][0] != loss["loss"][0]  # same batch, sigma and noise: only the LoRA differs
    assert lora2[next(k for k in lora2 if k.endswith("lora_down.weight"))].shape[0] == 4
    meta = read_metadata(comfy_dirs["loras"] / second)
    assert meta["kontext_restore.init_lora"] == lora_name.split("/")[-1] and meta["ss_network_dim"] == "4"
    with pytest.raises(ValueError, match="set adapter to lora"):
        _train_full(
            pack_nodes, model, latents, tiny_vae, f"{name}_lokr", steps=1, init_lora=lora_name, adapter="lokr"
        )
    with pytest.raises(ValueError, match="optimizer must be one of adamw, adam, adafactor"):
        _node(pack_nodes, "KontextRestoreTrainLoRA").execute(
            model, make_conditioning(), latents, tiny_vae, "x", 1, 1e-3, 4, 1, 1, 1, 1.5, 1, 1, "bridge", 0,
            True, optimizer="sgd",
        )  # fmt: skip


def test_a_missing_optimizer_package_is_refused_before_training(
    pack_nodes, image_folder, tiny_vae, comfy_dirs, monkeypatch
):
    import sys

    # The pack's own copy of the library (ComfyUI imports the pack as a package of its own).
    pack = sys.modules[_node(pack_nodes, "KontextRestoreTrainLoRA").__module__].__name__.rsplit(".nodes.", 1)[
        0
    ]
    optimizers = sys.modules[pack + ".kontext_train.train.optimizers"]
    monkeypatch.setattr(optimizers, "optimizer_available", lambda name: name != "adamw8bit")
    _, latents, _ = _cached_latents(pack_nodes, image_folder, tiny_vae)
    name = f"bnb_{image_folder.name}"
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        _train_full(pack_nodes, make_tiny_flux(), latents, tiny_vae, name, optimizer="adamw8bit")
    assert not (comfy_dirs["output"] / "kontext_restore" / name / "checkpoints").exists()


def test_preview_pairs_shows_the_pairs_the_cache_encodes(pack_nodes, image_folder, tiny_vae):
    from kontext_train.report.pair_preview import training_pairs

    dataset = _node(pack_nodes, "KontextRestoreDataset").execute(image_folder.name, 0.0625, 2, 0).result[0]
    out = _node(pack_nodes, "KontextRestorePreviewPairs").execute(dataset, 0, 3)
    (grid,) = out.result
    assert grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3
    assert out.ui.as_dict()["images"]  # shown on the node
    pairs = training_pairs(dataset, 0, 3)
    assert len(pairs) == 3
    for sample, degraded, clean in pairs:
        # the same pair Cache Latents encodes for epoch 0 with this seed
        same_clean, same_degraded = dataset.load_pair(sample, 0, 0)
        assert torch.equal(clean, same_clean) and torch.equal(degraded, same_degraded)
        assert not torch.equal(clean, degraded)
    # three rows: the grid is taller than two rows of 256 px cells plus the label band
    assert grid.shape[1] > 3 * 256 and grid.shape[2] >= 2 * 256
    assert np.isfinite(grid.numpy()).all()
    with pytest.raises(ValueError, match="at least 1"):
        training_pairs(dataset, 0, 0)
