"""What the example workflows contain: nodes, links, the settings that are not node defaults,
the Note each one carries, and its title and one-line description.

``build_workflows.py`` turns these descriptions into the UI and API files. Widgets not set here
take the node's default from ``/object_info`` (for this pack's nodes: kontext_train/options.py),
so a template shows the same defaults as the node and the command; where a template deliberately
sets another value, its Note says which and why.

ComfyUI's template browser shows a custom-node template by its file name only (title and
description both; frontends 1.32 and 1.49 read nothing else), so each UI file is named after the
title, and its thumbnail is the ``.jpg`` of the same name beside it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from kontext_train.options import DEFAULT_PROMPT  # noqa: E402

MODEL_FILES = {
    "unet": "flux1-kontext-dev.safetensors",
    "clip_l": "clip_l.safetensors",
    "t5": "t5xxl_fp16.safetensors",
    "vae": "ae.safetensors",
}
# Shown by the web UI's missing-models dialog as download links.
MODEL_URLS = {
    "flux1-kontext-dev.safetensors": (
        "https://huggingface.co/black-forest-labs/FLUX.1-Kontext-dev/resolve/main/flux1-kontext-dev.safetensors",
        "diffusion_models",
    ),
    "clip_l.safetensors": (
        "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
        "text_encoders",
    ),
    "t5xxl_fp16.safetensors": (
        "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors",
        "text_encoders",
    ),
    "ae.safetensors": (
        "https://huggingface.co/black-forest-labs/FLUX.1-schnell/resolve/main/ae.safetensors",
        "vae",
    ),
}
# The command's prompt (kontext-train --prompt): a LoRA is restored with the prompt it was trained with.
RESTORE_PROMPT = DEFAULT_PROMPT
LORA_NAME = "kontext_restore"
# The training templates load the base model in fp8 so that training fits a 24 GB card.
TRAIN_WEIGHT_DTYPE = "fp8_e4m3fn"
# The frontend's own Markdown note (virtual: never sent to the server; frontends 1.32 and 1.49).
NOTE_TYPE = "MarkdownNote"
# Restore Image applies the LoRA of its picker itself (lora_use apply: on activations, as trained;
# exact on fp8 weights, where a merged LoRA loses most of its effect: BENCHMARKS.md section 11), so
# the restore template needs no Load LoRA node.
RESTORE_APPLIES_LORA = True


@dataclass
class Node:
    """One node. ``col`` is the layout column (left to right); nodes of a column are stacked top
    to bottom in the order they are listed, or placed at ``y`` (build_workflows.layout)."""

    id: int
    type: str
    col: int
    widgets: dict = field(default_factory=dict)
    # input name -> (source node id, source output slot)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)
    title: str | None = None
    size: tuple[int, int] | None = None
    # Height kept free below the widgets for what the node shows once it has run (the trainer's
    # progress line and validation images), so it does not grow over the node below it.
    room: int = 0
    # Where the node sits in its column (canvas y); None: below the node listed before it. Set
    # from its template's ``places`` (Template.placed_nodes).
    y: int | None = None


@dataclass(frozen=True)
class Template:
    name: str  # API file name (api/<name>.api.json), for scripts
    title: str  # UI file name: what the template browser and the workflow tab show
    description: str  # one line, first in the Note and in the READMEs
    nodes: Callable[[], list[Node]]
    # Canvas y of nodes by id, where stacking them would put links over nodes; found by
    # `python workflows/build_workflows.py --untangle` (tests/test_workflows.py checks the result).
    places: dict[int, int] = field(default_factory=dict)

    def placed_nodes(self) -> list[Node]:
        return [replace(n, y=self.places.get(n.id, n.y)) for n in self.nodes()]


# --------------------------------------------------------------------------------------------
# Notes
# --------------------------------------------------------------------------------------------

MODELS_NOTE = """\
**Models** (FLUX.1 Kontext [dev]; the web UI offers download links for missing files):
- `models/diffusion_models/flux1-kontext-dev.safetensors`: from \
huggingface.co/black-forest-labs/FLUX.1-Kontext-dev, which asks you to accept its licence while \
logged in before the download works
- `models/vae/ae.safetensors`
- `models/text_encoders/clip_l.safetensors` and `t5xxl_fp16.safetensors`"""

# The one sentence to update with kontext-train plan --table's numbers (README "Will it fit?").
TRAIN_MEMORY_NOTE = """\
**GPU memory** (README "Will it fit?"; planned, not yet measured on a GPU): a 24 GB card runs \
this template as it is (weight_dtype fp8_e4m3fn, bucket_scale 1.0, gradient_checkpointing auto, \
rank 16, batch_size 1: 15.8 GiB, every block recomputed); a 16 GB card needs bucket_scale 0.5 (14.2 GiB). \
Every other setting is the node's default."""

