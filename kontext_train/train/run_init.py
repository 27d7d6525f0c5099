"""Where a run's adapters come from: its own checkpoint when resuming, else an ``init_lora`` file
(``method/lora_init.py`` reads it), else fresh ones; and the error a file the model cannot take
becomes (a ``RunError``, a message for the user)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from .run_checks import RunError


def init_state(checkpoint: Path | None, init_lora: Path | None):
    """(kohya state dict, its file name, whether it is the checkpoint's) the adapters are built
    from, or None for fresh adapters: the checkpoint's LoRA when resuming (its layout is the
    run's), else the ``init_lora`` file."""
    from safetensors.torch import load_file

    path = Path(checkpoint) / "lora.safetensors" if checkpoint is not None else init_lora
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise RunError(f"init_lora {path}: no such file; give a LoRA file (.safetensors).")
    try:
        return load_file(str(path)), path.name, checkpoint is not None
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise RunError(f"init_lora {path} cannot be read as safetensors ({e}).") from e


@contextlib.contextmanager
def init_errors(init):
    """An init_lora file the model cannot take becomes a RunError (a message for the user)."""
    try:
        yield
    except ValueError as e:
        if init is not None and not init[2]:
            raise RunError(str(e)) from None
        raise
