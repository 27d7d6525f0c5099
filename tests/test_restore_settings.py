"""One restore-settings object from a LoRA's metadata: user > LoRA metadata > default, and
missing or damaged metadata gives warnings and defaults, never a crash."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from kontext_train.method.flow import flux_shift_mu, image_tokens, sampling_sigmas
from kontext_train.method.lora import atomic_save_safetensors
from kontext_train.method.training_prompt import PROMPT_KEY, prompt_from_graph
from kontext_train.restore.restore_settings import (
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
from kontext_train.train.trainer import TrainConfig, lora_metadata


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


# -- the training prompt ------------------------------------------------------------------------

TRAINED_PROMPT = "Restore this photo: remove the blur, noise and JPEG artifacts, keep every detail."
OTHER_PROMPT = (
    "Restore this photo: remove the noise, blur and compression artifacts and recover fine detail, "
    "keeping the content, colors and composition exactly the same."
)


def _with_prompt(prompt: str | None = TRAINED_PROMPT) -> dict[str, str]:
    """Metadata of a run whose caller recorded its prompt (``metadata={"prompt": ...}``)."""
    extra = {"bucket_scale": 0.5} | ({PROMPT_KEY: prompt} if prompt is not None else {})
    return lora_metadata(TrainConfig(), step=10, extra=extra)


def test_the_training_prompt_is_read_back_and_used_when_none_is_given():
    meta = _with_prompt()
    assert meta["kontext_restore.prompt"] == TRAINED_PROMPT
    rs = resolve_restore_settings(lora_record_from_metadata(meta, "p.safetensors"))
    assert rs.prompt == TRAINED_PROMPT and rs.sources["prompt"] == FROM_LORA and rs.warnings == ()


def test_a_different_prompt_is_kept_and_warned_about_naming_both(caplog):
    record = lora_record_from_metadata(_with_prompt(), "p.safetensors")
    with caplog.at_level(logging.WARNING, logger="kontext_restore"):
        rs = resolve_restore_settings(record, prompt=OTHER_PROMPT)
    assert rs.prompt == OTHER_PROMPT and rs.sources["prompt"] == FROM_USER
    (warning,) = rs.warnings
    assert "p.safetensors" in warning and "differs from the prompt" in warning
    # Both prompts, shortened around where they start to differ ("the noise" / "the blur").
    assert '"Restore this photo: remove the noise, blur and compression..."' in warning
    assert '"Restore this photo: remove the blur, noise and JPEG..."' in warning
    assert "keeping the content" not in warning and len(warning) < 300
    assert warning in caplog.text


def test_prompts_differing_late_are_shown_where_they_differ():
    tail = " Keep the colors."
    rs = resolve_restore_settings(
        lora_record_from_metadata(_with_prompt(TRAINED_PROMPT + tail), "p.safetensors"),
        prompt=TRAINED_PROMPT + " Keep the grain.",
    )
    (warning,) = rs.warnings
    assert '"...and JPEG artifacts, keep every detail. Keep the grain."' in warning
    assert '"...and JPEG artifacts, keep every detail. Keep the colors."' in warning


def test_the_same_prompt_up_to_spacing_and_old_loras_give_no_warning(caplog):
    record = lora_record_from_metadata(_with_prompt(), "p.safetensors")
    spaced = "  " + TRAINED_PROMPT.replace(" ", "  \n") + " "
    assert resolve_restore_settings(record, prompt=spaced).warnings == ()
    old = lora_record_from_metadata(_with_prompt(None), "old.safetensors")  # trained before the key
    rs = resolve_restore_settings(old, prompt=OTHER_PROMPT)
    assert old.prompt is None and rs.warnings == () and rs.prompt == OTHER_PROMPT
    assert resolve_restore_settings(None, prompt=OTHER_PROMPT).warnings == ()


def test_a_damaged_prompt_key_is_ignored_with_a_warning():
    meta = _with_prompt("   ")
    record = lora_record_from_metadata(meta, "d.safetensors")
    assert record.prompt is None
    assert any("d.safetensors" in w and "prompt='   '" in w for w in record.warnings)
    rs = resolve_restore_settings(record, prompt=OTHER_PROMPT)
    assert not any("differs from the prompt" in w for w in rs.warnings)


def test_warnings_can_be_left_to_the_caller_to_show(caplog):
    record = lora_record_from_metadata(_with_prompt(), "p.safetensors")
    with caplog.at_level(logging.WARNING, logger="kontext_restore"):
        rs = resolve_restore_settings(record, prompt=OTHER_PROMPT, log_warnings=False)
    assert len(rs.warnings) == 1 and caplog.text == ""


def test_the_trainer_records_the_time_shift_it_samples_with():
    import inspect

    meta = _trained()
    shift_defaults = inspect.signature(flux_shift_mu).parameters
    assert float(meta["kontext_restore.base_shift"]) == shift_defaults["base_shift"].default
    assert float(meta["kontext_restore.max_shift"]) == shift_defaults["max_shift"].default
    rs = resolve_restore_settings(lora_record_from_metadata(meta, "s.safetensors"))
    assert rs.sources["base_shift"] == rs.sources["max_shift"] == FROM_LORA
    # A LoRA recording another line is restored on that clock.
    meta["kontext_restore.max_shift"] = "0.9"
    rs = resolve_restore_settings(lora_record_from_metadata(meta, "s.safetensors"))
    assert rs.max_shift == 0.9 and rs.mu(64, 64) == pytest.approx(
        flux_shift_mu(image_tokens(64, 64), 0.5, 0.9)
    )


# -- the prompt text behind a node's CONDITIONING (ComfyUI's hidden PROMPT) ----------------------


def _graph(**extra_nodes) -> dict:
    graph = {
        "2": {
            "class_type": "DualCLIPLoader",
            "inputs": {"clip_name1": "a", "clip_name2": "b", "type": "flux"},
        },
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": TRAINED_PROMPT, "clip": ["2", 0]}},
        "7": {"class_type": "KontextRestoreRestore", "inputs": {"conditioning": ["4", 0], "seed": 0}},
    }
    graph.update(extra_nodes)
    return graph


def test_prompt_from_graph_follows_the_conditioning_to_the_text_encoder():
    assert prompt_from_graph(_graph(), "7") == TRAINED_PROMPT
    assert prompt_from_graph(_graph(), 7) == TRAINED_PROMPT  # ids may arrive as numbers
    # Through nodes that pass the conditioning on (FluxGuidance), and text from a string node.
    graph = _graph(
        **{
            "9": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": OTHER_PROMPT}},
            "4": {"class_type": "CLIPTextEncode", "inputs": {"text": ["9", 0], "clip": ["2", 0]}},
            "5": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["4", 0], "guidance": 2.5}},
            "7": {"class_type": "KontextRestoreRestore", "inputs": {"conditioning": ["5", 0]}},
        }
    )
    assert prompt_from_graph(graph, "7") == OTHER_PROMPT


@pytest.mark.parametrize(
    "nodes",
    [
        # Two prompts combined: no single text.
        {
            "5": {
                "class_type": "ConditioningCombine",
                "inputs": {"conditioning_1": ["4", 0], "conditioning_2": ["4", 0]},
            },
            "7": {"class_type": "KontextRestoreRestore", "inputs": {"conditioning": ["5", 0]}},
        },
        # Text built by another node at run time.
        {
            "8": {"class_type": "StringConcatenate", "inputs": {"string_a": ["9", 0], "string_b": "x"}},
            "4": {"class_type": "CLIPTextEncode", "inputs": {"text": ["8", 0], "clip": ["2", 0]}},
        },
        # A loop of pass-through nodes, and a link to a node that is not there.
        {
            "5": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["6", 0]}},
            "6": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["5", 0]}},
            "7": {"class_type": "KontextRestoreRestore", "inputs": {"conditioning": ["5", 0]}},
        },
        {"7": {"class_type": "KontextRestoreRestore", "inputs": {"conditioning": ["404", 0]}}},
    ],
)
def test_prompt_from_graph_is_none_when_the_text_cannot_be_known(nodes):
    assert prompt_from_graph(_graph(**nodes), "7") is None


def test_prompt_from_graph_without_a_graph():
    assert prompt_from_graph(None, "7") is None and prompt_from_graph(_graph(), None) is None
    assert prompt_from_graph(_graph(), "99") is None


def test_prompt_from_graph_finds_the_prompt_in_the_shipped_api_workflows():
    """The API-format templates are what ComfyUI's hidden PROMPT holds when they are queued."""
    from pathlib import Path

    found = 0
    for path in sorted((Path(__file__).resolve().parents[1] / "workflows" / "api").glob("*.api.json")):
        graph = json.loads(path.read_text())
        (text,) = {n["inputs"]["text"] for n in graph.values() if n["class_type"] == "CLIPTextEncode"}
        for node_id, node in graph.items():
            if node["class_type"] in ("KontextRestoreTrainLoRA", "KontextRestoreRestore"):
                assert prompt_from_graph(graph, node_id) == text, (path.name, node_id)
                found += 1
    assert found >= 4  # the trainer and the Restore node of the three templates


@pytest.mark.parametrize(
    ("formulation", "noise"), [("bridge", 0.0), ("bridge", 0.1), ("kontext", 0.0), ("shortened", 0.0)]
)
def test_validation_samples_with_the_steps_restoring_takes(formulation, noise):
    """Issue 20: validation restored kontext in 8 steps where the Restore node takes 28."""
    config = TrainConfig(formulation=formulation, bridge_noise=noise)
    restoring = resolve_restore_settings(None, mode=formulation, steps=0)
    assert RestoreSettings.from_train_config(config).steps == restoring.steps
    assert restoring.steps == (28 if formulation == "kontext" else 8)
