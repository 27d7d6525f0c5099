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
    settings, ctx, pipe, dataset, config, result, ev, out, lora_path, train_seconds, total_seconds
) -> str:
    from ..data.degradations import describe
    from .demo import honest_paragraph

    trained_now = len(result.losses) - result.resumed_from
    per_step = train_seconds / trained_now if trained_now > 0 else float("nan")
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
        f"- time: {train_seconds:.1f} s training ({per_step:.3f} s/step), {total_seconds:.1f} s in all",
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
        m = ev.scores.means()
        lines += [
            "## Held-out images: before (degraded) and after (restored)",
            "",
            f"Restored with ComfyUI's `{settings.sampler}` sampler from the degraded latent; scored against the clean image.",
            "",
            "| metric | degraded (before) | restored (after) |",
            "|---|---|---|",
            f"| PSNR dB | {fmt_value(m.get('psnr_degraded'), '{:.2f}')} | {fmt_value(m.get('psnr_restored'), '{:.2f}')} |",
            f"| SSIM | {fmt_value(m.get('ssim_degraded'))} | {fmt_value(m.get('ssim_restored'))} |",
            f"| PSNR-Y dB | {fmt_value(m.get('psnr_y_degraded'), '{:.2f}')} | {fmt_value(m.get('psnr_y_restored'), '{:.2f}')} |",
            "",
            f"VAE round trip of the clean images (the ceiling for any latent restoration): {fmt_value(ev.vae_roundtrip_psnr, '{:.2f}')} dB PSNR.",
            "",
            "![samples](samples.png)",
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
                ev.vae_roundtrip_psnr if ev is not None else None,
                demo_real_command(settings, out),
                _latent_trend(result.validation),
            ),
        ]
    return "\n".join(lines) + "\n"


def demo_real_command(settings, out: Path) -> str:
    """The real-weights command the demo ends with, for the ComfyUI it ran on; its output folder
    beside the demo's."""
    from .demo import real_command
    from .runtime import locate_comfyui

    return real_command(locate_comfyui(settings), Path(out).absolute().parent / "kontext-restore-output")


def _latent_trend(rows: list[dict]) -> tuple[float, float, float] | None:
    rows = [r for r in rows if "latent_mse_restored" in r]
    if not rows:
        return None
    return rows[-1]["latent_mse_degraded"], rows[0]["latent_mse_restored"], rows[-1]["latent_mse_restored"]


def _device_line(ctx) -> str:
    if ctx.enabled:
        return f"{ctx.world_size} processes ({ctx.backend}), rank 0 on {ctx.device}: {_device_name()}"
    return _device_name()


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
