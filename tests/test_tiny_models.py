"""The tiny models the tests, the demo and the dry runs use are the same on every ComfyUI version."""

from __future__ import annotations

import hashlib

import torch
from conftest import make_tiny_flux

from kontext_train.comfyui.tiny_models import is_norm_module

# sha256 of build_tiny_flux(seed=0)'s parameters, under their released-checkpoint names, measured
# on ComfyUI 0.3.75 and 0.33.0 (torch 2.9.1's CPU generator). A change means the toy the learning
# tests measure is a different model on this host.
TINY_FLUX_SEED0_SHA256 = "37f33a32fdfb4869fa6b807516ca41aeaa138a0e79a359bc314af3c613b8c962"


def _released_name(module_path: str, module: torch.nn.Module, name: str) -> str:
    # Released Flux checkpoints call RMSNorm gains ".scale"; newer ComfyUI uses torch's ".weight".
    return f"{module_path}.{'scale' if is_norm_module(module) else name}"


def test_norm_gains_start_at_one_whatever_their_name(comfy_root):
    """ComfyUI's ops skip initialisation; random gains (as when they were found by the name
    ``scale``, which ComfyUI 0.33 renamed) made the toy learn measurably less."""
    diffusion = make_tiny_flux().model.diffusion_model
    gains = {
        f"{path}.{name}": p
        for path, m in diffusion.named_modules()
        if is_norm_module(m)
        for name, p in m.named_parameters(recurse=False)
    }
    # q and k norms of the double block's image and text attention and of the single block.
    assert len(gains) == 6, sorted(gains)
    assert all(torch.all(p == 1) for p in gains.values()), sorted(gains)


def test_same_seed_gives_the_same_weights_on_every_version(comfy_root):
    diffusion = make_tiny_flux(0).model.diffusion_model
    digest = hashlib.sha256()
    for path, module in diffusion.named_modules():
        for name, p in module.named_parameters(recurse=False):
            digest.update(_released_name(path, module, name).encode())
            digest.update(p.detach().float().contiguous().numpy().tobytes())
    assert digest.hexdigest() == TINY_FLUX_SEED0_SHA256


def test_norm_detection_by_type():
    assert is_norm_module(torch.nn.RMSNorm(4))
    assert is_norm_module(torch.nn.LayerNorm(4))
    assert is_norm_module(torch.nn.GroupNorm(2, 4))
    assert not is_norm_module(torch.nn.Linear(4, 4))
