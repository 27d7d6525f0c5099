"""What every subcommand of the headless app shares: output folder, ComfyUI and the weights, the
run's dataset, and rank-0-first work in multi-process runs."""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..files.atomic import atomic_write_bytes
from .demo import DEMO_BASE_MODEL, DEMO_HELD_OUT
from .settings import (
    BY_NAME,
    PROG,
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


def check_output_dir(value: str | os.PathLike | None) -> Path:
    """OUTPUT_DIR as an absolute path, checked without creating anything: no file in the way, and
    the nearest existing folder writable. UsageError otherwise."""
    if not value:
        raise UsageError("OUTPUT_DIR is empty: pass --output-dir or set OUTPUT_DIR to a writable folder")
    out = Path(value).expanduser().absolute()
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            raise UsageError(
                f"OUTPUT_DIR {out} cannot be created: {parent} is a file. Choose another --output-dir / OUTPUT_DIR"
            )
        if parent.exists():
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UsageError(
                    f"OUTPUT_DIR {out} is not writable ({parent} is read-only for this user). "
                    "Choose another --output-dir / OUTPUT_DIR"
                )
            break
    return out


def prepare_output_dir(value: str | os.PathLike | None) -> Path:
    """Creates OUTPUT_DIR if needed and proves it is writable; UsageError otherwise."""
    out = check_output_dir(value)
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


@contextmanager
def removed_if_failed_empty(folder: Path, enabled: bool = True) -> Iterator[None]:
    """If the block fails, the folders it created for ``folder`` (``folder`` and missing parents)
    are removed again when they hold nothing but empty folders: a failed run leaves no empty
    output folder behind. A folder that existed before, or holds any file, is never touched."""
    new = [p for p in [folder, *folder.parents] if not p.exists()]  # deepest first
    try:
        yield
    except BaseException:
        if enabled and new and new[0].is_dir():
            # Everything under a folder this run created was created by this run too.
            for sub in sorted((p for p in new[0].rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                try:
                    sub.rmdir()
                except OSError:
                    pass
            for p in new:
                try:
                    p.rmdir()
                except OSError:
                    break
        raise


def locate_comfyui(settings: Settings) -> Path:
    """The ComfyUI folder; an explicitly given one must be a ComfyUI install (find_comfyui checks)."""
    from ..comfyui import ComfyUINotFound, find_comfyui

    try:
        return find_comfyui(settings.comfyui)
    except ComfyUINotFound as e:
        raise UsageError(f"{e} ({settings.sources['comfyui']})") from None


def bootstrap(settings: Settings) -> Path:
    """Imports ComfyUI in this process (once); its folder."""
    from .. import comfyui

    root = locate_comfyui(settings)
    # ComfyUI warns at import about optional packages (torchaudio ...) the trainer never uses.
    logging.disable(logging.WARNING)
    try:
        how = (
            f"given by {settings.sources['comfyui']}"
            if settings.comfyui
            else "found automatically, as COMFYUI_PATH and --comfyui are unset"
        )
        comfyui.bootstrap_comfyui(root, cpu=True if settings.cpu else None, how=how)
    except comfyui.ComfyUINotFound as e:  # its requirements are not installed in this Python
        raise UsageError(str(e)) from None
    finally:
        logging.disable(logging.NOTSET)
    return root


# Where ComfyUI's loaders look for each weight file (folder_paths names; the first is the current one).
WEIGHT_FOLDERS = {
    "unet": ("diffusion_models", "unet"),
    "clip_l": ("text_encoders", "clip"),
    "t5xxl": ("text_encoders", "clip"),
    "vae": ("vae",),
}
WEIGHT_LABELS = {"unet": "Kontext model", "clip_l": "clip_l", "t5xxl": "t5xxl", "vae": "VAE"}


def resolve_weights(settings: Settings) -> dict[str, Path]:
    """Paths of the four weight files, each given as a path or as a name inside ComfyUI's models
    folders. Every missing one is reported in one UsageError, with the folders searched and the
    flag, environment variable and config key that set it; called before the dataset is scanned."""
    from ..comfyui import resolve_model_file

    root = locate_comfyui(settings)
    values = {key: settings.values.get(key) for key in WEIGHT_KEYS}
    if any(v and not Path(str(v)).expanduser().is_file() for v in values.values()):
        bootstrap(settings)  # names are looked up by ComfyUI's folder_paths
    found: dict[str, Path] = {}
    problems: list[str] = []
    for key, value in values.items():
        opt = BY_NAME[key]
        how = f"{opt.flag}, {opt.env} or {key!r} in the config file"
        folders = " or ".join(f"models/{f}" for f in WEIGHT_FOLDERS[key])
        if not value:
            problems.append(f"{WEIGHT_LABELS[key]}: not given (set {how})")
            continue
        path = resolve_model_file(str(value), WEIGHT_FOLDERS[key])
        if path is None:
            problems.append(
                f"{WEIGHT_LABELS[key]}: {str(value)!r} ({settings.sources[key]}) is neither a file nor in "
                f"{folders} (fix {how})"
            )
        else:
            found[key] = path
    if problems:
        where = (
            "found automatically" if settings.sources["comfyui"] == "default" else settings.sources["comfyui"]
        )
        # One short line per file (cli prints the first after "kontext-train: error: ").
        raise UsageError(
            "\n".join(
                [
                    f"{settings.command} needs the Kontext weights; {len(problems)} of 4 files not found:",
                    *(f"  {p}" for p in problems),
                    f"Names are looked up in {root / 'models'} (ComfyUI: {where}; --comfyui to change); "
                    "full paths work too.",
                    f"To try the pipeline without weights: {PROG} demo",
                ]
            )
        )
    return found


def degradation_config(settings: Settings):
    from ..data.degradations import DegradationConfig

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
    from ..train.trainer import TrainConfig

    try:
        return TrainConfig(**{k: settings.values[k] for k in TRAIN_CONFIG_KEYS})
    except ValueError as e:
        raise UsageError(str(e)) from None


def build_run_dataset(settings: Settings, out: Path, ctx, logger: logging.Logger | None = None):
    """The dataset of this run: HR_ROOT (+ LR_ROOT), or the demo photos in OUTPUT_DIR/demo_images."""
    from ..data.dataset import build_dataset
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
            held_out_first=DEMO_HELD_OUT if settings.demo else (),
        )
    except ValueError as e:
        which = "HR_ROOT/LR_ROOT" if lr else "HR_ROOT"
        raise UsageError(f"{which}: {e}") from None


def main_first(ctx, fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` on rank 0 while the other ranks wait; a UsageError there stops every rank."""
    if not ctx.enabled:
        return fn()
    from ..train.distributed import barrier, broadcast_error

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
    standin: dict | None = None  # the demo's stand-in: its pre-training metadata


def load_pipeline(settings: Settings, weights: dict[str, Path] | None = None) -> Pipeline:
    """Imports ComfyUI in-process and loads the model, VAE and prompt conditioning (``weights``:
    what ``resolve_weights`` found, resolved here when not given)."""
    from .. import comfyui

    bootstrap(settings)
    if settings.demo and not any(settings.values.get(k) for k in WEIGHT_KEYS):
        from .demo import build_demo_models, parameter_count

        try:
            model, vae, cond, meta = build_demo_models()
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(str(e)) from None
        n = parameter_count(model)
        return Pipeline(
            model,
            vae,
            cond,
            True,
            DEMO_BASE_MODEL,
            f"pretrained stand-in: tiny Flux ({n / 1e6:.2f}M parameters) + linear photo VAE",
            standin=meta,
        )
    weights = weights or resolve_weights(settings)
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
