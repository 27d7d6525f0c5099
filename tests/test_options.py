"""The one settings table (kontext_train.options): every value checked in one place, and the node
inputs, the command's flags and TrainConfig built from it agree."""

from __future__ import annotations

import argparse
import inspect
import json
import math
from dataclasses import fields

import pytest

from kontext_train import options
from kontext_train.app import cli, settings
from kontext_train.data.degradations import DegradationConfig
from kontext_train.options import NODE, SETTINGS, SettingError, check_value
from kontext_train.train.trainer import TrainConfig

FLOATS = [s for s in SETTINGS if s.kind == "float"]
INTS = [s for s in SETTINGS if s.kind == "int"]
CHOICES = [s for s in SETTINGS if s.kind == "choice" and s.choices]
DEGRADATION_FIELDS = {"degradation": "kind"} | {
    f.name: f.name for f in fields(DegradationConfig) if f.name in options.BY_NAME
}
TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}


def _outside(s) -> list[float]:
    out = [math.nan, math.inf, -math.inf]
    if s.max is not None:
        out.append(s.max * 2 + 1)
    if s.min is not None:
        out.append(s.min - 1)
    return out


def _bad_floats():
    return [pytest.param(s.name, v, id=f"{s.name}={v}") for s in FLOATS for v in _outside(s)]


@pytest.mark.parametrize("name, value", _bad_floats())
def test_every_float_setting_refuses_nan_inf_and_out_of_range(name, value):
    s = options.setting(name)
    with pytest.raises(SettingError) as err:
        check_value(name, value)
    message = str(err.value)
    assert name in message and s.range_text in message and repr(value) in message
    # The config classes refuse it through the same check.
    if name in TRAIN_FIELDS:
        with pytest.raises(ValueError, match=name):
            TrainConfig(**{name: value})
    if name in DEGRADATION_FIELDS:
        with pytest.raises(ValueError, match=name):
            DegradationConfig(**{DEGRADATION_FIELDS[name]: value})


def test_the_float_settings_are_the_ones_users_can_break():
    # NaN once gave black degraded images (noise_sigma) and black restores (guidance).
    assert {"noise_sigma", "blur_radius", "guidance", "learning_rate", "bucket_scale"} <= {
        s.name for s in FLOATS
    }


@pytest.mark.parametrize("s", INTS, ids=lambda s: s.name)
def test_int_settings_refuse_fractions_bools_and_out_of_range(s):
    for value in [1.5, True, "3", *(v for v in _outside(s) if isinstance(v, int))]:
        with pytest.raises(SettingError, match=s.name):
            check_value(s.name, value)


@pytest.mark.parametrize("s", CHOICES, ids=lambda s: s.name)
def test_choice_settings_refuse_unknown_names(s):
    with pytest.raises(SettingError, match=f"{s.name} must be one of"):
        check_value(s.name, "no_such_choice")


def test_every_default_is_valid_and_every_setting_has_a_tooltip():
    for s in SETTINGS:
        check_value(s.name, s.default)
        assert s.kind in options.KINDS_OF_SETTING
        assert s.tooltip.strip() and len(s.tooltip) < 200, s.name
        assert s.surfaces and set(s.surfaces) <= {options.NODE, options.COMMAND}
        assert set(s.commands) <= set(options.COMMANDS)


def test_bad_values_are_reported_together():
    with pytest.raises(SettingError) as err:
        TrainConfig(learning_rate=math.nan, steps=0)
    assert "learning_rate" in str(err.value) and "steps" in str(err.value)


def test_degradation_ranges_obey_their_settings():
    with pytest.raises(ValueError, match="noise_sigma_range"):
        DegradationConfig(kind="realesrgan", noise_sigma_range=(0.0, math.nan))
    with pytest.raises(ValueError, match="resize_range"):
        DegradationConfig(kind="realesrgan", resize_range=(1.0, math.inf))


def test_train_config_from_node_inputs():
    inputs = {"model": object(), "lora_name": "x", "steps": 12, "alpha": 0.0, "rank": 4, "unique_id": "7"}
    config = TrainConfig.from_inputs(inputs)
    assert (config.steps, config.rank, config.alpha, config.lora_alpha) == (12, 4, None, 4.0)
    assert config.learning_rate == TrainConfig().learning_rate  # missing inputs keep the default
    with pytest.raises(ValueError, match="guidance"):
        TrainConfig.from_inputs({"guidance": math.nan})


# -- the surfaces agree ------------------------------------------------------------------------


