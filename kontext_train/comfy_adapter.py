"""The one module that talks to ComfyUI.

Everything ComfyUI-specific lives here: finding and starting a ComfyUI install for headless use,
checking that a MODEL is Flux, attaching LoRA adapters to a *clone* of the model through
ComfyUI's weight wrappers, calling the diffusion model directly for training, sampling with
ComfyUI's own samplers from the degraded latent, VAE encode/decode, progress and cancel. The rest
of the library only sees plain tensors and callables.

ComfyUI is imported lazily inside functions so that ``import kontext_train`` works without it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .grad_checkpoint import run_block
from .lora import LoraAdapter, create_adapters, select_targets

log = logging.getLogger("kontext_restore")

# --------------------------------------------------------------------------------------------
# Finding and starting ComfyUI (headless command, tests)
# --------------------------------------------------------------------------------------------


class ComfyUINotFound(RuntimeError):
    pass


def _looks_like_comfyui(path: Path) -> bool:
    return (path / "comfy" / "model_management.py").is_file() and (path / "folder_paths.py").is_file()


def find_comfyui(explicit: str | os.PathLike | None = None) -> Path:
    """The ComfyUI folder to use: ``explicit``, else $COMFYUI_PATH, else the install this pack sits
    in (``ComfyUI/custom_nodes/<pack>``), else the test host the project's setup script builds.

    A folder the user named (argument or $COMFYUI_PATH) must be a ComfyUI: no silent fallback to
    another install.
    """
    named = explicit or os.environ.get("COMFYUI_PATH")
    if named:
        path = Path(named).expanduser().resolve()
        if _looks_like_comfyui(path):
            return path
        source = "given" if explicit else "in COMFYUI_PATH"
        raise ComfyUINotFound(
            f"The ComfyUI folder {source} ({path}) is not a ComfyUI install (no comfy/model_management.py "
            "or folder_paths.py). Point it at the folder that holds ComfyUI's main.py."
        )
    pack = Path(__file__).resolve().parent.parent
    candidates = [pack.parent.parent, pack / ".host" / "ComfyUI"]
    for c in candidates:
        if _looks_like_comfyui(c.resolve()):
            return c.resolve()
    raise ComfyUINotFound(
        "ComfyUI could not be found (looked in: " + ", ".join(str(c) for c in candidates) + "). Set "
        "COMFYUI_PATH to your ComfyUI folder (the one with main.py), pass --comfyui, or run "
        "scripts/setup_test_env.sh to build a local one."
    )


def comfyui_loaded() -> bool:
    return "comfy.model_management" in sys.modules


def bootstrap_comfyui(path: str | os.PathLike | None = None, cpu: bool | None = None) -> Path:
    """Imports ComfyUI in this process (no server), once. Returns its folder.

    Inside a running ComfyUI this is a no-op. ``cpu`` None means: CPU when CUDA is unavailable.
    """
    if comfyui_loaded():
        import folder_paths

        return Path(folder_paths.base_path)
    root = find_comfyui(path)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from comfy.cli_args import args

    if cpu is None:
        cpu = not torch.cuda.is_available()
    args.cpu = bool(cpu)
    args.disable_api_nodes = True
    import folder_paths  # noqa: F401

    # ComfyUI's nodes.py puts comfy/ first on sys.path; after that comfy/utils.py shadows
    # ComfyUI's own utils/ package, so it has to be imported before nodes.
    with contextlib.suppress(ImportError):
        import utils.install_util  # noqa: F401
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401

    import nodes  # noqa: F401

    return root


# --------------------------------------------------------------------------------------------
# Model checks and loading
# --------------------------------------------------------------------------------------------


def require_flux(model) -> None:
    """Raises a clear error unless ``model`` is a ComfyUI MODEL holding a Flux (Kontext) transformer."""
    base = getattr(model, "model", None)
    cfg = getattr(getattr(base, "model_config", None), "unet_config", None) or {}
    diffusion = getattr(base, "diffusion_model", None)
    if base is None or diffusion is None:
        raise ValueError(
            f"Expected a ComfyUI MODEL, got {type(model).__name__}. Connect a model loader's MODEL output."
        )
    is_flux = (
        cfg.get("image_model") == "flux"
        and hasattr(diffusion, "double_blocks")
        and hasattr(diffusion, "single_blocks")
    )
    if not is_flux:
        kind = cfg.get("image_model") or type(base).__name__
        raise ValueError(
            f"This trainer needs a FLUX.1 Kontext model, but the MODEL is {kind!r}. "
            "Load flux1-kontext-dev with 'Load Diffusion Model' (UNETLoader)."
        )
    if not cfg.get("guidance_embed", False):
        raise ValueError(
            "The MODEL is a Flux model without guidance embedding (e.g. Schnell); FLUX.1 Kontext [dev] is needed."
        )


def load_models_headless(unet: str, clip_l: str, t5xxl: str, vae: str, weight_dtype: str = "default"):
    """Loads the Kontext transformer, text encoders and VAE with ComfyUI's own loaders."""
    import comfy.sd
    import comfy.utils

    for label, path in (("Kontext model", unet), ("clip_l", clip_l), ("t5xxl", t5xxl), ("VAE", vae)):
        if not path or not Path(path).is_file():
            raise FileNotFoundError(
                f"{label} weights not found: {path!r}. Give the path to the .safetensors file."
            )
    model_options = {}
    if weight_dtype == "fp8_e4m3fn":
        model_options["dtype"] = torch.float8_e4m3fn
    elif weight_dtype == "fp8_e5m2":
        model_options["dtype"] = torch.float8_e5m2
    model = comfy.sd.load_diffusion_model(unet, model_options=model_options)
    clip = comfy.sd.load_clip(ckpt_paths=[clip_l, t5xxl], clip_type=comfy.sd.CLIPType.FLUX)
    vae_model = comfy.sd.VAE(sd=comfy.utils.load_torch_file(vae))
    return model, clip, vae_model


