"""Settings of the headless command: one table of options for flags, config-file keys,
environment variables and defaults, resolved with flags > config file > environment > defaults."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from .demo import DEMO_DEFAULTS, SAMPLE_PHOTOS

log = logging.getLogger("kontext_restore")

PROG = "kontext-train"
COMMANDS = ("train", "demo", "restore", "evaluate")
WEIGHT_KEYS = ("unet", "clip_l", "t5xxl", "vae")
DEFAULT_PROMPT = "Restore this photo: remove the blur, noise and JPEG artifacts, keep every detail."


class UsageError(Exception):
    """A configuration problem the user can fix; reported as one line, exit code 2."""


# --------------------------------------------------------------------------------------------
# Options: one table for flags, config-file keys, environment variables and defaults
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    name: str  # settings key and config-file key; the flag is --name-with-dashes
    kind: str  # int | float | str | path | bool | choice | float_or_none
    default: Any
    help: str
    commands: tuple[str, ...] = COMMANDS
    env: str | None = None
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _options() -> list[Option]:
    from ..flow import FORMULATIONS, LOSS_WEIGHTING, TIMESTEP_SAMPLING
    from ..latent_cache import CONTROL_MODES
    from ..lora import TARGET_SETS
    from ..trainer import LORA_DTYPES, LR_SCHEDULES, TrainConfig

    d = TrainConfig()
    train = ("train", "demo")
    data = ("train", "demo", "evaluate")
    run = COMMANDS
    opts = [
        # where things are
        Option(
            "output_dir", "path", "kontext-restore-output", "where everything is written", run, "OUTPUT_DIR"
        ),
        Option("hr_root", "path", None, "folder of clean (high-quality) images", data, "HR_ROOT"),
        Option(
            "lr_root",
            "path",
            None,
            "optional folder of real degraded images paired by file name",
            data,
            "LR_ROOT",
        ),
        Option(
            "comfyui",
            "path",
            None,
            "ComfyUI folder (found automatically inside custom_nodes)",
            run,
            "COMFYUI_PATH",
        ),
        Option(
            "unet",
            "path",
            None,
            "FLUX.1 Kontext [dev] weights (path, or name in models/diffusion_models)",
            run,
            "KONTEXT_UNET",
        ),
        Option(
            "clip_l",
            "path",
            None,
            "clip_l text encoder (path, or name in models/text_encoders)",
            run,
            "KONTEXT_CLIP_L",
        ),
        Option(
            "t5xxl",
            "path",
            None,
            "t5xxl text encoder (path, or name in models/text_encoders)",
            run,
            "KONTEXT_T5XXL",
        ),
        Option(
            "vae", "path", None, "Flux VAE ae.safetensors (path, or name in models/vae)", run, "KONTEXT_VAE"
        ),
        Option(
            "weight_dtype",
            "choice",
            "default",
            "base weights dtype",
            run,
            choices=("default", "fp8_e4m3fn", "fp8_e5m2"),
        ),
        Option("cpu", "bool", False, "run on the CPU even when a GPU is available", run),
        Option("prompt", "str", DEFAULT_PROMPT, "restoration prompt (encoded once)", run),
        Option("name", "str", "kontext_restore", "LoRA file name inside OUTPUT_DIR", run),
        Option(
            "demo_images", "int", len(SAMPLE_PHOTOS), "number of bundled sample photos the demo uses", run
        ),
        # data
        Option(
            "bucket_scale",
            "float",
            1.0,
            "scale of Kontext's ~1 MP buckets (0.5: ~512 px; restore/evaluate: the LoRA's)",
            run,
        ),
        Option("val_count", "int", 4, "held-out images for validation and evaluation", data),
        Option("min_size", "int", 64, "skip images with a side below this", data),
        Option(
            "degradation",
            "choice",
            "fixed",
            "synthetic degradation pipeline",
            data,
            choices=("fixed", "realesrgan"),
        ),
        Option("noise_sigma", "float", 0.02, "Gaussian noise std (fixed pipeline)", data),
        Option("blur_radius", "float", 1.5, "Gaussian blur radius in px (fixed pipeline)", data),
        Option("jpeg_quality", "int", 85, "JPEG quality, 0 = off (fixed pipeline)", data),
        Option("downscale", "float", 1.0, "down/up-scale factor, 1 = none (fixed pipeline)", data),
        Option(
            "control_mode",
            "choice",
            "pool",
            "random degradations: cached pool or re-encode",
            train,
            choices=tuple(CONTROL_MODES),
        ),
        Option("pool_size", "int", 4, "degradation variants cached per image (pool mode)", train),
        Option("cache_dir", "path", None, "latent cache folder (default OUTPUT_DIR/latent_cache)", train),
        # training (TrainConfig)
        Option("steps", "int", d.steps, "optimizer steps", train),
        Option("learning_rate", "float", d.learning_rate, "AdamW learning rate", train),
        Option("rank", "int", d.rank, "LoRA rank", train),
        Option("alpha", "float_or_none", None, "LoRA alpha (default: rank)", train),
        Option(
            "batch_size", "int", d.batch_size, "batch per process (global batch = this x processes)", train
        ),
        Option("grad_accum", "int", d.grad_accum, "gradient accumulation steps", train),
        Option(
            "lr_schedule",
            "choice",
            d.lr_schedule,
            "learning-rate schedule",
            train,
            choices=tuple(LR_SCHEDULES),
        ),
        Option("warmup_steps", "int", d.warmup_steps, "warm-up steps", train),
        Option("guidance", "float", d.guidance, "Flux guidance", train),
        Option(
            "checkpoint_every",
            "int",
            d.checkpoint_every,
            "checkpoint every N steps (0 = only at the end)",
            train,
        ),
        Option("keep_checkpoints", "int", d.keep_checkpoints, "checkpoints kept", train),
        Option(
            "validate_every_epochs",
            "int",
            d.validate_every_epochs,
            "validation every N epochs (0 = off)",
            train,
        ),
        Option("validation_steps", "int", d.validation_steps, "sampling steps during validation", train),
        Option("seed", "int", d.seed, "seed of split, degradations, LoRA init and noise", run),
        Option(
            "formulation",
            "choice",
            d.formulation,
            "flow-matching formulation",
            train,
            choices=tuple(FORMULATIONS),
        ),
        Option("bridge_noise", "float", d.bridge_noise, "noise added to the bridge start", train),
        Option(
            "timestep_sampling",
            "choice",
            d.timestep_sampling,
            "training sigma distribution",
            train,
            choices=tuple(TIMESTEP_SAMPLING),
        ),
        Option("logit_mean", "float", d.logit_mean, "logit-normal mean", train),
        Option("logit_std", "float", d.logit_std, "logit-normal std", train),
        Option(
            "loss_weighting",
            "choice",
            d.loss_weighting,
            "loss weighting",
            train,
            choices=tuple(LOSS_WEIGHTING),
        ),
        Option("weight_decay", "float", d.weight_decay, "AdamW weight decay", train),
        Option("max_grad_norm", "float", d.max_grad_norm, "gradient clipping (0 = off)", train),
        Option(
            "lora_targets",
            "choice",
            d.lora_targets,
            "layers that get LoRA adapters",
            train,
            choices=tuple(TARGET_SETS),
        ),
        Option(
            "gradient_checkpointing",
            "bool",
            d.gradient_checkpointing,
            "recompute blocks in backward (saves memory)",
            train,
        ),
        Option("lora_dtype", "choice", d.lora_dtype, "LoRA weights dtype", train, choices=tuple(LORA_DTYPES)),
        Option(
            "resume",
            "bool",
            True,
            "continue the run in OUTPUT_DIR (--no-resume refuses an existing run)",
            train,
        ),
        Option("log_every", "int", 10, "progress line every N steps when not on a terminal", train),
        # restoration / evaluation
        Option("restore_steps", "int", 8, "sampling steps to restore (0 = automatic)", run),
        Option("sampler", "str", "euler", "ComfyUI sampler name for restoration", run),
        Option(
            "lora", "path", None, "LoRA file (default OUTPUT_DIR/<name>.safetensors)", ("restore", "evaluate")
        ),
        Option("input", "path", None, "image file or folder to restore", ("restore",)),
        Option(
            "eval_split",
            "choice",
            "val",
            "images to evaluate: held-out split or all",
            ("evaluate",),
            choices=("val", "all"),
        ),
        Option("eval_count", "int", 8, "at most this many images are evaluated", data),
    ]
    return opts


OPTIONS: list[Option] = _options()
BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
TRAIN_CONFIG_KEYS = (
    "steps learning_rate rank alpha batch_size grad_accum lr_schedule warmup_steps guidance checkpoint_every "
    "keep_checkpoints validate_every_epochs validation_steps seed formulation bridge_noise timestep_sampling "
    "logit_mean logit_std loss_weighting weight_decay max_grad_norm lora_targets gradient_checkpointing "
    "lora_dtype"
).split()
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(opt: Option, value: Any, source: str) -> Any:
    """A value from a config file (typed) or the environment (a string) in the option's type."""
    where = f"{opt.name} ({source})"
    if value is None:
        return None
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
    if opt.kind in ("float", "float_or_none"):
        if isinstance(value, bool):
            raise UsageError(f"{where} must be a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{where} must be a number, got {value!r}") from None
        if not math.isfinite(out):
            raise UsageError(f"{where} must be a finite number, got {value!r}")
        return out
    if not isinstance(value, (str, os.PathLike)):
        raise UsageError(f"{where} must be a string, got {value!r}")
    text = str(value)
    if opt.kind == "choice" and text not in (opt.choices or ()):
        raise UsageError(f"{where} must be one of {', '.join(opt.choices or ())}; got {text!r}")
    return text


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
    given_weights = [k for k in WEIGHT_KEYS if values.get(k)]
    demo = command == "demo" or not given_weights
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
        "Without model weights, runs the offline demo on bundled sample photos.",
        epilog="Precedence: flags > --config file > environment variables > defaults. See docs/headless.md.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    helps = {
        "train": "train a LoRA on HR_ROOT (no --unet: the offline demo)",
        "demo": "the offline demo: sample photos, tiny random model, report (about a minute on a CPU)",
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
            help_text = f"{opt.help} (default {shown}){env}"
            if opt.kind == "bool":
                p.add_argument(opt.flag, action=argparse.BooleanOptionalAction, help=help_text)
            elif opt.kind == "int":
                p.add_argument(opt.flag, type=int, help=help_text, metavar="N")
            elif opt.kind in ("float", "float_or_none"):
                p.add_argument(opt.flag, type=float, help=help_text, metavar="X")
            elif opt.kind == "choice":
                p.add_argument(opt.flag, choices=opt.choices, help=help_text)
            else:
                p.add_argument(opt.flag, help=help_text, metavar="PATH" if opt.kind == "path" else "TEXT")
    return parser
