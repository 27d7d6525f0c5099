"""ComfyUI's services as the pack uses them: model checks, folders, VAE encode/decode, applying a
finished LoRA, progress on the node, cancel and out-of-memory exceptions, sampler names."""

from __future__ import annotations

import contextlib
import html
from collections.abc import Mapping
from pathlib import Path

import torch


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


def lora_folder() -> Path:
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0])


def lora_names() -> list[str]:
    """The LoRA files ComfyUI lists in its loras folder(s), as its own LoRA loaders show them."""
    import folder_paths

    return list(folder_paths.get_filename_list("loras"))


def find_lora_file(name: str) -> Path:
    """A LoRA named as the trainer outputs it: a name inside ComfyUI's loras folder(s), the
    ``.safetensors`` suffix optional."""
    import folder_paths

    raw = (name or "").strip()
    candidates = [raw] if raw.lower().endswith(".safetensors") else [raw + ".safetensors", raw]
    for candidate in candidates:
        found = folder_paths.get_full_path("loras", candidate)
        if found:
            return Path(found)
    folders = ", ".join(folder_paths.get_folder_paths("loras"))
    raise FileNotFoundError(
        f"LoRA {raw!r} was not found in the loras folder(s) ({folders}). Give the file name the "
        "trainer's lora_name output shows (e.g. 'kontext_restore.safetensors'), or choose none for no LoRA."
    )


def output_folder() -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory())


def writable_folders() -> list[Path]:
    """The folders nodes may write in: ComfyUI's output, temp and user folders and its loras
    folder(s) (``write_folders.check_inside`` checks a path against them)."""
    import folder_paths

    found = [folder_paths.get_output_directory(), folder_paths.get_temp_directory()]
    found.append(folder_paths.get_user_directory())
    found += folder_paths.get_folder_paths("loras")
    return [Path(p) for p in found]


def check_writable(path: Path, what: str, value=None) -> Path:
    """``path`` resolved if it is inside ``writable_folders()``; else a clear error naming it."""
    from ..files.write_folders import check_inside

    return check_inside(path, writable_folders(), what, value)


def input_folder() -> Path:
    import folder_paths

    return Path(folder_paths.get_input_directory())


def input_subfolders() -> list[str]:
    """The input folder's sub-folders, recursively, as core's folder loaders list them."""
    import folder_paths

    return list(folder_paths.get_input_subfolders())


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


def apply_lora(model, lora_state: Mapping[str, torch.Tensor], strength: float = 1.0):
    """The input MODEL with a LoRA state dict applied exactly as the stock LoraLoaderModelOnly does."""
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, None, dict(lora_state), strength, 0)[0]


def sampler_names() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.SAMPLER_NAMES)


def scheduler_names() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.SCHEDULER_NAMES)


def require_vae(vae, input_name: str = "vae") -> None:
    """A clear error unless ``vae`` is a ComfyUI VAE (text or another object where a VAE loader's
    output belongs once failed deep inside with "encode() argument 'encoding' must be str")."""
    if not all(callable(getattr(vae, m, None)) for m in ("encode", "decode")) or isinstance(
        vae, (str, bytes)
    ):
        raise ValueError(
            f"{input_name}: expected a ComfyUI VAE, got {type(vae).__name__}. Connect a VAE loader's VAE output."
        )


def vae_encode(vae, images_bchw: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [0,1] -> raw latents (B,16,H/8,W/8) on the CPU."""
    require_vae(vae)
    pixels = images_bchw.permute(0, 2, 3, 1).contiguous()
    with torch.no_grad():
        return vae.encode(pixels[:, :, :, :3]).float().cpu()


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Raw latents -> (B,3,H,W) in [0,1] on the CPU."""
    require_vae(vae)
    with torch.no_grad():
        images = vae.decode(latents)
    if images.ndim == 5:  # some VAEs return (B, T, H, W, C)
        images = images.reshape(-1, *images.shape[-3:])
    return images.permute(0, 3, 1, 2).float().clamp(0, 1).cpu()


def vae_identity(vae) -> str:
    """A stable identity for cache keys: class, latent channels and a fingerprint of some weights."""
    require_vae(vae)
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
        if text:
            show_on_node(text, self.node_id)


def show_on_node(text: str, node_id: str | None) -> None:
    """Draws ``text`` on the node as its status text (ComfyUI's progress text), where the server
    and version have one; it stays there after the node has run.

    Frontends 1.32 and 1.49 insert this text as HTML with ``<br>`` for each newline, so it is
    escaped: a file name with ``<`` or ``&`` shows as written.
    """
    if node_id is None:
        return
    with contextlib.suppress(Exception):
        import server

        server.PromptServer.instance.send_progress_text(html.escape(text, quote=False), node_id)


def soft_empty_cache() -> None:
    """Lets ComfyUI return freed memory to the device (e.g. after the text encoders are dropped)."""
    import comfy.model_management as mm

    mm.soft_empty_cache()
