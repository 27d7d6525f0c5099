"""Types and small helpers shared by the node modules: V3 inputs from the settings table.

The nodes are ComfyUI V3 nodes (``io.ComfyNode``). Every widget input is built here from its row
of ``kontext_train.options`` (kind, default, range, choices, tooltip): the one mapping from the
table's kinds to V3 inputs, so every node shows a setting the same way.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from ..kontext_train import comfyui
from ..kontext_train.comfyui.node_api import io
from ..kontext_train.method.flow import check_formulation
from ..kontext_train.method.lora import sanitize_lora_name
from ..kontext_train.method.train_config import TrainConfig
from ..kontext_train.options import SettingError, check_value, setting

CATEGORY = "Kontext Restore"

# Custom socket types passed between this pack's nodes.
DATASET = io.Custom("KONTEXT_RESTORE_DATASET")
DEGRADATION = io.Custom("KONTEXT_RESTORE_DEGRADATION")
LATENTS = io.Custom("KONTEXT_RESTORE_LATENTS")
LOSS = io.Custom("KONTEXT_RESTORE_LOSS")
# ComfyUI's own type of a LoRA state dict (core Save LoRA Weights, Load LoRA Model; 0.3.75 and 0.33.0).
LORA_MODEL = io.Custom("LORA_MODEL")

# The table's kinds of setting as V3 widget types ("choice" is a Combo).
_WIDGETS = {"int": io.Int, "float": io.Float, "bool": io.Boolean, "str": io.String, "path": io.String}


def shown_text(text: str) -> str:
    """``text`` with a Markdown hard break (two trailing spaces) at the end of each line.

    Frontend 1.32, which ComfyUI 0.3.75 ships, draws Preview as Text (the core node the templates
    wire our summaries and reports to) as Markdown and joins a paragraph's lines into one run of
    text. Two spaces keep each line on its own there and are invisible where text is shown plain.
    """
    lines = text.split("\n")
    return "\n".join(
        line.rstrip() + "  " if line.strip() and i < len(lines) - 1 else line for i, line in enumerate(lines)
    )


def setting_input(
    name: str,
    choices: list[str] | None = None,
    tooltip: str | None = None,
    optional: bool = False,
    links: tuple[type, ...] = (),
) -> io.Input:
    """The V3 input for setting ``name`` of the table, named as the table says (``input_name``),
    with its widget type (or choice list), default, range and tooltip. ``choices`` supplies lists
    only ComfyUI knows (samplers, LoRA files); ``tooltip`` replaces the table's where a node gives
    the setting a narrower meaning; ``links`` are other socket types the widget's input also
    takes (a combo of LoRA files that a STRING file name can be linked into)."""
    s = setting(name)
    default = s.node_default if s.default is None else s.default
    common: dict[str, Any] = {"default": default, "tooltip": tooltip or s.tooltip, "optional": optional}
    if s.kind == "choice":
        listed = list(choices if choices is not None else s.choices or ())
        if default not in listed:
            raise ValueError(f"setting {name}: default {default!r} is not among the choices {listed}")
        combo = io.Combo.Input(s.input_name, options=listed, **common)
        # MultiType keeps the combo widget (its widgetType) and types the socket "COMBO,STRING".
        return io.MultiType.Input(combo, types=list(links)) if links else combo
    if s.kind in ("int", "float"):
        common.update({k: getattr(s, k) for k in ("min", "max", "step") if getattr(s, k) is not None})
    return _WIDGETS[s.kind].Input(s.input_name, **common)


def folder_input(name: str, folders: list[str]) -> io.Input:
    """Setting ``name`` (a folder path) as a picker of ``folders``, the setting's default first
    whether or not it exists yet. The socket also takes a STRING, and the node's validator must
    name the input (ComfyUI then leaves the choice to it) so that a path typed before the picker
    existed, or an absolute one, still loads and runs."""
    s = setting(name)
    listed = list(dict.fromkeys([s.default, *folders]))
    tooltip = f"{s.tooltip} Lists the input folder's sub-folders (press R to refresh)."
    combo = io.Combo.Input(s.input_name, options=listed, default=s.default, tooltip=tooltip)
    return io.MultiType.Input(combo, types=[io.String])


def setting_inputs(*names: str, optional: bool = False) -> list[io.Input]:
    """The inputs of several settings, in the order given (the widgets' order)."""
    return [setting_input(n, optional=optional) for n in names]


def seed_input(tooltip: str | None = None) -> io.Input:
    """The seed widget; ``tooltip`` says what it seeds on this node (the table's covers training)."""
    return setting_input("seed", tooltip=tooltip)


def output(kind: type, name: str, tooltip: str | None = None) -> io.Output:
    """An output shown as ``name``, with the tooltip the frontend shows over its dot. Its id is
    left to ComfyUI: V3 ids must differ from the input ids, and several outputs are named like an
    input (the trainer's model and lora_name)."""
    return kind.Output(display_name=name, tooltip=tooltip)


def input_validator(
    *names: str,
    zero_or: Mapping[str, str] | None = None,
    also: tuple[str, ...] = (),
    cross: Callable[[dict[str, Any]], list[str]] | None = None,
):
    """A ``validate_inputs`` classmethod that checks the named settings when a prompt is queued,
    so NaN, infinities, out-of-range numbers and unknown choices get ComfyUI's HTTP 400 with
    ``node_errors`` naming the input instead of running.

    ComfyUI passes a validator only the inputs its signature names and then skips its own
    min/max/choice checks for those (``execution.validate_inputs``), so this one checks them all:
    numbers against the table, choices against the options the node declares (ComfyUI 0.3.75
    does not check a V3 combo's value at all, 0.33.0 does). Values that come through links are not
    known yet at that point (None) and are checked when the node runs. ``zero_or`` maps a setting
    whose 0 means "from the LoRA" to the setting any other value must satisfy. ``cross`` checks
    values together (by input name; None where linked or left out), given the inputs of ``names``
    and of ``also`` (more input names, not checked one by one), and returns its problems.
    """
    zero_or = dict(zero_or or {})
    by_input = {setting(n).input_name: n for n in names}

    def validate(cls, **values: Any) -> bool | str:
        declared = {i.id: i for i in cls.define_schema().inputs}
        problems = []
        for input_name, value in values.items():
            if value is None or input_name not in by_input:
                continue
            name = by_input[input_name]
            widget = declared[input_name]
            widget = getattr(widget, "input_override", None) or widget  # a MultiType's widget
            try:
                if isinstance(widget, io.Combo.Input):
                    _check_choice(name, input_name, value, widget.options)
                else:
                    check_value(name, value, label=input_name)
                    if name in zero_or and value != 0:
                        check_value(zero_or[name], value, label=f"{input_name} (0: from the LoRA)")
            except SettingError as e:
                problems.append(str(e))
        if cross is not None and not problems:
            problems += cross(values)
        return "; ".join(problems) if problems else True

    params = [inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
        for n in [*by_input, *(a for a in also if a not in by_input)]
    ]
    validate.__signature__ = inspect.Signature(params)  # what ComfyUI's getfullargspec reads
    return classmethod(validate)


def trainer_problems(values: Mapping[str, Any]) -> list[str]:
    """Queue-time checks of the trainer's inputs taken together: the LoRA name makes a file name
    inside the loras folder, and the formulation suits the bridge noise (``check_formulation``;
    a bridge_noise left out is its default). Linked values (None) are checked at run time."""
    problems = []
    name = values.get("lora_name")
    if name is not None:
        try:
            sanitize_lora_name(name)
        except ValueError as e:
            problems.append(f"lora_name: {e}")
    formulation = values.get("formulation")
    if formulation is not None:
        noise = values.get("bridge_noise")
        try:
            check_formulation(formulation, TrainConfig.bridge_noise if noise is None else noise)
        except ValueError as e:
            problems.append(str(e))
    return problems


def _check_choice(name: str, input_name: str, value: Any, options: list) -> None:
    if value in options or _legacy_choice(name, value, options):
        return
    if name == "scheduler" and value in comfyui.UNFIT_SCHEDULERS:
        raise SettingError(f"{input_name} {value!r} is not offered: {comfyui.UNFIT_SCHEDULERS[value]}")
    if len(options) <= 20:
        problem = f"{input_name} {value!r} is not one of: {', '.join(map(str, options))}."
    else:  # ComfyUI itself does not list long lists (model files) either
        problem = f"{input_name} {value!r} is not among its {len(options)} choices."
    raise SettingError(f"{problem} {_CHOICE_HINTS.get(name, '')}".strip())


_CHOICE_HINTS = {
    "restore_lora": "Put the LoRA file in ComfyUI's loras folder and refresh the page (R), or choose none."
}


def _legacy_choice(name: str, value: Any, options: list) -> bool:
    """Values saved workflows hold from before a setting changed kind: its row's ``legacy``
    (gradient_checkpointing's true/false, on/off now), and from when lora_name was free text, ""
    (no LoRA) and a file name without its .safetensors suffix (these depend on the files listed)."""
    if setting(name).current(value) in options:
        return True
    if name != "restore_lora" or not isinstance(value, str):
        return False
    return value.strip() == "" or f"{value.strip()}.safetensors" in options
