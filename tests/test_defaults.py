"""One set of defaults: every surface that shows or uses a setting starts from the settings
table's default (``kontext_train.options``).

The surfaces: the node widgets as a real server lists them (``/object_info``), the values the
node functions fall back to when an optional input is absent, the command's resolved settings
(``--print-config``), the config classes and library functions the table reads its defaults
from, and the widget values of the workflow templates (``workflows/*.json`` and
``workflows/api/*.api.json``), prompt included. The degradation the templates once trained with
(``realesrgan``) differed from the documented default (``fixed``: noise 0.02, blur 1.5, JPEG 85),
and the command's prompt from the templates' one.

Each test lists every disagreement at once, naming the surface, the setting and both values.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import fields
from pathlib import Path

import pytest
from server_host import server_fixture

from kontext_train import options
from kontext_train.app import cli, demo, settings
from kontext_train.data.dataset import build_dataset
from kontext_train.data.degradations import DegradationConfig
from kontext_train.data.latent_cache import LatentCache
from kontext_train.method.train_config import TrainConfig
from kontext_train.options import DEFAULT_PROMPT, NODE
from kontext_train.report.plots import render_loss_plot
from kontext_train.restore.restore_settings import RestoreSettings, resolve_restore_settings

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
comfy_server = server_fixture()

# Node inputs named like several settings: which setting the node shows, where it is not the
# setting of the input's own name. Used only where the setting exists (the table gains rows).
SHARED_INPUT_NAMES = {
    ("KontextRestoreTrainLoRA", "steps"): "steps",
    ("KontextRestoreRestore", "steps"): "restore_steps",
    ("KontextRestoreSigmas", "steps"): "sigma_steps",
    ("KontextRestoreTrainLoRA", "lora_name"): "name",
    ("KontextRestoreRestore", "lora_name"): "restore_lora",
    ("KontextRestoreTrainLoRA", "guidance"): "guidance",
    ("KontextRestoreRestore", "guidance"): "restore_guidance",
    ("KontextRestoreRestore", "bucket_scale"): "restore_bucket_scale",
}
# Template values that differ from the default on purpose, and why.
TEMPLATE_CHOICES = {
    ("KontextRestoreRestore", "lora_name"): "restores with the LoRA the training template writes",
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.object_info()


def _table_default(name: str, surface: str = NODE):
    s = options.setting(name)
    return s.node_default if (surface == NODE and s.default is None) else s.default


def _setting_of(node: str, input_name: str) -> str | None:
    """The table's setting a node input shows, or None when it is not a setting. An input named
    like several settings is the one listed in SHARED_INPUT_NAMES, else the one of its own name."""
    rows = [s.name for s in options.on_surface(NODE) if s.input_name == input_name]
    chosen = SHARED_INPUT_NAMES.get((node, input_name))
    if chosen in rows:
        return chosen
    if len(rows) > 1 and input_name not in rows:
        pytest.fail(f"{node}.{input_name} matches the settings {rows}: name one in SHARED_INPUT_NAMES")
    return input_name if input_name in rows else (rows[0] if rows else None)


def _widgets(info: dict) -> list[tuple[str, str, dict, list | None]]:
    """(name, type, options, choices) of a node's widget inputs in the order the frontend creates
    them (required, then optional, each in ``input_order``)."""
    out = []
    order = info.get("input_order") or {k: list(info["input"].get(k, {})) for k in ("required", "optional")}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            # An input taking several types ("COMBO,STRING") names the widget it shows.
            kind = opts.get("widgetType") or spec[0]
            choices = None
            if isinstance(kind, list):
                kind, choices = "COMBO", kind
            elif kind == "COMBO":
                choices = opts.get("options", [])
            if kind in WIDGET_TYPES and not opts.get("forceInput"):
                out.append((name, kind, opts, choices))
    return out


def _widget_default(kind: str, opts: dict, choices: list | None):
    if "default" in opts:
        return opts["default"]
    if kind == "COMBO":
        return choices[0] if choices else None  # the frontend shows the first choice
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


def _pack_nodes(object_info: dict) -> dict[str, dict]:
    return {
        k: v
        for k, v in object_info.items()
        if k.startswith("KontextRestore") and not k.startswith("KontextRestoreTest")
    }


def _differences(found: list[tuple[str, str, object]]) -> list[str]:
    """'where: setting is X, the table says Y' for each (where, setting, value) that differs."""
    return [
        f"{where}: {name} is {value!r}, the table says {_table_default(name)!r}"
        for where, name, value in found
        if value != _table_default(name)
    ]


# -- code surfaces -------------------------------------------------------------------------------


def test_node_widgets_default_to_the_table(object_info):
    found, shown = [], set()
    for node, info in _pack_nodes(object_info).items():
        for input_name, kind, opts, choices in _widgets(info):
            name = _setting_of(node, input_name)
            if name is None:
                continue
            shown.add(name)
            found.append((f"node {node}.{input_name}", name, _widget_default(kind, opts, choices)))
    assert not _differences(found), "\n".join(_differences(found))
    # The settings that matter most for a first run are on the nodes at all.
    assert {"degradation", "noise_sigma", "blur_radius", "jpeg_quality", "val_count", "steps"} <= shown


def test_node_functions_fall_back_to_the_table(pack_nodes):
    """An optional input left out of an API prompt reaches the node function as its Python
    default: that value must be the table's too."""
    found = []
    for node, cls in pack_nodes.NODE_CLASS_MAPPINGS.items():
        if not node.startswith("KontextRestore") or node.startswith("KontextRestoreTest"):
            continue
        fn = cls.execute if hasattr(cls, "define_schema") else getattr(cls, cls.FUNCTION)
        for param in inspect.signature(fn).parameters.values():
            if param.default is inspect.Parameter.empty or param.default is None:
                continue
            name = _setting_of(node, param.name)
            if name is not None:
                found.append((f"node {node} function argument {param.name}", name, param.default))
    assert found, "no node function has a defaulted setting argument: the test looks in the wrong place"
    assert not _differences(found), "\n".join(_differences(found))