def test_train_config_is_the_table():
    table = options.BY_NAME
    for f in fields(TrainConfig):
        assert f.name in table, f"TrainConfig.{f.name} has no row in the settings table"
        assert table[f.name].default == f.default, f.name
        assert options.COMMAND in table[f.name].surfaces, f.name
    assert settings.TRAIN_CONFIG_KEYS == tuple(f.name for f in fields(TrainConfig))
    for name, field_name in DEGRADATION_FIELDS.items():
        assert table[name].default == getattr(DegradationConfig(), field_name), name


def test_the_table_lists_the_rows_each_module_owns():
    """The library's rows live beside the values they check (no module imports the table to check
    itself); the table lists each of them, the same object, and every config field has its row."""
    from kontext_train.data.buckets import BUCKET_SCALE, bucket_resolutions
    from kontext_train.data.dataset import DATASET_SETTINGS
    from kontext_train.data.degradations import DEGRADATION_SETTINGS
    from kontext_train.data.latent_cache import CACHE_SETTINGS
    from kontext_train.method.train_config import TRAIN_SETTINGS
    from kontext_train.restore.restore_settings import RESTORE_SETTINGS

    owned = [BUCKET_SCALE, *DATASET_SETTINGS, *DEGRADATION_SETTINGS, *CACHE_SETTINGS]
    owned += [*TRAIN_SETTINGS, *RESTORE_SETTINGS]
    listed = {id(s) for s in SETTINGS}
    assert [s.name for s in owned if id(s) not in listed] == []
    assert {s.name for s in TRAIN_SETTINGS} == {f.name for f in fields(TrainConfig)}
    assert {s.name for s in DEGRADATION_SETTINGS} == set(DEGRADATION_FIELDS)
    with pytest.raises(SettingError, match=r"bucket_scale must be in 0\.0625\.\.4"):
        bucket_resolutions(0.01)


def _node_widgets(pack_nodes):
    """(node, input name, spec) of every widget input of every pack node."""
    for cls_name, cls in pack_nodes.NODE_CLASS_MAPPINGS.items():
        if not cls_name.startswith("KontextRestore") or cls_name.startswith("KontextRestoreTest"):
            continue
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for input_name, entry in spec.get(group, {}).items():
                yield cls_name, input_name, entry


def test_node_inputs_come_from_the_table(pack_nodes):
    by_input: dict[str, list] = {}
    for s in options.on_surface(NODE):
        by_input.setdefault(s.input_name, []).append(s)
    seen = set()
    for node, input_name, (kind, extra) in _node_widgets(pack_nodes):
        assert extra.get("tooltip", "").strip(), f"{node}.{input_name} has no tooltip"
        widget = extra.get("widgetType", kind) in ("COMBO", "INT", "FLOAT", "BOOLEAN", "STRING")
        if not widget:
            continue
        rows = by_input.get(input_name, [])
        assert rows, f"{node}.{input_name} is not in the settings table"
        matching = []
        for s in rows:
            default = s.node_default if s.default is None else s.default
            limits = {k: getattr(s, k) for k in ("min", "max", "step") if getattr(s, k) is not None}
            if extra.get("default") == default and all(extra.get(k) == v for k, v in limits.items()):
                matching.append(s)
        assert matching, f"{node}.{input_name} {extra} disagrees with the table"
        seen.update(s.name for s in matching)
    unused = {s.name for s in options.on_surface(NODE)} - seen
    assert not unused, f"settings marked for nodes but on no node: {unused}"


def test_train_node_defaults_are_train_config_defaults(pack_nodes):
    spec = pack_nodes.NODE_CLASS_MAPPINGS["KontextRestoreTrainLoRA"].INPUT_TYPES()
    widgets = {**spec["required"], **spec["optional"]}
    defaults = TrainConfig()
    for name in TRAIN_FIELDS & set(widgets):
        expected = defaults.to_dict()[name]
        assert widgets[name][1]["default"] == (0.0 if expected is None else expected), name
    # Every TrainConfig field the node shows reaches the config, under its own name.
    shown = {k: v[1]["default"] for k, v in widgets.items() if "default" in v[1]}
    assert TrainConfig.from_inputs(shown) == defaults


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_command_flags_come_from_the_table():
    subs = _subparsers(settings.build_parser())
    for command, parser in subs.items():
        flags = {s for a in parser._actions for s in a.option_strings}
        for s in settings.OPTIONS:
            assert (s.flag in flags) == (command in s.commands), f"{command} {s.flag}"
    # Subcommand help lists only what the subcommand uses.
    demo, restore = (set().union(*(a.option_strings for a in subs[c]._actions)) for c in ("demo", "restore"))
    assert not {"--unet", "--hr-root", "--input", "--lora", "--eval-split"} & demo
    assert not {"--demo-images", "--steps", "--hr-root", "--noise-sigma", "--resume"} & restore


