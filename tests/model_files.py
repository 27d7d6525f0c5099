"""Model files in the layouts users download, with random weights, small enough for the CPU.

The tests put these in a ComfyUI ``models`` folder and load them through the stock loaders
(``UNETLoader``, ``VAELoader``), so the pack meets the files it meets in real use:

- ``write_bfl_flux``: the Black Forest Labs transformer file (``flux1-kontext-dev.safetensors``):
  bf16, no key prefix, norm gains named ``.scale``, Kontext-dev's guidance embedder.
- ``write_scaled_fp8_flux``: Comfy-Org's "fp8 scaled" repackaging of it
  (``flux1-dev-kontext_fp8_scaled.safetensors``): every Linear weight stored as float8_e4m3fn with
  a float32 ``<layer>.scale_weight`` (the dequantised weight is ``weight * scale_weight``) and a
  ``<layer>.scale_input`` of one, biases and norm gains in bf16, and the ``scaled_fp8`` marker (an
  empty float8_e4m3fn tensor). ComfyUI 0.3.75 sees the marker in ``model_detection`` and builds
  the model with ``comfy.ops.scaled_fp8_ops``; 0.33 rewrites the file on load into its
  mixed-precision format (``comfy.utils.convert_old_quants``: ``weight_scale`` + per-layer
  ``comfy_quant``) and builds ``mixed_precision_ops`` layers holding ``QuantizedTensor`` weights.
  Which layers the released file quantises, and whether its ``scale_input`` values are one,
  could not be read here (no download); every Linear is quantised because 0.3.75's scaled ops
  give every Linear layer fp8 storage whatever the file holds.
- ``write_flux_vae``: the Flux autoencoder (``ae.safetensors``): float32, the LDM layout ComfyUI
  reads without conversion. Its size is fixed (ComfyUI's VAE config is not read from shapes,
  only the 16 latent channels are), 84M parameters: fine on the CPU.

The transformer keeps Flux's real width (3072: both hosts hard-code 24 heads of 128 in
``model_detection``, and 0.3.75 the 4.0 MLP ratio) but has fewer blocks (ComfyUI counts
``double_blocks.N`` / ``single_blocks.N``) and a narrower text input (``txt_in``'s width is read
from its shape; the tests' stand-in text encoder is 64 wide). Everything is deterministic per seed.
"""

from __future__ import annotations

from pathlib import Path

import torch

WIDTH = 3072  # both hosts: 24 heads x 128
MLP = 4 * WIDTH
HEAD_DIM = 128
VEC_DIM = 768  # CLIP-L pooled
TIME_DIM = 256  # sinusoidal timestep / guidance embedding
LATENT_CHANNELS = 16
PATCH = 2

BFL_FILE = "flux1-kontext-dev.safetensors"
SCALED_FP8_FILE = "flux1-dev-kontext_fp8_scaled.safetensors"
VAE_FILE = "ae.safetensors"
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def _linear(shapes: dict, name: str, out_dim: int, in_dim: int, bias: bool = True) -> None:
    shapes[f"{name}.weight"] = (out_dim, in_dim)
    if bias:
        shapes[f"{name}.bias"] = (out_dim,)


def _qk_norm(shapes: dict, name: str) -> None:
    shapes[f"{name}.norm.query_norm.scale"] = (HEAD_DIM,)
    shapes[f"{name}.norm.key_norm.scale"] = (HEAD_DIM,)


def flux_shapes(double: int = 1, single: int = 1, context_dim: int = 4096) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the BFL FLUX.1 [dev] / Kontext [dev] transformer file (19 double and 38
    single blocks and a 4096-wide text input in the released model)."""
    shapes: dict[str, tuple[int, ...]] = {}
    _linear(shapes, "img_in", WIDTH, LATENT_CHANNELS * PATCH * PATCH)
    _linear(shapes, "txt_in", WIDTH, context_dim)
    for embedder, in_dim in (("time_in", TIME_DIM), ("vector_in", VEC_DIM), ("guidance_in", TIME_DIM)):
        _linear(shapes, f"{embedder}.in_layer", WIDTH, in_dim)
        _linear(shapes, f"{embedder}.out_layer", WIDTH, WIDTH)
    for i in range(double):
        for stream in ("img", "txt"):
            block = f"double_blocks.{i}.{stream}"
            _linear(shapes, f"{block}_mod.lin", 6 * WIDTH, WIDTH)
            _linear(shapes, f"{block}_attn.qkv", 3 * WIDTH, WIDTH)
            _qk_norm(shapes, f"{block}_attn")
            _linear(shapes, f"{block}_attn.proj", WIDTH, WIDTH)
            _linear(shapes, f"{block}_mlp.0", MLP, WIDTH)
            _linear(shapes, f"{block}_mlp.2", WIDTH, MLP)
    for i in range(single):
        block = f"single_blocks.{i}"
        _linear(shapes, f"{block}.linear1", 3 * WIDTH + MLP, WIDTH)
        _linear(shapes, f"{block}.linear2", WIDTH, WIDTH + MLP)
        _qk_norm(shapes, block)
        _linear(shapes, f"{block}.modulation.lin", 3 * WIDTH, WIDTH)
    _linear(shapes, "final_layer.linear", LATENT_CHANNELS * PATCH * PATCH, WIDTH)
    _linear(shapes, "final_layer.adaLN_modulation.1", 2 * WIDTH, WIDTH)
    return shapes


def random_flux(
    double: int = 1, single: int = 1, context_dim: int = 4096, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A transformer's float32 weights (``flux_shapes``): Linear weights N(0, 1/fan_in), biases
    N(0, 0.02^2), norm gains one. Pass them to both writers to save drawing them twice."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in flux_shapes(double, single, context_dim).items():
        if key.endswith(".scale"):
            sd[key] = torch.ones(shape)
        elif len(shape) == 2:
            sd[key] = torch.randn(shape, generator=g) * shape[1] ** -0.5
        else:
            sd[key] = torch.randn(shape, generator=g) * 0.02
    return sd


def _save(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def write_bfl_flux(path: Path, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """The BFL transformer layout in bf16 (``flux1-kontext-dev.safetensors``) of ``weights``
    (default: ``random_flux()``)."""
    sd = random_flux() if weights is None else weights
    return _save({k: v.to(torch.bfloat16) for k, v in sd.items()}, path)


def write_scaled_fp8_flux(path: Path, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Comfy-Org's scaled fp8 layout (``flux1-dev-kontext_fp8_scaled.safetensors``) of
    ``weights`` (default: ``random_flux()``): each Linear weight scaled by its absolute maximum
    onto float8_e4m3fn's range."""
    sd = random_flux() if weights is None else weights
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith(".weight") and value.ndim == 2:
            layer = key.removesuffix(".weight")
            scale = value.abs().amax() / FP8_MAX
            out[key] = (value / scale).to(torch.float8_e4m3fn)
            out[f"{layer}.scale_weight"] = scale.to(torch.float32).reshape(())
            out[f"{layer}.scale_input"] = torch.ones((), dtype=torch.float32)
        else:
            out[key] = value.to(torch.bfloat16)
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return _save(out, path)


