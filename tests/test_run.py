"""The training-run entry point (``kontext_train.train.run``) on the tiny Flux model: what it refuses
before any work (resume on other data, overwriting a LoRA, names too long, a folder another run
holds) and that a finished run is not trained or written again."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import pytest
from _bad_images import write_good
from conftest import make_conditioning, make_tiny_flux

from kontext_train.data.dataset import build_dataset
from kontext_train.files.atomic import WriteError
from kontext_train.method.train_config import TrainConfig
from kontext_train.train.run import (
    RunError,
    RunHooks,
    RunLockedError,
    RunOutputs,
    train_lora,
)
from kontext_train.train.run_checks import check_output_names
from kontext_train.train.run_latents import latents_from_vae, warm_cache
from kontext_train.train.run_lock import LOCK_NAME, run_lock


def _photos(folder, seeds=(1, 2, 3)):
    for i, seed in enumerate(seeds):
        write_good(folder / f"p{i}.png", 96, 64, seed=seed)
    return folder


def _latents(folder, vae, cache_dir, seed=0):
    dataset = build_dataset(folder, val_count=0, seed=seed, bucket_scale=0.0625, min_size=8)
    return latents_from_vae(dataset, vae, cache_dir, "pool", 1, seed)


def _config(steps=2):
    return TrainConfig(
        steps=steps,
        learning_rate=1e-3,
        rank=2,
        warmup_steps=0,
        checkpoint_every=1,
        validate_every_epochs=0,
        gradient_checkpointing=False,
    )


def _train(latents, outputs, steps=2, resume=True, messages=None, metadata=None):
    hooks = RunHooks(on_message=messages.append if messages is not None else None)
    return train_lora(
        latents,
        make_tiny_flux(),
        make_conditioning(),
        _config(steps),
        outputs,
        resume=resume,
        hooks=hooks,
        metadata=metadata,
    )


@pytest.fixture
def run(tmp_path, tiny_vae):
    outputs = RunOutputs(tmp_path / "loras" / "r.safetensors", tmp_path / "run")
    latents = _latents(_photos(tmp_path / "hq"), tiny_vae, tmp_path / "cache")
    return outputs, latents


def test_resume_on_another_dataset_is_refused_naming_both(tmp_path, tiny_vae, run):
    outputs, latents = run
    _train(latents, outputs)
    lora_bytes = outputs.lora_path.read_bytes()
    other = _latents(_photos(tmp_path / "other", seeds=(4, 5, 6)), tiny_vae, tmp_path / "cache")
    with pytest.raises(RunError, match="Cannot resume") as e:
        _train(other, outputs, steps=4)
    assert str(tmp_path / "hq") in str(e.value) and str(tmp_path / "other") in str(e.value)
    assert outputs.lora_path.read_bytes() == lora_bytes

    # Same files under another folder name: the same data, so the run continues.
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "hq", moved)
    result = _train(_latents(moved, tiny_vae, tmp_path / "cache"), outputs, steps=3)
    assert result.resumed_from == 2 and result.step == 3


def test_resume_under_another_prompt_is_refused_naming_both(run):
    outputs, latents = run
    _train(latents, outputs, metadata={"prompt": "Restore this photo."})
    lora_bytes = outputs.lora_path.read_bytes()
    with pytest.raises(RunError, match="Cannot resume") as e:
        _train(latents, outputs, steps=4, metadata={"prompt": "Make it a painting."})
    assert "Restore this photo." in str(e.value) and "Make it a painting." in str(e.value)
    assert outputs.lora_path.read_bytes() == lora_bytes
    # Whitespace does not make another prompt, and an unknown prompt (built by other nodes)
    # cannot be compared: both continue.
    assert _train(latents, outputs, steps=3, metadata={"prompt": " Restore  this\nphoto. "}).resumed_from == 2
    assert _train(latents, outputs, steps=4).resumed_from == 3


def test_another_degradation_seed_is_another_dataset(tmp_path, tiny_vae, run):
    outputs, latents = run
    _train(latents, outputs)
    reseeded = _latents(tmp_path / "hq", tiny_vae, tmp_path / "cache", seed=1)
    with pytest.raises(RunError, match="seed 0.*seed 1"):
        _train(reseeded, outputs, steps=4)


def test_a_finished_run_is_not_trained_or_written_again(run):
    outputs, latents = run
    first = _train(latents, outputs)
    stamp = outputs.lora_path.stat().st_mtime_ns
    messages = []
    again = _train(latents, outputs, messages=messages)
    assert again.already_complete and again.step == 2 and again.losses == first.losses
    assert outputs.lora_path.stat().st_mtime_ns == stamp
    assert any("already trained to step 2" in m for m in messages)
    assert again.lora_state.keys() == first.lora_state.keys()


def test_a_new_run_never_overwrites_an_existing_lora(run):
    outputs, latents = run
    outputs.lora_path.parent.mkdir(parents=True)
    outputs.lora_path.write_bytes(b"someone else's LoRA")
    for resume in (True, False):
        with pytest.raises(RunError, match="already exists") as e:
            _train(latents, outputs, resume=resume)
        assert str(outputs.lora_path) in str(e.value)
    assert outputs.lora_path.read_bytes() == b"someone else's LoRA"


def test_resume_off_refuses_a_folder_with_checkpoints(run):
    outputs, latents = run
    _train(latents, outputs)
    before = outputs.lora_path.read_bytes()
    with pytest.raises(RunError, match="resume is off"):
        _train(latents, outputs, steps=3, resume=False)
    assert outputs.lora_path.read_bytes() == before


def test_a_too_long_lora_name_fails_before_any_work(tmp_path, run):
    _, latents = run
    outputs = RunOutputs(tmp_path / "loras" / ("x" * 220 + ".safetensors"), tmp_path / "long_run")
    with pytest.raises(RunError, match="too long") as e:
        _train(latents, outputs)
    assert "at most 217 bytes" in str(e.value)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "long_run").exists()
    assert not (tmp_path / "loras").exists()


def test_the_longest_derived_name_sets_the_limit(tmp_path):
    # The LoRA's own temporary name (".<name>.<8 random>.safetensors.tmp") is the longest one.
    fits = tmp_path / ("x" * 217 + ".safetensors")
    check_output_names(fits, tmp_path / "run", 3000)
    with pytest.raises(RunError, match="too long"):
        check_output_names(fits.with_name("x" * 218 + ".safetensors"), tmp_path / "run", 3000)
    with pytest.raises(RunError, match="too long"):  # the run folder is checked too
        check_output_names(fits, tmp_path / ("r" * 256), 3000)


def test_a_folder_held_by_a_live_run_is_refused(run):
    outputs, latents = run
    with run_lock(outputs.run_dir):
        with pytest.raises(RunLockedError) as e:
            _train(latents, outputs)
    assert f"process {os.getpid()} on {socket.gethostname()}" in str(e.value)
    assert not outputs.lora_path.exists()
    _train(latents, outputs)  # released: the run goes ahead
    assert not (outputs.run_dir / LOCK_NAME).exists()


def test_a_lock_held_by_another_process_is_refused(tmp_path, run):
    outputs, latents = run
    code = (
        "import sys, time; from kontext_train.train.run_lock import run_lock\n"
        "with run_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(outputs.run_dir)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"process {holder.pid} "):
            _train(latents, outputs)
    finally:
        holder.kill()
        holder.wait()
    # Killed without releasing: its lock is stale now and the next run takes it over.
    assert json.loads((outputs.run_dir / LOCK_NAME).read_text())["pid"] == holder.pid
    assert _train(latents, outputs).step == 2


def test_an_unreadable_latest_checkpoint_is_skipped_with_a_warning(run, caplog):
    # Once: KeyError 'optimizer', or "cannot be read; delete it" for a truncated file.
    outputs, latents = run
    _train(latents, outputs, steps=2)
    bad = outputs.run_dir / "checkpoints" / "step_000002"
    data = (bad / "state.pt").read_bytes()
    (bad / "state.pt").write_bytes(data[: len(data) // 3])
    with caplog.at_level(logging.WARNING, logger="kontext_restore"):
        result = _train(latents, outputs, steps=3)
    assert result.resumed_from == 1 and result.step == 3
    assert str(bad) in caplog.text and "Continuing from step_000001" in caplog.text


def test_a_checkpoint_without_optimizer_state_is_skipped(run, caplog):
    import torch

    outputs, latents = run
    _train(latents, outputs, steps=2)
    bad = outputs.run_dir / "checkpoints" / "step_000002"
    state = torch.load(bad / "state.pt", weights_only=True)
    del state["optimizer"]
    torch.save(state, bad / "state.pt")
    with caplog.at_level(logging.WARNING, logger="kontext_restore"):
        result = _train(latents, outputs, steps=3)
    assert result.resumed_from == 1 and result.step == 3
    assert "lacks optimizer" in caplog.text and str(bad) in caplog.text


def test_a_cache_entry_that_is_a_folder_is_a_clear_error(tmp_path, tiny_vae):
    # Once: IsADirectoryError from os.replace after the encoding work.
    folder = _photos(tmp_path / "hq")
    cache = tmp_path / "cache"
    warm_cache(_latents(folder, tiny_vae, cache))
    entry = next(p for p in cache.rglob("*.safetensors") if p.is_file())
    entry.unlink()
    (entry / "inner").mkdir(parents=True)
    with pytest.raises(WriteError, match="a folder of that name is in the way") as e:
        warm_cache(_latents(folder, tiny_vae, cache))
    assert str(entry) in str(e.value)


def test_the_lora_records_what_restoring_reads_back(run):
    """The prompt its caller recorded, the bucket scale and the time shift: a restore with the
    LoRA finds them all in the file, and a differing prompt is warned about."""
    from kontext_train.method.training_prompt import PROMPT_KEY
    from kontext_train.restore.restore_settings import FROM_LORA, read_restore_settings

    outputs, latents = run
    prompt = "Restore this scan: remove the dust and the JPEG blocks."
    train_lora(
        latents,
        make_tiny_flux(),
        make_conditioning(),
        _config(),
        outputs,
        metadata={PROMPT_KEY: prompt},
    )
    rs = read_restore_settings(outputs.lora_path)
    assert (rs.prompt, rs.bucket_scale, rs.formulation) == (prompt, 0.0625, "bridge")
    for name in ("prompt", "bucket_scale", "base_shift", "max_shift", "guidance", "formulation"):
        assert rs.sources[name] == FROM_LORA, name
    assert rs.warnings == ()
    other = read_restore_settings(outputs.lora_path, prompt="Restore this photo.")
    assert len(other.warnings) == 1 and prompt in other.warnings[0]


def test_a_finished_run_read_back_keeps_its_last_validation(tmp_path, tiny_vae):
    """The last validation runs after the last step's checkpoint; the checkpoint is saved again so
    a re-run (which reads the finished run back) reports every validation row (issue 23)."""
    outputs = RunOutputs(tmp_path / "loras" / "v.safetensors", tmp_path / "run")
    dataset = build_dataset(_photos(tmp_path / "hq"), val_count=1, seed=0, bucket_scale=0.0625, min_size=8)
    latents = latents_from_vae(dataset, tiny_vae, tmp_path / "cache", "pool", 1, 0)
    config = TrainConfig(
        steps=2, learning_rate=1e-3, rank=2, warmup_steps=0, checkpoint_every=1, validate_every_epochs=1,
        validation_steps=1, gradient_checkpointing=False,
    )  # fmt: skip

    def train():
        return train_lora(latents, make_tiny_flux(), make_conditioning(), config, outputs, hooks=RunHooks())

    first = train()
    assert first.validation and first.validation[-1]["step"] == 2
    again = train()
    assert again.already_complete
    assert [r["step"] for r in again.validation] == [r["step"] for r in first.validation]
