"""What every subcommand of the headless app shares: output folder, ComfyUI and the weights, the
run's dataset, and rank-0-first work in multi-process runs."""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_bytes
from .demo import DEMO_BASE_MODEL
from .settings import (
    BY_NAME,
    TRAIN_CONFIG_KEYS,
    WEIGHT_KEYS,
    Settings,
    UsageError,
)

log = logging.getLogger("kontext_restore")


def _say(text: str) -> None:
    print(text, flush=True)


def _save_png(image, path: Path) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def prepare_output_dir(value: str | os.PathLike | None) -> Path:
    """Creates OUTPUT_DIR if needed and proves it is writable; UsageError otherwise."""
    if not value:
        raise UsageError("OUTPUT_DIR is empty: pass --output-dir or set OUTPUT_DIR to a writable folder")
    out = Path(value).expanduser().absolute()
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            raise UsageError(
                f"OUTPUT_DIR {out} cannot be created: {parent} is a file. Choose another --output-dir / OUTPUT_DIR"
            )
        if parent.exists():
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(
            f"OUTPUT_DIR {out} is not writable ({e.strerror or e}). Choose another --output-dir / OUTPUT_DIR"
        ) from None
    return out


def locate_comfyui(settings: Settings) -> Path:
    """The ComfyUI folder; an explicitly given one must be a ComfyUI install (find_comfyui checks)."""
    from ..comfyui import ComfyUINotFound, find_comfyui

    try:
        return find_comfyui(settings.comfyui)
    except ComfyUINotFound as e:
        raise UsageError(f"{e} ({settings.sources['comfyui']})") from None


def resolve_weights(settings: Settings) -> dict[str, Path]:
    """Paths of the four weight files (ComfyUI must be bootstrapped for name lookups)."""
    from ..comfyui import resolve_model_file

    folders = {
        "unet": ("diffusion_models", "unet"),
        "clip_l": ("text_encoders", "clip"),
        "t5xxl": ("text_encoders", "clip"),
        "vae": ("vae",),
    }
    labels = {"unet": "Kontext model", "clip_l": "clip_l", "t5xxl": "t5xxl", "vae": "VAE"}
    out: dict[str, Path] = {}
    for key in WEIGHT_KEYS:
        value = settings.values.get(key)
        opt = BY_NAME[key]
        if not value:
            raise UsageError(
                f"{labels[key]} weights not given: pass {opt.flag} or set {opt.env} "
                "(all four of --unet, --clip-l, --t5xxl and --vae are needed; give none of them for the demo)"
            )
        path = resolve_model_file(str(value), folders[key])
        if path is None:
            raise UsageError(
                f"{labels[key]} weights file not found: {value!r} ({settings.sources[key]}). Give the path to the "
                f".safetensors file or its name inside ComfyUI's models/{folders[key][0]} folder."
            )
        out[key] = path
    return out


def degradation_config(settings: Settings):
    from ..degradations import DegradationConfig

    try:
        return DegradationConfig(
            kind=settings.degradation,
            noise_sigma=settings.noise_sigma,
            blur_radius=settings.blur_radius,
            jpeg_quality=settings.jpeg_quality,
            downscale=settings.downscale,
        )
    except ValueError as e:
        raise UsageError(f"degradation settings: {e}") from None


def train_config(settings: Settings):
    from ..trainer import TrainConfig

    try:
        return TrainConfig(**{k: settings.values[k] for k in TRAIN_CONFIG_KEYS})
    except ValueError as e:
        raise UsageError(str(e)) from None


def build_run_dataset(settings: Settings, out: Path, ctx, logger: logging.Logger | None = None):
    """The dataset of this run: HR_ROOT (+ LR_ROOT), or the demo photos in OUTPUT_DIR/demo_images."""
    from ..dataset import build_dataset
    from .demo import DemoUnavailable, export_sample_photos

    lr = settings.lr_root
    if settings.demo:
        hr = out / "demo_images"
        if settings.given("hr_root") and settings.is_main:
            _say(f"note: the demo uses its bundled sample photos; HR_ROOT={settings.hr_root} is ignored.")
        lr = None

        def export() -> None:
            try:
                export_sample_photos(hr, settings.demo_images)
            except (DemoUnavailable, ValueError) as e:
                raise UsageError(str(e)) from None

        main_first(ctx, export)
    else:
        if not settings.hr_root:
            raise UsageError(
                "HR_ROOT is not set: pass --hr-root or set HR_ROOT to the folder of clean training images"
            )
        hr = Path(settings.hr_root).expanduser()
    try:
        return build_dataset(
            hr,
            Path(lr).expanduser() if lr else None,
            val_count=settings.val_count,
            seed=settings.seed,
            bucket_scale=settings.bucket_scale,
            min_size=settings.min_size,
            degradation=degradation_config(settings),
            logger=logger or log,
        )
    except ValueError as e:
        which = "HR_ROOT/LR_ROOT" if lr else "HR_ROOT"
        raise UsageError(f"{which}: {e}") from None


def main_first(ctx, fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` on rank 0 while the other ranks wait; a UsageError there stops every rank."""
    if not ctx.enabled:
        return fn()
    from ..distributed import barrier, broadcast_error

    error = None
    if ctx.is_main:
        try:
            fn()
        except UsageError as e:
            error = str(e)
    error = broadcast_error(ctx, error)
    if error is not None:
        raise UsageError(error)
    barrier(ctx)
    return None


@dataclass
class Pipeline:
    model: Any  # ComfyUI MODEL (ModelPatcher)
    vae: Any
    conditioning: list
    demo: bool
    base_model: str
    description: str


def load_pipeline(settings: Settings) -> Pipeline:
    """Imports ComfyUI in-process and loads the model, VAE and prompt conditioning."""
    from .. import comfyui

    root = locate_comfyui(settings)
    # ComfyUI warns at import about optional packages (torchaudio ...) the trainer never uses.
    logging.disable(logging.WARNING)
    try:
        comfyui.bootstrap_comfyui(root, cpu=True if settings.cpu else None)
    finally:
        logging.disable(logging.NOTSET)
    if settings.demo and not any(settings.values.get(k) for k in WEIGHT_KEYS):
        from .demo import build_demo_models, parameter_count

        model, vae, cond = build_demo_models(seed=0)
        n = parameter_count(model)
        return Pipeline(
            model,
            vae,
            cond,
            True,
            DEMO_BASE_MODEL,
            f"tiny random Flux ({n / 1e6:.2f}M parameters) + random VAE",
        )
    weights = resolve_weights(settings)
    if settings.is_main:
        _say(
            f"loading {weights['unet'].name}, {weights['clip_l'].name}, {weights['t5xxl'].name}, {weights['vae'].name} ..."
        )
    model, clip, vae = comfyui.load_models_headless(
        str(weights["unet"]),
        str(weights["clip_l"]),
        str(weights["t5xxl"]),
        str(weights["vae"]),
        settings.weight_dtype,
    )
    with torch.no_grad():
        cond = comfyui.encode_prompt(clip, settings.prompt)
    del clip  # the text encoders are not needed again (T5-XXL alone is ~9 GB)
    comfyui.soft_empty_cache()
    comfyui.require_flux(model)
    return Pipeline(
        model, vae, cond, False, weights["unet"].name, f"{weights['unet'].name} ({settings.weight_dtype})"
    )