# ---- the Flux autoencoder --------------------------------------------------------------------

VAE_CH = 128
VAE_CH_MULT = (1, 2, 4, 4)
VAE_RES_BLOCKS = 2


def _conv(shapes: dict, name: str, out_ch: int, in_ch: int, k: int = 3) -> None:
    shapes[f"{name}.weight"] = (out_ch, in_ch, k, k)
    shapes[f"{name}.bias"] = (out_ch,)


def _norm(shapes: dict, name: str, ch: int) -> None:
    shapes[f"{name}.weight"] = (ch,)
    shapes[f"{name}.bias"] = (ch,)


def _resnet(shapes: dict, name: str, in_ch: int, out_ch: int) -> None:
    _norm(shapes, f"{name}.norm1", in_ch)
    _conv(shapes, f"{name}.conv1", out_ch, in_ch)
    _norm(shapes, f"{name}.norm2", out_ch)
    _conv(shapes, f"{name}.conv2", out_ch, out_ch)
    if in_ch != out_ch:
        _conv(shapes, f"{name}.nin_shortcut", out_ch, in_ch, 1)


def _mid(shapes: dict, name: str, ch: int) -> None:
    _resnet(shapes, f"{name}.block_1", ch, ch)
    _norm(shapes, f"{name}.attn_1.norm", ch)
    for proj in ("q", "k", "v", "proj_out"):
        _conv(shapes, f"{name}.attn_1.{proj}", ch, ch, 1)
    _resnet(shapes, f"{name}.block_2", ch, ch)


def vae_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the Flux ``ae.safetensors`` (encoder and decoder, no quant convs)."""
    shapes: dict[str, tuple[int, ...]] = {}
    chans = [VAE_CH * m for m in VAE_CH_MULT]
    _conv(shapes, "encoder.conv_in", VAE_CH, 3)
    in_ch = VAE_CH
    for level, ch in enumerate(chans):
        for b in range(VAE_RES_BLOCKS):
            _resnet(shapes, f"encoder.down.{level}.block.{b}", in_ch, ch)
            in_ch = ch
        if level < len(chans) - 1:
            _conv(shapes, f"encoder.down.{level}.downsample.conv", ch, ch)
    _mid(shapes, "encoder.mid", in_ch)
    _norm(shapes, "encoder.norm_out", in_ch)
    _conv(shapes, "encoder.conv_out", 2 * LATENT_CHANNELS, in_ch)
    _conv(shapes, "decoder.conv_in", chans[-1], LATENT_CHANNELS)
    _mid(shapes, "decoder.mid", chans[-1])
    in_ch = chans[-1]
    for level in reversed(range(len(chans))):
        ch = chans[level]
        for b in range(VAE_RES_BLOCKS + 1):
            _resnet(shapes, f"decoder.up.{level}.block.{b}", in_ch, ch)
            in_ch = ch
        if level > 0:
            _conv(shapes, f"decoder.up.{level}.upsample.conv", ch, ch)
    _norm(shapes, "decoder.norm_out", in_ch)
    _conv(shapes, "decoder.conv_out", 3, in_ch)
    return shapes


def write_flux_vae(path: Path, seed: int = 0) -> Path:
    """The Flux VAE layout in float32 with random weights (kernels N(0, 1/fan_in), biases zero,
    norm gains one)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in vae_shapes().items():
        if len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            sd[key] = torch.randn(shape, generator=g) * fan_in**-0.5
        elif ".norm" in key and key.endswith(".weight"):
            sd[key] = torch.ones(shape)
        else:
            sd[key] = torch.zeros(shape)
    return _save(sd, path)
