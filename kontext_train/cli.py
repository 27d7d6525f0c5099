"""``kontext-train``: headless training, restoration and evaluation, outside ComfyUI's UI.

It drives the same library code as the nodes (dataset -> LatentCache -> LatentBatches -> Trainer
+ Validator, and the Restore node's restoration) with ComfyUI's own loaders, imported in-process
without a server. Without model weights it runs the offline demo (``demo.py``).

Settings come from, highest first: command-line flags, a config file (``--config``, JSON or TOML),
environment variables (``HR_ROOT``, ``LR_ROOT``, ``OUTPUT_DIR``, ``COMFYUI_PATH``,
``KONTEXT_UNET``, ``KONTEXT_CLIP_L``, ``KONTEXT_T5XXL``, ``KONTEXT_VAE``), then the defaults
(the demo's own defaults when the tiny demo model is used). See docs/headless.md.

Exit codes: 0 done, 2 bad configuration (one line on stderr), 130 interrupted (a checkpoint is
saved; the same command resumes), 1 anything else.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write_bytes, atomic_write_text
from .demo import DEMO_BASE_MODEL
from .report import fmt_value, format_validation_row, render_report
from .settings import (
    BY_NAME,
    PROG,
    TRAIN_CONFIG_KEYS,
    WEIGHT_KEYS,
    Settings,
    UsageError,
    build_parser,
    resolve_settings,
)

log = logging.getLogger("kontext_restore")

# --------------------------------------------------------------------------------------------
# Checks and small helpers
# --------------------------------------------------------------------------------------------


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
    from .comfy_adapter import ComfyUINotFound, find_comfyui

    try:
        return find_comfyui(settings.comfyui)
    except ComfyUINotFound as e:
        raise UsageError(f"{e} ({settings.sources['comfyui']})") from None


def resolve_weights(settings: Settings) -> dict[str, Path]:
    """Paths of the four weight files (ComfyUI must be bootstrapped for name lookups)."""
    from .comfy_adapter import resolve_model_file

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
    from .degradations import DegradationConfig

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
    from .trainer import TrainConfig

    try:
        return TrainConfig(**{k: settings.values[k] for k in TRAIN_CONFIG_KEYS})
    except ValueError as e:
        raise UsageError(str(e)) from None


def build_run_dataset(settings: Settings, out: Path, ctx, logger: logging.Logger | None = None):
    """The dataset of this run: HR_ROOT (+ LR_ROOT), or the demo photos in OUTPUT_DIR/demo_images."""
    from .dataset import build_dataset
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
    from .distributed import barrier, broadcast_error

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


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


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
    from . import comfy_adapter

    root = locate_comfyui(settings)
    # ComfyUI warns at import about optional packages (torchaudio ...) the trainer never uses.
    logging.disable(logging.WARNING)
    try:
        comfy_adapter.bootstrap_comfyui(root, cpu=True if settings.cpu else None)
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
    model, clip, vae = comfy_adapter.load_models_headless(
        str(weights["unet"]),
        str(weights["clip_l"]),
        str(weights["t5xxl"]),
        str(weights["vae"]),
        settings.weight_dtype,
    )
    with torch.no_grad():
        cond = comfy_adapter.encode_prompt(clip, settings.prompt)
    del clip  # the text encoders are not needed again (T5-XXL alone is ~9 GB)
    comfy_adapter.soft_empty_cache()
    comfy_adapter.require_flux(model)
    return Pipeline(
        model, vae, cond, False, weights["unet"].name, f"{weights['unet'].name} ({settings.weight_dtype})"
    )


# --------------------------------------------------------------------------------------------
# Restoration and evaluation (the Restore node's code path)
# --------------------------------------------------------------------------------------------


@dataclass
class RestoreSettings:
    formulation: str
    guidance: float
    bridge_noise: float
    steps: int


def lora_restore_settings(lora_path: Path | None, settings: Settings) -> RestoreSettings:
    from .restore import read_lora_settings, resolve_formulation, resolve_steps

    lora = read_lora_settings(lora_path) if lora_path is not None else None
    formulation = resolve_formulation("auto", lora)
    guidance = lora.guidance if lora is not None and lora.guidance is not None else settings.guidance
    steps = resolve_steps(settings.restore_steps, formulation)
    return RestoreSettings(formulation, float(guidance), lora.bridge_noise if lora else 0.0, steps)


def restore_tensor(
    pipe: Pipeline, patched_model, image: torch.Tensor, rs: RestoreSettings, settings: Settings, index: int
) -> torch.Tensor:
    """(3, H, W) degraded image -> restored image of the same size (buckets or tiles)."""
    from . import comfy_adapter
    from .buckets import bucket_resolutions
    from .restore import plan_restoration, restore_image, tile_seed

    h, w = image.shape[-2:]
    plan = plan_restoration(w, h, bucket_resolutions(settings.bucket_scale))

    def restore_bucket(pixels: torch.Tensor, tile: int) -> torch.Tensor:
        return comfy_adapter.restore_pixels(
            patched_model,
            pipe.vae,
            pipe.conditioning,
            pixels,
            formulation=rs.formulation,
            steps=rs.steps,
            sampler_name=settings.sampler,
            seed=tile_seed(settings.seed, index, tile),
            guidance=rs.guidance,
            bridge_noise=rs.bridge_noise,
        )

    with torch.no_grad():
        return restore_image(image.float(), plan, restore_bucket)


def patched_with_lora(pipe: Pipeline, lora_state: Mapping[str, torch.Tensor] | None):
    from . import comfy_adapter

    return comfy_adapter.apply_lora(pipe.model, lora_state) if lora_state else pipe.model


def _merge_scores(parts: list):
    """One RestorationScores from per-image ones (images of different sizes are scored apart)."""
    from .metrics import RestorationScores

    merged: dict[str, Any] = {}
    for f in fields(RestorationScores):
        lists = [getattr(s, f.name) for s in parts]
        merged[f.name] = None if any(v is None for v in lists) else [x for v in lists for x in v]
    return RestorationScores(**merged)


@dataclass
class Evaluation:
    scores: Any  # RestorationScores
    keys: list[str]
    triples: list[tuple]  # (degraded, restored, clean) PIL images
    vae_roundtrip_psnr: float | None

    def to_dict(self) -> dict:
        data = self.scores.to_dict()
        for row, key in zip(data["per_image"], self.keys):
            row["image"] = key
        data["vae_roundtrip_psnr"] = self.vae_roundtrip_psnr
        return data


def evaluate_samples(
    pipe: Pipeline,
    patched_model,
    dataset,
    samples: list,
    rs: RestoreSettings,
    settings: Settings,
    progress: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Degrade (epoch 0, the run's seed), restore with ``patched_model``, score against the clean
    image; also the VAE round trip of the clean image (the ceiling any latent restoration has)."""
    from . import comfy_adapter
    from .images import tensor_to_pil
    from .metrics import evaluate_restoration, psnr

    parts, triples, keys, roundtrip = [], [], [], []
    for i, sample in enumerate(samples):
        if progress:
            progress(i, len(samples))
        clean, degraded = dataset.load_pair(sample, 0, settings.seed)
        restored = restore_tensor(pipe, patched_model, degraded, rs, settings, i)
        parts.append(evaluate_restoration(restored[None], degraded[None], clean[None]))
        with torch.no_grad():
            rt = comfy_adapter.vae_decode(pipe.vae, comfy_adapter.vae_encode(pipe.vae, clean[None]))
        roundtrip.append(float(psnr(rt.clamp(0, 1), clean[None]).mean()))
        triples.append((tensor_to_pil(degraded), tensor_to_pil(restored), tensor_to_pil(clean)))
        keys.append(sample.key)
    finite = [v for v in roundtrip if math.isfinite(v)]
    return Evaluation(_merge_scores(parts), keys, triples, sum(finite) / len(finite) if finite else None)


