"""``kontext-train plan``: the predicted peak GPU memory of one training step, before a run.

The plan comes from the real step run on the meta device (``comfyui.memory_probe``); no weights are
read and no GPU is needed. ``--table`` plans the full model at 512/768/1024 px, with and without
the reference tokens, bf16 and fp8 weights, rank 16 and 32, checkpointing on and off.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Sequence

from ..options import check_value, setting
from ..plan.memory_plan import DEFAULT_OVERHEAD_BYTES, GIB, MemoryPlan, fits, format_table, gib
from .settings import PROG

# Settings that exist in the options table keep its flag, default, choices and range.
_FROM_OPTIONS = (
    "rank",
    "lora_targets",
    "batch_size",
    "gradient_checkpointing",
    "bucket_scale",
    "lora_dtype",
    "adapter",
    "optimizer",
)
TABLE_SIDES = (512, 768, 1024)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} plan",
        description="Predict the peak GPU memory of one training step (the real step, run on the meta "
        "device: no weights, no GPU). A prediction: add a margin.",
    )
    p.add_argument("--comfyui", help="ComfyUI folder (default: found automatically, or $COMFYUI_PATH)")
    p.add_argument(
        "--bucket",
        default="1024",
        help="a side (1024), WIDTHxHEIGHT (1184x880) or a Kontext bucket index 0-16 (default 1024)",
    )
    p.add_argument(
        "--weights",
        default="bf16",
        choices=("bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2"),
        help="how the base weights are stored (UNETLoader's weight_dtype; default bf16)",
    )
    p.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Kontext reference tokens (formulations kontext and shortened; default off, as bridge)",
    )
    for name in _FROM_OPTIONS:
        opt = setting(name)
        help_text = f"{opt.help or opt.tooltip.rstrip('.')} (default {opt.default})"
        if opt.kind == "bool":
            p.add_argument(
                opt.flag, action=argparse.BooleanOptionalAction, default=opt.default, help=help_text
            )
        elif opt.kind == "choice":
            p.add_argument(opt.flag, choices=opt.choices, default=opt.default, help=help_text)
        else:
            p.add_argument(
                opt.flag, type=int if opt.kind == "int" else float, default=opt.default, help=help_text
            )
    p.add_argument("--text-tokens", type=int, default=512, help="T5 tokens of the prompt (default 512)")
    p.add_argument(
        "--attention",
        choices=("flash", "native"),
        default="flash",
        help="flash: CUDA's flash kernel (default); native: ComfyUI's function as it runs on meta (math)",
    )
    p.add_argument(
        "--overhead-gib",
        type=float,
        default=DEFAULT_OVERHEAD_BYTES / GIB,
        help=f"CUDA context + allocator overhead added to the total (default {DEFAULT_OVERHEAD_BYTES / GIB:g}, "
        "an estimate)",
    )
    p.add_argument("--free-gib", type=float, help="say whether the plan fits in this much free GPU memory")
    p.add_argument("--table", action="store_true", help="plan the full-size table and print it (minutes)")
    return p


MAX_TEXT_TOKENS = 4096


def _check_gib(flag: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and 0 <= value <= 1 << 20):
        raise ValueError(f"{flag} must be a number of GiB from 0 to {1 << 20}, got {value!r}")


def settings_from(ns: argparse.Namespace):
    """The plan settings of the flags; ``ValueError`` with a one-line message for a bad value."""
    from ..comfyui.memory_probe import PlanSettings, parse_bucket

    for name in _FROM_OPTIONS:
        check_value(name, getattr(ns, name))
    _check_gib("--free-gib", ns.free_gib)
    _check_gib("--overhead-gib", ns.overhead_gib)
    if not 1 <= ns.text_tokens <= MAX_TEXT_TOKENS:
        raise ValueError(f"--text-tokens must be from 1 to {MAX_TEXT_TOKENS}, got {ns.text_tokens}")
    width, height = parse_bucket(ns.bucket, ns.bucket_scale)
    return PlanSettings(
        weight_dtype=ns.weights,
        width=width,
        height=height,
        reference=ns.reference,
        rank=ns.rank,
        lora_targets=ns.lora_targets,
        batch_size=ns.batch_size,
        gradient_checkpointing=ns.gradient_checkpointing != "off",  # auto: see _plan_and_print
        lora_dtype=ns.lora_dtype,
        text_tokens=ns.text_tokens,
        adapter=ns.adapter,
        optimizer=ns.optimizer,
    )


def scaled_bucket_note(ns: argparse.Namespace, settings) -> str | None:
    """What ``--bucket-scale`` made of ``--bucket`` when it changed it (None when it did not)."""
    if ns.bucket_scale == 1.0:
        return None
    return (
        f"note: --bucket {ns.bucket} at --bucket-scale {ns.bucket_scale:g} plans {settings.bucket} "
        f"(scaled as training scales its buckets; --bucket {settings.width}x{settings.height} alone "
        "plans the same)"
    )


def table_settings(base) -> list:
    """Every combination ``--table`` plans, bucket-major."""
    from dataclasses import replace

    combos = itertools.product(TABLE_SIDES, (False, True), ("bf16", "fp8_e4m3fn"), (16, 32), (True, False))
    return [
        replace(
            base, width=side, height=side, reference=ref, weight_dtype=w, rank=r, gradient_checkpointing=ck
        )
        for side, ref, w, r, ck in combos
    ]


def pivot(plans: Sequence[MemoryPlan]) -> str:
    """Totals as a Markdown table: a row per bucket and reference, a column per weights/rank/checkpointing."""
    keys = ("bucket", "reference")
    cols = ("weights", "rank", "checkpointing")
    columns = list(dict.fromkeys(tuple(p.settings[c] for c in cols) for p in plans))
    rows = list(dict.fromkeys(tuple(p.settings[k] for k in keys) for p in plans))
    total = {(tuple(p.settings[k] for k in keys), tuple(p.settings[c] for c in cols)): p.total for p in plans}
    head = ["bucket", "reference"] + [f"{w} r{r} ckpt {ck}" for w, r, ck in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        cells = [gib(total[(row, c)]) if (row, c) in total else "" for c in columns]
        lines.append("| " + " | ".join([*row, *cells]) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    ns = parser.parse_args(list(argv))
    try:
        base = settings_from(ns)
    except ValueError as e:
        print(f"{PROG} plan: error: {e}", file=sys.stderr)
        return 2
    from .. import comfyui

    try:
        comfyui.bootstrap_comfyui(ns.comfyui, cpu=True)
    except comfyui.ComfyUINotFound as e:
        print(f"{PROG} plan: error: {e}", file=sys.stderr)
        return 2
    try:
        return _plan_and_print(ns, base)
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "can't allocate" not in str(e):
            raise
        detail = str(e).splitlines()[-1][:200]
        print(f"{PROG} plan: error: out of host memory while planning ({detail})", file=sys.stderr)
        return 1


def _plan_and_print(ns: argparse.Namespace, base) -> int:
    from ..comfyui.memory_probe import plan_memory

    overhead = int(ns.overhead_gib * GIB)
    if not ns.table:
        note = scaled_bucket_note(ns, base)
        if note:
            print(note)
        if ns.gradient_checkpointing == "auto" and ns.free_gib is not None:
            from dataclasses import replace

            from ..comfyui.memory_check import choose_checkpointing

            def planner(s):
                return plan_memory(s, attention=ns.attention, overhead=overhead)

            choice = choose_checkpointing(base, int(ns.free_gib * GIB), planner=planner)
            print(choice.describe())
            blocks = choice.blocks
            base = replace(base, gradient_checkpointing=blocks if 0 < blocks < base.blocks else blocks > 0)
        plan = plan_memory(base, attention=ns.attention, overhead=overhead)
        print(plan.describe())
        if ns.free_gib is not None:
            verdict = "fits" if fits(plan, int(ns.free_gib * GIB)) else "does NOT fit"
            print(f"{verdict} in {ns.free_gib:g} GiB free")
        return 0
    plans = []
    for s in table_settings(base):
        plans.append(plan_memory(s, attention=ns.attention, overhead=overhead))
        print(f"planned {len(plans)}: {s.label()} -> {gib(plans[-1].total)}", file=sys.stderr, flush=True)
    print(
        f"Predicted peak GPU memory, full FLUX.1 Kontext, batch {base.batch_size}, {base.text_tokens} text "
        f"tokens, targets {base.lora_targets}, attention {ns.attention}, overhead {ns.overhead_gib:g} GiB:\n"
    )
    print(pivot(plans))
    print()
    print(format_table(plans, ["bucket", "reference", "weights", "rank", "checkpointing"]))
    return 0
