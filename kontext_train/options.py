"""The one table of settings: every node input, command flag and config-file key that is a value.

Each ``Setting`` holds its name, kind, default, range (min/max/step) or choices, a tooltip (one
sentence a ComfyUI user understands), longer help for ``kontext-train --help``, and where it is
used: on the nodes (``NODE``), and/or as a flag and config key of the command (``COMMAND``, with
the subcommands that show it). Defaults of settings that belong to a config class
(``TrainConfig``, ``DegradationConfig``) or to a library function are read from there.

``check_value`` / ``check_settings`` are the one validation of values: numbers finite and in
range, whole numbers whole, choices valid. ``TrainConfig``, ``DegradationConfig``,
``bucket_resolutions``, the nodes and the command all call them.
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from .data.dataset import build_dataset
from .data.degradations import KINDS, DegradationConfig
from .method.flow import FORMULATIONS, LOSS_WEIGHTING, TIMESTEP_SAMPLING
from .data.latent_cache import CONTROL_MODES, LatentCache
from .method.lora import TARGET_SETS
from .report.plots import render_loss_plot
from .restore.restore_settings import AS_TRAINED, BRIDGE_STEPS, DEFAULT_BUCKET_SCALE, DEFAULT_GUIDANCE, MODES
from .method.train_config import LORA_DTYPES, LR_SCHEDULES, TrainConfig

NODE = "node"
COMMAND = "command"  # a --flag, a config-file key and, where ``env`` is set, an environment variable
COMMANDS = ("train", "demo", "restore", "evaluate")
TRAINING = ("train", "demo")
WITH_DATA = ("train", "demo", "evaluate")
WITH_WEIGHTS = ("train", "restore", "evaluate")  # the demo's model is built in; it reads no folder
WITH_FOLDERS = ("train", "evaluate")
MAX_SEED = 0xFFFFFFFFFFFFFFFF  # ComfyUI's seed widgets allow 64 bits
DEFAULT_PROMPT = "Restore this photo: remove the blur, noise and JPEG artifacts, keep every detail."
NO_LORA = "none"  # the Restore node's lora_name choice for "no LoRA file"
KINDS_OF_SETTING = ("int", "float", "bool", "str", "path", "choice")


class SettingError(ValueError):
    """A value outside what its setting allows; the message names the setting and the range."""


@dataclass(frozen=True)
class Setting:
    name: str  # config key and flag (--name-with-dashes); the node input unless node_name is set
    kind: str  # one of KINDS_OF_SETTING
    default: Any  # None: "not set" (paths) or "automatic" (alpha), and None is then allowed
    tooltip: str
    help: str = ""  # for --help; the tooltip when empty
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | None = None  # None for a choice: the node supplies them (samplers)
    surfaces: tuple[str, ...] = (NODE, COMMAND)
    commands: tuple[str, ...] = COMMANDS  # subcommands that show the flag
    env: str | None = None
    node_name: str | None = None
    node_default: Any = None  # what a node widget shows for a None default (alpha: 0)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def input_name(self) -> str:
        return self.node_name or self.name

    @property
    def range_text(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        if self.kind not in ("int", "float"):
            return {"bool": "true or false"}.get(self.kind, "text")
        show = (lambda v: str(int(v))) if self.kind == "int" else (lambda v: f"{v:g}")
        lo = "-inf" if self.min is None else show(self.min)
        hi = "inf" if self.max is None else show(self.max)
        return f"{lo}..{hi}"


def _arg_default(func: Callable, name: str) -> Any:
    """A library function's default for one argument, so the table does not repeat it."""
    return inspect.signature(func).parameters[name].default


class _Defaults:
    """A config class's field defaults as attributes, read without constructing an instance
    (construction validates through this module, which is still being imported)."""

    def __init__(self, cls: type) -> None:
        self.__dict__.update({f.name: f.default for f in fields(cls)})


_T, _D = _Defaults(TrainConfig), _Defaults(DegradationConfig)
_CACHE = LatentCache.__init__


def _s(name: str, kind: str, default: Any, tooltip: str, help: str = "", **kw: Any) -> Setting:
    return Setting(name, kind, default, tooltip, help, **kw)


_NODE_ONLY = (NODE,)
_COMMAND_ONLY = (COMMAND,)

