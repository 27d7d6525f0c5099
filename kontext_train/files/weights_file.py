"""Checking a weights file before a loader reads it: a file cut short (an interrupted download)
or not a safetensors file at all is one line naming the file, not a loader's traceback."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

__all__ = ["UnreadableWeights", "check_safetensors"]


class UnreadableWeights(ValueError):
    """A weights file that cannot be read; the message names it and says what to do."""


def check_safetensors(path: str | Path, label: str) -> None:
    """Reads the header of a ``.safetensors`` file (cheap: no tensor is loaded). safetensors
    checks there that the file holds every byte its header lists, so a truncated file is caught.
    Other file types are left to their loader."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as e:  # SafetensorError, or OSError for an unreadable file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnreadableWeights(
            f"{label} file {path} cannot be read ({reason}): it is cut short or not a safetensors file; "
            "download it again."
        ) from None