def test_command_defaults_are_the_table_defaults(monkeypatch, capsys):
    for s in settings.OPTIONS:
        if s.env:
            monkeypatch.delenv(s.env, raising=False)
    resolved = settings.resolve_settings("train", {"unet": "given"}, environ={})
    for f in fields(TrainConfig):
        assert resolved.values[f.name] == f.default, f.name
    assert resolved.values["noise_sigma"] == DegradationConfig().noise_sigma


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--noise-sigma", "nan"], "noise_sigma"),
        (["--guidance", "inf"], "guidance"),
        (["--learning-rate", "0"], "learning_rate"),
        (["--bucket-scale", "9"], "bucket_scale"),
        (["--steps", "0"], "steps"),
    ],
)
def test_command_refuses_bad_numbers_in_one_line(argv, named, capsys):
    assert cli.main(["train", "--unet", "x", *argv, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert named in err and options.setting(named).range_text in err and argv[0] in err


def test_config_file_refuses_nan(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("blur_radius = nan\n")
    assert cli.main(["train", "--config", str(config), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "blur_radius" in err and "config" in err
    good = tmp_path / "run.json"
    good.write_text(json.dumps({"guidance": 3.5}))
    assert cli.main(["train", "--config", str(good), "--print-config"]) == 0


def test_nodes_refuse_nan_when_a_prompt_is_queued(pack_nodes):
    from comfy_api.internal import first_real_override

    cls = pack_nodes.NODE_CLASS_MAPPINGS["KontextRestoreDegradation"]
    # ComfyUI passes a V3 node's validate_inputs the inputs its signature names (execution.validate_inputs).
    names = inspect.getfullargspec(first_real_override(cls, "validate_inputs")).args
    assert {"noise_sigma", "blur_radius", "downscale"} <= set(names)
    assert cls.validate_inputs(noise_sigma=0.02, blur_radius=1.5) is True
    message = cls.validate_inputs(noise_sigma=math.nan, blur_radius=99.0)
    assert "noise_sigma" in message and "blur_radius" in message and "0..10" in message
    restore = pack_nodes.NODE_CLASS_MAPPINGS["KontextRestoreRestore"]
    assert "guidance" in restore.validate_inputs(guidance=math.nan)


def test_restore_settings_use_the_table():
    from kontext_train.restore import restore_settings
    from kontext_train.restore.restore_settings import RestoreSettings

    scale = options.setting("bucket_scale")
    assert (restore_settings.MIN_BUCKET_SCALE, restore_settings.MAX_BUCKET_SCALE) == (scale.min, scale.max)
    assert restore_settings.DEFAULT_GUIDANCE == options.setting("guidance").default
    for name, value in [("guidance", math.inf), ("bridge_noise", 2.0), ("bucket_scale", 0.05)]:
        with pytest.raises(SettingError, match=f"{name} must be .*{options.setting(name).range_text}"):
            RestoreSettings(**{name: value})


def _as_float_widget_keeps(value: float, step: float, lo: float | None, hi: float | None) -> float:
    """What a FLOAT widget of frontends 1.32 and 1.49 stores when ``value`` is typed in (their
    ``onFloatValueChange`` with the defaults of ``useFloatWidget``: precision from the step,
    rounding to 10**-precision, toFixed(precision), then clamped to min..max)."""
    precision = max(0, -math.floor(math.log10(step)))
    rounding = 10**-precision
    kept = float(f"{round(value / rounding) * rounding:.{precision}f}")
    return min(max(kept, -math.inf if lo is None else lo), math.inf if hi is None else hi)


def test_float_widgets_keep_the_values_their_settings_allow():
    """The learning_rate widget once stored 0.000005 as 1e-05 (step 1e-5: five decimals). Every
    float setting on the nodes keeps its default and its minimum, and the learning rate keeps
    small rates."""
    kept_wrong = []
    for s in options.on_surface(NODE):
        if s.kind != "float" or s.step is None:
            continue
        values = [v for v in (s.default, s.min) if isinstance(v, float) and v > 0]
        if s.name == "learning_rate":
            values += [5e-6, 3e-6, 2.5e-5, 1e-7]
        for v in values:
            kept = _as_float_widget_keeps(v, s.step, s.min, s.max)
            if not math.isclose(kept, v, rel_tol=1e-9):
                kept_wrong.append(f"{s.name}: {v!r} becomes {kept!r} (step {s.step})")
    assert kept_wrong == []
