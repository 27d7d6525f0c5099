"""Checks a training run makes before any work: the names it will write fit the filesystem, what it
trains on (the dataset fingerprint), and whether it starts, continues or is already finished.

The rules (see ``plan_run``):

* a new run never overwrites an existing LoRA file: it is refused, naming the file;
* resume off refuses a run folder that already holds checkpoints (nothing is overwritten);
* resume on continues the latest checkpoint only if it was trained on the same data (content
  hashes and relative names of every image, the held-out split, the synthetic degradation, the
  bucket scale and the degradation seed) and with compatible settings;
* a run whose checkpoint is already at the final step, with its LoRA file in place, is finished:
  nothing is trained or written again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..data.degradations import describe
from ..data.latent_cache import file_sha256
from ..files.atomic import temporary_name
from ..method.train_config import TrainConfig, check_resume_compatible
from ..method.training_prompt import same_prompt
from .checkpoints import (
    CheckpointError,
    checkpoint_step,
    find_resumable,
    latest_checkpoint,
    partial_checkpoint_dir,
)
from .validation import validation_report_paths

__all__ = [
    "ResumePlan",
    "RunError",
    "check_output_names",
    "check_resume_prompt",
    "dataset_identity",
    "plan_run",
]

log = logging.getLogger("kontext_restore")

# Fallback where the filesystem does not say (Windows has no pathconf): the common limit.
_DEFAULT_NAME_MAX = 255
_DEFAULT_PATH_MAX = 4096


class RunError(ValueError):
    """A run that must not start, with what to do about it."""


# -- names ---------------------------------------------------------------------------------


def _limit(folder: Path, which: str, default: int) -> int:
    existing = next((p for p in [folder, *folder.parents] if os.path.isdir(p)), None)
    try:
        return int(os.pathconf(existing or ".", which))
    except (AttributeError, OSError, ValueError):
        return default


def derived_paths(lora_path: Path, run_dir: Path, steps: int) -> list[Path]:
    """Every path of the run whose name is derived from the LoRA name or the run folder, with
    its temporary twin (``atomic_path``), longest names included."""
    lora_path, run_dir = Path(lora_path), Path(run_dir)
    paths = [lora_path, lora_path.with_name(temporary_name(lora_path.name, ".safetensors.tmp"))]
    for report in validation_report_paths(lora_path):
        paths += [report, report.with_name(temporary_name(report.name))]
    partial = partial_checkpoint_dir(run_dir, steps)
    paths += [partial / "lora.safetensors", partial / temporary_name("lora.safetensors", ".safetensors.tmp")]
    paths.append(run_dir / temporary_name("loss_history.json"))
    return paths


def check_output_names(lora_path: Path, run_dir: Path, steps: int) -> None:
    """Refuses (RunError) a LoRA name or run folder whose derived file names the filesystem
    cannot hold, before anything is trained or written."""
    worst = None  # (bytes over the limit, name, folder, limit)
    for path in derived_paths(lora_path, run_dir, steps):
        name_max = _limit(path.parent, "PC_NAME_MAX", _DEFAULT_NAME_MAX)
        for part in path.parts:
            over = len(os.fsencode(part)) - name_max
            if over > 0 and (worst is None or over > worst[0]):
                worst = (over, part, path.parent, name_max)
        path_max = _limit(path.parent, "PC_PATH_MAX", _DEFAULT_PATH_MAX)
        if len(os.fsencode(str(path.absolute()))) >= path_max:
            raise RunError(
                f"The path {path} would be longer than the {path_max} bytes the filesystem allows: "
                "choose a shorter LoRA name or output folder."
            )
    if worst is not None:
        over, part, folder, name_max = worst
        stem = Path(lora_path).name.removesuffix(".safetensors")
        raise RunError(
            f"The LoRA name {Path(lora_path).name!r} is too long: the run would write {part!r} "
            f"({len(os.fsencode(part))} bytes), but file names in {folder} are limited to {name_max} bytes. "
            f"Choose a name of at most {max(1, len(os.fsencode(stem)) - over)} bytes (before .safetensors)."
        )


# -- what the run trains on ----------------------------------------------------------------


def dataset_identity(dataset, seed: int) -> dict[str, str]:
    """A fingerprint of the training data and a description a person can read.

    The fingerprint covers every image's relative name and content hash (and its paired LQ
    file's), which images are held out, the bucket scale, and for synthetic degradations the
    degradation settings and seed: everything that changes the latents the run learns from.
    Moving or renaming the dataset folder keeps it.
    """
    synthetic = any(s.lq_path is None for s in dataset.train + dataset.val)

    def files(samples) -> list:
        return [
            [s.key, file_sha256(s.hq_path), file_sha256(s.lq_path) if s.lq_path else None] for s in samples
        ]

    record = {
        "train": files(dataset.train),
        "val": files(dataset.val),
        "bucket_scale": float(dataset.bucket_scale),
        "degradation": dataset.degradation.to_dict() if synthetic else None,
        "seed": int(seed) if synthetic else None,
    }
    fingerprint = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    source = f"paired LQ from {dataset.lq_dir}" if dataset.lq_dir else describe(dataset.degradation)
    description = (
        f"{dataset.hq_dir} ({len(dataset.train)} training + {len(dataset.val)} held-out images; {source}; "
        f"bucket scale {dataset.bucket_scale:g}" + (f"; seed {seed}" if synthetic else "") + ")"
    )
    return {"fingerprint": fingerprint, "description": description}


# -- start, continue or finished -----------------------------------------------------------


@dataclass(frozen=True)
class ResumePlan:
    checkpoint: Path | None  # the checkpoint to continue from; None: a new run
    step: int = 0
    complete: bool = False  # at the final step with its LoRA written: nothing to do
    trained_prompt: str | None = None  # the prompt the checkpoint was trained with, when recorded


def plan_run(
    run_dir: Path, lora_path: Path, resume: bool, identity: dict[str, str], config: TrainConfig
) -> ResumePlan:
    """What this run will do, or RunError when it would overwrite or mix up another run's work."""
    run_dir, lora_path = Path(run_dir), Path(lora_path)
    latest = latest_checkpoint(run_dir)
    if latest is None:
        if lora_path.exists():
            raise RunError(
                f"The LoRA {lora_path} already exists and its run folder {run_dir} holds no checkpoint to "
                "continue: a new run does not overwrite it. Choose another LoRA name, or move that file away."
            )
        return ResumePlan(None)
    if not resume:
        raise RunError(
            f"{run_dir} already holds a run (checkpoint at step {checkpoint_step(latest)}) and resume is "
            "off: nothing was overwritten. Turn resume on to continue it, or choose another LoRA name / "
            "output folder."
        )
    try:  # falls back past unreadable checkpoints, with a warning naming them
        latest, _, state = find_resumable(run_dir)
    except CheckpointError as e:
        raise RunError(str(e)) from None
    saved = state.get("dataset")
    if not saved:
        log.warning(
            "Checkpoint %s records no dataset fingerprint (written by an older version): the dataset "
            "cannot be compared with the one it was trained on.",
            latest,
        )
    elif saved.get("fingerprint") != identity["fingerprint"]:
        raise RunError(
            f"Cannot resume {run_dir}: its checkpoint (step {state.get('step')}) was trained on "
            f"{saved.get('description')} [fingerprint {str(saved.get('fingerprint'))[:12]}], but this run's "
            f"dataset is {identity['description']} [fingerprint {identity['fingerprint'][:12]}]. Use the "
            "original dataset and settings to continue, or choose another LoRA name for a new run."
        )
    try:
        check_resume_compatible(state.get("config", {}), config)
    except ValueError as e:
        raise RunError(str(e)) from None
    step = int(state.get("step", checkpoint_step(latest)))
    complete = step >= config.steps and lora_path.is_file()
    return ResumePlan(latest, step, complete, trained_prompt=(saved or {}).get("prompt"))


def check_resume_prompt(plan: ResumePlan, run_dir: Path, prompt: str | None) -> None:
    """RunError when a resumed run would continue under another prompt than its checkpoint was
    trained with: the LoRA would learn half its steps under each conditioning. Nothing to compare
    when either prompt is unknown (older checkpoints; a prompt built by other nodes)."""
    if plan.checkpoint is None or not prompt or not plan.trained_prompt:
        return
    if not same_prompt(prompt, plan.trained_prompt):
        raise RunError(
            f"Cannot resume {run_dir}: its checkpoint (step {plan.step}) was trained with the prompt "
            f"{plan.trained_prompt!r}, this run gives {prompt!r}. Use the original prompt to continue, "
            "or choose another LoRA name for a new run."
        )
