"""Checkpoint folders: names and steps, unreadable checkpoints, a full disk while saving."""

from __future__ import annotations

import logging

import pytest
import torch

from kontext_train.files.atomic import WriteError
from kontext_train.method import lora
from kontext_train.method.lora import LoraAdapter
from kontext_train.train import checkpoints
from kontext_train.train.checkpoints import (
    CheckpointError,
    checkpoint_dir,
    checkpoint_step,
    find_resumable,
    list_checkpoints,
    load_state,
    save_checkpoint,
)


def test_checkpoint_step_reads_the_folder_name(tmp_path):
    assert checkpoint_step(checkpoint_dir(tmp_path, 500)) == 500
    assert checkpoint_step(checkpoint_dir(tmp_path, 1_234_567)) == 1_234_567
    for bad in ("step_12", "step_000500.partial", "steps_000500"):
        with pytest.raises(ValueError, match="not a checkpoint folder"):
            checkpoint_step(tmp_path / bad)


def _state(step):
    return {
        "step": step,
        "epoch": 0,
        "position": step,
        "optimizer": {"state": {}, "param_groups": []},
        "scheduler": {},
        "losses": [0.5] * step,
        "validation": [],
    }


def _save(run_dir, step):
    adapters = {"double_blocks.0.img_attn.qkv": LoraAdapter(8, 8, rank=2, alpha=2.0)}
    return save_checkpoint(run_dir, step, adapters, _state(step), {"ss_steps": str(step)})


def test_an_unreadable_latest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    good, truncated, no_optimizer = _save(tmp_path, 1), _save(tmp_path, 2), _save(tmp_path, 3)
    data = (truncated / "state.pt").read_bytes()
    (truncated / "state.pt").write_bytes(data[: len(data) // 2])
    state = _state(3)
    del state["optimizer"]
    torch.save(state, no_optimizer / "state.pt")
    with caplog.at_level(logging.WARNING, logger="kontext_restore"):
        found, _, state = find_resumable(tmp_path)
    assert found == good and state["step"] == 1
    text = caplog.text
    assert str(truncated) in text and str(no_optimizer) in text and "lacks optimizer" in text
    assert list_checkpoints(tmp_path) == [good]  # the bad ones were moved aside, not deleted
    assert len(list((tmp_path / "checkpoints").glob(".step_*.unreadable-*"))) == 2


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
    only = _save(tmp_path, 1)
    (only / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="No checkpoint in .* can be read") as e:
        find_resumable(tmp_path)
    assert str(only) in str(e.value) and "Move that folder away" in str(e.value)
    assert list_checkpoints(tmp_path) == [only]  # nothing moved when there is nothing to fall back to
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_state(only)


@pytest.mark.parametrize(
    ("module", "name", "error"),
    [
        (
            checkpoints.torch,
            "save",
            RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64"),
        ),
        (lora, "save_file", OSError(28, "No space left on device")),
    ],
)
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous(
    tmp_path, monkeypatch, module, name, error
):
    previous = _save(tmp_path, 1)

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(module, name, full)
    with pytest.raises(WriteError) as e:
        _save(tmp_path, 2)
    message = str(e.value)
    assert "\n" not in message and "space" in message and "step_000002" in message
    assert list_checkpoints(tmp_path) == [previous] and load_state(previous)["step"] == 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]


@pytest.mark.parametrize(
    ("field", "value"), [("step", "six"), ("position", 2.5), ("losses", None), ("epoch", -1)]
)
def test_a_state_with_a_wrong_field_type_is_moved_aside_like_other_unreadable_ones(
    tmp_path, caplog, field, value
):
    # Once "invalid literal for int()" while planning, and the checkpoint stayed the latest one.
    good = _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    state = torch.load(bad / "state.pt", weights_only=True)
    state[field] = value
    torch.save(state, bad / "state.pt")
    with pytest.raises(CheckpointError, match=rf"damaged: in its state.pt {field} is"):
        load_state(bad)
    with caplog.at_level(logging.WARNING, logger="kontext_restore"):
        path, _, loaded = find_resumable(tmp_path)
    assert path == good and loaded["step"] == 1
    assert list_checkpoints(tmp_path) == [good]
    assert any(p.name.startswith(".step_000002.unreadable-") for p in (tmp_path / "checkpoints").iterdir())
    assert "step_000002" in caplog.text and field in caplog.text
