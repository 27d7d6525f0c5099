"""Validation during training: restore held-out pairs with the trained path and score them.

Each held-out image is degraded once (epoch 0, fixed seed) so every validation sees the same
inputs and the numbers are comparable across steps. Scores: PSNR/SSIM of restored vs clean next
to degraded vs clean (the baseline a restoration LoRA must beat), plus latent MSE, which needs no
decoder and is what the tiny test models can be judged on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..files.atomic import atomic_write_csv, atomic_write_text
from ..method.sampler import restore_latents
from ..report.metrics import evaluate_restoration
from ..restore.restore_settings import RestoreSettings


@dataclass
class ValidationItem:
    key: str
    clean_latent: torch.Tensor  # raw VAE latent (16, h, w)
    degraded_latent: torch.Tensor
    clean_image: torch.Tensor | None = None  # (3, H, W) in [0, 1]
    degraded_image: torch.Tensor | None = None


def items_from_dataset(dataset, cache, seed: int, limit: int = 8) -> list[ValidationItem]:
    items = []
    for sample in dataset.val[:limit]:
        clean_img, degraded_img = dataset.load_pair(sample, 0, seed)
        items.append(
            ValidationItem(
                key=sample.key,
                clean_latent=cache.target(dataset, sample),
                degraded_latent=cache.control(dataset, sample, 0, seed),
                clean_image=clean_img,
                degraded_image=degraded_img,
            )
        )
    return items


# torch.Generator.manual_seed takes at most 64 bits; a seed widget's maximum (2**64 - 1) plus an
# offset does not fit, so combined seeds are reduced into [0, 2**63 - 1).
SEED_MODULUS = 2**63 - 1


def sample_seed(seed: int, offset: int) -> int:
    """The seed of held-out image ``offset``: ``seed + offset`` wherever that fits (so seeds in
    use keep their samples), reduced modulo 2**63 - 1 otherwise, never an overflow."""
    return (int(seed) + int(offset)) % SEED_MODULUS


class Validator:
    def __init__(
        self,
        items: list[ValidationItem],
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
        seed: int = 0,
    ) -> None:
        self.items = items
        self.decode = decode
        self.seed = seed

    def run(self, model, cond, config) -> tuple[dict, list]:
        """Returns (row of mean scores, list of (degraded, restored, clean) images)."""
        rs = RestoreSettings.from_train_config(config)  # restore as the Restore node would
        mse_restored, mse_degraded = [], []
        restored_images, degraded_images, clean_images, triples = [], [], [], []
        for i, item in enumerate(self.items):
            clean = model.to_model_space(item.clean_latent[None].to(model.device))
            degraded = model.to_model_space(item.degraded_latent[None].to(model.device))
            mu = rs.mu(*degraded.shape[-2:])

            def velocity(x, sigma, reference):
                return model.velocity(x, sigma, cond, rs.guidance, reference)

            restored = restore_latents(
                velocity,
                degraded,
                rs.formulation,
                rs.steps,
                mu,
                seed=sample_seed(self.seed, i),
                bridge_noise=rs.bridge_noise,
            )
            mse_restored.append(torch.mean((restored - clean) ** 2).item())
            mse_degraded.append(torch.mean((degraded - clean) ** 2).item())
            if self.decode is not None and item.clean_image is not None:
                image = self.decode(model.from_model_space(restored))[0]
                restored_images.append(image)
                degraded_images.append(item.degraded_image)
                clean_images.append(item.clean_image)
                triples.append((item.degraded_image, image, item.clean_image))
        row: dict = {
            "n_images": len(self.items),
            "latent_mse_restored": sum(mse_restored) / max(len(mse_restored), 1),
            "latent_mse_degraded": sum(mse_degraded) / max(len(mse_degraded), 1),
        }
        if restored_images:
            means = _image_scores(restored_images, degraded_images, clean_images)
            row.update(means)
        return row, triples


def _image_scores(restored: list, degraded: list, clean: list) -> dict:
    """Mean scores over images that may have different bucket sizes (scored one by one)."""
    totals: dict[str, float] = {}
    for r, d, c in zip(restored, degraded, clean):
        scores = evaluate_restoration(r[None], d[None], c[None])
        for k, v in scores.means().items():
            if v is not None:
                totals[k] = totals.get(k, 0.0) + v
    return {k: v / len(restored) for k, v in totals.items()}


def format_validation_row(row: Mapping[str, Any]) -> str:
    """One validation as a line: the step, then each score restored against degraded."""
    parts = [f"step {row.get('step')}"]
    if "latent_mse_restored" in row:
        parts.append(
            f"latent MSE {row['latent_mse_restored']:.5f} (degraded {row['latent_mse_degraded']:.5f})"
        )
    if "psnr_restored" in row:
        parts.append(f"PSNR {row['psnr_restored']:.2f} dB (degraded {row['psnr_degraded']:.2f})")
    if "ssim_restored" in row:
        parts.append(f"SSIM {row['ssim_restored']:.4f} (degraded {row['ssim_degraded']:.4f})")
    return ", ".join(parts)


def format_validation_report(rows: list[Mapping[str, Any]]) -> str:
    """Every validation of a run, one line each."""
    if not rows:
        return "No validation ran (no held-out images, or validation off)."
    return "\n".join(format_validation_row(r) for r in rows)


def validation_report_paths(lora_path: Path) -> tuple[Path, Path]:
    """``<lora>.validation.json`` and ``.csv`` beside the LoRA file."""
    base = Path(lora_path).with_suffix("")
    return base.with_name(base.name + ".validation.json"), base.with_name(base.name + ".validation.csv")


def write_validation_report(rows: list[dict], lora_path: Path) -> tuple[Path, Path]:
    """The validation rows so far, as JSON and CSV beside the LoRA file."""
    json_path, csv_path = validation_report_paths(lora_path)
    atomic_write_text(json_path, json.dumps(rows, indent=2, default=str))
    atomic_write_csv(csv_path, rows)
    return json_path, csv_path
