"""What gradient_checkpointing auto chooses for the full FLUX.1 Kontext model on 24 GB and 16 GB
cards, and the step-time gain that predicts (issue 19). No GPU: the memory comes from the planner
(the real step on the meta device), the time from a measured ratio.

For each card, bucket (512/768/1024) and reference tokens (off/on), ``choose_checkpointing`` picks
the fewest checkpointed blocks whose planned step fits the card's free memory with 10% spare
(fp8_e4m3fn weights, rank 16, blocks targets, batch 1, 512 text tokens, flash attention, CUDA
autocast). The gain is predicted as ``recompute_share x the uncheckpointed blocks' share of the
blocks' parameters`` (a block's forward costs in proportion to its parameters at a given token
count): ``--recompute-share`` is the share of a fully checkpointed step spent recomputing block
forwards, measured on the CPU at width 3072 by ``wide_step.py`` (ours_act vs ours_half).

    COMFYUI_PATH=.host/0.33.0/ComfyUI PYTHONPATH=. .host/0.33.0/venv/bin/python \\
        benchmarks/checkpoint_choice.py --recompute-share 0.25
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CARDS = {"24 GB": 23.5, "16 GB": 15.5}  # GiB free for training on an otherwise idle card (assumed)


def block_params(settings) -> tuple[int, int]:
    """Parameters of one double and one single block of the full model (from the meta model)."""
    from kontext_train.comfyui.memory_probe import build_meta_flux

    diffusion = build_meta_flux(settings).model.diffusion_model
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return count(diffusion.double_blocks[0]), count(diffusion.single_blocks[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recompute-share", type=float, help="measured share (no gain column without it)")
    args = p.parse_args()
    from kontext_train.comfyui.memory_check import cached_plan, choose_checkpointing
    from kontext_train.comfyui.memory_probe import full_size
    from kontext_train.plan.memory_plan import GIB, gib

    base = full_size(weight_dtype="fp8_e4m3fn")
    double, single = block_params(base)
    total = base.depth * double + base.depth_single_blocks * single
    print(f"block parameters: double {double / 1e6:.0f} M, single {single / 1e6:.0f} M", file=sys.stderr)
    head = ["card", "bucket", "reference", "all checkpointed", "none", "auto recomputes", "planned",
            "uncheckpointed share", "predicted gain"]  # fmt: skip
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for card, free_gib in CARDS.items():
        for side in (512, 768, 1024):
            for ref in (False, True):
                s = full_size(weight_dtype="fp8_e4m3fn", width=side, height=side, reference=ref)
                choice = choose_checkpointing(s, int(free_gib * GIB), planner=cached_plan)
                k = choice.blocks
                # The first k blocks are checkpointed: doubles first, then singles.
                free_params = sum(double if i < s.depth else single for i in range(k, s.blocks))
                share = free_params / total if choice.fits else 0.0
                gain = "" if args.recompute_share is None else f"{args.recompute_share * share:.0%}"
                every = cached_plan(s).total
                none = cached_plan(s.__class__(**{**s.__dict__, "gradient_checkpointing": False})).total
                cells = [
                    card, f"{side}²", "on" if ref else "off", gib(every), gib(none),
                    f"{k}/{s.blocks}" + ("" if choice.fits else " (does not fit)"), gib(choice.planned),
                    f"{share:.0%}", gain,
                ]  # fmt: skip
                print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    from kontext_train import comfyui

    comfyui.bootstrap_comfyui(cpu=True)
    main()