def write_evaluation(ev: Evaluation, folder: Path, stem: str = "evaluation") -> dict[str, Path]:
    from .plots import image_grid

    data = ev.to_dict()
    paths = {"json": folder / f"{stem}.json", "csv": folder / f"{stem}.csv", "grid": folder / "samples.png"}
    atomic_write_text(paths["json"], json.dumps(data, indent=2))
    rows = data["per_image"]
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(paths["csv"], buf.getvalue())
    _save_png(image_grid([list(t) for t in ev.triples], ["degraded", "restored", "clean"]), paths["grid"])
    return paths


# --------------------------------------------------------------------------------------------
# Console progress
# --------------------------------------------------------------------------------------------


class ConsoleProgress:
    """tqdm on a terminal; otherwise one line every ``every`` steps (logs, CI, torchrun)."""

    def __init__(self, total: int, start: int, every: int, enabled: bool) -> None:
        self.total, self.every, self.enabled = total, max(1, every), enabled
        self.started = time.perf_counter()
        self.start_step = start
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, desc="training", unit="step", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, info) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = info.step
            self.bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}", refresh=False)
            self.bar.refresh()
            return
        if info.step % self.every == 0 or info.step == info.total:
            done = info.step - self.start_step
            elapsed = time.perf_counter() - self.started
            rate = elapsed / done if done else 0.0
            eta = rate * (info.total - info.step)
            _say(
                f"step {info.step}/{info.total}  loss {info.loss:.4f}  lr {info.lr:.2e}  "
                f"{rate:.3f} s/step  ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def _notice_demo(settings: Settings) -> None:
    if not settings.is_main:
        return
    if settings.command == "train":
        _say(
            "No Kontext model given (--unet / KONTEXT_UNET): running the offline DEMO with a tiny random "
            "model on bundled sample photos. Give --unet, --clip-l, --t5xxl and --vae for real training."
        )
    else:
        _say(
            "Offline demo: tiny random Flux model + random VAE on bundled sample photos (no weights needed)."
        )


def _sigterm_as_interrupt() -> None:
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # not the main thread
        pass


def cmd_train(settings: Settings, ctx) -> int:
    from . import comfy_adapter
    from .batches import LatentBatches
    from .checkpoints import latest_checkpoint, list_checkpoints
    from .distributed import DataParallelTrainer, all_equal, barrier, sync_gradients
    from .latent_cache import LatentCache
    from .lora import sanitize_lora_name, to_kohya_state_dict
    from .trainer import LORA_DTYPES, NonFiniteLossError, Trainer, TrainerHooks
    from .validation import Validator, items_from_dataset

    wall_start = time.perf_counter()
    if settings.demo:
        _notice_demo(settings)
    config = train_config(settings)
    out = (
        main_first(ctx, lambda: prepare_output_dir(settings.output_dir))
        or Path(settings.output_dir).expanduser().absolute()
    )
    try:
        name = sanitize_lora_name(settings.name)
    except ValueError as e:
        raise UsageError(f"--name: {e}") from None
    lora_path = out / name
    existing = latest_checkpoint(out)
    if not settings.resume and (list_checkpoints(out) or lora_path.exists()):
        raise UsageError(
            f"OUTPUT_DIR {out} already holds a run ({existing or lora_path}); --no-resume does not overwrite it. "
            "Resume it (drop --no-resume) or choose another --output-dir."
        )
    if not all_equal(ctx, existing.name if existing else None):
        raise UsageError(
            f"the processes see different checkpoints in {out}: OUTPUT_DIR must be on storage every process shares"
        )
    locate_comfyui(settings)  # fail fast, before the dataset is scanned
    dataset = build_run_dataset(settings, out, ctx)
    if settings.is_main:
        _say(dataset.summary())
    pipe = load_pipeline(settings)
    cache_dir = Path(settings.cache_dir).expanduser() if settings.cache_dir else out / "latent_cache"
    cache = LatentCache(
        cache_dir,
        vae_id=comfy_adapter.vae_identity(pipe.vae),
        encode=lambda images: comfy_adapter.vae_encode(pipe.vae, images),
        control_mode=settings.control_mode,
        pool_size=settings.pool_size,
    )
    samples = dataset.train + dataset.val

    def warm_cache() -> None:
        t = time.perf_counter()
        for sample in samples:
            cache.target(dataset, sample)
            if settings.control_mode == "pool" or not dataset.degradation.is_random:
                cache.control(dataset, sample, 0, settings.seed)
        _say(
            f"latent cache {cache_dir}: {len(samples)} images in {time.perf_counter() - t:.1f} s {cache.stats}"
        )

    main_first(ctx, warm_cache)

    hooks_progress = ConsoleProgress(
        config.steps,
        int(existing.name.split("_")[1]) if existing and settings.resume else 0,
        settings.log_every,
        settings.is_main,
    )
    hooks = TrainerHooks(
        on_step=hooks_progress.update,
        cancel_exceptions=(KeyboardInterrupt,),
        oom_exceptions=comfy_adapter.oom_exception_types(),
        on_validation=(lambda row: _say("validation: " + format_validation_row(row)))
        if settings.is_main
        else None,
        sync_gradients=sync_gradients(ctx) if ctx.enabled else None,
        is_main_process=settings.is_main,
    )
    metadata = {
        "base_model": pipe.base_model,
        "dataset_size": len(dataset.train),
        "validation_size": len(dataset.val),
        "degradation": json.dumps(dataset.degradation.to_dict(), sort_keys=True),
        "bucket_scale": dataset.bucket_scale,
        "world_size": ctx.world_size,
        "global_batch": config.batch_size * ctx.world_size,
        "trained_with": "kontext-train " + (settings.command + (" (demo)" if settings.demo else "")),
    }
    with torch.inference_mode(False):
        lora_model = comfy_adapter.FluxLoraModel(
            pipe.model,
            rank=config.rank,
            alpha=config.lora_alpha,
            lora_dtype=LORA_DTYPES[config.lora_dtype],
            targets=config.lora_targets,
            gradient_checkpointing=config.gradient_checkpointing,
            seed=config.seed,
        )
        validator = None
        if settings.is_main and dataset.val and config.validate_every_epochs:
            validator = Validator(
                items_from_dataset(dataset, cache, settings.seed),
                decode=lambda z: comfy_adapter.vae_decode(pipe.vae, z),
                seed=settings.seed,
            )
        trainer_cls = DataParallelTrainer if ctx.enabled else Trainer
        extra = {"dist_context": ctx} if ctx.enabled else {}
        trainer = trainer_cls(
            config,
            lora_model,
            LatentBatches(
                dataset, cache, config.batch_size, settings.seed, rank=ctx.rank, world_size=ctx.world_size
            ),
            lora_model.prepare_conditioning(pipe.conditioning),
            out,
            lora_path,
            metadata=metadata,
            validator=validator,
            hooks=hooks,
            **extra,
        )
        if settings.is_main:
            where = f"{ctx.world_size} processes ({ctx.backend}), " if ctx.enabled else ""
            _say(
                f"training {pipe.description} on {where}{lora_model.device}: {config.steps} steps, batch "
                f"{config.batch_size * ctx.world_size}, rank {config.rank}, lr {config.learning_rate:g} -> {out}"
            )
        train_start = time.perf_counter()
        try:
            result = trainer.run(resume=settings.resume)
        except KeyboardInterrupt:
            hooks_progress.close()
            saved = trainer.last_checkpoint
            if settings.is_main:
                print(
                    f"{PROG}: interrupted at step {trainer.step}; "
                    + (f"checkpoint {saved} saved. " if saved else "no checkpoint yet (step 0). ")
                    + "Run the same command again to resume.",
                    file=sys.stderr,
                    flush=True,
                )
            return 130
        except NonFiniteLossError as e:
            hooks_progress.close()
            print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
            return 1
        finally:
            hooks_progress.close()
        train_seconds = time.perf_counter() - train_start
        lora_state = to_kohya_state_dict(lora_model.adapters)
        lora_model.release()
    barrier(ctx)
    if not settings.is_main:
        return 0
    if result.resumed_from:
        _say(f"resumed from step {result.resumed_from}")
    _say(f"LoRA: {result.lora_path}")

    from .plots import render_loss_plot

    loss_png = out / "loss.png"
    _save_png(render_loss_plot(result.losses, validation=result.validation or None), loss_png)

    ev = None
    if dataset.val:
        rs = lora_restore_settings(result.lora_path, settings)
        samples_eval = dataset.val[: settings.eval_count]
        _say(
            f"restoring {len(samples_eval)} held-out image(s) with ComfyUI's {settings.sampler} sampler, {rs.steps} steps ..."
        )
        ev = evaluate_samples(pipe, patched_with_lora(pipe, lora_state), dataset, samples_eval, rs, settings)
        write_evaluation(ev, out)
        _say(ev.scores.table())
    report = render_report(
        settings,
        ctx,
        pipe,
        dataset,
        config,
        result,
        ev,
        out,
        lora_path,
        train_seconds,
        time.perf_counter() - wall_start,
    )
    atomic_write_text(out / "report.md", report)
    _say(f"report: {out / 'report.md'}  (total {time.perf_counter() - wall_start:.1f} s)")
    return 0


def _lora_or_default(settings: Settings) -> Path:
    from .lora import sanitize_lora_name

    if settings.lora:
        p = Path(settings.lora).expanduser()
    else:
        p = Path(settings.output_dir).expanduser() / sanitize_lora_name(settings.name)
    if not p.is_file():
        raise UsageError(
            f"LoRA file {p} not found: pass --lora, or the --output-dir / --name of a finished training run"
        )
    return p


def _bucket_scale_from_lora(lora_path: Path, settings: Settings) -> None:
    """Restore and evaluate at the bucket scale the LoRA was trained at, unless told otherwise."""
    from .lora import read_metadata

    if settings.given("bucket_scale"):
        return
    value = read_metadata(lora_path).get("kontext_restore.bucket_scale")
    try:
        scale = float(value) if value is not None else None
    except ValueError:
        scale = None
    if scale is not None and math.isfinite(scale) and scale > 0:
        settings.values["bucket_scale"], settings.sources["bucket_scale"] = scale, "LoRA metadata"


def _check_lora_matches(lora_path: Path, pipe: Pipeline) -> None:
    from .lora import read_metadata

    base = read_metadata(lora_path).get("kontext_restore.base_model")
    if base == DEMO_BASE_MODEL and not pipe.demo:
        raise UsageError(
            f"{lora_path} was trained by the demo on the tiny random model; it does not fit {pipe.base_model}"
        )
    if pipe.demo and base is not None and base != DEMO_BASE_MODEL:
        raise UsageError(
            f"{lora_path} was trained on {base}; give the same weights (--unet, --clip-l, --t5xxl, --vae) to use it"
        )


def _load_lora_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"cannot read LoRA {path} ({e})") from None


