"""The Markdown report the headless command writes into OUTPUT_DIR."""

from __future__ import annotations

import math
import os
import shlex
from pathlib import Path
from typing import Any

import torch

from .settings import PROG


def fmt_value(v: Any, spec: str = "{:.4f}") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    return spec.format(v) if math.isfinite(v) else str(v)


def render_report(
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
    total_seconds,
    seed_evs=(),
) -> str:
    """``seed_evs``: evaluations of the same held-out images restored with other seeds (the demo's
    mean and spread); ``ev`` is the first of them when given."""
    from ..data.degradations import describe
    from .demo import honest_paragraph

    trained_now = len(result.losses) - result.resumed_from
    if trained_now > 0:
        time_line = f"{train_seconds:.1f} s training ({train_seconds / trained_now:.3f} s/step)"
    else:  # a re-run of a finished run trains nothing
        time_line = f"nothing left to train (the run was already at step {result.step})"
    ema = None
    for v in result.losses:
        ema = v if ema is None else 0.9 * ema + 0.1 * v
    lines = [
        f"# Kontext Restore training report{' (offline demo)' if settings.demo else ''}",
        "",
        f"- command: `{PROG} {' '.join(shlex.quote(a) for a in settings.argv)}`",
        f"- model: {pipe.description}",
        f"- device: {_device_line(ctx)}",
        f"- data: {len(dataset.train)} training, {len(dataset.val)} held-out images from `{dataset.hq_dir}`; "
        f"{f'paired LQ from `{dataset.lq_dir}`' if dataset.lq_dir else describe(dataset.degradation)}; "
        f"bucket scale {dataset.bucket_scale:g} ({', '.join(dataset.bucket_histogram())})",
        *(f"- warning: {w}" for w in dataset.split_warnings),  # val_count reduced, few images
        f"- training: {result.step} steps"
        + (f" (resumed from step {result.resumed_from})" if result.resumed_from else "")
        + f", global batch {config.batch_size * ctx.world_size}, rank {config.rank}, lr {config.learning_rate:g} "
        f"({config.lr_schedule}, {config.warmup_steps} warm-up), formulation {config.formulation}, guidance {config.guidance:g}",
        f"- time: {time_line}, {total_seconds:.1f} s in all",
        f"- loss: first {fmt_value(result.losses[0] if result.losses else None)}, last {fmt_value(result.losses[-1] if result.losses else None)}, EMA {fmt_value(ema)}",
        "",
        "## Files",
        "",
        f"- LoRA: `{lora_path.name}` (kohya format; ComfyUI's LoraLoaderModelOnly and diffusers load it)",
        f"- checkpoints: `runs/{lora_path.relative_to(out).as_posix()[: -len('.safetensors')]}/checkpoints/` (resume: run the same command again), latent cache: `{Path(settings.cache_dir).name if settings.cache_dir else 'latent_cache'}/`",
        f"- validation metrics: `{lora_path.stem}.validation.json` / `.csv`",
        "- loss plot: `loss.png`; restored samples: `samples.png` (degraded | restored | VAE round trip | clean); `evaluation.json` / `.csv`",
        "",
        "![loss](loss.png)",
        "",
    ]
    if ev is not None:
        evs = list(seed_evs) or [ev]
        seeds = f" over {len(evs)} sampling seeds (mean ± sd)" if len(evs) > 1 else ""
        if seeds and config.formulation == "bridge" and not config.bridge_noise:
            seeds += "; a bridge without bridge noise draws no noise, so every seed gives the same image"
        lines += [
            "## Held-out images: before (degraded) and after (restored)",
            "",
            f"Restored with ComfyUI's `{settings.sampler}` sampler ({config.formulation}); scored against the "
            f"clean image{seeds}.",
            "",
            "![samples](samples.png)",
            "",
            "| metric | degraded (before) | restored (after) |",
            "|---|---|---|",
            f"| PSNR dB | {_over(evs, 'psnr_degraded', '{:.2f}')} | {_over(evs, 'psnr_restored', '{:.2f}')} |",
            f"| SSIM | {_over(evs, 'ssim_degraded', '{:.4f}')} | {_over(evs, 'ssim_restored', '{:.4f}')} |",
            f"| PSNR-Y dB | {_over(evs, 'psnr_y_degraded', '{:.2f}')} | {_over(evs, 'psnr_y_restored', '{:.2f}')} |",
            "",
            f"VAE round trip of the clean images (encode, then decode: what the VAE alone loses): "
            f"{fmt_value(ev.vae_roundtrip_psnr, '{:.2f}')} dB PSNR. "
            + (
                "For the stand-in's linear VAE this is the best any latent can decode to."
                if pipe.demo
                else "A reference, not a bound: a learned VAE can decode a restored latent closer to the clean image."
            ),
            "",
        ]
    else:
        lines += ["No held-out images (val_count 0 or a single image): no samples or metrics.", ""]
    if result.validation:
        lines += [
            "## Validation during training",
            "",
            "| step | latent MSE degraded | latent MSE restored | PSNR degraded | PSNR restored |",
            "|---|---|---|---|---|",
        ]
        for row in result.validation:
            lines.append(
                f"| {row.get('step')} | {fmt_value(row.get('latent_mse_degraded'))} | {fmt_value(row.get('latent_mse_restored'))} "
                f"| {fmt_value(row.get('psnr_degraded'), '{:.2f}')} | {fmt_value(row.get('psnr_restored'), '{:.2f}')} |"
            )
        lines.append("")
    if settings.demo and pipe.demo:
        from .demo import parameter_count

        lines += [
            "## About this demo",
            "",
            honest_paragraph(
                parameter_count(pipe.model),
                result.step,
                len(dataset.train),
                pipe.standin or {},
                demo_real_command(settings, out),
                _psnr_pair(list(seed_evs) or ([ev] if ev is not None else [])),
            ),
        ]
    return "\n".join(lines) + "\n"


def demo_real_command(settings, out: Path) -> str:
    """The real-weights command the demo ends with, for the ComfyUI it ran on; its output folder
    beside the demo's."""
    from .demo import real_command
    from .runtime import locate_comfyui

    return real_command(locate_comfyui(settings), Path(out).absolute().parent / "kontext-restore-output")


def _psnr_pair(evs: list) -> tuple[float, float] | None:
    """Mean (degraded, restored) PSNR over evaluations, or None without numbers."""
    pairs = [(e.scores.means().get("psnr_degraded"), e.scores.means().get("psnr_restored")) for e in evs]
    pairs = [p for p in pairs if all(isinstance(v, (int, float)) and math.isfinite(v) for v in p)]
    if not pairs:
        return None
    return sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(pairs)


def _over(evs: list, key: str, spec: str) -> str:
    """The mean of ``key`` over evaluations, ``± sd`` when there are several."""
    values = [e.scores.means().get(key) for e in evs]
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return spec.format(mean)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{spec.format(mean)} ± {spec.format(sd)}"


def _device_line(ctx) -> str:
    if ctx.enabled:
        return f"{ctx.world_size} processes ({ctx.backend}), rank 0 on {ctx.device}: {_device_name()}"
    return _device_name()


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
