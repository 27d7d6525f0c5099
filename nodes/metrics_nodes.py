"""Scoring restorations and plotting training loss."""

from __future__ import annotations

import math

from ..kontext_train.images import comfy_image_to_tensors, pil_to_tensor, tensors_to_comfy_image
from ..kontext_train.metrics import evaluate_restoration
from ..kontext_train.plots import render_loss_plot
from .common import CATEGORY, LOSS, number_validator, setting_inputs, socket


def _nan_if_none(value: float | None) -> float:
    # A FLOAT output must be a number; NaN says "not computed" without inventing a score.
    return math.nan if value is None else float(value)


class KontextRestoreMetrics:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "restored": socket("IMAGE", "The restored images to score."),
                "reference": socket("IMAGE", "The clean ground truth, same size and count as restored."),
            },
            "optional": {"degraded": socket("IMAGE", "The degraded input, scored as the baseline to beat.")},
        }

    RETURN_TYPES = ("STRING", "FLOAT", "FLOAT", "FLOAT", "FLOAT")
    RETURN_NAMES = ("table", "psnr", "ssim", "psnr_y", "ssim_y")
    FUNCTION = "score"
    CATEGORY = CATEGORY + "/metrics"
    OUTPUT_NODE = True
    DESCRIPTION = (
        "PSNR and SSIM (RGB and BT.601 Y) of restored vs reference, per image and mean; with degraded, the "
        "baseline and the gain. LPIPS only if the lpips package and its weights are already on disk."
    )

    def score(self, restored, reference, degraded=None):
        scores = evaluate_restoration(
            comfy_image_to_tensors(restored),
            comfy_image_to_tensors(degraded) if degraded is not None else None,
            comfy_image_to_tensors(reference),
            with_lpips=True,
        )
        means = scores.means()
        table = scores.table()
        result = (
            table,
            _nan_if_none(means["psnr_restored"]),
            _nan_if_none(means["ssim_restored"]),
            _nan_if_none(means["psnr_y_restored"]),
            _nan_if_none(means["ssim_y_restored"]),
        )
        return {"ui": {"text": [table]}, "result": result}


class KontextRestoreLossPlot:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"loss": socket(LOSS, "The loss output of Kontext Restore: Train LoRA.")},
            "optional": setting_inputs("smoothing", "log_scale"),
        }

    VALIDATE_INPUTS = number_validator("smoothing")

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("plot",)
    FUNCTION = "plot"
    CATEGORY = CATEGORY + "/metrics"
    DESCRIPTION = "Training loss (raw and smoothed) with validation PSNR (restored vs degraded) below it."

    def plot(self, loss, smoothing=0.9, log_scale=False):
        if not isinstance(loss, dict) or "loss" not in loss:
            raise ValueError(
                f"Expected the Kontext Restore trainer's loss output (a dict with 'loss'), got {type(loss).__name__}."
            )
        name = loss.get("lora") or ""
        image = render_loss_plot(
            [float(v) for v in loss.get("loss") or []],
            smoothing=smoothing,
            validation=list(loss.get("validation") or []),
            log_y=bool(log_scale),
            title=f"Training loss {name}".strip(),
        )
        return (tensors_to_comfy_image(pil_to_tensor(image)),)


NODE_CLASS_MAPPINGS = {
    "KontextRestoreMetrics": KontextRestoreMetrics,
    "KontextRestoreLossPlot": KontextRestoreLossPlot,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KontextRestoreMetrics": "Kontext Restore: Restoration Metrics",
    "KontextRestoreLossPlot": "Kontext Restore: Loss Plot",
}
