"""Scoring restorations and plotting training loss."""

from __future__ import annotations

import math

from ..kontext_train.comfyui.node_api import io, ui
from ..kontext_train.data.images import comfy_image_to_tensors, pil_to_tensor, tensors_to_comfy_image
from ..kontext_train.report.metrics import evaluate_restoration
from ..kontext_train.report.plots import render_loss_plot
from .common import CATEGORY, LOSS, input_validator, output, setting_inputs, shown_text


def _nan_if_none(value: float | None) -> float:
    # A FLOAT output must be a number; NaN says "not computed" without inventing a score.
    return math.nan if value is None else float(value)


class KontextRestoreMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KontextRestoreMetrics",
            display_name="Kontext Restore: Restoration Metrics",
            category=CATEGORY + "/metrics",
            description=(
                "PSNR and SSIM (RGB and BT.601 Y) of restored vs reference, per image and mean; with degraded, "
                "the baseline and the gain. LPIPS only if the lpips package and its weights are already on disk."
            ),
            inputs=[
                io.Image.Input("restored", tooltip="The restored images to score."),
                io.Image.Input(
                    "reference", tooltip="The clean ground truth, same size and count as restored."
                ),
                io.Image.Input(
                    "degraded", tooltip="The degraded input, scored as the baseline to beat.", optional=True
                ),
            ],
            outputs=[
                output(io.String, "table", "Per image and mean, restored (and degraded) against reference."),
                output(io.Float, "psnr", "Mean PSNR of restored vs reference, RGB, dB."),
                output(io.Float, "ssim", "Mean SSIM of restored vs reference, RGB."),
                output(io.Float, "psnr_y", "Mean PSNR on the luma (BT.601 Y) channel, dB."),
                output(io.Float, "ssim_y", "Mean SSIM on the luma (BT.601 Y) channel."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, restored, reference, degraded=None) -> io.NodeOutput:
        scores = evaluate_restoration(
            comfy_image_to_tensors(restored),
            comfy_image_to_tensors(degraded) if degraded is not None else None,
            comfy_image_to_tensors(reference),
            with_lpips=True,
        )
        means = scores.means()
        table = shown_text(scores.table())
        return io.NodeOutput(
            table,
            _nan_if_none(means["psnr_restored"]),
            _nan_if_none(means["ssim_restored"]),
            _nan_if_none(means["psnr_y_restored"]),
            _nan_if_none(means["ssim_y_restored"]),
            ui=ui.PreviewText(table),
        )


class KontextRestoreLossPlot(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KontextRestoreLossPlot",
            display_name="Kontext Restore: Loss Plot",
            category=CATEGORY + "/metrics",
            description="Training loss (raw and smoothed) with validation PSNR (restored vs degraded) below it.",
            inputs=[
                LOSS.Input("loss", tooltip="The loss output of Kontext Restore: Train LoRA."),
                *setting_inputs("smoothing", "log_scale", optional=True),
            ],
            outputs=[output(io.Image, "plot", "The loss curve with validation PSNR below it.")],
        )

    validate_inputs = input_validator("smoothing")

    @classmethod
    def execute(cls, loss, smoothing=0.9, log_scale=False) -> io.NodeOutput:
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
        return io.NodeOutput(tensors_to_comfy_image(pil_to_tensor(image)))


NODES: list[type[io.ComfyNode]] = [KontextRestoreMetrics, KontextRestoreLossPlot]