def encode_prompt(clip, text: str) -> list:
    """CONDITIONING exactly as ComfyUI's CLIPTextEncode makes it."""
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


def lora_folder() -> Path:
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0])


def output_folder() -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory())


def input_folder() -> Path:
    import folder_paths

    return Path(folder_paths.get_input_directory())


def model_name(model) -> str:
    """Best-effort name of the weights a MODEL came from, for metadata."""
    for attr in ("cached_patcher_init", "model_file", "ckpt_path"):
        value = getattr(model, attr, None)
        if isinstance(value, tuple) and value and isinstance(value[1], tuple) and value[1]:
            return Path(str(value[1][0])).name
        if isinstance(value, str):
            return Path(value).name
    cfg = getattr(getattr(model, "model", None), "model_config", None)
    return type(cfg).__name__ if cfg is not None else "unknown"


# --------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------


@dataclass
class PreparedConditioning:
    """Text conditioning on the device once, expanded to a batch on demand (no per-step work)."""

    context: torch.Tensor  # (1, seq, 4096)
    pooled: torch.Tensor | None  # (1, 768)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        pooled = self.pooled.expand(n, -1) if self.pooled is not None else None
        return self.context.expand(n, -1, -1), pooled


def prepare_conditioning(conditioning, device: torch.device, dtype: torch.dtype) -> PreparedConditioning:
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError("CONDITIONING is empty: connect a CLIPTextEncode with the restoration prompt.")
    first = conditioning[0]
    context, extras = first[0], (first[1] if len(first) > 1 else {})
    if not isinstance(context, torch.Tensor) or context.ndim != 3:
        raise ValueError("CONDITIONING is not text conditioning (expected a (batch, tokens, width) tensor).")
    pooled = extras.get("pooled_output")
    # Clone so tensors made under inference mode can take part in autograd graphs.
    context = context[:1].detach().clone().to(device=device, dtype=dtype)
    if pooled is not None:
        pooled = pooled[:1].detach().clone().to(device=device, dtype=dtype)
    return PreparedConditioning(context=context, pooled=pooled)


# --------------------------------------------------------------------------------------------
# Training model: LoRA on a clone, direct velocity calls
# --------------------------------------------------------------------------------------------


def _fix_inference_tensors(module: torch.nn.Module) -> None:
    """Parameters created under ``torch.inference_mode`` (everything a node loads) cannot be saved
    for backward. ComfyUI's cast ops copy their weights anyway, but a few plain parameters (Flux's
    RMSNorm scales) are used directly; replace those by ordinary tensors with the same values.
    The values do not change, so the shared model behaves exactly as before."""
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()


