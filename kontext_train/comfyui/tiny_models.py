"""Tiny Flux Kontext and VAE models built through ComfyUI's own classes: for the tests, the
offline demo and the benchmarks (nothing is downloaded). Random ones, and the pretrained stand-in's
Flux loaded from its weights file (``load_tiny_flux``; see ``kontext_train/app/standin.py``)."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from pathlib import Path

import torch

# Text-conditioning width of the tiny models (the real T5-XXL's is 4096).
TINY_CONTEXT_DIM = 64


# Normalisation layers across versions: torch's own (ComfyUI's ops subclass them; Flux's RMSNorm is
# torch.nn.RMSNorm with ``.weight`` in newer ComfyUI) and older ComfyUI's Flux RMSNorm, a plain Module
# with ``.scale``.
_TORCH_NORMS = (
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
    torch.nn.RMSNorm,
    torch.nn.modules.batchnorm._NormBase,
)


def is_norm_module(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer, whose gain must start at one (not random)."""
    return isinstance(module, _TORCH_NORMS) or type(module).__name__.endswith("Norm")


def flux_unet_config(
    hidden_size: int, num_heads: int, depth: int, depth_single_blocks: int, context_in_dim: int = 4096
) -> dict:
    """ComfyUI's unet_config for a FLUX.1-dev-style (Kontext) transformer of the given size;
    19/38 blocks at width 3072 with 24 heads is the real model."""
    from comfy.ldm.flux.model import FluxParams

    head_dim = hidden_size // num_heads
    axes = [head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16]
    axes[0] += head_dim - sum(axes)  # 128 -> [16, 56, 56], as in Flux
    config = {
        "image_model": "flux",
        "in_channels": 16,
        "out_channels": 16,
        "vec_in_dim": 768,
        "context_in_dim": context_in_dim,
        "hidden_size": hidden_size,
        "mlp_ratio": 4.0,
        "num_heads": num_heads,
        "depth": depth,
        "depth_single_blocks": depth_single_blocks,
        "axes_dim": axes,
        "theta": 10000,
        "patch_size": 2,
        "qkv_bias": True,
        "guidance_embed": True,
    }
    if "txt_ids_dims" in getattr(FluxParams, "__dataclass_fields__", {}):
        config["txt_ids_dims"] = []  # newer ComfyUI versions have this field
    return config


