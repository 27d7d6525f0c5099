"""One run at a time per run folder: a lock file that records who holds it.

``run.lock`` in the run folder holds the pid, the host name and the start time of the process
that trains there. A second run on the same folder is refused with those details. A lock left
behind by a process that no longer exists on this host (killed, crashed) is stale and taken over
with a warning; a lock from another host cannot be checked from here and is never taken over.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..files.atomic import temporary_name
from .run_checks import RunError

__all__ = ["LOCK_NAME", "RunLockedError", "run_lock"]

LOCK_NAME = "run.lock"
log = logging.getLogger("kontext_restore")


class RunLockedError(RunError):
    """Another run holds the run folder."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill would terminate the process there; ask psutil (ComfyUI needs it)
        try:
            import psutil
        except ImportError:
            return True
        return psutil.pid_exists(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read(lock: Path) -> tuple[str, dict | None]:
    try:
        text = lock.read_text(encoding="utf-8")
    except FileNotFoundError:
        return "", None
    try:
        holder = json.loads(text)
    except ValueError:
        return text, None
    return text, holder if isinstance(holder, dict) else None


def _create(lock: Path, text: str) -> bool:
    """Creates the lock with its content in one step (a hard link to a finished file), so no
    other process ever reads a half-written lock. False when the lock exists."""
    tmp = lock.with_name(temporary_name(lock.name, ".new", secrets.token_hex(4)))
    tmp.write_text(text, encoding="utf-8")
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this filesystem: exclusive create, then write
        pass
    finally:
        tmp.unlink()
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return True


def _stale(holder: dict | None) -> bool:
    if holder is None:
        return False
    return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1)))


def _take_over(lock: Path, seen: str) -> None:
    """Removes a stale lock, unless another process replaced it since it was read."""
    grave = lock.with_name(f"{lock.name}.stale.{secrets.token_hex(4)}")
    try:
        os.rename(lock, grave)
    except FileNotFoundError:
        return
    if grave.read_text(encoding="utf-8") != seen:
        # A live run took the lock between the read and the rename: give it back.
        try:
            os.link(grave, lock)
        except OSError:
            pass
    os.unlink(grave)


def acquire(run_dir: Path) -> tuple[Path, str]:
    """Takes the lock of ``run_dir`` (created if needed); (lock path, token to release it)."""
    run_dir = Path(run_dir)
    lock = run_dir / LOCK_NAME
    for path, what in ((run_dir, "folder"), (lock, "lock file")):
        if path.exists() and not (path.is_dir() if what == "folder" else path.is_file()):
            kind = "a folder" if path.is_dir() else "a file" if path.is_file() else "not a regular file"
            raise RunError(
                f"{path} is {kind}, but the run needs it as its {what}: move it away, or choose another "
                "LoRA name / output folder."
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "token": token,
    }
    text = json.dumps(me)
    for _ in range(3):
        if _create(lock, text):
            return lock, token
        seen, holder = _read(lock)
        if not seen and holder is None and not lock.exists():
            continue  # released meanwhile
        if _stale(holder):
            log.warning(
                "Kontext Restore: taking over the stale lock %s of process %s on %s (started %s), "
                "which no longer runs.",
                lock,
                holder.get("pid"),
                holder.get("host"),
                holder.get("started"),
            )
            _take_over(lock, seen)
            continue
        who = (
            f"process {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')})"
            if holder
            else "an unknown process (the lock file is unreadable)"
        )
        raise RunLockedError(
            f"Another training run is using {run_dir}: {who} holds {lock}. Wait for it to finish, or "
            "choose another LoRA name / output folder. If no run is active any more (e.g. it ran on "
            "another machine and was killed), delete the lock file."
        )
    raise RunLockedError(f"Could not take the lock {lock}: other processes keep taking it; try again.")


def release(lock: Path, token: str) -> None:
    """Removes the lock if it is still ours."""
    _, holder = _read(lock)
    if holder and holder.get("token") == token:
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass


@contextmanager
def run_lock(run_dir: Path) -> Iterator[Path]:
    """Holds the lock of ``run_dir`` for the block; RunLockedError if another run holds it."""
    lock, token = acquire(run_dir)
    try:
        yield lock
    finally:
        release(lock, token)
