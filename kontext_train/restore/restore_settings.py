"""How to restore with a LoRA: one settings object, built from what the LoRA file records.

The trainer writes its settings into the LoRA's safetensors metadata (``trainer.lora_metadata``:
``kontext_restore.formulation``, ``.bridge_noise``, ``.guidance``, the time shift line
``.base_shift``/``.max_shift``, ``.config`` as JSON, plus the run's extras such as
``.bucket_scale`` and the training ``.prompt``). Restoring well means sampling the way the LoRA was
trained, so the Restore node, ``kontext-train restore/evaluate`` and validation during training all
build one ``RestoreSettings`` here instead of each reading (or asking for) the values again.

Each value comes from, in this order: an explicit user setting, the LoRA's metadata, the default.
Metadata that is missing or unusable (not a number, out of range, broken JSON) never stops a
restore: the value is ignored with a warning that names the file, the key and what was found,
and the default is used. A prompt that differs from the one the LoRA was trained with is kept
and warned about (``training_prompt.prompt_mismatch``). Two cases are errors: a file whose
safetensors header cannot be read at all (its weights cannot be loaded either), and ``mode``
``auto`` on a LoRA whose formulation is missing or unknown, because no default can be right there
(sampling a noise-start LoRA from the degraded image, or the reverse, gives garbage).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..data.buckets import BUCKET_SCALE
from ..method.flow import (
    FORMULATIONS,
    check_choice,
    flux_shift_mu,
    image_tokens,
    sampling_sigmas,
    start_sigma,
    starts_from_degraded,
)
from ..method.train_config import TRAIN_SETTINGS, TrainConfig
from ..method.training_prompt import PROMPT_KEY, prompt_mismatch
from ..setting import NODE_ONLY, Setting, check_values

log = logging.getLogger("kontext_restore")

METADATA_PREFIX = "kontext_restore."  # the trainer's prefix (trainer.METADATA_PREFIX)
MODES = ("auto",) + FORMULATIONS
AS_TRAINED = "as_trained"
BRIDGE_STEPS = 8
KONTEXT_STEPS = 28

# Without a LoRA (or with one that records nothing usable): the training defaults, read from
# where they live so restoring and training cannot drift apart (tests/test_defaults.py).
DEFAULT_FORMULATION = TrainConfig.formulation
DEFAULT_GUIDANCE = TrainConfig.guidance
DEFAULT_BUCKET_SCALE = BUCKET_SCALE.default  # what training uses unless told otherwise
# The line flow.flux_shift_mu draws through (256 tokens, base) and (4096 tokens, max): the
# resolution-dependent time shift training samples sigmas with.
DEFAULT_BASE_SHIFT = 0.5
DEFAULT_MAX_SHIFT = 1.15
MIN_BUCKET_SCALE, MAX_BUCKET_SCALE = BUCKET_SCALE.min, BUCKET_SCALE.max

FROM_USER, FROM_LORA, FROM_DEFAULT = "user", "LoRA metadata", "default"


# --------------------------------------------------------------------------------------------
# What a LoRA file says
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraRecord:
    """The restore-relevant settings a LoRA file records (``None`` where it records nothing usable)."""

    path: str
    formulation: str | None = None  # as written; may be a name this version does not know
    bridge_noise: float | None = None
    guidance: float | None = None
    bucket_scale: float | None = None
    base_shift: float | None = None
    max_shift: float | None = None
    prompt: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def from_kontext_restore(self) -> bool:
        return self.formulation is not None


def _number(raw: Any, key: str, path: str, warnings: list[str], low=None, high=None, low_open=False):
    """``raw`` as a float within [low, high] ((low, high] with ``low_open``), else None and a warning."""
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bounds = ""
        if low is not None or high is not None:
            bounds = f" in {'(' if low_open else '['}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        warnings.append(
            f"LoRA {path}: metadata {key}={raw!r} is not a finite number{bounds}; ignored (the default is used)."
        )
        return None
    return value


def lora_record_from_metadata(metadata: Mapping[str, str], path: str = "<lora>") -> LoraRecord:
    """Reads the trainer's keys. Top-level keys win over the same setting inside ``.config``;
    ``.config`` also supplies ``base_shift``/``max_shift`` when a trainer records them."""
    warnings: list[str] = []
    config: dict = {}
    raw_config = metadata.get(METADATA_PREFIX + "config")
    if raw_config:
        try:
            parsed = json.loads(raw_config)
        except (TypeError, ValueError):
            parsed = None
        if isinstance(parsed, dict):
            config = parsed
        else:
            warnings.append(f"LoRA {path}: metadata {METADATA_PREFIX}config is not a JSON object; ignored.")

    def raw(name: str):
        value = metadata.get(METADATA_PREFIX + name)
        return value if value not in (None, "") else config.get(name)

    formulation = raw("formulation")
    if formulation is not None and not isinstance(formulation, str):
        warnings.append(f"LoRA {path}: metadata formulation={formulation!r} is not a name; ignored.")
        formulation = None
    prompt = metadata.get(METADATA_PREFIX + PROMPT_KEY)
    if prompt is not None and not (isinstance(prompt, str) and prompt.strip()):
        warnings.append(f"LoRA {path}: metadata {PROMPT_KEY}={prompt!r} is not a prompt; ignored.")
        prompt = None
    record = LoraRecord(
        path=path,
        formulation=formulation or None,
        bridge_noise=_number(raw("bridge_noise"), "bridge_noise", path, warnings, low=0.0),
        guidance=_number(raw("guidance"), "guidance", path, warnings, low=0.0),
        bucket_scale=_number(
            raw("bucket_scale"), "bucket_scale", path, warnings, low=MIN_BUCKET_SCALE, high=MAX_BUCKET_SCALE
        ),
        base_shift=_number(raw("base_shift"), "base_shift", path, warnings),
        max_shift=_number(raw("max_shift"), "max_shift", path, warnings),
        prompt=prompt,
        warnings=tuple(warnings),
    )
    if not record.from_kontext_restore and not warnings:
        record = replace(
            record,
            warnings=(
                f"LoRA {path} has no '{METADATA_PREFIX}formulation' metadata (it was not trained by Kontext "
                "Restore, or the metadata was stripped): its training settings are unknown, defaults are used.",
            ),
        )
    return record


def read_lora_record(path: str | Path) -> LoraRecord:
    """The settings stored in a LoRA file's safetensors header."""
    from ..method.lora import read_metadata

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"LoRA file not found: {p}")
    try:
        metadata = read_metadata(p)
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ValueError(
            f"Cannot read {p} as a safetensors LoRA ({e}). Is it a complete .safetensors file?"
        ) from e
    return lora_record_from_metadata(metadata, str(p))


