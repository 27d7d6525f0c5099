"""What a setting is, and the one check of a value against it.

A ``Setting`` holds its name, kind, default, range (min/max/step) or choices, a tooltip (one
sentence a ComfyUI user understands), longer help for ``kontext-train --help``, and where it is
used: on the nodes (``NODE``), and/or as a flag and config key of the command (``COMMAND``, with
the subcommands that show it).

The module that takes a value owns its row: ``TrainConfig``'s fields are rows in
``method/train_config.py``, the degradations' in ``data/degradations.py``, and so on. Each checks
its values against its own rows; ``kontext_train.options`` lists every row in one table, for the
nodes and the command. This module imports nothing of the pack, so every stage may use it.
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "COMMAND",
    "COMMANDS",
    "COMMAND_ONLY",
    "KINDS_OF_SETTING",
    "NODE",
    "NODE_ONLY",
    "TRAINING",
    "WITH_DATA",
    "WITH_FOLDERS",
    "WITH_WEIGHTS",
    "Setting",
    "SettingError",
    "arg_default",
    "check_values",
]

NODE = "node"
COMMAND = "command"  # a --flag, a config-file key and, where ``env`` is set, an environment variable
NODE_ONLY = (NODE,)
COMMAND_ONLY = (COMMAND,)
COMMANDS = ("train", "demo", "restore", "evaluate")
TRAINING = ("train", "demo")
WITH_DATA = ("train", "demo", "evaluate")
WITH_WEIGHTS = ("train", "restore", "evaluate")  # the demo's model is built in; it reads no folder
WITH_FOLDERS = ("train", "evaluate")
KINDS_OF_SETTING = ("int", "float", "bool", "str", "path", "choice")


class SettingError(ValueError):
    """A value outside what its setting allows; the message names the setting and the range."""


@dataclass(frozen=True)
class Setting:
    name: str  # config key and flag (--name-with-dashes); the node input unless node_name is set
    kind: str  # one of KINDS_OF_SETTING
    default: Any  # None: "not set" (paths) or "automatic" (alpha), and None is then allowed
    tooltip: str
    help: str = ""  # for --help; the tooltip when empty
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | None = None  # None for a choice: the node supplies them (samplers)
    surfaces: tuple[str, ...] = (NODE, COMMAND)
    commands: tuple[str, ...] = COMMANDS  # subcommands that show the flag
    env: str | None = None
    node_name: str | None = None
    node_default: Any = None  # what a node widget shows for a None default (alpha: 0)
    # Maps a value the setting held before it changed kind to today's (saved workflows and config
    # files keep loading); anything else is returned as it is, for ``check``.
    legacy: Callable[[Any], Any] | None = None

    def current(self, value: Any) -> Any:
        """``value`` as the setting holds it today (``legacy`` applied)."""
        return self.legacy(value) if self.legacy is not None else value

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def input_name(self) -> str:
        return self.node_name or self.name

    @property
    def range_text(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        if self.kind not in ("int", "float"):
            return {"bool": "true or false"}.get(self.kind, "text")
        show = (lambda v: str(int(v))) if self.kind == "int" else (lambda v: f"{v:g}")
        lo = "-inf" if self.min is None else show(self.min)
        hi = "inf" if self.max is None else show(self.max)
        return f"{lo}..{hi}"

    def check(self, value: Any, label: str | None = None) -> Any:
        """``value`` checked against this setting (numbers finite and in range, whole numbers
        whole, choices valid); returned unchanged. ``label`` names it in the error when it is not
        the setting itself (an element of a range, say).

        Raises ``SettingError`` (a ``ValueError``) naming the setting and what it allows."""
        label = label or self.name
        if value is None:
            if self.default is None:
                return value
            raise SettingError(f"{label} must be set ({self.range_text}), got None")
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise SettingError(f"{label} must be true or false, got {value!r}")
            return value
        if self.kind in ("int", "float"):
            whole = self.kind == "int"
            ok_type = numbers.Integral if whole else numbers.Real
            what = "a whole number" if whole else "a finite number"
            if isinstance(value, bool) or not isinstance(value, ok_type):
                raise SettingError(f"{label} must be {what} in {self.range_text}, got {value!r}")
            if not whole and not math.isfinite(value):
                raise SettingError(f"{label} must be {what} in {self.range_text}, got {value!r}")
            if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
                raise SettingError(f"{label} must be in {self.range_text}, got {value!r}")
            return value
        if not isinstance(value, (str, os.PathLike)):
            raise SettingError(f"{label} must be text, got {value!r}")
        if self.kind == "choice" and self.choices is not None and value not in self.choices:
            raise SettingError(f"{label} must be {self.range_text}; got {value!r}")
        return value


def check_values(values: Mapping[str, Any], settings: Iterable[Setting]) -> None:
    """Checks every value whose key names one of ``settings`` (other keys are skipped). Every bad
    value is reported at once (joined by '; '), so a user fixes them in one go."""
    by_name = {s.name: s for s in settings}
    problems = []
    for key, value in values.items():
        if key in by_name:
            try:
                by_name[key].check(value)
            except SettingError as e:
                problems.append(str(e))
    if problems:
        raise SettingError("; ".join(problems))


def arg_default(func: Callable, name: str) -> Any:
    """A function's default for one argument, so a row does not repeat it."""
    return inspect.signature(func).parameters[name].default