@pytest.mark.parametrize("command", options.COMMANDS)
def test_the_command_resolves_the_table_defaults(command, monkeypatch, capsys):
    for s in settings.OPTIONS:
        if s.env:
            monkeypatch.delenv(s.env, raising=False)
    weights = [] if command == "demo" else ["--unet", "x"]  # real weights: no demo defaults
    assert cli.main([command, *weights, "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)["settings"]
    wrong = []
    for name, entry in printed.items():
        if name not in options.BY_NAME or entry["source"] not in ("default", "demo default"):
            continue
        expected = options.setting(name).default
        if entry["source"] == "demo default":
            if name not in demo.DEMO_DEFAULTS:
                continue  # the demo's own folder
            expected = demo.DEMO_DEFAULTS[name]
        elif name == "demo_images":
            expected = len(demo.SAMPLE_PHOTOS)  # the app knows how many photos it bundles
        if entry["value"] != expected:
            wrong.append(f"kontext-train {command}: {name} is {entry['value']!r}, expected {expected!r}")
    assert not wrong, "\n".join(wrong)
    assert printed["prompt"]["value"] == DEFAULT_PROMPT
    if command != "restore":
        assert printed["degradation"]["value"] == "fixed" and printed["noise_sigma"]["value"] == 0.02


def test_config_classes_and_library_functions_default_to_the_table():
    def arg(func, name):
        return inspect.signature(func).parameters[name].default

    found = [(f"TrainConfig.{f.name}", f.name, f.default) for f in fields(TrainConfig)]
    degradation = DegradationConfig()
    found += [
        ("DegradationConfig.kind", "degradation", degradation.kind),
        *[
            (f"DegradationConfig.{n}", n, getattr(degradation, n))
            for n in (
                "noise_sigma",
                "blur_radius",
                "jpeg_quality",
                "downscale",
                "second_order_prob",
                "shuffle_prob",
            )
        ],
        *[
            (f"build_dataset({n}=)", n, arg(build_dataset, n))
            for n in ("val_count", "bucket_scale", "min_size")
        ],
        *[(f"LatentCache({n}=)", n, arg(LatentCache.__init__, n)) for n in ("control_mode", "pool_size")],
        ("render_loss_plot(smoothing=)", "smoothing", arg(render_loss_plot, "smoothing")),
        # What a restore without a LoRA (or without the key in it) uses.
        ("RestoreSettings.guidance", "guidance", RestoreSettings().guidance),
        ("RestoreSettings.formulation", "formulation", RestoreSettings().formulation),
        ("RestoreSettings.bucket_scale", "bucket_scale", RestoreSettings().bucket_scale),
        ("RestoreSettings.steps", "sigma_steps", RestoreSettings().steps),
        ("RestoreSettings.sampler", "sampler", RestoreSettings().sampler),
        ("RestoreSettings.scheduler", "scheduler", RestoreSettings().scheduler),
        ("resolve_restore_settings(mode=)", "mode", arg(resolve_restore_settings, "mode")),
        ("resolve_restore_settings(steps=)", "restore_steps", arg(resolve_restore_settings, "steps")),
        ("resolve_restore_settings(sampler=)", "sampler", arg(resolve_restore_settings, "sampler")),
    ]
    found = [(where, name, value) for where, name, value in found if name in options.BY_NAME]
    wrong = [
        f"{where}: {name} is {value!r}, the table says {options.setting(name).default!r}"
        for where, name, value in found
        if value != options.setting(name).default
    ]
    assert not wrong, "\n".join(wrong)


def test_the_documented_degradation_is_the_default():
    # README: the fixed pipeline with Gaussian noise 0.02, blur radius 1.5 and JPEG quality 85.
    values = {
        n: options.setting(n).default for n in ("degradation", "noise_sigma", "blur_radius", "jpeg_quality")
    }
    assert values == {"degradation": "fixed", "noise_sigma": 0.02, "blur_radius": 1.5, "jpeg_quality": 85}


# -- the workflow templates (generated by workflows/build_workflows.py) --------------------------


def _ui_values(path: Path, object_info: dict) -> list[tuple[str, str, object]]:
    """(node type, input name, value) of every widget of the pack's nodes and text encoders in a
    UI-format file, matched to inputs in the frontend's order (helper widgets skipped)."""
    out = []
    for node in json.loads(path.read_text())["nodes"]:
        kind = node.get("type")
        if kind not in object_info or not (kind.startswith("KontextRestore") or kind == "CLIPTextEncode"):
            continue
        values = list(node.get("widgets_values") or [])
        for input_name, widget_kind, opts, _ in _widgets(object_info[kind]):
            assert values, f"{path.name} node {node['id']} ({kind}): too few widget values"
            out.append((kind, input_name, values.pop(0)))
            if opts.get("control_after_generate") or (
                widget_kind == "INT" and input_name in ("seed", "noise_seed")
            ):
                values.pop(0)  # the frontend's "control after generate" widget
        assert not values, f"{path.name} node {node['id']} ({kind}): {len(values)} widget values left over"
    return out


def _api_values(path: Path) -> list[tuple[str, str, object]]:
    return [
        (node["class_type"], name, value)
        for node in json.loads(path.read_text()).values()
        for name, value in node["inputs"].items()
        if not isinstance(value, list)  # a link, not a widget value
    ]


def _template_files() -> list[Path]:
    files = sorted(WORKFLOWS.glob("*.json")) + sorted((WORKFLOWS / "api").glob("*.api.json"))
    assert len(files) >= 6, f"expected the templates in both formats, found {[f.name for f in files]}"
    return files


def _template_values(path: Path, object_info: dict):
    return _api_values(path) if path.name.endswith(".api.json") else _ui_values(path, object_info)


@pytest.mark.parametrize("name", [p.relative_to(WORKFLOWS).as_posix() for p in _template_files()])
def test_templates_use_the_defaults(name, object_info):
    path = WORKFLOWS / name
    found = []
    for node, input_name, value in _template_values(path, object_info):
        if not node.startswith("KontextRestore") or (node, input_name) in TEMPLATE_CHOICES:
            continue
        setting_name = _setting_of(node, input_name)
        if setting_name is not None:
            found.append((f"{name} {node}.{input_name}", setting_name, value))
    assert found, f"{name}: no widget value of a pack node found"
    assert not _differences(found), "\n".join(_differences(found))


@pytest.mark.parametrize("name", [p.relative_to(WORKFLOWS).as_posix() for p in _template_files()])
def test_templates_encode_the_default_prompt(name, object_info):
    texts = [v for node, n, v in _template_values(WORKFLOWS / name, object_info) if node == "CLIPTextEncode"]
    assert texts, f"{name}: no prompt"
    assert all(t == DEFAULT_PROMPT for t in texts), f"{name}: prompt {texts} is not {DEFAULT_PROMPT!r}"