SETTINGS: tuple[Setting, ...] = (
    # -- where things are (command) ----------------------------------------------------------
    _s("output_dir", "path", "kontext-restore-output", "Folder everything of the run is written to.",
       surfaces=_COMMAND_ONLY, env="OUTPUT_DIR"),
    _s("hr_root", "path", None, "Folder of clean (high-quality) images.", surfaces=_COMMAND_ONLY,
       commands=WITH_FOLDERS, env="HR_ROOT"),
    _s("lr_root", "path", None, "Optional folder of real degraded images, paired by file name.",
       surfaces=_COMMAND_ONLY, commands=WITH_FOLDERS, env="LR_ROOT"),
    _s("comfyui", "path", None, "ComfyUI folder (found automatically inside custom_nodes).",
       surfaces=_COMMAND_ONLY, env="COMFYUI_PATH"),
    _s("unet", "path", None, "FLUX.1 Kontext [dev] weights (path, or name in models/diffusion_models).",
       surfaces=_COMMAND_ONLY, commands=WITH_WEIGHTS, env="KONTEXT_UNET"),
    _s("clip_l", "path", None, "clip_l text encoder (path, or name in models/text_encoders).",
       surfaces=_COMMAND_ONLY, commands=WITH_WEIGHTS, env="KONTEXT_CLIP_L"),
    _s("t5xxl", "path", None, "t5xxl text encoder (path, or name in models/text_encoders).",
       surfaces=_COMMAND_ONLY, commands=WITH_WEIGHTS, env="KONTEXT_T5XXL"),
    _s("vae", "path", None, "Flux VAE ae.safetensors (path, or name in models/vae).",
       surfaces=_COMMAND_ONLY, commands=WITH_WEIGHTS, env="KONTEXT_VAE"),
    _s("weight_dtype", "choice", "default", "Dtype the base model's weights are loaded in.",
       choices=("default", "fp8_e4m3fn", "fp8_e5m2"), surfaces=_COMMAND_ONLY, commands=WITH_WEIGHTS),
    _s("cpu", "bool", False, "Run on the CPU even when a GPU is available.", surfaces=_COMMAND_ONLY),
    _s("prompt", "str", DEFAULT_PROMPT, "The restoration prompt, encoded once.", surfaces=_COMMAND_ONLY),
    _s("name", "str", "kontext_restore",
       "Name of the LoRA file written to the loras folder, and of its checkpoint folder.",
       "LoRA file name inside OUTPUT_DIR", node_name="lora_name"),
    _s("demo_images", "int", None, "Number of bundled sample photos the demo uses.", min=1,
       surfaces=_COMMAND_ONLY, commands=WITH_DATA),
    # -- dataset -----------------------------------------------------------------------------
    _s("hq_folder", "str", "restore_hq",
       "Folder of clean photos to learn from; a relative path is inside ComfyUI's input folder.",
       surfaces=_NODE_ONLY),
    _s("lq_folder", "str", "",
       "Optional folder of real degraded versions of the clean photos, matched by relative path "
       "(empty: synthetic degradations).", surfaces=_NODE_ONLY),
    _s("bucket_scale", "float", _arg_default(build_dataset, "bucket_scale"),
       "Size of Kontext's ~1 megapixel resolutions: 1.0 is native, 0.5 gives ~512 px and needs "
       "far less memory; restore at the scale the LoRA was trained at.",
       "scale of Kontext's ~1 MP buckets (0.5: ~512 px; restore/evaluate: the LoRA's)",
       min=0.0625, max=4.0, step=0.0625),
    _s("val_count", "int", _arg_default(build_dataset, "val_count"),
       "How many images are held out of training to measure progress (4 typical; 0: none); at most "
       "20% of the images, fewer in a small folder.",
       "held-out images for validation and evaluation; at most 20% of the images (at least 1)",
       min=0, max=1000, commands=WITH_DATA),
    _s("min_size", "int", _arg_default(build_dataset, "min_size"),
       "Images with a side shorter than this many pixels are skipped.", min=8, max=4096,
       commands=WITH_DATA),
    _s("degradation", "choice", _D.kind,
       "fixed: the same blur, down/up-scale, noise and JPEG on every image (the values below); "
       "realesrgan: random strengths and order with a second pass, closer to real photos.",
       "synthetic degradation pipeline", choices=KINDS, commands=WITH_DATA, node_name="kind"),
    _s("noise_sigma", "float", _D.noise_sigma,
       "Gaussian noise added to the clean image, as a fraction of full brightness (0: none; 0.02 "
       "is light grain).", "Gaussian noise std (fixed pipeline)",
       min=0.0, max=0.5, step=0.005, commands=WITH_DATA),
    _s("blur_radius", "float", _D.blur_radius,
       "Gaussian blur radius in pixels (0: none; 1.5 looks slightly out of focus).",
       "Gaussian blur radius in px (fixed pipeline)", min=0.0, max=10.0, step=0.1, commands=WITH_DATA),
    _s("jpeg_quality", "int", _D.jpeg_quality,
       "JPEG quality the degraded image is saved at (0: no JPEG; 85 gives mild artifacts, 30 heavy).",
       "JPEG quality, 0 = off (fixed pipeline)", min=0, max=100, commands=WITH_DATA),
    _s("downscale", "float", _D.downscale,
       "Shrink by this factor and scale back up, losing fine detail (1: off; 2 halves the resolution).",
       "down/up-scale factor, 1 = none (fixed pipeline)", min=1.0, max=8.0, step=0.25,
       commands=WITH_DATA),
    _s("second_order_prob", "float", _D.second_order_prob,
       "realesrgan only: chance of a second degradation pass (0.5 typical).",
       min=0.0, max=1.0, step=0.05, surfaces=_NODE_ONLY),
    _s("shuffle_prob", "float", _D.shuffle_prob,
       "realesrgan only: chance that blur, resize, noise and JPEG run in random order (0.3 typical).",
       min=0.0, max=1.0, step=0.05, surfaces=_NODE_ONLY),
    _s("control_mode", "choice", _arg_default(_CACHE, "control_mode"),
       "Random degradations only: pool caches a few degraded versions per image (fast); reencode "
       "makes fresh ones every epoch (more variety, more VAE work).",
       "random degradations: cached pool or re-encode", choices=CONTROL_MODES, commands=TRAINING),
    _s("pool_size", "int", _arg_default(_CACHE, "pool_size"),
       "pool mode: how many degraded versions of each image are cached (4 typical).",
       "degradation variants cached per image (pool mode)", min=1, max=64, commands=TRAINING),
    _s("cache_folder", "str", "kontext_restore_cache",
       "Where encoded latents are kept; a relative path is inside ComfyUI's output folder.",
       surfaces=_NODE_ONLY),
    _s("cache_dir", "path", None, "Latent cache folder.", "latent cache folder (default OUTPUT_DIR/latent_cache)",
       surfaces=_COMMAND_ONLY, commands=TRAINING),
    # -- training (TrainConfig) --------------------------------------------------------------
    _s("steps", "int", _T.steps, "Optimizer steps to train for (3000 typical).", "optimizer steps",
       min=1, max=1_000_000, commands=TRAINING),
    _s("learning_rate", "float", _T.learning_rate,
       "How fast the LoRA learns (1e-4 typical; lower it if the loss becomes NaN).",
       "AdamW learning rate", min=1e-7, max=1.0, step=1e-5, commands=TRAINING),
    _s("rank", "int", _T.rank,
       "LoRA size: a higher rank learns more but takes more memory and disk (16 typical).",
       "LoRA rank", min=1, max=256, commands=TRAINING),
    _s("alpha", "float", _T.alpha,
       "LoRA alpha; the LoRA's strength is alpha / rank (0: same as rank, strength 1).",
       "LoRA alpha (unset or 0: alpha = rank)", min=0.0, max=1024.0, commands=TRAINING,
       node_default=0.0),
    _s("batch_size", "int", _T.batch_size,
       "Images per step on each GPU (1 typical; more needs more memory).",
       "batch per process (global batch = this x processes)", min=1, max=64, commands=TRAINING),
    _s("grad_accum", "int", _T.grad_accum,
       "Steps whose gradients are added up before one update: a bigger batch without more memory (1).",
       "gradient accumulation steps", min=1, max=256, commands=TRAINING),
    _s("lr_schedule", "choice", _T.lr_schedule,
       "How the learning rate changes over the run; cosine (typical) lowers it to 0 by the end.",
       "learning-rate schedule", choices=LR_SCHEDULES, commands=TRAINING),
    _s("warmup_steps", "int", _T.warmup_steps,
       "Steps over which the learning rate rises from 0 at the start (100 typical).",
       "warm-up steps", min=0, max=100_000, commands=TRAINING),
    _s("guidance", "float", _T.guidance,
       "Flux guidance the model gets while training and restoring (1.5 typical for restoration).",
       "Flux guidance (restore/evaluate: the LoRA's)", min=0.0, max=100.0, step=0.1),
    _s("checkpoint_every", "int", _T.checkpoint_every,
       "Save a resumable checkpoint every this many steps (500 typical; 0: only at the end).",
       "checkpoint every N steps (0 = only at the end)", min=0, max=100_000, commands=TRAINING),
    _s("keep_checkpoints", "int", _T.keep_checkpoints, "How many recent checkpoints are kept (0: all).",
       "checkpoints kept (0 = all)", min=0, max=10_000, surfaces=_COMMAND_ONLY, commands=TRAINING),
    _s("validate_every_epochs", "int", _T.validate_every_epochs,
       "Restore and score the held-out images every this many epochs (5 typical; 0: off).",
       "validation every N epochs (0 = off)", min=0, max=10_000, commands=TRAINING),
    _s("validation_steps", "int", _T.validation_steps,
       "Sampling steps used to restore the held-out images during validation; 0: as the Restore node "
       "does (8 for bridge modes, 28 for kontext).",
       "sampling steps during validation (0 = as restoring: 8 bridge, 28 kontext)", min=0, max=100,
       commands=TRAINING),
    _s("seed", "int", _T.seed,
       "Random seed: the same seed gives the same split, degradations, training and sampling noise.",
       "seed of split, degradations, LoRA init and noise", min=0, max=MAX_SEED),
    _s("formulation", "choice", _T.formulation,
       "bridge (default, fastest): start from the degraded image; bridge_ref: start from it with "
       "bridge_noise >= 0.1 and also see it as reference; kontext: start from noise, see it as reference.",
       "flow-matching formulation", choices=FORMULATIONS, commands=TRAINING),
    _s("bridge_noise", "float", _T.bridge_noise,
       "Noise added to the degraded start of a bridge (0: none; bridge_ref needs at least 0.1). "
       "Restoring uses the LoRA's value.",
       "noise added to the bridge start", min=0.0, max=1.0, step=0.01, commands=TRAINING),
    _s("timestep_sampling", "choice", _T.timestep_sampling,
       "How training picks points on the way from degraded to clean (shifted_uniform typical).",
       "training sigma distribution", choices=TIMESTEP_SAMPLING, commands=TRAINING),
    _s("logit_mean", "float", _T.logit_mean, "Centre of the logit-normal timestep distribution (0).",
       "logit-normal mean", min=-5.0, max=5.0, surfaces=_COMMAND_ONLY, commands=TRAINING),
    _s("logit_std", "float", _T.logit_std, "Spread of the logit-normal timestep distribution (1).",
       "logit-normal std", min=0.01, max=10.0, surfaces=_COMMAND_ONLY, commands=TRAINING),
    _s("loss_weighting", "choice", _T.loss_weighting,
       "How the loss weighs points along the path (none typical).", "loss weighting",
       choices=LOSS_WEIGHTING, commands=TRAINING),
    _s("weight_decay", "float", _T.weight_decay, "AdamW weight decay (0.01).", "AdamW weight decay",
       min=0.0, max=1.0, surfaces=_COMMAND_ONLY, commands=TRAINING),
    _s("max_grad_norm", "float", _T.max_grad_norm, "Gradient clipping norm (1.0; 0: off).",
       "gradient clipping (0 = off)", min=0.0, max=1000.0, surfaces=_COMMAND_ONLY, commands=TRAINING),
    _s("lora_targets", "choice", _T.lora_targets,
       "Layers that get LoRA adapters: blocks (typical), blocks+modulation, or all_linear (more "
       "capacity, more memory).", "layers that get LoRA adapters", choices=tuple(TARGET_SETS),
       commands=TRAINING),
    _s("gradient_checkpointing", "bool", _T.gradient_checkpointing,
       "Recompute activations during the backward pass: much less memory, somewhat slower (on).",
       "recompute blocks in backward (saves memory)", commands=TRAINING),
    _s("lora_dtype", "choice", _T.lora_dtype,
       "Precision of the trained LoRA weights (float32 typical).", "LoRA weights dtype",
       choices=tuple(LORA_DTYPES), commands=TRAINING),
    _s("resume", "bool", True,
       "Continue from this LoRA name's latest checkpoint; off refuses to touch an existing run.",
       "continue the run in OUTPUT_DIR (--no-resume refuses an existing run)", commands=TRAINING),
    _s("log_every", "int", 10, "Progress line every N steps when not on a terminal.", min=1,
       max=1_000_000, surfaces=_COMMAND_ONLY, commands=TRAINING),
    # -- restoration and evaluation ----------------------------------------------------------
    _s("mode", "choice", "auto",
       "How to sample: auto uses the formulation recorded in the LoRA (lora_name), else bridge.",
       choices=MODES, surfaces=_NODE_ONLY),
    _s("restore_steps", "int", 0,
       "Sampling steps to restore (0: automatic, 8 for bridge LoRAs and 28 for kontext).",
       "sampling steps to restore (0 = automatic: 8 for bridge LoRAs, 28 for kontext)",
       min=0, max=200, node_name="steps"),
    _s("sigma_steps", "int", BRIDGE_STEPS, "Sampling steps from the degraded image to the clean one (8).",
       min=1, max=200, surfaces=_NODE_ONLY, node_name="steps"),
    _s("sampler", "choice", "euler", "ComfyUI sampler used to restore (euler typical).",
       "ComfyUI sampler name for restoration", node_name="sampler_name"),
    _s("scheduler", "choice", AS_TRAINED,
       "as_trained (recommended): from 1 to 0 with the time shift training used; or a ComfyUI scheduler.",
       surfaces=_NODE_ONLY),
    _s("restore_guidance", "float", 0.0,
       "Flux guidance to restore with; 0: the guidance the LoRA was trained with (lora_name), else "
       f"{DEFAULT_GUIDANCE}.",
       min=0.0, max=100.0, step=0.1, surfaces=_NODE_ONLY, node_name="guidance"),
    _s("restore_bucket_scale", "float", 0.0,
       "Resolution scale to restore at (1.0: Kontext's ~1 MP, 0.5: ~512 px); 0: the scale the LoRA was "
       f"trained at (lora_name), else {DEFAULT_BUCKET_SCALE}.", min=0.0, max=4.0, step=0.0625, surfaces=_NODE_ONLY,
       node_name="bucket_scale"),
    _s("restore_lora", "choice", NO_LORA,
       "LoRA file in the loras folder whose metadata sets mode auto, guidance, bucket scale, bridge noise "
       "and time shift (none: no LoRA).", surfaces=_NODE_ONLY, node_name="lora_name"),
    _s("lora_use", "choice", "apply",
       "apply: the node applies lora_name on activations, as trained (no Load LoRA needed); already "
       "applied: the MODEL has it from a loader, only its settings are read.",
       choices=("apply", "already applied"), surfaces=_NODE_ONLY),
    _s("lora", "path", None, "LoRA file to restore with.", "LoRA file (default OUTPUT_DIR/<name>.safetensors)",
       surfaces=_COMMAND_ONLY, commands=("restore", "evaluate")),
    _s("input", "path", None, "Image file or folder to restore.", surfaces=_COMMAND_ONLY,
       commands=("restore",)),
    _s("eval_split", "choice", "val", "Images to evaluate: the held-out split or all.",
       choices=("val", "all"), surfaces=_COMMAND_ONLY, commands=("evaluate",)),
    _s("eval_count", "int", 8, "At most this many images are evaluated.", min=1, max=100_000,
       surfaces=_COMMAND_ONLY, commands=WITH_DATA),
    # -- plots -------------------------------------------------------------------------------
    _s("smoothing", "float", _arg_default(render_loss_plot, "smoothing"),
       "How much the loss curve is smoothed (0: raw; 0.9 typical).", min=0.0, max=0.999, step=0.01,
       surfaces=_NODE_ONLY),
    _s("log_scale", "bool", False, "Plot the loss on a logarithmic axis.", surfaces=_NODE_ONLY),
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
    """``value`` checked against setting ``name``; returned unchanged. ``label`` names it in the
    error when it is not the setting itself (an element of a range, say).

    Raises ``SettingError`` (a ``ValueError``) naming the setting and what it allows."""
    s = setting(name)
    label = label or name
    if value is None:
        if s.default is None:
            return value
        raise SettingError(f"{label} must be set ({s.range_text}), got None")
    if s.kind == "bool":
        if not isinstance(value, bool):
            raise SettingError(f"{label} must be true or false, got {value!r}")
        return value
    if s.kind in ("int", "float"):
        whole = s.kind == "int"
        ok_type = numbers.Integral if whole else numbers.Real
        what = "a whole number" if whole else "a finite number"
        if isinstance(value, bool) or not isinstance(value, ok_type):
            raise SettingError(f"{label} must be {what} in {s.range_text}, got {value!r}")
        if not whole and not math.isfinite(value):
            raise SettingError(f"{label} must be {what} in {s.range_text}, got {value!r}")
        if (s.min is not None and value < s.min) or (s.max is not None and value > s.max):
            raise SettingError(f"{label} must be in {s.range_text}, got {value!r}")
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise SettingError(f"{label} must be text, got {value!r}")
    if s.kind == "choice" and s.choices is not None and value not in s.choices:
        raise SettingError(f"{label} must be {s.range_text}; got {value!r}")
    return value


def check_settings(values: Mapping[str, Any]) -> None:
    """Checks every value whose key is a setting (other keys are not settings and are skipped).
    Every bad value is reported at once (joined by '; '), so a user fixes them in one go."""
    problems = []
    for key, value in values.items():
        if key in BY_NAME:
            try:
                check_value(key, value)
            except SettingError as e:
                problems.append(str(e))
    if problems:
        raise SettingError("; ".join(problems))
