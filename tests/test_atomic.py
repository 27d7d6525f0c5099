"""Atomic writes: all or nothing under the real name, ordinary permissions."""

from __future__ import annotations

import os

import pytest
import torch

from kontext_train.files.atomic import WriteError, atomic_path, atomic_write_csv, atomic_write_text


def test_written_file_has_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "a" / "report.json", "{}")
    finally:
        os.umask(old)
    assert path.read_text() == "{}"
    assert (path.stat().st_mode & 0o777) == 0o644  # not mkstemp's 0600: others on a server can read it


def test_lora_and_cache_files_written_by_safetensors_get_umask_permissions(tmp_path):
    """safetensors' save_file (0.8) replaces the temporary file by a new one of mode 0600; the
    LoRA, its checkpoints and the latent cache are still written like every other file."""
    import torch

    from kontext_train.method.lora import atomic_save_safetensors

    old = os.umask(0o022)
    try:
        path = atomic_save_safetensors({"w": torch.zeros(2)}, tmp_path / "lora.safetensors", {"k": "v"})
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]


def test_failure_inside_the_block_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "lora.safetensors"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]


def test_the_umask_in_force_at_write_time_applies_and_is_left_alone(tmp_path):
    # ComfyUI's server is threaded: the module must not set (or cache) the process-wide umask.
    old = os.umask(0o077)
    try:
        path = atomic_write_text(tmp_path / "private.json", "{}")
        assert os.umask(0o077) == 0o077  # still what this test set
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o600


def test_csv_rows_with_columns_in_order_of_first_appearance(tmp_path):
    path = atomic_write_csv(
        tmp_path / "rows.csv", [{"step": 1, "psnr": 20.5, "images": [1]}, {"step": 2, "ssim": 0.5}]
    )
    assert path.read_text().splitlines() == ["step,psnr,ssim", "1,20.5,", "2,,0.5"]


def _fail_with(error):
    def write(tmp):
        tmp.write_bytes(b"half")
        raise error

    return write


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4736 vs 4624"),
    ],
)
def test_a_full_disk_is_one_line_naming_the_file_and_folder(tmp_path, error):
    target = tmp_path / "run" / "lora.safetensors"
    atomic_write_text(target, "previous")
    with pytest.raises(WriteError) as e:
        with atomic_path(target) as tmp:
            _fail_with(error)(tmp)
    message = str(e.value)
    assert "\n" not in message and "lora.safetensors" in message and str(target.parent) in message
    assert "space" in message
    assert isinstance(e.value, ValueError)  # shown by the command like every user-facing error
    assert target.read_text() == "previous"
    assert sorted(p.name for p in target.parent.iterdir()) == ["lora.safetensors"]


def test_other_errors_pass_unchanged(tmp_path):
    with pytest.raises(RuntimeError, match="something else"):
        with atomic_path(tmp_path / "a.txt"):
            raise RuntimeError("something else")
    with pytest.raises(PermissionError):
        with atomic_path(tmp_path / "b.txt"):
            raise PermissionError(13, "Permission denied")


def test_a_folder_in_the_way_is_a_clear_error(tmp_path):
    target = tmp_path / "entry.safetensors"
    (target / "inner").mkdir(parents=True)
    with pytest.raises(WriteError, match="a folder of that name is in the way") as e:
        atomic_write_text(target, "x")
    assert str(target) in str(e.value)
    assert (target / "inner").is_dir()


def test_a_full_disk_under_safetensors_names_the_lora_file(tmp_path, monkeypatch):
    # safetensors raises SafetensorError (no OSError, no file name) on a full disk.
    from safetensors import SafetensorError

    from kontext_train.method import lora

    def full(*args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(lora, "save_file", full)
    target = tmp_path / "loras" / "mine.safetensors"
    with pytest.raises(WriteError) as e:
        lora.atomic_save_safetensors({"a": torch.zeros(2)}, target, {})
    message = str(e.value)
    assert "\n" not in message and "mine.safetensors" in message and str(target.parent) in message
    assert "no space left on device" in message and "free some space" in message
    assert list(target.parent.iterdir()) == []
