"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a folder ``step_000500`` holding the LoRA (``lora.safetensors``, loadable by
ComfyUI like the final file) and ``state.pt`` (optimizer, schedule, data position, loss and
validation history, settings, and what the run was trained on). No random-generator state is
stored: the trainer draws every sample's randomness from a generator keyed on the step and the
sample's position, so the position is enough to continue exactly. A checkpoint is written under a
temporary name and renamed when complete, so a crash or a cancel mid-write leaves the previous
checkpoint as the latest one. A checkpoint that cannot be read anyway (a truncated file, a key
missing) is moved aside by ``find_resumable``, with a warning, and the run continues from the one
before it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from ..files.atomic import reporting_write_errors
from ..method.lora import LoraAdapter, atomic_save_safetensors, to_kohya_state_dict

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
# What the trainer reads from state.pt to continue a run.
REQUIRED_STATE = ("step", "epoch", "position", "optimizer", "scheduler", "losses", "validation")

log = logging.getLogger("kontext_restore")


class CheckpointError(ValueError):
    pass


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder (``step_000500`` -> 500)."""
    m = _STEP_DIR.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint folder (expected a name like step_000500)")
    return int(m.group(1))


def partial_checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where a checkpoint is assembled before it is renamed into place."""
    final = checkpoint_dir(run_dir, step)
    return final.with_name(f".{final.name}.partial")


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "state.pt").is_file() and (p / "lora.safetensors").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    adapters: Mapping[str, LoraAdapter],
    state: dict,
    metadata: Mapping[str, str],
    keep: int = 3,
    lora_copy: Path | None = None,
) -> Path:
    """Writes checkpoint ``step`` and prunes all but the newest ``keep`` (0: keeps all).

    ``lora_copy``: the checkpoint's LoRA is also written there (``loras/<name>/<name>_step_N``, so
    that LoRA pickers list it); copies of pruned checkpoints in that folder are removed with them.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = partial_checkpoint_dir(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        atomic_save_safetensors(to_kohya_state_dict(adapters), tmp / "lora.safetensors", metadata)
        with reporting_write_errors(tmp / "state.pt"):
            torch.save(state, tmp / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if lora_copy is not None:
        Path(lora_copy).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(final / "lora.safetensors", Path(lora_copy).with_name(Path(lora_copy).name + ".tmp"))
        os.replace(Path(lora_copy).with_name(Path(lora_copy).name + ".tmp"), lora_copy)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    if lora_copy is not None and keep > 0:
        prune_lora_copies(Path(lora_copy).parent, {checkpoint_step(p) for p in list_checkpoints(run_dir)})
    return final


# The type each field of REQUIRED_STATE must have (a whole number for the counters).
_STATE_TYPES = {
    "step": int,
    "epoch": int,
    "position": int,
    "optimizer": dict,
    "scheduler": dict,
    "losses": list,
    "validation": list,
}


def lora_copies(folder: Path) -> dict[int, Path]:
    """The checkpoint LoRA files in ``folder`` (``<folder name>_step_000500.safetensors``) by step."""
    pattern = re.compile(re.escape(Path(folder).name) + r"_step_(\d{6,})\.safetensors$")
    found = {}
    for p in Path(folder).glob("*.safetensors") if Path(folder).is_dir() else []:
        m = pattern.match(p.name)
        if m:
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def prune_lora_copies(folder: Path, kept_steps: set[int]) -> None:
    """Removes the checkpoint LoRA files in ``folder`` whose checkpoint was pruned."""
    for step, path in lora_copies(folder).items():
        if step not in kept_steps:
            path.unlink(missing_ok=True)


def _read_state(path: Path) -> dict:
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    missing = [k for k in REQUIRED_STATE if k not in state] if isinstance(state, dict) else REQUIRED_STATE
    if missing:
        raise CheckpointError(f"Checkpoint {path} is incomplete: its state.pt lacks {', '.join(missing)}")
    wrong = [
        f"{k} is {type(state[k]).__name__} {state[k]!r:.40}"
        for k, kind in _STATE_TYPES.items()
        if not isinstance(state[k], kind) or (kind is int and (isinstance(state[k], bool) or state[k] < 0))
    ]
    if wrong:
        raise CheckpointError(f"Checkpoint {path} is damaged: in its state.pt {'; '.join(wrong)}.")
    return state


def load_state(path: Path) -> dict:
    """The training state of one checkpoint folder, without its LoRA."""
    path = Path(path)
    try:
        return _read_state(path)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"Checkpoint {path} cannot be read ({e}).") from e


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(kohya LoRA tensors, training state) of one checkpoint folder."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        lora = load_file(str(path / "lora.safetensors"))
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"Checkpoint {path} cannot be read ({e}).") from e
    return lora, load_state(path)


def find_resumable(
    run_dir: Path, move_aside: bool = True
) -> tuple[Path, dict[str, torch.Tensor], dict] | None:
    """(folder, LoRA, state) of the newest checkpoint that reads whole, or None when there is none.

    Newer checkpoints that cannot be read (truncated by a crash of the storage, edited, a key
    missing) are moved aside as ``.step_N.unreadable-<time>`` with a warning naming them, so the
    run continues from the last good one without the user deleting anything. Only one process of a
    distributed run moves (``move_aside``). If no checkpoint reads, CheckpointError names them all.
    """
    bad: list[tuple[Path, CheckpointError]] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            lora, state = load_checkpoint(path)
        except CheckpointError as e:
            bad.append((path, e))
            continue
        for broken, error in bad:
            aside = broken.with_name(f".{broken.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
            if move_aside:
                os.replace(broken, aside)
            log.warning("%s Continuing from %s; the unreadable one was moved to %s.", error, path.name, aside)
        return path, lora, state
    if bad:
        names = "; ".join(str(e) for _, e in bad)
        raise CheckpointError(
            f"No checkpoint in {Path(run_dir) / 'checkpoints'} can be read: {names} Move that folder away "
            "to start the run again (or restore it from a backup)."
        )
    return None
