"""``kontext-train``: headless training, restoration and evaluation, outside ComfyUI's UI.

It drives the same library code as the nodes (dataset -> LatentCache -> LatentBatches -> Trainer
+ Validator, and the Restore node's restoration) with ComfyUI's own loaders, imported in-process
without a server. ``demo`` runs the offline demo (``demo.py``) without weights; ``train`` needs the
four model files and stops before any work, naming every missing one.

Settings come from, highest first: command-line flags, a config file (``--config``, JSON or TOML),
environment variables (``HR_ROOT``, ``LR_ROOT``, ``OUTPUT_DIR``, ``COMFYUI_PATH``,
``KONTEXT_UNET``, ``KONTEXT_CLIP_L``, ``KONTEXT_T5XXL``, ``KONTEXT_VAE``), then the defaults
(the demo's own defaults for ``demo``). See docs/headless.md.

Exit codes: 0 done, 2 bad configuration (one line on stderr), 130 interrupted (a checkpoint is
saved; the same command resumes), 1 anything else.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

from ..files.atomic import WriteError
from .restore_command import cmd_evaluate, cmd_restore
from .settings import (
    PROG,
    UsageError,
    build_parser,
    resolve_settings,
)
from .train_command import cmd_train

log = logging.getLogger("kontext_restore")


def _sigterm_as_interrupt() -> None:
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # not the main thread
        pass


HANDLERS = {"train": cmd_train, "demo": cmd_train, "restore": cmd_restore, "evaluate": cmd_evaluate}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kontext-train`` and ``python -m kontext_train``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:  # its own flags: see plan_command (no weights, no GPU)
        from .plan_command import main as plan_main

        return plan_main(argv[1:])
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not ns.command:
        parser.print_help(sys.stderr)
        return 2
    flags = {k: v for k, v in vars(ns).items() if k not in ("command", "config", "print_config", "debug")}
    if getattr(ns, "config", None):
        flags["config"] = ns.config
    debug = getattr(ns, "debug", False) or os.environ.get("KONTEXT_TRAIN_DEBUG") == "1"
    ctx = None
    try:
        settings = resolve_settings(ns.command, flags, argv=argv)
        if getattr(ns, "print_config", False):
            print(
                json.dumps(
                    {"command": ns.command, "demo": settings.demo, "settings": settings.as_dict()}, indent=2
                )
            )
            return 0
        from ..train.distributed import init_from_env, shutdown

        try:
            ctx = init_from_env()
        except ValueError as e:
            raise UsageError(str(e)) from None
        settings.values["is_main"] = ctx.is_main
        settings.sources["is_main"] = "launcher"
        if ctx.enabled and ns.command not in ("train", "demo"):
            raise UsageError(f"'{ns.command}' runs in one process; launch it without torchrun")
        _sigterm_as_interrupt()
        try:
            return HANDLERS[ns.command](settings, ctx)
        finally:
            shutdown(ctx)
    except UsageError as e:
        if debug:
            raise
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return 130
    except WriteError as e:  # a full disk mid-run: a failure during the run, not a bad setting
        if debug:
            raise
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 1
    except (FileNotFoundError, ValueError) as e:
        if debug:
            raise
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (MemoryError, RuntimeError) as e:
        # Host or device out of memory despite the memory checks: one line, not torch's traceback.
        text = str(e)
        if debug or not (isinstance(e, MemoryError) or "can't allocate" in text or "out of memory" in text):
            raise
        detail = text.strip().splitlines()[-1][:200] if text.strip() else type(e).__name__
        print(
            f"{PROG}: error: out of memory ({detail}); try a smaller --bucket-scale or --batch-size",
            file=sys.stderr,
            flush=True,
        )
        return 1