class _BlockPatch:
    """A ComfyUI "dit" block replacement that runs one block with safe adds, optionally checkpointed.

    It calls the block module it was made for rather than ``extra["original_block"]``: ComfyUI's
    wrapper closes over the loop variable, so when checkpointing recomputes a block during backward
    that closure already points at the *last* block of the model.
    """

    def __init__(self, block: torch.nn.Module, double: bool, owner: FluxLoraModel) -> None:
        self.block = block
        self.double = double
        self.owner = owner
        # Older ComfyUI blocks take no transformer_options; pass it only where the block has it.
        self.takes_options = "transformer_options" in inspect.signature(block.forward).parameters

    def _call(self, args: dict) -> dict:
        kwargs = {"vec": args["vec"], "pe": args["pe"], "attn_mask": args.get("attn_mask")}
        if self.takes_options:
            kwargs["transformer_options"] = args.get("transformer_options")
        if self.double:
            img, txt = self.block(img=args["img"], txt=args["txt"], **kwargs)
            return {"img": img, "txt": txt}
        return {"img": self.block(args["img"], **kwargs)}

    def __call__(self, args: dict, extra: dict) -> dict:
        # A snapshot of the options: ComfyUI mutates the dict (block_index) as the loop goes on.
        args = dict(args)
        if isinstance(args.get("transformer_options"), dict):
            args["transformer_options"] = dict(args["transformer_options"])
        return run_block(self._call, args, checkpoint=self.owner.gradient_checkpointing)


class FluxLoraModel:
    """A clone of a ComfyUI Flux MODEL with trainable LoRA adapters attached as weight wrappers.

    The input MODEL is untouched: adapters and block patches live on the clone, and ComfyUI applies
    them only while the clone is the loaded copy. ``velocity`` calls the transformer directly, so
    a step costs one forward and one backward, without the sampler machinery.
    """

    def __init__(
        self,
        model,
        rank: int,
        alpha: float,
        lora_dtype: torch.dtype = torch.float32,
        targets: str = "blocks",
        gradient_checkpointing: bool = True,
        seed: int = 0,
        adapters: Mapping[str, LoraAdapter] | None = None,
    ) -> None:
        require_flux(model)
        self.patcher = model.clone()
        self.base = self.patcher.model
        diffusion = self.base.diffusion_model
        if adapters is None:
            modules = dict(diffusion.named_modules())
            targets = select_targets(modules, targets=targets)
            if not targets:
                raise ValueError("No LoRA target layers found in the Flux model.")
            shapes = {p: tuple(modules[p].weight.shape) for p in targets}
            adapters = create_adapters(shapes, rank=rank, alpha=alpha, dtype=lora_dtype, seed=seed)
        self.adapters: dict[str, LoraAdapter] = dict(adapters)
        for path, adapter in self.adapters.items():
            self.patcher.add_weight_wrapper(f"diffusion_model.{path}.weight", adapter)
        self.gradient_checkpointing = gradient_checkpointing
        for i, block in enumerate(diffusion.double_blocks):
            self.patcher.set_model_patch_replace(_BlockPatch(block, True, self), "dit", "double_block", i)
        for i, block in enumerate(diffusion.single_blocks):
            self.patcher.set_model_patch_replace(_BlockPatch(block, False, self), "dit", "single_block", i)
        self.device = torch.device(self.patcher.load_device)
        self.dtype = self.base.manual_cast_dtype or self.base.get_dtype()

    def prepare_conditioning(self, conditioning) -> PreparedConditioning:
        return prepare_conditioning(conditioning, self.device, self.dtype)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for a in self.adapters.values() for p in a.parameters()]

    def load(self) -> torch.device:
        """Loads the clone under ComfyUI's memory manager (which also moves the adapters)."""
        import comfy.model_management as mm

        _fix_inference_tensors(self.base.diffusion_model)
        # Only the adapters train. A model loaded outside inference mode (headless command, tests)
        # has base weights with requires_grad=True: backward would then build a full-size gradient
        # for every base weight (and fail on fp8 weights). ComfyUI's own trainer does the same.
        self.base.diffusion_model.requires_grad_(False)
        mm.load_models_gpu([self.patcher], memory_required=0, force_full_load=True)
        self.device = self.patcher.load_device
        self.dtype = self.base.manual_cast_dtype or self.base.get_dtype()
        for a in self.adapters.values():
            a.to(self.device)
            a.requires_grad_(True)
        return self.device

    def to_model_space(self, raw_latent: torch.Tensor) -> torch.Tensor:
        return self.base.process_latent_in(raw_latent)

    def from_model_space(self, latent: torch.Tensor) -> torch.Tensor:
        return self.base.process_latent_out(latent)

    def velocity(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: PreparedConditioning,
        guidance: float,
        reference: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The model's velocity at (x, sigma), latents in model space."""
        n = x.shape[0]
        context, pooled = cond.batch(n)
        g = torch.full((n,), float(guidance), device=x.device, dtype=self.dtype)
        refs = [reference.to(self.dtype)] if reference is not None else None
        transformer_options = self.patcher.model_options.get("transformer_options", {}).copy()
        out = self.base.diffusion_model(
            x.to(self.dtype),
            sigma.to(self.dtype),
            context,
            y=pooled,
            guidance=g,
            ref_latents=refs,
            transformer_options=transformer_options,
        )
        # At least fp32 for the loss; float64 stays float64 (gradient checks need it).
        return out.to(torch.promote_types(out.dtype, torch.float32))

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Autograd on inside ComfyUI's inference mode, and the version-specific training flag."""
        import comfy.model_management as mm

        had_flag = hasattr(mm, "in_training")
        previous = getattr(mm, "in_training", None)
        with torch.inference_mode(False), torch.enable_grad():
            if had_flag:
                mm.in_training = True
            try:
                yield
            finally:
                if had_flag:
                    mm.in_training = previous

    def release(self) -> None:
        """Unloads the clone so ComfyUI can reload the plain model; adapters stay as trained."""
        import comfy.model_management as mm

        for a in self.adapters.values():
            a.requires_grad_(False)
        with contextlib.suppress(Exception):
            self.patcher.detach()
        with contextlib.suppress(Exception):
            mm.soft_empty_cache()


def apply_lora(model, lora_state: Mapping[str, torch.Tensor], strength: float = 1.0):
    """The input MODEL with a LoRA state dict applied exactly as the stock LoraLoaderModelOnly does."""
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, None, dict(lora_state), strength, 0)[0]


