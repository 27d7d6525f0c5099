"""The pretrained stand-in (kontext_train/app/standin.py): its photo VAE round-trips photos through
ComfyUI's VAE class, its Flux knows photographs (it denoises a held-out photo far better than the
same network with random weights), and the shipped file says how it was made."""

from __future__ import annotations

import math
import random

import pytest
import torch

from kontext_train.app.standin import (
    ASSET,
    HELD_OUT_PHOTOS,
    PRETRAIN_PHOTOS,
    TASKS,
    load_photo,
    make_example,
    read_standin,
    resize_longest,
    task_conditioning,
)
from kontext_train.comfyui import photo_vae


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1.0 / torch.mean((a - b) ** 2).item())


@pytest.fixture(scope="module")
def standin(comfy_root):
    from kontext_train.app.standin import load_standin

    return load_standin()


@pytest.fixture(scope="module")
def motorcycle():
    return resize_longest(load_photo(HELD_OUT_PHOTOS[0]), 128)


def test_the_shipped_file_records_how_it_was_made():
    pca, meta = read_standin(ASSET)
    assert ASSET.stat().st_size < 6_000_000  # a few MB
    assert meta["settings"]["seed"] == 0 and meta["steps_done"] == meta["settings"]["steps"]
    assert not set(meta["photos"]) & set(HELD_OUT_PHOTOS) and set(meta["photos"]) == set(PRETRAIN_PHOTOS)
    assert meta["loss_last_50"] < 0.5 * meta["loss_first_50"]
    assert pca["components"].shape == (photo_vae.LATENT_CHANNELS, 3 * photo_vae.PATCH**2)


def test_the_pca_fit_is_deterministic_and_orthonormal():
    images = [resize_longest(load_photo(n), 64) for n in ("astronaut", "coffee")]
    a, b = photo_vae.fit_patch_pca(images), photo_vae.fit_patch_pca(images)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = a["components"].double()
    torch.testing.assert_close(c @ c.T, torch.eye(len(c), dtype=torch.float64), atol=1e-5, rtol=0)


def test_the_photo_vae_round_trips_a_held_out_photo_through_comfyui(standin, motorcycle):
    from kontext_train.comfyui import vae_decode, vae_encode

    _, vae, _ = standin
    raw = vae_encode(vae, motorcycle[None])
    assert raw.shape == (1, 16, motorcycle.shape[1] // 4, motorcycle.shape[2] // 4)
    back = vae_decode(vae, raw)
    assert _psnr(back, motorcycle[None]) > 26.0
    # The plain-torch functions are the same map.
    pca, _ = read_standin(ASSET)
    torch.testing.assert_close(photo_vae.encode(pca, motorcycle[None]), raw, atol=1e-4, rtol=0)


def test_the_pretrained_flux_denoises_a_held_out_photo_far_better_than_random_weights(standin, motorcycle):
    """Flow-matching loss (generate task, sigma 0.5) on the held-out photo: the stand-in against
    the same architecture with random weights."""
    from kontext_train.comfyui import build_tiny_flux, vae_encode

    model, vae, meta = standin
    random_model = build_tiny_flux(**meta["settings"]["arch"], seed=0)
    clean = model.model.process_latent_in(vae_encode(vae, motorcycle[None]))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(clean.shape, generator=g)
    sigma = torch.tensor([0.5])
    x = 0.5 * noise + 0.5 * clean
    context, pooled = task_conditioning("generate", meta["settings"]["arch"]["context_in_dim"])

    def loss(m) -> float:
        with torch.no_grad():
            out = m.model.diffusion_model(x, sigma, context, y=pooled, guidance=torch.tensor([2.0]))
        return torch.mean((out - (noise - clean)) ** 2).item()

    trained, untrained = loss(model), loss(random_model)
    assert trained < 0.5 * untrained, (trained, untrained)


def test_every_task_makes_an_example_of_the_crop_size():
    photos = [resize_longest(load_photo("astronaut"), 128)]
    rng = random.Random(0)
    seen = set()
    for _ in range(40):
        task, target, reference = make_example(photos, 32, rng)
        seen.add(task)
        assert target.shape == (3, 32, 32)
        assert (reference is None) == (task == "generate")
        if reference is not None:
            assert reference.shape == (3, 32, 32)
    assert seen == set(TASKS)


def test_the_pretraining_recipe_runs_and_writes_a_loadable_stand_in(comfy_root, tmp_path):
    # scripts/pretrain_standin.py's code path, shrunk: two photos, three steps, a smaller network.
    # (Its block patches once lacked a field added for partial checkpointing and failed at step 1.)
    from kontext_train.app.standin import PretrainSettings, load_standin, pretrain

    photos = {name: load_photo(name) for name in PRETRAIN_PHOTOS[:2]}
    settings = PretrainSettings(steps=3, batch_size=3, save_every=2, scales=(96,), crop=32, warmup_steps=1)
    settings.arch = {**settings.arch, "hidden_size": 64, "depth": 1, "depth_single_blocks": 1}
    out = tmp_path / "standin.safetensors"
    meta = pretrain(settings, out, photos=photos, log=lambda line: None)
    assert meta["steps_done"] == 3 and meta["photos"] == list(photos)
    model, vae, read_meta = load_standin(out)
    assert read_meta["steps_done"] == 3
    before = build_same_untrained(settings)
    trained = model.model.diffusion_model.state_dict()
    moved = [k for k, v in before.items() if not torch.equal(v.float(), trained[k].float())]
    assert moved, "three optimiser steps changed no weight"


def build_same_untrained(settings) -> dict:
    from kontext_train import comfyui

    net = comfyui.build_tiny_flux(**settings.arch, seed=settings.seed).model.diffusion_model
    return {k: v.to(torch.float16) for k, v in net.state_dict().items()}