def build_tiny_flux(
    hidden_size: int = 128,
    num_heads: int = 1,
    depth: int = 1,
    depth_single_blocks: int = 1,
    context_in_dim: int = TINY_CONTEXT_DIM,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A small random Flux Kontext MODEL built through ComfyUI's own model classes.

    For tests and the offline demo. ComfyUI's ops skip weight initialisation to load faster, so the
    weights are initialised here: PyTorch's default Linear init, biases U(±0.02), normalisation gains
    one and their biases zero (found by module type: the parameter is ``.scale`` in older ComfyUI,
    ``.weight`` since Flux uses torch's RMSNorm).
    """
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = flux_unet_config(hidden_size, num_heads, depth, depth_single_blocks, context_in_dim)
    cfg = comfy.supported_models.Flux(unet_config)
    cfg.set_inference_dtype(dtype, None)
    with torch.inference_mode(False):
        base = cfg.get_model({})
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            # Module by module in named_parameters() order, so one seed gives the same weights on
            # every ComfyUI version whatever the norm parameters are called.
            for module in base.diffusion_model.modules():
                norm = is_norm_module(module)
                for name, p in module.named_parameters(recurse=False):
                    if norm:
                        p.fill_(0.0 if name == "bias" else 1.0)
                    elif p.ndim >= 2:
                        bound = 1.0 / (p.shape[1] ** 0.5)
                        p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=g))
                    else:
                        p.copy_(torch.empty(p.shape).uniform_(-0.02, 0.02, generator=g))
    base.diffusion_model.to(dtype)
    patcher = comfy.model_patcher.ModelPatcher(
        base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )
    # ComfyUI's "load this model again" hook, which core loaders set (0.33+): the native trainer's
    # clone(force_deepcopy=True), the non-dynamic delegate and multi-GPU clones call it. The same
    # arguments rebuild the same weights, as reading the same file would.
    patcher.cached_patcher_init = (
        _rebuild_tiny_flux,
        (dict(hidden_size=hidden_size, num_heads=num_heads, depth=depth,
              depth_single_blocks=depth_single_blocks, context_in_dim=context_in_dim, seed=seed,
              dtype=dtype),),
    )  # fmt: skip
    return patcher


def _rebuild_tiny_flux(kwargs: dict, disable_dynamic: bool = False):
    # Always a plain ModelPatcher: the tiny models never use dynamic VRAM.
    return build_tiny_flux(**kwargs)


def build_tiny_vae(seed: int = 0, latent_channels: int = 16):
    """A small random 16-channel VAE in TAESD format (~2.5M parameters), loaded through
    ``comfy.sd.VAE`` like any VAE file. For the offline demo and tests; it does not reconstruct
    images faithfully (random weights).

    ComfyUI's ops skip weight initialisation, so the weights are set here: uniform with a
    fan-in scale for kernels, zero biases, ``vae_scale`` one.
    """
    import comfy.sd
    import comfy.taesd.taesd

    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False):
        taesd = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
        with torch.no_grad():
            for name, p in taesd.named_parameters():
                if p.ndim > 1:
                    bound = (3.0 / p[0].numel()) ** 0.5
                    p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator))
                elif name == "vae_scale":
                    p.fill_(1.0)
                else:
                    p.zero_()
        state = {k: v.detach().clone() for k, v in taesd.state_dict().items()}
    return comfy.sd.VAE(sd=state)


def load_tiny_flux(arch: dict, weights: str | Path, prefix: str = "flux."):
    """A tiny Flux MODEL (``build_tiny_flux(**arch)``) with the weights stored under ``prefix`` in
    the safetensors file ``weights`` (float32 in memory). ComfyUI's reload hook reads the same
    file again, as a core loader would."""
    from safetensors.torch import load_file

    stored = load_file(str(weights))
    state = {k[len(prefix) :]: v.float() for k, v in stored.items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{weights} holds no '{prefix}*' tensors: not a stand-in weights file")
    patcher = build_tiny_flux(**arch)
    net = patcher.model.diffusion_model
    expected = set(net.state_dict())
    # Flux's q/k RMSNorm gain is ``.scale`` in older ComfyUI and ``.weight`` (torch's RMSNorm) in newer.
    swap = {".scale": ".weight", ".weight": ".scale"}
    for key in [k for k in state if k not in expected]:
        for old, new in swap.items():
            if key.endswith(old) and key[: -len(old)] + new in expected:
                state[key[: -len(old)] + new] = state.pop(key)
                break
    with torch.inference_mode(False), torch.no_grad():
        net.load_state_dict(state, strict=True)
    patcher.cached_patcher_init = (_reload_tiny_flux, ({"arch": dict(arch), "weights": str(weights)},))
    return patcher


def _reload_tiny_flux(kwargs: dict, disable_dynamic: bool = False):
    return load_tiny_flux(kwargs["arch"], kwargs["weights"])


@contextlib.contextmanager
def full_training(diffusion_model: torch.nn.Module) -> Iterator[dict]:
    """Training every weight of a (tiny) Flux transformer directly, outside a LoRA: autograd on
    inside ComfyUI's inference mode, ComfyUI's training flag (its RoPE kernel has no backward), and
    the blocks run with out-of-place residual adds (``transformer_options`` to pass to the model's
    forward, the same block patches LoRA training uses)."""
    import comfy.model_management as mm

    from .training_model import _BlockPatch

    owner = types.SimpleNamespace(checkpoint_blocks=0)  # no block recomputes in backward
    replace = {
        ("double_block", i): _BlockPatch(b, True, owner) for i, b in enumerate(diffusion_model.double_blocks)
    }
    replace.update(
        {
            ("single_block", i): _BlockPatch(b, False, owner)
            for i, b in enumerate(diffusion_model.single_blocks)
        }
    )
    had_flag = hasattr(mm, "in_training")
    previous = getattr(mm, "in_training", None)
    with torch.inference_mode(False), torch.enable_grad():
        if had_flag:
            mm.in_training = True
        try:
            yield {"patches_replace": {"dit": replace}}
        finally:
            if had_flag:
                mm.in_training = previous
