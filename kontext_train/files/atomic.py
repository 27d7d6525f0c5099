"""Writing files so that a crash, a cancel or a full disk never leaves half a file under the real
name: write beside the target under a temporary name, then rename (atomic on one filesystem)."""

from __future__ import annotations

import csv
import errno
import io
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

# Length of the random part of a temporary name (hex digits).
_RANDOM_CHARS = 8

# errno values that mean "no room": the disk, or the user's quota.
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
# torch.save reports a failed write as RuntimeError from its zip writer, without the errno.
_TORCH_WRITE_FAILED = ("inline_container", "unexpected pos", "file write failed", "PytorchStreamWriter")
# safetensors reports it as SafetensorError('Error while serializing: IoError(Os { code: 28, kind:
# StorageFull, message: "No space left on device" })'): no OSError, no file name.
_NO_SPACE_TEXT = (
    "No space left on device",
    "StorageFull",
    "Disk quota exceeded",
    "QuotaExceeded",
    "FileTooLarge",
)


class WriteError(OSError, ValueError):
    """A file could not be written, in one line naming it (a ValueError too, so the command and
    the nodes show it like any other user-facing error)."""


def _write_failure(exc: BaseException, path: Path) -> WriteError | None:
    """A one-line error for a full disk (or quota) while writing ``path``; None for other errors."""
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        reason = exc.strerror or "no space left"
    elif isinstance(exc, RuntimeError) and any(s in str(exc) for s in _TORCH_WRITE_FAILED):
        reason = "the write stopped short, most likely no space left"
    elif not isinstance(exc, OSError) and any(s in str(exc) for s in _NO_SPACE_TEXT):
        reason = "no space left on device"
    else:
        return None
    return WriteError(
        f"Could not write {path.name} in {path.parent}: {reason}. Nothing was replaced (any previous "
        "file there is intact); free some space on that disk and run again."
    )


@contextmanager
def reporting_write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turns a full disk while writing ``path`` into one clear line (WriteError)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - only a full disk is replaced, everything else re-raised
        clear = _write_failure(e, Path(path))
        if clear is None:
            raise
        raise clear from None


def temporary_name(name: str, suffix: str = ".tmp", token: str | None = None) -> str:
    """The name ``atomic_path`` gives the temporary file of ``name``; with no ``token``, one of
    the same length as the real ones (for checking name lengths before any work)."""
    return f".{name}.{token or 'x' * _RANDOM_CHARS}{suffix}"


def _create_temporary(path: Path, suffix: str) -> Path:
    # Created with mode 0o666 so the kernel applies the process's umask (and a folder's default
    # ACL) itself: mkstemp's 0600 would need a chmod, and reading the umask means setting it,
    # which races with other threads (ComfyUI's server is threaded).
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.with_name(temporary_name(path.name, suffix, secrets.token_hex(_RANDOM_CHARS // 2)))
        try:
            os.close(os.open(tmp, flags, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {path}")


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a temporary path in the target's folder; it replaces ``path`` if the block succeeds
    and is removed if it raises. The result gets the permissions of any new file (umask), also
    when the block's writer replaced the temporary file by one of its own: safetensors'
    ``save_file`` (0.8) writes a new file with mode 0600, which is put back to the created one."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        # Checked first, so no work is spent on a file that could never replace the folder.
        raise WriteError(
            f"Cannot write {path}: a folder of that name is in the way. Move or delete that folder and run again."
        )
    with reporting_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temporary(path, suffix)
        mode = os.stat(tmp).st_mode & 0o7777
    try:
        with reporting_write_errors(path):
            yield tmp
            if os.stat(tmp).st_mode & 0o7777 != mode:
                os.chmod(tmp, mode)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_csv(
    path: str | os.PathLike, rows: Iterable[Mapping], columns: Sequence[str] | None = None
) -> Path:
    """Rows as CSV with a header. Without ``columns``: every scalar key, in order of first
    appearance (lists and dicts are left to the JSON beside it)."""
    rows = list(rows)
    if columns is None:
        found: list[str] = []
        for row in rows:
            found += [k for k in row if k not in found and not isinstance(row[k], (list, dict))]
        columns = found
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())