TRAIN_TIME_NOTE = """\
**How long:** 3000 steps. Once it runs, Train LoRA shows s/step, the time left (ETA) and each \
checkpoint; cancel (✕ in the queue) saves one, and queueing again continues from it."""


def _note(template_title: str, description: str, *parts: str) -> str:
    return "\n\n".join((f"## {template_title}\n{description}", *parts))


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _loaders(col: int, weight_dtype: str = "default") -> list[Node]:
    """Model, text encoders and VAE (ids 1-3), stacked in one column."""
    return [
        Node(1, "UNETLoader", col, {"unet_name": MODEL_FILES["unet"], "weight_dtype": weight_dtype}),
        Node(
            2,
            "DualCLIPLoader",
            col,
            {"clip_name1": MODEL_FILES["clip_l"], "clip_name2": MODEL_FILES["t5"], "type": "flux"},
        ),
        Node(3, "VAELoader", col, {"vae_name": MODEL_FILES["vae"]}),
    ]


def _prompt(col: int) -> Node:
    return Node(
        4,
        "CLIPTextEncode",
        col,
        {"text": RESTORE_PROMPT},
        {"clip": (2, 0)},
        title="Restoration prompt",
        size=(400, 180),
    )


def _training(data_col: int) -> list[Node]:
    """Degradation -> folder dataset -> latent cache -> LoRA trainer -> loss plot, and the
    dataset summary with the validation report in one text preview (ids 5-11, 20). Uses columns
    data_col - 1 .. data_col + 2.

    The dataset summary reaches its preview through a join with the trainer's report: a preview
    fed by the Dataset node alone would be an output that does not need the trainer, so ComfyUI
    would accept a graph whose trainer is invalid (missing model files, a bad setting), run the
    dataset part and answer HTTP 200 instead of refusing it (tests/test_server.py)."""
    return [
        Node(5, "KontextRestoreDegradation", data_col - 1),
        Node(6, "KontextRestoreDataset", data_col, {}, {"degradation": (5, 0)}, room=DATASET_TEXT_H),
        Node(7, "KontextRestoreCacheLatents", data_col, {}, {"dataset": (6, 0), "vae": (3, 0)}),
        Node(
            8,
            "KontextRestoreTrainLoRA",
            data_col + 1,
            {},
            {"model": (1, 0), "conditioning": (4, 0), "latents": (7, 0), "vae": (3, 0)},
            room=TRAINER_PREVIEW_H,
        ),
        Node(9, "KontextRestoreLossPlot", data_col + 2, {}, {"loss": (8, 2)}),
        Node(10, "PreviewImage", data_col + 2, {}, {"images": (9, 0)}, title="Loss curve", size=(460, 360)),
        Node(
            20,
            "StringConcatenate",
            data_col + 2,
            {"delimiter": "\n\n"},
            {"string_a": (6, 1), "string_b": (8, 3)},
            title="Dataset summary + validation report",
            size=(460, 130),
        ),
        Node(
            11,
            "PreviewAny",
            data_col + 2,
            {},
            {"source": (20, 0)},
            title="Dataset summary and validation report",
            size=(460, 360),
        ),
    ]


