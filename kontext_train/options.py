"""The one table of settings: every node input, command flag and config-file key that is a value.

What a row is and how a value is checked against it live in ``kontext_train.setting``. The rows
of values the library takes live beside the code that takes them, which checks its values there:
``TrainConfig``'s fields (``method/train_config.py``), the degradations (``data/degradations.py``),
``bucket_scale`` (``data/buckets.py``), the dataset and the latent cache (``data/dataset.py``,
``data/latent_cache.py``) and restoring (``restore/restore_settings.py``). This table lists them
in the order the nodes and ``kontext-train --help`` show them, together with the rows only the
nodes or the command have (folders, weights, names, the run and the plot). Nothing in the library
imports this module: the nodes and the command do.

``check_value`` / ``check_settings`` check a value by its setting's name: numbers finite and in
range, whole numbers whole, choices valid.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .data.buckets import BUCKET_SCALE
from .data.dataset import DATASET_SETTINGS
from .data.degradations import DEGRADATION_SETTINGS
from .data.latent_cache import CACHE_SETTINGS
from .method.train_config import MAX_SEED, TRAIN_SETTINGS
from .report.plots import render_loss_plot
from .restore.restore_settings import RESTORE_SETTINGS
from .setting import (
    COMMAND,
    COMMAND_ONLY,
    COMMANDS,
    KINDS_OF_SETTING,
    NODE,
    NODE_ONLY,
    TRAINING,
    WITH_DATA,
    WITH_FOLDERS,
    WITH_WEIGHTS,
    Setting,
    SettingError,
    arg_default,
    check_values,
)

__all__ = [
    "BY_NAME",
    "COMMAND",
    "COMMANDS",
    "DEFAULT_PROMPT",
    "KINDS_OF_SETTING",
    "MAX_SEED",
    "NODE",
    "NO_LORA",
    "SETTINGS",
    "TRAINING",
    "WITH_DATA",
    "WITH_FOLDERS",
    "WITH_WEIGHTS",
    "Setting",
    "SettingError",
    "check_settings",
    "check_value",
    "on_surface",
    "setting",
]

DEFAULT_PROMPT = "Restore this photo: remove the blur, noise and JPEG artifacts, keep every detail."
NO_LORA = "none"  # the Restore node's lora_name choice for "no LoRA file"

SETTINGS: tuple[Setting, ...] = (
    # -- where things are (command) ----------------------------------------------------------
    Setting("output_dir", "path", "kontext-restore-output", "Folder everything of the run is written to.",
        surfaces=COMMAND_ONLY, env="OUTPUT_DIR"),
    Setting("hr_root", "path", None, "Folder of clean (high-quality) images.", surfaces=COMMAND_ONLY,
        commands=WITH_FOLDERS, env="HR_ROOT"),
    Setting("lr_root", "path", None, "Optional folder of real degraded images, paired by file name.",
        surfaces=COMMAND_ONLY, commands=WITH_FOLDERS, env="LR_ROOT"),
    Setting("comfyui", "path", None, "ComfyUI folder (found automatically inside custom_nodes).",
        surfaces=COMMAND_ONLY, env="COMFYUI_PATH"),
    Setting("unet", "path", None, "FLUX.1 Kontext [dev] weights (path, or name in models/diffusion_models).",
        surfaces=COMMAND_ONLY, commands=WITH_WEIGHTS, env="KONTEXT_UNET"),
    Setting("clip_l", "path", None, "clip_l text encoder (path, or name in models/text_encoders).",
        surfaces=COMMAND_ONLY, commands=WITH_WEIGHTS, env="KONTEXT_CLIP_L"),
    Setting("t5xxl", "path", None, "t5xxl text encoder (path, or name in models/text_encoders).",
        surfaces=COMMAND_ONLY, commands=WITH_WEIGHTS, env="KONTEXT_T5XXL"),
    Setting("vae", "path", None, "Flux VAE ae.safetensors (path, or name in models/vae).",
        surfaces=COMMAND_ONLY, commands=WITH_WEIGHTS, env="KONTEXT_VAE"),
    Setting("weight_dtype", "choice", "default", "Dtype the base model's weights are loaded in.",
        choices=("default", "fp8_e4m3fn", "fp8_e5m2"), surfaces=COMMAND_ONLY, commands=WITH_WEIGHTS),
    Setting("cpu", "bool", False, "Run on the CPU even when a GPU is available.", surfaces=COMMAND_ONLY),
    Setting("prompt", "str", DEFAULT_PROMPT, "The restoration prompt, encoded once.", surfaces=COMMAND_ONLY),
    Setting("name", "str", "kontext_restore",
        "Name of the LoRA file written to the loras folder, and of its checkpoint folder.",
        "LoRA file name inside OUTPUT_DIR", node_name="lora_name"),
    Setting("demo_images", "int", None,
        "Number of bundled sample photos the demo uses, its held-out photo included.", min=1,
        surfaces=COMMAND_ONLY, commands=WITH_DATA),
    # -- dataset -----------------------------------------------------------------------------
    Setting("hq_folder", "str", "restore_hq",
        "Folder of clean photos to learn from; a relative path is inside ComfyUI's input folder.",
        surfaces=NODE_ONLY),
    Setting("lq_folder", "str", "",
        "Optional folder of real degraded versions of the clean photos, matched by relative path "
        "(empty: synthetic degradations).", surfaces=NODE_ONLY),
    BUCKET_SCALE,  # data/buckets.py
    *DATASET_SETTINGS,  # data/dataset.py: val_count, min_size
    *DEGRADATION_SETTINGS,  # data/degradations.py: DegradationConfig's fields
    *CACHE_SETTINGS,  # data/latent_cache.py: control_mode, pool_size
    Setting("cache_folder", "str", "kontext_restore_cache",
        "Where encoded latents are kept; a relative path is inside ComfyUI's output folder.",
        surfaces=NODE_ONLY),
    Setting("cache_dir", "path", None, "Latent cache folder.", "latent cache folder (default OUTPUT_DIR/latent_cache)",
        surfaces=COMMAND_ONLY, commands=TRAINING),
    # -- training (TrainConfig) --------------------------------------------------------------
    *TRAIN_SETTINGS,  # method/train_config.py: one row per TrainConfig field
    Setting("init_lora", "path", None,
        "LoRA file to start from (ours or a kohya-format Kontext LoRA): its rank, alpha, layers and "
        "adapter kind are read from the file; unset: a fresh LoRA.",
        "LoRA file to start a new run from (kohya format); its rank, alpha, layers and kind are used",
        surfaces=COMMAND_ONLY, commands=TRAINING),
    Setting("init_lora_choice", "choice", NO_LORA,
        "Start from this LoRA file's weights (ours or a kohya-format Kontext LoRA): its rank, alpha, "
        "layers and adapter kind are read from the file (none: a fresh LoRA). Ignored when resuming.",
        surfaces=NODE_ONLY, node_name="init_lora"),
    Setting("resume", "bool", True,
        "Continue from this LoRA name's latest checkpoint; off refuses to touch an existing run.",
        "continue the run in OUTPUT_DIR (--no-resume refuses an existing run)", commands=TRAINING),
    Setting("log_every", "int", 10, "Progress line every N steps when not on a terminal.", min=1,
        max=1_000_000, surfaces=COMMAND_ONLY, commands=TRAINING),
    # -- restoration and evaluation ----------------------------------------------------------
    *RESTORE_SETTINGS,  # restore/restore_settings.py: mode .. restore_bucket_scale
    Setting("restore_lora", "choice", NO_LORA,
        "LoRA file in the loras folder whose metadata sets mode auto, guidance, bucket scale, bridge noise "
        "and time shift (none: no LoRA).", surfaces=NODE_ONLY, node_name="lora_name"),
    Setting("lora_use", "choice", "apply",
        "apply: the node applies lora_name on activations, as trained (no Load LoRA needed); already "
        "applied: the MODEL has it from a loader, only its settings are read.",
        choices=("apply", "already applied"), surfaces=NODE_ONLY),
    Setting("lora", "path", None, "LoRA file to restore with.", "LoRA file (default OUTPUT_DIR/<name>.safetensors)",
        surfaces=COMMAND_ONLY, commands=("restore", "evaluate")),
    Setting("input", "path", None, "Image file or folder to restore.", surfaces=COMMAND_ONLY,
        commands=("restore",)),
    Setting("eval_split", "choice", "val", "Images to evaluate: the held-out split or all.",
        choices=("val", "all"), surfaces=COMMAND_ONLY, commands=("evaluate",)),
    Setting("eval_count", "int", 8, "At most this many images are evaluated.", min=1, max=100_000,
        surfaces=COMMAND_ONLY, commands=WITH_DATA),
    Setting("preview_count", "int", 8, "How many training pairs the preview shows (8 typical).", min=1,
        max=64, surfaces=NODE_ONLY, node_name="count"),
    # -- plots -------------------------------------------------------------------------------
    Setting("smoothing", "float", arg_default(render_loss_plot, "smoothing"),
        "How much the loss curve is smoothed (0: raw; 0.9 typical).", min=0.0, max=0.999, step=0.01,
        surfaces=NODE_ONLY),
    Setting("log_scale", "bool", False, "Plot the loss on a logarithmic axis.", surfaces=NODE_ONLY),
)  # fmt: skip

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def setting(name: str) -> Setting:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"no setting named {name!r} in kontext_train.options") from None


def on_surface(surface: str) -> list[Setting]:
    return [s for s in SETTINGS if surface in s.surfaces]


def check_value(name: str, value: Any, label: str | None = None) -> Any:
    """``value`` checked against setting ``name`` (``Setting.check``, after ``Setting.current``:
    a value saved before the setting changed kind passes as what it now means)."""
    s = setting(name)
    return s.check(s.current(value), label)


def check_settings(values: Mapping[str, Any]) -> None:
    """Checks every value whose key is a setting (other keys are skipped); every bad value is
    reported at once."""
    check_values(values, SETTINGS)
