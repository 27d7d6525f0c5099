"""Settings of the headless command: flags, config-file keys, environment variables and defaults
from the one settings table (``kontext_train.options``), resolved with flags > config file >
environment > defaults and checked there (finite, in range, valid choices)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .. import __version__
from ..method.train_config import TrainConfig
from ..options import COMMAND, COMMANDS, DEFAULT_PROMPT, Setting, SettingError, check_value, on_surface
from .demo import DEMO_DEFAULTS, SAMPLE_PHOTOS

__all__ = ["COMMANDS", "DEFAULT_PROMPT", "OPTIONS", "BY_NAME", "TRAIN_CONFIG_KEYS", "Settings", "UsageError"]

log = logging.getLogger("kontext_restore")

PROG = "kontext-train"
WEIGHT_KEYS = ("unet", "clip_l", "t5xxl", "vae")


class UsageError(Exception):
    """A configuration problem the user can fix; reported as one line, exit code 2."""


Option = Setting  # the command's options are the table's settings on the COMMAND surface


def _command_options() -> list[Setting]:
    out = []
    for opt in on_surface(COMMAND):
        if opt.name == "demo_images":  # the app knows how many photos the demo bundles
            opt = replace(opt, default=len(SAMPLE_PHOTOS), max=len(SAMPLE_PHOTOS))
        out.append(opt)
    return out


OPTIONS: list[Setting] = _command_options()
BY_NAME: dict[str, Setting] = {o.name: o for o in OPTIONS}
TRAIN_CONFIG_KEYS = tuple(f.name for f in fields(TrainConfig))
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(opt: Option, value: Any, source: str) -> Any:
    """A value from a config file (typed) or the environment (a string) in the option's type."""
    where = f"{opt.name} ({source})"
    if value is None:
        return None
    value = opt.current(value)  # e.g. gradient_checkpointing true/false from before auto: on/off
    if opt.kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE and not isinstance(value, (int, float)):
            return text in _TRUE
        raise UsageError(f"{where} must be true or false, got {value!r}")
    if opt.kind == "int":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise UsageError(f"{where} must be a whole number, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise UsageError(f"{where} must be a whole number, got {value!r}") from None
    if opt.kind == "float":
        if isinstance(value, bool):
            raise UsageError(f"{where} must be a number, got {value!r}")
        try:
            return float(value)  # finite and in range: checked against the table afterwards
        except (TypeError, ValueError):
            raise UsageError(f"{where} must be a number, got {value!r}") from None
    if not isinstance(value, (str, os.PathLike)):
        raise UsageError(f"{where} must be a string, got {value!r}")
    return str(value)


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Settings from a JSON (``.json``) or TOML (anything else) file, flat keys named like the
    flags with underscores (``learning_rate = 1e-4``); TOML tables are merged into the top level.
    Relative paths in the file are relative to the file's folder."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"config file {p} does not exist: fix --config")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            try:
                import tomllib
            except ImportError:  # Python 3.10
                try:
                    import tomli as tomllib  # type: ignore[no-redef]
                except ImportError:
                    raise UsageError(
                        f"config file {p}: TOML needs Python 3.11+ or 'pip install tomli'; or use JSON"
                    ) from None
            data = tomllib.loads(text)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - JSON/TOML/encoding errors, reported with the file
        raise UsageError(f"config file {p} cannot be parsed ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {p} must hold a table/object of settings")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key.replace("-", "_") not in BY_NAME:
            flat.update(value)  # [train], [data], ... sections
        else:
            flat[key] = value
    out: dict[str, Any] = {}
    for key, value in flat.items():
        name = str(key).replace("-", "_")
        if name not in BY_NAME:
            import difflib

            close = difflib.get_close_matches(name, BY_NAME, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"config file {p}: unknown setting {key!r}{hint}")
        opt = BY_NAME[name]
        value = _convert(opt, value, f"config {p.name}")
        if opt.kind == "path" and value is not None:
            q = Path(value).expanduser()
            value = str(q if q.is_absolute() else (p.parent / q))
        out[name] = value
    return out


@dataclass
class Settings:
    """Resolved settings and where each value came from (flag, config, env, default, demo)."""

    command: str
    values: dict[str, Any]
    sources: dict[str, str]
    demo: bool = False
    argv: list[str] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def given(self, name: str) -> bool:
        return self.sources.get(name, "default") not in ("default", "demo default")

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {k: {"value": v, "source": self.sources[k]} for k, v in sorted(self.values.items())}


def resolve_settings(
    command: str,
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    argv: Sequence[str] = (),
) -> Settings:
    """Flags > config file > environment > defaults (demo defaults when the demo model is used)."""
    environ = os.environ if environ is None else environ
    config_path = flags.get("config")
    from_config = load_config_file(config_path) if config_path else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for opt in OPTIONS:
        if opt.name in flags:
            values[opt.name], sources[opt.name] = flags[opt.name], "flag"
        elif opt.name in from_config:
            values[opt.name], sources[opt.name] = from_config[opt.name], "config"
        elif opt.env and environ.get(opt.env, "").strip():
            values[opt.name] = _convert(opt, environ[opt.env].strip(), f"${opt.env}")
            sources[opt.name] = "env " + opt.env
        else:
            values[opt.name], sources[opt.name] = opt.default, "default"
    for name, value in values.items():
        try:
            check_value(name, value)
        except SettingError as e:
            where = BY_NAME[name].flag if sources[name] == "flag" else sources[name]
            raise UsageError(f"{e} (from {where})") from None
    given_weights = [k for k in WEIGHT_KEYS if values.get(k)]
    # Only `demo` trains the tiny model: `train` without weights is an error naming them (once it
    # silently ran the demo). restore/evaluate without weights use the demo's model.
    demo = command == "demo" or (command != "train" and not given_weights)
    if demo and not given_weights:
        for key, value in DEMO_DEFAULTS.items():
            if sources.get(key) == "default":
                values[key], sources[key] = value, "demo default"
        if sources["output_dir"] == "default":
            values["output_dir"], sources["output_dir"] = "kontext-restore-demo", "demo default"
    return Settings(command, values, sources, demo=demo, argv=list(argv))


# --------------------------------------------------------------------------------------------
# Argument parser
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train, apply and evaluate FLUX.1 Kontext restoration LoRAs without the ComfyUI UI. "
        "`kontext-train demo` runs the offline demo on bundled sample photos (no weights needed).",
        epilog="Precedence: flags > --config file > environment variables > defaults. See docs/headless.md.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    helps = {
        "train": "train a LoRA on HR_ROOT (needs --unet, --clip-l, --t5xxl and --vae)",
        "demo": "the offline demo: sample photos, the pretrained stand-in model, report (minutes on a CPU)",
        "restore": "restore images with a trained LoRA",
        "evaluate": "degrade held-out images, restore them and score PSNR/SSIM",
    }
    for command in COMMANDS:
        p = sub.add_parser(
            command, help=helps[command], description=helps[command], argument_default=argparse.SUPPRESS
        )
        p.add_argument("--config", help="JSON or TOML file of settings (keys named like the flags)")
        p.add_argument(
            "--print-config",
            action="store_true",
            help="print the resolved settings and their sources, then exit",
        )
        p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
        for opt in OPTIONS:
            if command not in opt.commands:
                continue
            env = f" [env {opt.env}]" if opt.env else ""
            default = DEMO_DEFAULTS.get(opt.name, opt.default)
            shown = f"{opt.default}" + (f"; demo {default}" if default != opt.default else "")
            limits = f"; {opt.range_text}" if opt.kind in ("int", "float") else ""
            help_text = f"{opt.help or opt.tooltip.rstrip('.')} (default {shown}{limits}){env}"
            help_text = help_text.replace("%", "%%")  # argparse formats help with %: "20%" is text
            if opt.kind == "bool":
                p.add_argument(opt.flag, action=argparse.BooleanOptionalAction, help=help_text)
            elif opt.kind == "int":
                p.add_argument(opt.flag, type=int, help=help_text, metavar="N")
            elif opt.kind == "float":
                p.add_argument(opt.flag, type=float, help=help_text, metavar="X")
            elif opt.kind == "choice":
                p.add_argument(opt.flag, choices=opt.choices, help=help_text)
            else:
                p.add_argument(opt.flag, help=help_text, metavar="PATH" if opt.kind == "path" else "TEXT")
    # Listed here so that `kontext-train --help` names it; cli.main hands `plan` its own parser
    # (plan_command.build_parser) before this one runs.
    sub.add_parser("plan", help="predict the peak GPU memory of one training step (see plan --help)")
    return parser
