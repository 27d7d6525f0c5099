"""One restore-settings object from a LoRA's metadata: user > LoRA metadata > default, and
missing or damaged metadata gives warnings and defaults, never a crash."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from kontext_train.flow import flux_shift_mu, image_tokens, sampling_sigmas
from kontext_train.lora import atomic_save_safetensors
from kontext_train.restore_settings import (
    DEFAULT_BUCKET_SCALE,
    DEFAULT_GUIDANCE,
    FROM_DEFAULT,
    FROM_LORA,
    FROM_USER,
    RestoreSettings,
    lora_record_from_metadata,
    read_lora_record,
    read_restore_settings,
    resolve_formulation,
    resolve_restore_settings,
    resolve_steps,
)
from kontext_train.trainer import TrainConfig, lora_metadata


def _trained(**config) -> dict[str, str]:
    """Metadata as a training run writes it (the run's extras include the dataset's bucket scale)."""
    return lora_metadata(TrainConfig(**config), step=10, extra={"bucket_scale": 0.5, "base_model": "x"})


def test_settings_come_from_the_trainers_metadata():
    meta = _trained(formulation="bridge", bridge_noise=0.05, guidance=2.5)
    rs = resolve_restore_settings(lora_record_from_metadata(meta, "a.safetensors"))
    assert (rs.formulation, rs.bridge_noise, rs.guidance, rs.bucket_scale) == ("bridge", 0.05, 2.5, 0.5)
    assert rs.steps == 8 and rs.lora_path == "a.safetensors"
    for name in ("formulation", "bridge_noise", "guidance", "bucket_scale"):
        assert rs.sources[name] == FROM_LORA, name
    assert rs.sources["steps"] == "automatic" and rs.warnings == ()


def test_user_values_override_the_lora_with_a_warning(caplog):
    record = lora_record_from_metadata(_trained(formulation="kontext", guidance=2.5), "k.safetensors")
    with caplog.at_level(logging.WARNING, logger="kontext_restore"):
        rs = resolve_restore_settings(
            record, mode="bridge_ref", steps=3, guidance=4.0, bucket_scale=1.0, sampler="heun", seed=9
        )
    assert (rs.formulation, rs.guidance, rs.bucket_scale, rs.steps) == ("bridge_ref", 4.0, 1.0, 3)
    assert (rs.sampler, rs.seed) == ("heun", 9)
    assert rs.sources["guidance"] == rs.sources["bucket_scale"] == rs.sources["formulation"] == FROM_USER
    text = " ".join(rs.warnings)
    assert "trained as kontext" in text and "guidance 4.0 differs from the 2.5" in text
    assert "bucket_scale 1.0 differs from the 0.5" in text
    assert "trained as kontext" in caplog.text  # the warnings are logged, not only returned


def test_no_lora_means_defaults_and_the_users_values():
    rs = resolve_restore_settings(None)
    assert (rs.formulation, rs.guidance, rs.bucket_scale, rs.bridge_noise) == (
        "bridge",
        DEFAULT_GUIDANCE,
        DEFAULT_BUCKET_SCALE,
        0.0,
    )
    assert rs.sources["guidance"] == FROM_DEFAULT and rs.lora_path is None
    assert resolve_restore_settings(None, mode="kontext").steps == 28
    assert resolve_restore_settings(None, guidance=3.0).guidance == 3.0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("guidance", "abc"),
        ("guidance", "nan"),
        ("bridge_noise", "-0.1"),
        ("bucket_scale", "0"),
        ("bucket_scale", "9"),
        ("bucket_scale", "inf"),
    ],
)
def test_garbage_numbers_are_ignored_with_a_warning_naming_key_and_file(key, value):
    meta = _trained(formulation="bridge", guidance=2.5, bridge_noise=0.1)
    meta["kontext_restore." + key] = value
    meta["kontext_restore.config"] = "{}"  # no fallback value inside the config either
    rs = resolve_restore_settings(lora_record_from_metadata(meta, "bad.safetensors"))
    defaults = {"guidance": DEFAULT_GUIDANCE, "bridge_noise": 0.0, "bucket_scale": DEFAULT_BUCKET_SCALE}
    assert getattr(rs, key) == defaults[key] and rs.sources[key] == FROM_DEFAULT
    assert len(rs.warnings) == 1
    assert "bad.safetensors" in rs.warnings[0] and key in rs.warnings[0] and repr(value) in rs.warnings[0]
    assert rs.formulation == "bridge"  # the rest of the file is still used


def test_broken_config_json_is_ignored_and_top_level_keys_still_count():
    meta = _trained(formulation="bridge", guidance=2.5)
    meta["kontext_restore.config"] = "{not json"
    rs = resolve_restore_settings(lora_record_from_metadata(meta, "c.safetensors"))
    assert rs.formulation == "bridge" and rs.guidance == 2.5
    assert any("config is not a JSON object" in w for w in rs.warnings)


def test_config_json_fills_in_missing_keys_and_records_the_shift():
    config = TrainConfig(formulation="bridge", guidance=3.0, bridge_noise=0.2).to_dict()
    config.update(base_shift=0.3, max_shift=0.9)  # a trainer that records its time-shift line
    meta = {"kontext_restore.config": json.dumps(config)}
    rs = resolve_restore_settings(lora_record_from_metadata(meta, "cfg.safetensors"))
    assert (rs.formulation, rs.guidance, rs.bridge_noise) == ("bridge", 3.0, 0.2)
    assert (rs.base_shift, rs.max_shift) == (0.3, 0.9)
    assert rs.sources["max_shift"] == FROM_LORA
    assert rs.mu(64, 64) == pytest.approx(flux_shift_mu(image_tokens(64, 64), 0.3, 0.9))


def test_a_foreign_lora_needs_an_explicit_mode_and_otherwise_runs_on_defaults():
    record = lora_record_from_metadata({"ss_network_dim": "16"}, "foreign.safetensors")
    assert record.warnings and "no 'kontext_restore.formulation'" in record.warnings[0]
    with pytest.raises(ValueError, match="Choose the mode explicitly"):
        resolve_restore_settings(record)
    rs = resolve_restore_settings(record, mode="kontext")
    assert rs.formulation == "kontext" and rs.guidance == DEFAULT_GUIDANCE and rs.steps == 28


def test_an_unknown_formulation_is_an_error_only_in_auto_mode():
    meta = _trained()
    meta["kontext_restore.formulation"] = "schroedinger"
    record = lora_record_from_metadata(meta, "new.safetensors")
    with pytest.raises(ValueError, match="Update the pack"):
        resolve_restore_settings(record)
    rs = resolve_restore_settings(record, mode="bridge")
    assert rs.formulation == "bridge" and any("trained as schroedinger" in w for w in rs.warnings)


def test_reading_a_file(tmp_path):
    path = atomic_save_safetensors(
        {"x": torch.zeros(1)}, tmp_path / "l.safetensors", _trained(formulation="kontext", guidance=2.0)
    )
    rs = read_restore_settings(path, steps=2)
    assert (rs.formulation, rs.guidance, rs.bucket_scale, rs.steps) == ("kontext", 2.0, 0.5, 2)
    assert read_restore_settings(None).formulation == "bridge"
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        read_lora_record(tmp_path / "missing.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match="cut.safetensors.*complete .safetensors"):
        read_lora_record(tmp_path / "cut.safetensors")


def test_the_clock_is_the_trainers():
    rs = RestoreSettings(steps=6)
    for h, w in ((64, 64), (128, 128), (37, 53)):
        mu = flux_shift_mu(image_tokens(h, w))
        assert rs.mu(h, w) == mu
        assert torch.equal(rs.as_trained_sigmas(h, w), sampling_sigmas(6, mu))


def test_validation_settings_are_the_runs_own():
    config = TrainConfig(formulation="bridge", bridge_noise=0.1, guidance=2.0, validation_steps=3, seed=4)
    rs = RestoreSettings.from_train_config(config)
    assert (rs.formulation, rs.bridge_noise, rs.guidance, rs.steps, rs.seed) == ("bridge", 0.1, 2.0, 3, 4)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("bucket_scale", 0.0, "bucket_scale"),
        ("guidance", float("nan"), "guidance"),
        ("bridge_noise", -1.0, "bridge_noise"),
        ("steps", 0, "steps"),
        ("formulation", "sideways", "formulation"),
    ],
)
def test_bad_explicit_values_are_refused_by_name(field, value, match):
    with pytest.raises(ValueError, match=match):
        RestoreSettings(**{field: value})


def test_resolve_mode_and_steps():
    assert resolve_formulation("auto", None) == "bridge"
    assert resolve_formulation("kontext", None) == "kontext"
    assert resolve_steps(0, "bridge") == 8 and resolve_steps(0, "bridge_ref") == 8
    assert resolve_steps(0, "kontext") == 28 and resolve_steps(5, "kontext") == 5
    with pytest.raises(ValueError, match="mode"):
        resolve_formulation("sideways", None)
