"""Checkpoint folders: names and steps."""

from __future__ import annotations

import pytest

from kontext_train.checkpoints import checkpoint_dir, checkpoint_step


def test_checkpoint_step_reads_the_folder_name(tmp_path):
    assert checkpoint_step(checkpoint_dir(tmp_path, 500)) == 500
    assert checkpoint_step(checkpoint_dir(tmp_path, 1_234_567)) == 1_234_567
    for bad in ("step_12", "step_000500.partial", "steps_000500"):
        with pytest.raises(ValueError, match="not a checkpoint folder"):
            checkpoint_step(tmp_path / bad)