# --------------------------------------------------------------------------------------------
# The settings a restore runs with
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreSettings:
    """Everything that decides how an image is restored. ``sources`` says where each value of a
    resolved object came from (user, LoRA metadata, default, automatic)."""

    formulation: str = DEFAULT_FORMULATION
    bridge_noise: float = 0.0
    guidance: float = DEFAULT_GUIDANCE
    bucket_scale: float = DEFAULT_BUCKET_SCALE
    base_shift: float = DEFAULT_BASE_SHIFT
    max_shift: float = DEFAULT_MAX_SHIFT
    prompt: str | None = None
    steps: int = BRIDGE_STEPS
    sampler: str = "euler"
    scheduler: str = AS_TRAINED
    seed: int = 0
    lora_path: str | None = None
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        check_choice("formulation", self.formulation, FORMULATIONS)
        # The ranges the nodes and the command use (NaN guidance once gave black restores).
        check_values(
            {"guidance": self.guidance, "bridge_noise": self.bridge_noise, "bucket_scale": self.bucket_scale},
            (*TRAIN_SETTINGS, BUCKET_SCALE),
        )
        if not (math.isfinite(self.base_shift) and math.isfinite(self.max_shift)):
            raise ValueError(
                f"base_shift and max_shift must be finite, got {self.base_shift}, {self.max_shift}"
            )
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")

    def mu(self, latent_height: int, latent_width: int) -> float:
        """The time shift training used at this latent size (the same function as the trainer)."""
        return flux_shift_mu(image_tokens(latent_height, latent_width), self.base_shift, self.max_shift)

    def as_trained_sigmas(self, latent_height: int, latent_width: int) -> torch.Tensor:
        """``steps`` + 1 sigmas from the formulation's start (1, or sigma0) to 0 on the training clock
        for this latent size."""
        return sampling_sigmas(
            self.steps, self.mu(latent_height, latent_width), start_sigma(self.formulation)
        )

    def with_seed(self, seed: int) -> RestoreSettings:
        return replace(self, seed=int(seed))

    @classmethod
    def from_train_config(cls, config: Any) -> RestoreSettings:
        """The settings validation restores with during training: the run's own (a ``TrainConfig``)."""
        return cls(
            formulation=config.formulation,
            bridge_noise=float(config.bridge_noise),
            guidance=float(config.guidance),
            # 0 (the default): the steps the Restore node takes for this formulation.
            steps=resolve_steps(int(config.validation_steps), config.formulation),
            seed=int(getattr(config, "seed", 0)),
            sources={"formulation": "training", "bridge_noise": "training", "guidance": "training"},
        )


