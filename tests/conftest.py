"""Shared fixtures: a real ComfyUI imported in-process (CPU), tiny random Flux / VAE models built
through ComfyUI's own classes, and conditioning shaped like CLIPTextEncode's for Flux.

The ComfyUI used is $COMFYUI_PATH when set, else the tree scripts/setup_test_env.sh builds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kontext_train.comfyui.tiny_models import TINY_CONTEXT_DIM  # noqa: E402


class _RootIsAPlainFolder:
    """The repository root holds the pack's __init__.py (ComfyUI's entry point), so pytest would
    collect it as a Python package and import it by the folder's name, which fails for clones named
    like "ComfyUI-Kontext-Restore". Collect it as a plain folder; the tests load the pack the way
    ComfyUI does (``pack_nodes``)."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if Path(path) == ROOT:
            return pytest.Dir.from_parent(parent, path=Path(path))
        return None


def pytest_configure(config):
    if not config.pluginmanager.has_plugin("kontext-restore-root"):
        config.pluginmanager.register(_RootIsAPlainFolder(), "kontext-restore-root")


@pytest.fixture(scope="session")
def comfy_root(tmp_path_factory) -> Path:
    """ComfyUI imported once per session, with its input/output/temp and loras in a temp folder."""
    from kontext_train import comfyui

    root = comfyui.bootstrap_comfyui(cpu=True)
    import folder_paths

    base = tmp_path_factory.mktemp("comfy_base")
    for sub in ("input", "output", "temp", "loras"):
        (base / sub).mkdir()
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.add_model_folder_path("loras", str(base / "loras"), is_default=True)
    return root


@pytest.fixture(scope="session")
def comfy_dirs(comfy_root):
    import folder_paths

    return {
        "input": Path(folder_paths.get_input_directory()),
        "output": Path(folder_paths.get_output_directory()),
        "temp": Path(folder_paths.get_temp_directory()),
        "loras": Path(folder_paths.get_folder_paths("loras")[0]),
    }


@pytest.fixture(scope="session")
def pack_nodes(comfy_root):
    """ComfyUI's node registry with this pack loaded the way ComfyUI loads custom nodes."""
    import asyncio

    import nodes

    if not any(k.startswith("KontextRestore") for k in nodes.NODE_CLASS_MAPPINGS):
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        ok = asyncio.run(nodes.load_custom_node(str(ROOT)))
        assert ok, "ComfyUI failed to import the pack"
    return nodes


def make_tiny_flux(seed: int = 0, **kwargs):
    from kontext_train.comfyui import build_tiny_flux

    return build_tiny_flux(context_in_dim=TINY_CONTEXT_DIM, seed=seed, **kwargs)


@pytest.fixture
def tiny_flux(comfy_root):
    return make_tiny_flux()


def make_tiny_vae(seed: int = 0):
    """A 16-channel TAESD-format VAE (~2.5M params) loaded through comfy.sd.VAE."""
    from kontext_train.comfyui import build_tiny_vae

    return build_tiny_vae(seed)


@pytest.fixture(scope="session")
def tiny_vae(comfy_root):
    return make_tiny_vae()


def make_conditioning(seed: int = 0, tokens: int = 8):
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(1, tokens, TINY_CONTEXT_DIM, generator=g)
    pooled = torch.randn(1, 768, generator=g)
    return [[context, {"pooled_output": pooled}]]


@pytest.fixture
def flux_conditioning():
    return make_conditioning()


def recording_model(model):
    """A clone of ``model`` that records every model call the sampler makes."""
    calls = []
    patched = model.clone()

    def wrapper(apply_model, args):
        c = args["c"]
        calls.append(
            {
                "input": args["input"].detach().clone(),
                "sigma": args["timestep"].detach().clone(),
                "refs": [r.detach().clone() for r in c["ref_latents"]] if c.get("ref_latents") else None,
                "guidance": float(c["guidance"].flatten()[0]) if "guidance" in c else None,
            }
        )
        return apply_model(args["input"], args["timestep"], **c)

    patched.set_model_unet_function_wrapper(wrapper)
    return patched, calls
