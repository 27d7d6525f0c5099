"""Training settings (``TrainConfig``): what a run is, and its rows of the settings table."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from ..setting import COMMAND_ONLY, TRAINING, Setting, check_values
from .flow import LOSS_WEIGHTING, TIMESTEP_SAMPLING, TRAINABLE_FORMULATIONS, check_formulation
from .lora import ADAPTER_KINDS, TARGET_SETS

MAX_SEED = 0xFFFFFFFFFFFFFFFF  # ComfyUI's seed widgets allow 64 bits
LORA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LR_SCHEDULES = ("cosine", "constant_with_warmup", "linear")


CHECKPOINTING_MODES = ("auto", "on", "off")
# train/optimizers.py builds them; named here so that the table's rows stay in the method layer.
OPTIMIZERS = ("adamw", "adam", "adafactor", "prodigy", "adamw8bit")
LOSSES = ("mse", "l1", "huber")


def checkpointing_mode(value):
    """``gradient_checkpointing`` as auto / on / off: true and false (what saved workflows and
    configs before auto held) become on and off; anything else is returned for the check."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return "on" if value.strip().lower() == "true" else "off"
    return value


@dataclass
class TrainConfig:
    """Training settings. Defaults follow the original design note where it had one.

    Every field has a row in ``TRAIN_SETTINGS`` below (range, tooltip, help; the settings table
    ``kontext_train.options`` lists them); construction checks each value against its row (finite,
    in range, a valid choice).
    """

    steps: int = 3000
    learning_rate: float = 1e-4
    rank: int = 16
    alpha: float | None = None  # None (or 0): alpha = rank, i.e. LoRA scale 1
    batch_size: int = 1
    grad_accum: int = 1
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    guidance: float = 1.5
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validate_every_epochs: int = 5
    validation_steps: int = 0  # 0: as restoring does (restore_settings.resolve_steps: 8 bridge, 28 kontext)
    seed: int = 0
    formulation: str = "bridge"  # chosen over seeds and two toys: README "Why bridge is the default"
    bridge_noise: float = 0.0
    timestep_sampling: str = "shifted_uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    loss_weighting: str = "none"
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    lora_targets: str = "blocks"  # blocks | blocks+modulation | all_linear
    # auto: the memory plan chooses how many blocks to recompute (CUDA; all of them elsewhere);
    # on: every block; off: none. true/false (saved workflows, old configs) mean on/off.
    gradient_checkpointing: str = "auto"
    lora_dtype: str = "float32"
    optimizer: str = "adamw"  # train/optimizers.py: adamw | adam | adafactor | prodigy | adamw8bit
    adapter: str = "lora"  # lora | lokr | loha (method/lycoris.py)
    loss: str = "mse"  # mse | l1 | huber
    huber_delta: float = 1.0
    validate_every_steps: int = 0  # > 0: validation every N steps instead of every N epochs
    checkpoint_loras: bool = True  # each checkpoint also as loras/<name>/<name>_step_N.safetensors

    # Settings that may change between a run and its resume; everything else must match.
    RESUMABLE_CHANGES = (
        "steps",
        "checkpoint_every",
        "keep_checkpoints",
        "validate_every_epochs",
        "validation_steps",
        "validate_every_steps",
        "checkpoint_loras",
    )

    def __post_init__(self) -> None:
        # 0 is how the node's widget says "no alpha" (alpha = rank); one meaning on every surface.
        if self.alpha is not None and not isinstance(self.alpha, bool) and self.alpha == 0:
            self.alpha = None
        self.gradient_checkpointing = checkpointing_mode(self.gradient_checkpointing)
        check_values({f.name: getattr(self, f.name) for f in fields(self)}, TRAIN_SETTINGS)
        check_formulation(self.formulation, self.bridge_noise)

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_inputs(cls, inputs: Mapping[str, Any]) -> TrainConfig:
        """The config from a node's inputs or the command's settings: every key named like a
        field is used, other keys (model, lora_name, ...) are ignored, missing fields keep their
        defaults. Values are checked against their rows (``TRAIN_SETTINGS``)."""
        return cls.from_dict(inputs)