def resolve_formulation(mode: str, lora: LoraRecord | None) -> str:
    """``auto``: the LoRA's recorded formulation when a LoRA file is given, else the default."""
    check_choice("mode", mode, MODES)
    if mode != "auto":
        return mode
    if lora is None:
        return DEFAULT_FORMULATION
    if lora.formulation is None:
        raise ValueError(
            f"mode is 'auto' but LoRA {lora.path} has no '{METADATA_PREFIX}formulation' metadata "
            "(it was not trained by Kontext Restore). Choose the mode explicitly: bridge, bridge_ref, kontext or shortened."
        )
    if lora.formulation not in FORMULATIONS:
        raise ValueError(
            f"LoRA {lora.path} records formulation {lora.formulation!r}, which this version does not know "
            f"({', '.join(FORMULATIONS)}). Update the pack, or choose the mode explicitly."
        )
    return lora.formulation


def resolve_steps(steps: int, formulation: str) -> int:
    """0 means automatic: a bridge starts at the degraded image and needs few steps; Kontext
    starts from noise and uses its usual 28."""
    if steps < 0:
        raise ValueError(f"steps must be 0 (automatic) or positive, got {steps}")
    if steps:
        return int(steps)
    return BRIDGE_STEPS if starts_from_degraded(formulation) else KONTEXT_STEPS


def resolve_restore_settings(
    lora: LoraRecord | None = None,
    *,
    mode: str = "auto",
    steps: int = 0,
    sampler: str = "euler",
    scheduler: str = AS_TRAINED,
    seed: int = 0,
    guidance: float | None = None,
    bucket_scale: float | None = None,
    bridge_noise: float | None = None,
    prompt: str | None = None,
    log_warnings: bool = True,
) -> RestoreSettings:
    """The settings to restore with. ``None`` means "not set by the user": the LoRA's recorded
    value, else the default. A user value that differs from what the LoRA was trained with is
    kept and warned about. ``prompt`` is the text restored with where it is known (the command's
    --prompt, the prompt a node's conditioning was encoded from); None when it is not.

    Warnings are in ``RestoreSettings.warnings`` and logged (``log_warnings``: off for a caller
    that shows them itself, so they do not appear twice)."""
    formulation = resolve_formulation(mode, lora)
    sources: dict[str, str] = {"formulation": FROM_USER if mode != "auto" else FROM_DEFAULT}
    warnings = list(lora.warnings) if lora is not None else []
    if lora is not None and mode == "auto":
        sources["formulation"] = FROM_LORA
    if lora is not None and lora.formulation and lora.formulation != formulation:
        warnings.append(f"Sampling as {formulation}, but {lora.path} was trained as {lora.formulation}.")

    def pick(name: str, given, default, differs=None):
        recorded = getattr(lora, name, None) if lora is not None else None
        if given is not None:
            sources[name] = FROM_USER
            if recorded is not None and given != recorded:
                message = (
                    differs(given, recorded, lora.path)
                    if differs
                    else f"{name} {given} differs from the {recorded} {lora.path} was trained with."
                )
                if message:
                    warnings.append(message)
            return given
        if recorded is not None:
            sources[name] = FROM_LORA
            return recorded
        sources[name] = FROM_DEFAULT
        return default

    values = {
        "guidance": pick("guidance", guidance, DEFAULT_GUIDANCE),
        "bucket_scale": pick("bucket_scale", bucket_scale, DEFAULT_BUCKET_SCALE),
        "bridge_noise": pick("bridge_noise", bridge_noise, 0.0),
        "base_shift": pick("base_shift", None, DEFAULT_BASE_SHIFT),
        "max_shift": pick("max_shift", None, DEFAULT_MAX_SHIFT),
        "prompt": pick("prompt", prompt, None, differs=prompt_mismatch),
    }
    sources["steps"] = FROM_USER if steps else "automatic"
    sources.update(sampler=FROM_USER, scheduler=FROM_USER, seed=FROM_USER)
    for message in warnings if log_warnings else ():
        log.warning("Kontext Restore: %s", message)
    return RestoreSettings(
        formulation=formulation,
        steps=resolve_steps(steps, formulation),
        sampler=sampler,
        scheduler=scheduler,
        seed=int(seed),
        lora_path=lora.path if lora is not None else None,
        sources=sources,
        warnings=tuple(warnings),
        **values,
    )


