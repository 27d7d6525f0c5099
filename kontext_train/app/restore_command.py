"""`kontext-train restore` and `evaluate`: the Restore node's code path from the command line."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..files.atomic import atomic_write_csv, atomic_write_text
from ..restore.restore_settings import AS_TRAINED, FROM_LORA, RestoreSettings, read_restore_settings
from .demo import DEMO_BASE_MODEL
from .report import fmt_value
from .runtime import (
    Pipeline,
    _save_png,
    _say,
    build_run_dataset,
    load_pipeline,
    prepare_output_dir,
)
from .settings import (
    PROG,
    Settings,
    UsageError,
)

log = logging.getLogger("kontext_restore")


def lora_restore_settings(lora_path: Path | None, settings: Settings) -> RestoreSettings:
    """What the LoRA's metadata records, with the flags the user gave winning over it."""

    def given(name: str):
        return settings.values[name] if settings.given(name) else None

    rs = read_restore_settings(
        lora_path,
        steps=settings.restore_steps,
        sampler=settings.sampler,
        scheduler=settings.values.get("scheduler", AS_TRAINED),  # the command has no flag for it yet
        seed=settings.seed,
        guidance=given("guidance"),
        bucket_scale=given("bucket_scale"),
        prompt=given("prompt"),
        log_warnings=False,  # printed here: the command configures no logging
    )
    for warning in rs.warnings:  # a --prompt other than the training prompt, damaged metadata, ...
        print(f"{PROG}: warning: {warning}", file=sys.stderr, flush=True)
    return rs


def _adopt_lora_settings(rs: RestoreSettings, settings: Settings) -> None:
    """Images are bucketed and the prompt encoded from ``settings``: take the LoRA's values there."""
    for name in ("bucket_scale", "prompt"):
        if rs.sources.get(name) == FROM_LORA:
            settings.values[name], settings.sources[name] = getattr(rs, name), FROM_LORA
    _say(
        f"restoring as {rs.formulation}: {rs.steps} steps, guidance {rs.guidance:g}, "
        f"bucket scale {rs.bucket_scale:g}, bridge noise {rs.bridge_noise:g}"
        + (", the LoRA's training prompt" if rs.sources.get("prompt") == FROM_LORA else "")
    )


def restore_tensor(
    pipe: Pipeline, patched_model, image: torch.Tensor, rs: RestoreSettings, index: int
) -> torch.Tensor:
    """(3, H, W) degraded image -> restored image of the same size (buckets or tiles); ``index``
    seeds it as the Restore node seeds the image at that position of a batch."""
    from .. import comfyui
    from ..restore.restore import restore_images

    restorer = comfyui.region_restorer(patched_model, pipe.vae, pipe.conditioning, rs)
    guard = comfyui.restore_memory_guard(patched_model, pipe.vae, pipe.conditioning, rs)
    return restore_images([image], rs, restorer, first_index=index, check_memory=guard)[0]


@contextlib.contextmanager
def patched_with_lora(pipe: Pipeline, lora_state: Mapping[str, torch.Tensor] | None) -> Iterator[Any]:
    """The pipeline's MODEL with the LoRA applied as training applied it (on activations, on a
    clone, released afterwards: ``comfyui.restore_lora``), as the Restore node applies it."""
    from .. import comfyui

    with comfyui.lora_for_restore(pipe.model, lora_state or None, name="the LoRA") as applied:
        for note in applied.notes:
            _say(note)
        for warning in applied.warnings:
            print(f"{PROG}: warning: {warning}", file=sys.stderr, flush=True)
        yield applied.model


