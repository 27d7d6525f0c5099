"""Atomic writes: all or nothing under the real name, ordinary permissions."""

from __future__ import annotations

import os

import pytest

from kontext_train.atomic import atomic_path, atomic_write_text


def test_written_file_has_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "a" / "report.json", "{}")
    finally:
        os.umask(old)
    assert path.read_text() == "{}"
    assert (path.stat().st_mode & 0o777) == 0o644  # not mkstemp's 0600: others on a server can read it


def test_failure_inside_the_block_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "lora.safetensors"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]