def check_resume_compatible(saved: Mapping, config: TrainConfig) -> None:
    """ValueError naming every setting that differs from a checkpoint's and may not change."""
    current = config.to_dict()
    differ = [
        k
        for k, v in saved.items()
        if k in current and k not in TrainConfig.RESUMABLE_CHANGES and current[k] != v
    ]
    if differ:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in differ)
        raise ValueError(
            f"Cannot resume: settings differ from the checkpoint ({detail}). "
            "Use the original settings, or choose another LoRA name for a new run."
        )


_T = TrainConfig  # the rows read the field defaults from the class

# One row per field, in the order of the settings table (and of ``kontext-train --help``).
TRAIN_SETTINGS: tuple[Setting, ...] = (
    Setting("steps", "int", _T.steps, "Optimizer steps to train for (3000 typical).", "optimizer steps",
        min=1, max=1_000_000, commands=TRAINING),
    Setting("learning_rate", "float", _T.learning_rate,
        "How fast the LoRA learns (1e-4 typical; lower it if the loss becomes NaN).",
        "AdamW learning rate", min=1e-7, max=1.0, step=1e-7, commands=TRAINING),
    Setting("rank", "int", _T.rank,
        "LoRA size: a higher rank learns more but takes more memory and disk (16 typical).",
        "LoRA rank", min=1, max=256, commands=TRAINING),
    Setting("alpha", "float", _T.alpha,
        "LoRA alpha; the LoRA's strength is alpha / rank (0: same as rank, strength 1).",
        "LoRA alpha (unset or 0: alpha = rank)", min=0.0, max=1024.0, commands=TRAINING,
        node_default=0.0),
    Setting("batch_size", "int", _T.batch_size,
        "Images per step on each GPU (1 typical; more needs more memory).",
        "batch per process (global batch = this x processes)", min=1, max=64, commands=TRAINING),
    Setting("grad_accum", "int", _T.grad_accum,
        "Steps whose gradients are added up before one update: a bigger batch without more memory (1).",
        "gradient accumulation steps", min=1, max=256, commands=TRAINING),
    Setting("lr_schedule", "choice", _T.lr_schedule,
        "How the learning rate changes over the run; cosine (typical) lowers it to 0 by the end.",
        "learning-rate schedule", choices=LR_SCHEDULES, commands=TRAINING),
    Setting("warmup_steps", "int", _T.warmup_steps,
        "Steps over which the learning rate rises from 0 at the start (100 typical).",
        "warm-up steps", min=0, max=100_000, commands=TRAINING),
    Setting("guidance", "float", _T.guidance,
        "Flux guidance the model gets while training and restoring (1.5 typical for restoration).",
        "Flux guidance (restore/evaluate: the LoRA's)", min=0.0, max=100.0, step=0.1),
    Setting("checkpoint_every", "int", _T.checkpoint_every,
        "Save a resumable checkpoint every this many steps (500 typical; 0: only at the end).",
        "checkpoint every N steps (0 = only at the end)", min=0, max=100_000, commands=TRAINING),
    Setting("keep_checkpoints", "int", _T.keep_checkpoints, "How many recent checkpoints are kept (0: all).",
        "checkpoints kept (0 = all)", min=0, max=10_000, surfaces=COMMAND_ONLY, commands=TRAINING),
    Setting("validate_every_epochs", "int", _T.validate_every_epochs,
        "Restore and score the held-out images every this many epochs (5 typical; 0: off).",
        "validation every N epochs (0 = off)", min=0, max=10_000, commands=TRAINING),
    Setting("validation_steps", "int", _T.validation_steps,
        "Sampling steps used to restore the held-out images during validation; 0: as the Restore node "
        "does (8 for bridge modes, 28 for kontext).",
        "sampling steps during validation (0 = as restoring: 8 bridge, 28 kontext)", min=0, max=100,
        commands=TRAINING),
    Setting("seed", "int", _T.seed,
        "Random seed: the same seed gives the same split, degradations, training and sampling noise.",
        "seed of split, degradations, LoRA init and noise", min=0, max=MAX_SEED),
    Setting("formulation", "choice", _T.formulation,
        "bridge (default): start from the degraded image; kontext: from noise; shortened: from it "
        "mixed with noise at sigma 0.6; both see it as reference. bridge_ref restores only.",
        "flow-matching formulation (bridge_ref is no longer trained: its reference gives the target away)", choices=TRAINABLE_FORMULATIONS, commands=TRAINING),
    Setting("bridge_noise", "float", _T.bridge_noise,
        "Noise added to the degraded start of a bridge (0: none). "
        "Restoring uses the LoRA's value.",
        "noise added to the bridge start", min=0.0, max=1.0, step=0.01, commands=TRAINING),
    Setting("timestep_sampling", "choice", _T.timestep_sampling,
        "How training picks points on the way from degraded to clean (shifted_uniform typical).",
        "training sigma distribution", choices=TIMESTEP_SAMPLING, commands=TRAINING),
    Setting("logit_mean", "float", _T.logit_mean, "Centre of the logit-normal timestep distribution (0).",
        "logit-normal mean", min=-5.0, max=5.0, surfaces=COMMAND_ONLY, commands=TRAINING),
    Setting("logit_std", "float", _T.logit_std, "Spread of the logit-normal timestep distribution (1).",
        "logit-normal std", min=0.01, max=10.0, surfaces=COMMAND_ONLY, commands=TRAINING),
    Setting("loss_weighting", "choice", _T.loss_weighting,
        "How the loss weighs points along the path (none typical).", "loss weighting",
        choices=LOSS_WEIGHTING, commands=TRAINING),
    Setting("weight_decay", "float", _T.weight_decay, "AdamW weight decay (0.01).", "AdamW weight decay",
        min=0.0, max=1.0, surfaces=COMMAND_ONLY, commands=TRAINING),
    Setting("max_grad_norm", "float", _T.max_grad_norm, "Gradient clipping norm (1.0; 0: off).",
        "gradient clipping (0 = off)", min=0.0, max=1000.0, surfaces=COMMAND_ONLY, commands=TRAINING),
    Setting("lora_targets", "choice", _T.lora_targets,
        "Layers that get LoRA adapters: blocks (typical), blocks+modulation, or all_linear (more "
        "capacity, more memory).", "layers that get LoRA adapters", choices=tuple(TARGET_SETS),
        commands=TRAINING),
    Setting("gradient_checkpointing", "choice", _T.gradient_checkpointing,
        "Recompute blocks' activations during the backward pass: less memory, slower. auto: the memory "
        "plan recomputes only as many blocks as the GPU's free memory needs; on: all; off: none.",
        "recompute blocks in backward: auto (as many as the GPU needs), on (all), off",
        choices=CHECKPOINTING_MODES, commands=TRAINING, legacy=checkpointing_mode),
    Setting("lora_dtype", "choice", _T.lora_dtype,
        "Precision of the trained LoRA weights (float32 typical).", "LoRA weights dtype",
        choices=tuple(LORA_DTYPES), commands=TRAINING),
    Setting("optimizer", "choice", _T.optimizer,
        "adamw (typical); adam; adafactor (least memory); prodigy (sets its own step size: use "
        "learning_rate 1.0; needs pip install prodigyopt); adamw8bit (8-bit state; needs pip install "
        "bitsandbytes).", "optimizer (prodigy: pip install prodigyopt; adamw8bit: pip install bitsandbytes)",
        choices=OPTIMIZERS, commands=TRAINING),
    Setting("adapter", "choice", _T.adapter,
        "Kind of adapter: lora (typical); lokr (Kronecker product, far fewer numbers for its rank); "
        "loha (Hadamard product, more expressive per number, slower). All load with ComfyUI's Load LoRA.",
        "adapter kind (lora, lokr, loha)", choices=ADAPTER_KINDS, commands=TRAINING),
    Setting("loss", "choice", _T.loss,
        "How the error in the predicted velocity is measured: mse (typical), l1, or huber (mse for small "
        "errors, l1 for large ones).", "training loss", choices=LOSSES, commands=TRAINING),
    Setting("huber_delta", "float", _T.huber_delta, "Huber loss: where it turns from squared to linear (1.0).",
        "Huber loss delta", min=1e-4, max=100.0, surfaces=COMMAND_ONLY, commands=TRAINING),
    Setting("validate_every_steps", "int", _T.validate_every_steps,
        "Restore and score the held-out images every this many steps instead of every few epochs "
        "(0: use validate_every_epochs).", "validation every N steps (0 = every N epochs instead)",
        min=0, max=1_000_000, commands=TRAINING),
    Setting("checkpoint_loras", "bool", _T.checkpoint_loras,
        "Also save each checkpoint as a LoRA file in loras/<lora name>/, so LoRA pickers list it "
        "(the newest keep_checkpoints are kept).", "checkpoints also as LoRA files in LORAS/<name>/",
        commands=TRAINING),
)  # fmt: skip