def _merge_scores(parts: list):
    """One RestorationScores from per-image ones (images of different sizes are scored apart)."""
    from ..report.metrics import RestorationScores

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
    roundtrips: list = field(default_factory=list)  # the clean images through the VAE and back

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
    image; also the VAE round trip of the clean image (what the VAE alone loses)."""
    from .. import comfyui
    from ..data.images import tensor_to_pil
    from ..report.metrics import evaluate_restoration, psnr

    parts, triples, keys, roundtrip, roundtrip_images = [], [], [], [], []
    for i, sample in enumerate(samples):
        if progress:
            progress(i, len(samples))
        clean, degraded = dataset.load_pair(sample, 0, settings.seed)
        restored = restore_tensor(pipe, patched_model, degraded, rs, i)
        parts.append(evaluate_restoration(restored[None], degraded[None], clean[None]))
        with torch.no_grad():
            rt = comfyui.vae_decode(pipe.vae, comfyui.vae_encode(pipe.vae, clean[None]))
        roundtrip.append(float(psnr(rt.clamp(0, 1), clean[None]).mean()))
        roundtrip_images.append(tensor_to_pil(rt[0].clamp(0, 1)))
        triples.append((tensor_to_pil(degraded), tensor_to_pil(restored), tensor_to_pil(clean)))
        keys.append(sample.key)
    finite = [v for v in roundtrip if math.isfinite(v)]
    mean_roundtrip = sum(finite) / len(finite) if finite else None
    return Evaluation(_merge_scores(parts), keys, triples, mean_roundtrip, roundtrip_images)


def write_evaluation(ev: Evaluation, folder: Path, stem: str = "evaluation") -> dict[str, Path]:
    from ..report.sample_grid import SAMPLE_COLUMNS, before_after, image_grid, sample_rows

    data = ev.to_dict()
    paths = {
        "json": folder / f"{stem}.json",
        "csv": folder / f"{stem}.csv",
        "grid": folder / "samples.png",
        "before_after": folder / "before_after.png",
    }
    atomic_write_text(paths["json"], json.dumps(data, indent=2))
    atomic_write_csv(paths["csv"], data["per_image"])
    # The VAE round trip column shows what the VAE alone does to the clean image.
    _save_png(image_grid(sample_rows(ev.triples, ev.roundtrips), list(SAMPLE_COLUMNS)), paths["grid"])
    if ev.triples:  # the first image, degraded | restored
        _save_png(before_after(ev.triples[0][0], ev.triples[0][1]), paths["before_after"])
    return paths


def _lora_or_default(settings: Settings) -> Path:
    from ..method.lora import sanitize_lora_name

    if settings.lora:
        p = Path(settings.lora).expanduser()
    else:
        p = Path(settings.output_dir).expanduser() / sanitize_lora_name(settings.name)
    if not p.is_file():
        raise UsageError(
            f"LoRA file {p} not found: pass --lora, or the --output-dir / --name of a finished training run"
        )
    return p


def _check_lora_matches(lora_path: Path, pipe: Pipeline) -> None:
    from ..method.lora import read_metadata

    base = read_metadata(lora_path).get("kontext_restore.base_model")
    if base == DEMO_BASE_MODEL and not pipe.demo:
        raise UsageError(
            f"{lora_path} was trained by the demo on its stand-in model; it does not fit {pipe.base_model}"
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
    from ..data.images import ImageLoadError, load_rgb, pil_to_tensor, scan_image_folder, tensor_to_pil

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
    rs = lora_restore_settings(lora_path, settings)
    _adopt_lora_settings(rs, settings)
    out = prepare_output_dir(Path(settings.output_dir).expanduser() / "restored")
    pipe = load_pipeline(settings)
    _check_lora_matches(lora_path, pipe)
    with patched_with_lora(pipe, _load_lora_state(lora_path)) as patched:
        for i, f in enumerate(files):
            try:
                image = pil_to_tensor(load_rgb(f, min_size=8))
            except ImageLoadError as e:
                _say(f"skipping {e}")
                continue
            t = time.perf_counter()
            restored = restore_tensor(pipe, patched, image, rs, i)
            target = out / (f.stem + ".png")
            _save_png(tensor_to_pil(restored), target)
            _say(f"{f} -> {target} ({time.perf_counter() - t:.1f} s)")
    return 0


def cmd_evaluate(settings: Settings, ctx) -> int:
    lora_path = _lora_or_default(settings)
    rs = lora_restore_settings(lora_path, settings)
    _adopt_lora_settings(rs, settings)
    out = prepare_output_dir(Path(settings.output_dir).expanduser() / "evaluation")
    dataset = build_run_dataset(settings, Path(settings.output_dir).expanduser(), ctx)
    samples = dataset.val if settings.eval_split == "val" else dataset.train + dataset.val
    if not samples:
        raise UsageError("no images to evaluate: raise --val-count or use --eval-split all")
    samples = samples[: settings.eval_count]
    pipe = load_pipeline(settings)
    _check_lora_matches(lora_path, pipe)
    with patched_with_lora(pipe, _load_lora_state(lora_path)) as patched:
        ev = evaluate_samples(
            pipe, patched, dataset, samples, rs, settings, lambda i, n: _say(f"image {i + 1}/{n}")
        )
    paths = write_evaluation(ev, out)
    _say(ev.scores.table())
    _say(f"VAE round trip PSNR (ceiling): {fmt_value(ev.vae_roundtrip_psnr, '{:.2f}')} dB")
    _say(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0