# --------------------------------------------------------------------------------------------
# Sampling from the degraded latent with ComfyUI's samplers
# --------------------------------------------------------------------------------------------


class DegradedStartNoise:
    """A ComfyUI NOISE (``.seed`` + ``.generate_noise``) whose sample *is* the degraded latent.

    ComfyUI starts sampling at ``sigma0 * noise + (1 - sigma0) * process_in(latent_image)`` and
    does not pass the noise through ``process_in``; so with sigma0 = 1 the first model input is
    exactly the model-space latent held here, the start the bridge was trained from. With
    ``bridge_noise`` s > 0 it is ``z_LQ + s * eps`` with eps drawn from ``seed`` on the CPU, the
    same draw as ``sampler.restore_latents``.
    """

    def __init__(self, degraded_model_space: torch.Tensor, seed: int = 0, bridge_noise: float = 0.0) -> None:
        if not isinstance(degraded_model_space, torch.Tensor) or degraded_model_space.ndim != 4:
            shape = tuple(getattr(degraded_model_space, "shape", ()))
            raise ValueError(
                f"The degraded latent must be a (batch, channels, h, w) tensor, got shape {shape}."
            )
        if not (bridge_noise >= 0 and math.isfinite(bridge_noise)):
            raise ValueError(f"bridge_noise must be a finite number >= 0, got {bridge_noise}")
        self.degraded = degraded_model_space.detach().to(device="cpu", dtype=torch.float32)
        self.seed = int(seed)
        self.bridge_noise = float(bridge_noise)

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        samples = input_latent.get("samples") if isinstance(input_latent, dict) else None
        if isinstance(samples, torch.Tensor) and not samples.is_nested:
            if samples.shape[0] != self.degraded.shape[0] or samples.shape[-2:] != self.degraded.shape[-2:]:
                raise ValueError(
                    f"The sampler's latent_image is {tuple(samples.shape)} but the degraded start is "
                    f"{tuple(self.degraded.shape)}. Connect the same degraded LATENT (VAE Encode of the degraded "
                    "image) to both 'Degraded Image as Start' and the sampler's latent_image."
                )
        start = self.degraded.clone()
        if self.bridge_noise > 0:
            g = torch.Generator().manual_seed(self.seed)
            start = start + self.bridge_noise * torch.randn(start.shape, generator=g)
        return start


def degraded_start_noise(model, degraded_raw: torch.Tensor, seed: int = 0, bridge_noise: float = 0.0):
    """The NOISE for a raw (VAE-space) degraded latent, in this MODEL's latent space."""
    process_in = model.get_model_object("latent_format").process_in
    return DegradedStartNoise(
        process_in(degraded_raw.detach().float().cpu()), seed=seed, bridge_noise=bridge_noise
    )


