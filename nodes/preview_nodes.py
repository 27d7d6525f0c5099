"""The "Preview training pairs" node: what the trainer will learn from, shown before training."""

from __future__ import annotations

from ..kontext_train.comfyui.node_api import io, ui
from ..kontext_train.data.images import pil_to_tensor, tensors_to_comfy_image
from ..kontext_train.report.pair_preview import training_pairs_grid
from .common import CATEGORY, DATASET, input_validator, output, setting_inputs


class KontextRestorePreviewPairs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KontextRestorePreviewPairs",
            display_name="Kontext Restore: Preview Training Pairs",
            category=CATEGORY + "/dataset",
            description="A grid of degraded | clean training pairs as they will be trained, before training.",
            inputs=[
                DATASET.Input("dataset", tooltip="The dataset from Image Folder Dataset."),
                *setting_inputs("seed", "preview_count"),
            ],
            outputs=[output(io.Image, "grid")],
            is_output_node=True,
        )

    validate_inputs = input_validator("preview_count")

    @classmethod
    def execute(cls, dataset, seed, count) -> io.NodeOutput:
        grid = tensors_to_comfy_image(pil_to_tensor(training_pairs_grid(dataset, seed, count)))
        return io.NodeOutput(grid, ui=ui.PreviewImage(grid, cls=cls))


NODES: list[type[io.ComfyNode]] = [KontextRestorePreviewPairs]