NOTE_SIZE = (560, 460)
# The trainer's progress text and its grid of held-out images (degraded | restored | clean),
# as frontend 1.49 draws them below the widgets (measured: about 270 px).
TRAINER_PREVIEW_H = 380  # and five lines of its status (step, speed, checkpoints, validation)
# The Dataset node's counts and warnings, and Restore Image's progress, settings and warnings,
# drawn below their widgets as text that does not scroll.
DATASET_TEXT_H = 120
RESTORE_TEXT_H = 120


def _note_node(node_id: int, col: int, text: str) -> Node:
    return Node(node_id, NOTE_TYPE, col, {"text": text}, title="Read me", size=NOTE_SIZE)


# --------------------------------------------------------------------------------------------
# The templates
# --------------------------------------------------------------------------------------------

TRAIN = Template(
    "train_restoration_lora",
    "Train a Kontext restoration LoRA",
    "Trains a LoRA that removes noise, blur and JPEG artifacts, from a folder of clean photos "
    "(ComfyUI/input/restore_hq) degraded on the fly.",
    lambda: train_restoration_lora(),
    {1: 420, 2: 580, 3: 780, 4: 820, 5: 2140, 6: 2140, 7: 400, 8: 640, 9: 420, 10: 20, 11: 1480, 20: 1880},
)
RESTORE = Template(
    "restore_with_lora",
    "Restore photos with a Kontext LoRA",
    "Restores a degraded photo with a trained LoRA (models/loras/kontext_restore.safetensors) and "
    "saves the result.",
    lambda: restore_with_lora(),
    {1: 740, 2: 260, 3: 620, 4: 260, 6: 780, 7: 620, 8: 620},
)
# Node positions found by build_workflows.py --untangle (tests/test_workflows.py checks them).
EVALUATE_PLACES = {
    1: 1740, 2: 640, 3: 1620, 4: 640, 5: 860, 6: 320, 7: 1520, 8: 1320, 9: 1360, 10: 1520, 11: 260,
    12: 1320, 13: 1328, 14: 1216, 15: 740, 16: 1360, 17: 1780, 18: 1180, 19: 940, 20: 660,
}  # fmt: skip
EVALUATE = Template(
    "train_then_evaluate",
    "Train and evaluate a Kontext LoRA",
    "Trains the LoRA, then degrades a clean reference photo, restores it with the new LoRA and "
    "scores restored against reference (PSNR/SSIM, the degraded input as the baseline).",
    lambda: train_then_evaluate(),
    EVALUATE_PLACES,
)

TRAIN_STEPS_NOTE = """\
1. **Put** 20 or more clean photos in `ComfyUI/input/restore_hq` (sub-folders are fine).
2. **Press Queue** (Ctrl+Enter).
3. **Result:** `models/loras/kontext_restore.safetensors`; press R and pick it in Restore \
Image. The summary and the held-out scores show in "Dataset summary and validation report"."""


def train_restoration_lora() -> list[Node]:
    note = _note(
        TRAIN.title, TRAIN.description, TRAIN_STEPS_NOTE, TRAIN_TIME_NOTE, MODELS_NOTE, TRAIN_MEMORY_NOTE
    )
    return [
        _note_node(21, 0, note),
        *_loaders(1, TRAIN_WEIGHT_DTYPE),
        _prompt(2),
        *_training(3),
    ]


RESTORE_NOTE = """\
1. **Put** your degraded photo in "Degraded photo" (drop it there or click to upload).
2. **Pick** the LoRA in Restore Image's lora_name (kontext_restore.safetensors here instead of \
the default none; press R after training a new one).{load_lora}
3. **Press Queue** (Ctrl+Enter). **How long:** 8 sampling steps, about as long as 8 steps of a \
Flux image.
4. **Result:** `output/kontext_restore/restored_*.png`, shown in Save Image."""

RESTORE_MEMORY_NOTE = """\
**GPU memory** (README "Will it fit?"): ComfyUI offloads what does not fit; weight_dtype \
fp8_e4m3fn on Load Diffusion Model halves the model's weights."""