def sampler_names() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.SAMPLER_NAMES)


def scheduler_names() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.SCHEDULER_NAMES)


def comfy_sigmas(model, scheduler: str, steps: int) -> torch.Tensor:
    """Sigmas from one of ComfyUI's schedulers with the MODEL's own model sampling (its shift)."""
    import comfy.samplers

    names = scheduler_names()
    if scheduler not in names:
        raise ValueError(f"Unknown scheduler {scheduler!r}; ComfyUI has: {', '.join(names)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()


def restore_sigmas(model, scheduler: str, steps: int, latent_height: int, latent_width: int) -> torch.Tensor:
    """``as_trained`` (the training time shift for this latent size) or a ComfyUI scheduler."""
    from .restore import AS_TRAINED, as_trained_sigmas

    if scheduler == AS_TRAINED:
        return as_trained_sigmas(steps, latent_height, latent_width)
    return comfy_sigmas(model, scheduler, steps)


def with_reference_and_guidance(conditioning, reference_raw: torch.Tensor | None, guidance: float):
    """The conditioning as training saw it: Flux guidance set, and exactly one reference (the
    degraded latent) or none. References already on the conditioning (e.g. from a ReferenceLatent
    node) are replaced, not appended: a second reference was never part of training."""
    import node_helpers

    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError("CONDITIONING is empty: connect a CLIPTextEncode with the restoration prompt.")
    had_refs = any(len(c) > 1 and c[1].get("reference_latents") for c in conditioning)
    refs = [reference_raw] if reference_raw is not None else None
    if had_refs:
        log.warning(
            "Kontext Restore: reference latents already on the conditioning were dropped; %s",
            "the degraded image is the reference." if refs else "a 'bridge' LoRA was trained without one.",
        )
    return node_helpers.conditioning_set_values(
        conditioning, {"guidance": float(guidance), "reference_latents": refs}
    )


def sample_from(
    model,
    conditioning,
    degraded_raw: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    formulation: str,
    sampler_name: str = "euler",
    seed: int = 0,
    guidance: float = 1.5,
    bridge_noise: float = 0.0,
    callback: Callable | None = None,
) -> torch.Tensor:
    """Restores one batch of raw degraded latents with ComfyUI's sampler; returns raw latents.

    Bridge formulations start at the degraded latent through ``DegradedStartNoise`` (exactly, when
    ``sigmas[0]`` is 1); ``kontext`` starts from seeded Gaussian noise like a stock sampler.
    """
    import comfy.samplers

    from .flow import starts_from_degraded, uses_reference

    if sampler_name not in sampler_names():
        raise ValueError(f"Unknown sampler {sampler_name!r}; ComfyUI has: {', '.join(sampler_names())}")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten().cpu()
    if sigmas.numel() < 2:
        raise ValueError(f"Need at least 2 sigmas (one step), got {sigmas.tolist()}")
    degraded_raw = degraded_raw.detach().float().cpu()
    reference = degraded_raw if uses_reference(formulation) else None
    cond = with_reference_and_guidance(conditioning, reference, guidance)
    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": cond})
    guider.set_cfg(1.0)
    sampler = comfy.samplers.sampler_object(sampler_name)
    if starts_from_degraded(formulation):
        noise = degraded_start_noise(model, degraded_raw, seed=seed, bridge_noise=bridge_noise)
        # The degraded latent as latent_image too keeps the start exact when sigmas[0] < 1.
        latent_image = degraded_raw
    else:
        latent_image = torch.zeros_like(degraded_raw)
        noise = _SeededNoise(seed)
    noise_tensor = noise.generate_noise({"samples": latent_image})
    out = guider.sample(
        noise_tensor, latent_image, sampler, sigmas, callback=callback, disable_pbar=True, seed=seed
    )
    return out.float().cpu()


class _SeededNoise:
    """ComfyUI's own seeded noise (what RandomNoise / KSampler draw for this seed)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        import comfy.sample

        return comfy.sample.prepare_noise(input_latent["samples"], self.seed, None)


def restore_pixels(
    model,
    vae,
    conditioning,
    pixels: torch.Tensor,
    *,
    formulation: str,
    steps: int,
    scheduler: str = "as_trained",
    sampler_name: str = "euler",
    seed: int = 0,
    guidance: float = 1.5,
    bridge_noise: float = 0.0,
    callback: Callable | None = None,
) -> torch.Tensor:
    """(B, 3, H, W) degraded pixels at a bucket size -> restored pixels: encode, sample, decode."""
    raw = vae_encode(vae, pixels)
    sigmas = restore_sigmas(model, scheduler, steps, raw.shape[-2], raw.shape[-1])
    restored = sample_from(
        model,
        conditioning,
        raw,
        sigmas,
        formulation=formulation,
        sampler_name=sampler_name,
        seed=seed,
        guidance=guidance,
        bridge_noise=bridge_noise,
        callback=callback,
    )
    return vae_decode(vae, restored)


# --------------------------------------------------------------------------------------------
# VAE, progress, cancel
# --------------------------------------------------------------------------------------------


def vae_encode(vae, images_bchw: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [0,1] -> raw latents (B,16,H/8,W/8) on the CPU."""
    pixels = images_bchw.permute(0, 2, 3, 1).contiguous()
    with torch.no_grad():
        return vae.encode(pixels[:, :, :, :3]).float().cpu()


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Raw latents -> (B,3,H,W) in [0,1] on the CPU."""
    with torch.no_grad():
        images = vae.decode(latents)
    if images.ndim == 5:  # some VAEs return (B, T, H, W, C)
        images = images.reshape(-1, *images.shape[-3:])
    return images.permute(0, 3, 1, 2).float().clamp(0, 1).cpu()


def vae_identity(vae) -> str:
    """A stable identity for cache keys: class, latent channels and a fingerprint of some weights."""
    sd_model = getattr(vae, "first_stage_model", None)
    parts = [type(sd_model).__name__, str(getattr(vae, "latent_channels", "?"))]
    if sd_model is not None:
        params = list(sd_model.parameters())
        picked = params[:2] + params[-2:]
        for p in picked:
            t = p.detach().float().flatten()
            parts.append(f"{tuple(p.shape)}:{t[:64].sum().item():.6e}:{t.abs().mean().item():.6e}")
    return "|".join(parts)


def interrupt_exception_types() -> tuple[type[BaseException], ...]:
    import comfy.model_management as mm

    return (mm.InterruptProcessingException, KeyboardInterrupt)


def check_interrupted() -> None:
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()


def oom_exception_types() -> tuple[type[BaseException], ...]:
    import comfy.model_management as mm

    types: list[type[BaseException]] = [torch.cuda.OutOfMemoryError]
    oom = getattr(mm, "OOM_EXCEPTION", None)
    if isinstance(oom, type):
        types.append(oom)
    return tuple(types)


class NodeProgress:
    """ComfyUI's progress bar plus a status line on the node, where the version has one."""

    def __init__(self, total: int, node_id: str | None = None) -> None:
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(total)
        self.total = total
        self.node_id = node_id

    def update(self, value: int, text: str | None = None, preview=None) -> None:
        preview_arg = ("JPEG", preview, 512) if preview is not None else None
        self.bar.update_absolute(value, self.total, preview_arg)
        if text and self.node_id is not None:
            with contextlib.suppress(Exception):
                import server

                server.PromptServer.instance.send_progress_text(text, self.node_id)


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
    context_in_dim: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A small random Flux Kontext MODEL built through ComfyUI's own model classes.

    For tests and the offline demo. ComfyUI's ops skip weight initialisation to load faster, so the
    weights are initialised here (PyTorch's default Linear init, norm scales at one).
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
            for name, p in base.diffusion_model.named_parameters():
                if p.ndim >= 2:
                    bound = 1.0 / (p.shape[1] ** 0.5)
                    p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=g))
                elif name.endswith("scale"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.empty(p.shape).uniform_(-0.02, 0.02, generator=g))
    base.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(
        base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


# --- headless command ---


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


def resolve_model_file(value: str, folders: tuple[str, ...]) -> Path | None:
    """A weights file given as a path, or as a name inside one of ComfyUI's model folders
    (e.g. ``diffusion_models``, ``text_encoders``, ``vae``). None when neither exists."""
    if not value:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.resolve()
    if not comfyui_loaded():
        return None
    import folder_paths

    for folder in folders:
        try:
            found = folder_paths.get_full_path(folder, value)
        except Exception:  # unknown folder name in this ComfyUI version
            found = None
        if found and Path(found).is_file():
            return Path(found)
    return None


def soft_empty_cache() -> None:
    """Lets ComfyUI return freed memory to the device (e.g. after the text encoders are dropped)."""
    import comfy.model_management as mm

    mm.soft_empty_cache()
