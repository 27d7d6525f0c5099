"""Training settings (``TrainConfig``): what a run is, checked against the settings table."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

LORA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LR_SCHEDULES = ("cosine", "constant_with_warmup", "linear")


@dataclass
class TrainConfig:
    """Training settings. Defaults follow the original design note where it had one.

    Every field is a row of the settings table (``kontext_train.options``), which holds its range,
    tooltip and help; construction checks each value there (finite, in range, a valid choice).
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
    gradient_checkpointing: bool = True
    lora_dtype: str = "float32"

    # Settings that may change between a run and its resume; everything else must match.
    RESUMABLE_CHANGES = (
        "steps",
        "checkpoint_every",
        "keep_checkpoints",
        "validate_every_epochs",
        "validation_steps",
    )

    def __post_init__(self) -> None:
        # Imported here: the settings table reads its defaults from this class.
        from .flow import check_formulation
        from ..options import check_settings

        # 0 is how the node's widget says "no alpha" (alpha = rank); one meaning on every surface.
        if self.alpha is not None and not isinstance(self.alpha, bool) and self.alpha == 0:
            self.alpha = None
        check_settings({f.name: getattr(self, f.name) for f in fields(self)})
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
        defaults. Values are checked against the settings table."""
        return cls.from_dict(inputs)