def restore_with_lora() -> list[Node]:
    lora_file = f"{LORA_NAME}.safetensors"
    load_lora = "" if RESTORE_APPLIES_LORA else " Load LoRA applies it to the model: keep the two equal."
    steps = RESTORE_NOTE.format(load_lora=load_lora)
    note = _note(RESTORE.title, RESTORE.description, steps, MODELS_NOTE, RESTORE_MEMORY_NOTE)
    lora_loader = Node(
        5, "LoraLoaderModelOnly", 2, {"lora_name": lora_file, "strength_model": 1.0}, {"model": (1, 0)}
    )
    return [
        _note_node(9, 0, note),
        *_loaders(1),
        *([] if RESTORE_APPLIES_LORA else [lora_loader]),
        _prompt(2),
        Node(6, "LoadImage", 2, {"image": "degraded_photo.png"}, title="Degraded photo", size=(400, 400)),
        Node(
            7,
            "KontextRestoreRestore",
            3,
            {"lora_name": lora_file},
            {
                "model": (1, 0) if RESTORE_APPLIES_LORA else (5, 0),
                "vae": (3, 0),
                "conditioning": (4, 0),
                "images": (6, 0),
            },
            room=RESTORE_TEXT_H,
        ),
        Node(
            8,
            "SaveImage",
            4,
            {"filename_prefix": "kontext_restore/restored"},
            {"images": (7, 0)},
            size=(460, 460),
        ),
    ]


EVALUATE_STEPS_NOTE = """\
1. **Put** 20 or more clean photos in `ComfyUI/input/restore_hq`, and a clean reference photo \
(not one of them) in "Clean reference".
2. **Press Queue** (Ctrl+Enter).
3. **Result:** the LoRA in `models/loras/kontext_restore.safetensors`; the reference is degraded \
like the training data, restored with the new LoRA and scored in "Metrics" (restored and \
degraded against the reference); the restored image in `output/kontext_restore/evaluated_*.png`."""


def train_then_evaluate() -> list[Node]:
    note = _note(
        EVALUATE.title,
        EVALUATE.description,
        EVALUATE_STEPS_NOTE,
        TRAIN_TIME_NOTE,
        MODELS_NOTE,
        TRAIN_MEMORY_NOTE,
    )
    return [
        _note_node(21, 0, note),
        Node(12, "LoadImage", 0, {"image": "clean_photo.png"}, title="Clean reference", size=(400, 400)),
        *_loaders(1, TRAIN_WEIGHT_DTYPE),
        Node(13, "KontextRestoreBucketImage", 1, {}, {"images": (12, 0)}),
        _prompt(2),
        *_training(3),
        Node(
            14,
            "KontextRestoreDegradeImage",
            2,
            {},
            {"images": (13, 0), "degradation": (5, 0)},
            title="Degraded input",
        ),
        Node(17, "PreviewImage", 2, {}, {"images": (14, 0)}, title="Degraded preview", size=(400, 320)),
        Node(
            15,
            "KontextRestoreRestore",
            4,
            {},
            {
                # The plain model: Restore applies the trained LoRA (linked by name) itself.
                "model": (1, 0),
                "vae": (3, 0),
                "conditioning": (4, 0),
                "images": (14, 0),
                "lora_name": (8, 1),
            },
            room=RESTORE_TEXT_H,
        ),
        Node(
            18,
            "KontextRestoreMetrics",
            6,
            {},
            {"restored": (15, 0), "reference": (13, 0), "degraded": (14, 0)},
        ),
        Node(19, "PreviewAny", 6, {}, {"source": (18, 0)}, title="Metrics", size=(460, 200)),
        Node(
            16,
            "SaveImage",
            6,
            {"filename_prefix": "kontext_restore/evaluated"},
            {"images": (15, 0)},
            size=(460, 460),
        ),
    ]


TEMPLATES: dict[str, Template] = {t.name: t for t in (TRAIN, RESTORE, EVALUATE)}
