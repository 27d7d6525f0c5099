"""Types and small helpers shared by the node modules: input specs from the settings table."""

from __future__ import annotations

import inspect
from typing import Any

from ..kontext_train.options import SettingError, check_value, setting

CATEGORY = "Kontext Restore"

# Custom socket types passed between this pack's nodes.
DATASET = "KONTEXT_RESTORE_DATASET"
DEGRADATION = "KONTEXT_RESTORE_DEGRADATION"
LATENTS = "KONTEXT_RESTORE_LATENTS"
LOSS = "KONTEXT_RESTORE_LOSS"

_WIDGET_TYPES = {"int": "INT", "float": "FLOAT", "bool": "BOOLEAN", "str": "STRING", "path": "STRING"}


def setting_input(name: str, choices: list[str] | None = None, tooltip: str | None = None) -> tuple:
    """A ComfyUI V1 input spec for setting ``name`` of the table: its widget type (or choice
    list), default, range and tooltip. ``choices`` supplies lists only ComfyUI knows (samplers);
    ``tooltip`` replaces the table's where a node gives the setting a narrower meaning."""
    s = setting(name)
    default = s.node_default if s.default is None else s.default
    options: dict[str, Any] = {"default": default, "tooltip": tooltip or s.tooltip}
    if s.kind == "choice":
        listed = list(choices if choices is not None else s.choices or ())
        if default not in listed:
            raise ValueError(f"setting {name}: default {default!r} is not among the choices {listed}")
        return (listed, options)
    for key in ("min", "max", "step"):
        value = getattr(s, key)
        if value is not None:
            options[key] = value
    return (_WIDGET_TYPES[s.kind], options)


def setting_inputs(*names: str) -> dict[str, tuple]:
    """``{input name: spec}`` for several settings, in the order given (the widgets' order)."""
    return {setting(n).input_name: setting_input(n) for n in names}


SEED = setting_input("seed")


def socket(type_name: str, tooltip: str) -> tuple:
    """An input that takes a connection (MODEL, IMAGE, ...) with its tooltip."""
    return (type_name, {"tooltip": tooltip})


def number_validator(*names: str):
    """A ``VALIDATE_INPUTS`` classmethod that checks the named FLOAT/INT settings against the
    table when a prompt is queued, so NaN, infinities and out-of-range values get ComfyUI's
    HTTP 400 with ``node_errors`` instead of running.

    ComfyUI passes a validator only the inputs its signature names, and skips its own min/max
    check for those (``execution.validate_inputs``); this one checks them all. Values that come
    through links are not known yet at that point and are checked when the node runs.
    """
    by_input = {setting(n).input_name: n for n in names}

    def validate(cls, **values: Any) -> bool | str:
        problems = []
        for input_name, value in values.items():
            if value is None:
                continue
            try:
                check_value(by_input[input_name], value, label=input_name)
            except SettingError as e:
                problems.append(str(e))
        return "; ".join(problems) if problems else True

    params = [inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for n in by_input]
    validate.__signature__ = inspect.Signature(params)  # what ComfyUI's getfullargspec reads
    return classmethod(validate)