# The rows of the settings table for what a user sets on a restore (0 and "auto": what the LoRA
# records). The command restores with the training rows ``guidance`` and ``bucket_scale``.
RESTORE_SETTINGS: tuple[Setting, ...] = (
    Setting("mode", "choice", "auto",
        "How to sample: auto uses the formulation recorded in the LoRA (lora_name), else bridge.",
        choices=MODES, surfaces=NODE_ONLY),
    Setting("restore_steps", "int", 0,
        "Sampling steps to restore (0: automatic, 8 for bridge LoRAs and 28 for kontext).",
        "sampling steps to restore (0 = automatic: 8 for bridge LoRAs, 28 for kontext)",
        min=0, max=200, node_name="steps"),
    Setting("sigma_steps", "int", BRIDGE_STEPS, "Sampling steps from the degraded image to the clean one (8).",
        min=1, max=200, surfaces=NODE_ONLY, node_name="steps"),
    Setting("sampler", "choice", "euler", "ComfyUI sampler used to restore (euler typical).",
        "ComfyUI sampler name for restoration", node_name="sampler_name"),
    Setting("scheduler", "choice", AS_TRAINED,
        "as_trained (recommended): from 1 to 0 with the time shift training used; or a ComfyUI scheduler.",
        surfaces=NODE_ONLY),
    Setting("restore_guidance", "float", 0.0,
        "Flux guidance to restore with; 0: the guidance the LoRA was trained with (lora_name), else "
        f"{DEFAULT_GUIDANCE}.",
        min=0.0, max=100.0, step=0.1, surfaces=NODE_ONLY, node_name="guidance"),
    Setting("restore_bucket_scale", "float", 0.0,
        "Resolution scale to restore at (1.0: Kontext's ~1 MP, 0.5: ~512 px); 0: the scale the LoRA was "
        f"trained at (lora_name), else {DEFAULT_BUCKET_SCALE}.", min=0.0, max=4.0, step=0.0625, surfaces=NODE_ONLY,
        node_name="bucket_scale"),
)  # fmt: skip


def read_restore_settings(lora_path: str | Path | None, **given: Any) -> RestoreSettings:
    """``resolve_restore_settings`` for a LoRA file (or none); ``given`` as there."""
    return resolve_restore_settings(read_lora_record(lora_path) if lora_path else None, **given)


def as_trained_sigmas(steps: int, latent_height: int, latent_width: int) -> torch.Tensor:
    """Sigmas 1 -> 0 with the default training time shift at this latent size."""
    return RestoreSettings(steps=steps).as_trained_sigmas(latent_height, latent_width)