def cmd_restore(settings: Settings, ctx) -> int:
    from .images import ImageLoadError, load_rgb, pil_to_tensor, scan_image_folder, tensor_to_pil

    if not settings.input:
        raise UsageError("nothing to restore: pass --input with an image file or a folder of images")
    src = Path(settings.input).expanduser()
    if src.is_dir():
        files = scan_image_folder(src)
    elif src.is_file():
        files = [src]
    else:
        raise UsageError(f"--input {src} does not exist")
    if not files:
        raise UsageError(f"--input {src} holds no image files")
    lora_path = _lora_or_default(settings)
    _bucket_scale_from_lora(lora_path, settings)
    out = prepare_output_dir(Path(settings.output_dir).expanduser() / "restored")
    pipe = load_pipeline(settings)
    _check_lora_matches(lora_path, pipe)
    rs = lora_restore_settings(lora_path, settings)
    patched = patched_with_lora(pipe, _load_lora_state(lora_path))
    for i, f in enumerate(files):
        try:
            image = pil_to_tensor(load_rgb(f, min_size=8))
        except ImageLoadError as e:
            _say(f"skipping {e}")
            continue
        t = time.perf_counter()
        restored = restore_tensor(pipe, patched, image, rs, settings, i)
        target = out / (f.stem + ".png")
        _save_png(tensor_to_pil(restored), target)
        _say(f"{f} -> {target} ({time.perf_counter() - t:.1f} s)")
    return 0


