"""Where the nodes may write: a path is accepted only if, after resolving symlinks and ``..``, it
lies inside one of the allowed folders (ComfyUI's output, temp, user and loras folders, looked up
by ``comfyui.host.writable_folders``). The command is not limited: it writes where its user says."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["OutsideAllowedFolders", "check_inside"]


class OutsideAllowedFolders(ValueError):
    pass


def check_inside(path: str | os.PathLike, roots: Iterable[str | os.PathLike], what: str, value=None) -> Path:
    """``path`` resolved, or OutsideAllowedFolders naming ``what``/``value`` and the allowed folders.

    Both sides are resolved, so a symlink inside an allowed folder that points elsewhere is refused,
    and an allowed folder that is itself a symlink still accepts what is inside it."""
    resolved = Path(path).expanduser().resolve()
    allowed = [Path(r).expanduser().resolve() for r in roots]
    if any(resolved == root or resolved.is_relative_to(root) for root in allowed):
        return resolved
    shown = value if value is not None else str(path)
    raise OutsideAllowedFolders(
        f"{what} {shown!r} resolves to {resolved}, outside the folders ComfyUI nodes may write to "
        f"({', '.join(str(r) for r in allowed)}). Give a folder inside one of them, e.g. a name "
        "relative to the output folder."
    )