def cmd_evaluate(settings: Settings, ctx) -> int:
    lora_path = _lora_or_default(settings)
    _bucket_scale_from_lora(lora_path, settings)
    out = prepare_output_dir(Path(settings.output_dir).expanduser() / "evaluation")
    dataset = build_run_dataset(settings, Path(settings.output_dir).expanduser(), ctx)
    samples = dataset.val if settings.eval_split == "val" else dataset.train + dataset.val
    if not samples:
        raise UsageError("no images to evaluate: raise --val-count or use --eval-split all")
    samples = samples[: settings.eval_count]
    pipe = load_pipeline(settings)
    _check_lora_matches(lora_path, pipe)
    rs = lora_restore_settings(lora_path, settings)
    patched = patched_with_lora(pipe, _load_lora_state(lora_path))
    ev = evaluate_samples(
        pipe, patched, dataset, samples, rs, settings, lambda i, n: _say(f"image {i + 1}/{n}")
    )
    paths = write_evaluation(ev, out)
    _say(ev.scores.table())
    _say(f"VAE round trip PSNR (ceiling): {fmt_value(ev.vae_roundtrip_psnr, '{:.2f}')} dB")
    _say(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


HANDLERS = {"train": cmd_train, "demo": cmd_train, "restore": cmd_restore, "evaluate": cmd_evaluate}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kontext-train`` and ``python -m kontext_train``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not ns.command:
        parser.print_help(sys.stderr)
        return 2
    flags = {k: v for k, v in vars(ns).items() if k not in ("command", "config", "print_config", "debug")}
    if getattr(ns, "config", None):
        flags["config"] = ns.config
    debug = getattr(ns, "debug", False) or os.environ.get("KONTEXT_TRAIN_DEBUG") == "1"
    ctx = None
    try:
        settings = resolve_settings(ns.command, flags, argv=argv)
        if getattr(ns, "print_config", False):
            print(
                json.dumps(
                    {"command": ns.command, "demo": settings.demo, "settings": settings.as_dict()}, indent=2
                )
            )
            return 0
        from .distributed import init_from_env, shutdown

        try:
            ctx = init_from_env()
        except ValueError as e:
            raise UsageError(str(e)) from None
        settings.values["is_main"] = ctx.is_main
        settings.sources["is_main"] = "launcher"
        if ctx.enabled and ns.command not in ("train", "demo"):
            raise UsageError(f"'{ns.command}' runs in one process; launch it without torchrun")
        _sigterm_as_interrupt()
        try:
            return HANDLERS[ns.command](settings, ctx)
        finally:
            shutdown(ctx)
    except UsageError as e:
        if debug:
            raise
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return 130
    except (FileNotFoundError, ValueError) as e:
        if debug:
            raise
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
