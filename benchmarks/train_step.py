"""Training-step benchmark on a tiny Flux model (CPU, fp32): this pack vs ComfyUI's TrainLoraNode,
the trainer vs a bare loop, and peak memory per variant.

    .venv/bin/python benchmarks/train_step.py                 # timing, interleaved rounds
    .venv/bin/python benchmarks/train_step.py --memory        # peak RSS, one fresh process per variant

Variants (all on the same base model, same LoRA rank, same batch/resolution/dtype/checkpointing):

* ``ours_<formulation>``: ``kontext_train.train.trainer.Trainer.run`` with ``FluxLoraModel`` (targets
  ``all_linear``), in-memory latent batches, no validation and no checkpoints inside the loop.
* ``native``: ComfyUI's ``TrainLoraNode.execute`` (noise -> x0 formulation; it cannot take
  reference latents), LoRA on every comfy-op weight plus bias deltas. On ComfyUI 0.33 its newer
  inputs are set to its fastest settings (bypass mode, per-block checkpointing:
  ``_common.NATIVE_NEWER_INPUTS``), and it trains on a reloaded copy of the model.
* ``bare_<formulation>``: the same ``FluxLoraModel`` (same adapters, same inputs) called in a plain
  loop: ``velocity`` + MSE + ``backward`` + ``AdamW.step``. Nothing of the trainer around it.

Per-step time is the interval between consecutive ``optimizer.step()`` returns (a global post-step
hook), identical for every variant; the first interval of each run is dropped. Rounds alternate
the order of the variants and the step count (N, 2N), so a second estimate of the native node's
step time, (wall(2N) - wall(N)) / N, removes its setup cost without any hook.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    bootstrap,
    clocked,
    import_trainer_deps,
    machine_info,
    make_conditioning,
    md_table,
    median,
    native_train_lora,
    param_bytes,
    peak_rss_mb,
    round_order,
    run_child,
    write_json,
)
from _training import MemoryBatches, bare_steps, lora_model, random_latents, train_ours  # noqa: E402

from kontext_train.comfyui.tiny_models import TINY_CONTEXT_DIM as CONTEXT_DIM  # noqa: E402


def build(args):
    from kontext_train.comfyui import build_tiny_flux

    return build_tiny_flux(
        hidden_size=args.width,
        num_heads=max(1, args.width // 128),
        depth=args.double,
        depth_single_blocks=args.single,
        context_in_dim=CONTEXT_DIM,
        seed=0,
    )


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.model = build(args)
        self.clean, self.degraded = random_latents(max(4, args.batch * 2), args.latent)
        self.raw_cond = make_conditioning(CONTEXT_DIM, args.text_tokens, guidance=args.guidance)
        self.lm, self.cond = lora_model(
            self.model,
            args.rank,
            "all_linear",
            self.raw_cond,
            gradient_checkpointing=args.checkpointing,
            seed=0,
        )
        self.tmp = Path(tempfile.mkdtemp(prefix="kr_trainstep_"))
        self.runs = 0

    # -- variants -------------------------------------------------------------------------
    def ours(self, formulation: str, steps: int) -> None:
        a = self.args
        self.runs += 1
        batches = MemoryBatches(self.clean, self.degraded, a.batch)
        train_ours(
            self.lm,
            self.cond,
            batches,
            self.tmp / f"run{self.runs}",
            steps,
            formulation,
            rank=a.rank,
            targets="all_linear",
            checkpointing=a.checkpointing,
            batch_size=a.batch,
            guidance=a.guidance,
        )

    def bare(self, formulation: str, steps: int, base_grad: bool = False) -> None:
        a, lm = self.args, self.lm
        with torch.inference_mode(False):
            lm.load()
            # base_grad: the state before FluxLoraModel.load() froze the base weights (a model
            # loaded outside inference mode kept requires_grad=True on every base weight).
            lm.base.diffusion_model.requires_grad_(base_grad)
            batch = slice(0, a.batch)
            bare_steps(lm, self.cond, self.clean[batch], self.degraded[batch], formulation, steps, a.guidance)
            if base_grad:
                for p in lm.base.diffusion_model.parameters():
                    p.grad = None
                lm.base.diffusion_model.requires_grad_(False)

    def native(self, steps: int):
        a = self.args
        # One LATENT per image: a single batched LATENT hits an UnboundLocalError (multi_res) in
        # ComfyUI 0.3.75's TrainLoraNode.execute.
        latents = [{"samples": self.clean[i : i + 1]} for i in range(len(self.clean))]
        return native_train_lora(
            model=[self.model],
            latents=latents,
            positive=[self.raw_cond],
            batch_size=[a.batch],
            steps=[steps],
            rank=[a.rank],
            training_dtype=["fp32"],
            gradient_checkpointing=[a.checkpointing],
        )

    def run_variant(self, name: str, steps: int) -> None:
        if name == "native":
            self.native(steps)
        elif name.startswith("ours_"):
            self.ours(name[5:], steps)
        elif name.startswith("basegrad_"):
            self.bare(name[9:], steps, base_grad=True)
        elif name.startswith("bare_"):
            self.bare(name[5:], steps)
        else:
            raise ValueError(name)


def adapter_summary(bench: Bench) -> dict:
    ours = sum(p.numel() for p in bench.lm.parameters())
    lora = bench.native(1)
    native_total = sum(v.numel() for v in lora.values())
    native_lora = sum(
        v.numel() for k, v in lora.items() if k.endswith(("lora_up.weight", "lora_down.weight"))
    )
    native_lora_layers = sum(1 for k in lora if k.endswith("lora_down.weight"))
    native_diff = sum(v.numel() for k, v in lora.items() if k.endswith(("diff_b", "diff")))
    return {
        "ours_layers": len(bench.lm.adapters),
        "ours_trainable_params": ours,
        "native_lora_layers": native_lora_layers,
        "native_trainable_params": native_total,
        "native_lora_params": native_lora,
        "native_bias_diff_params": native_diff,
        "native_keys": len(lora),
        "base_param_bytes": param_bytes(bench.model.model.diffusion_model),
        "base_params": sum(p.numel() for p in bench.model.model.diffusion_model.parameters()),
    }


def timing(args) -> dict:
    bench = Bench(args)
    summary = adapter_summary(bench)
    variants = ["ours_bridge", "native", "bare_bridge", "basegrad_bridge"]
    if not args.no_ref:
        variants += ["ours_bridge_ref", "bare_bridge_ref", "ours_kontext"]
    # Warm-up: every variant once (allocator, lazy imports, first-call costs).
    for v in variants:
        bench.run_variant(v, 2)
    per_step: dict[str, list[float]] = {v: [] for v in variants}
    round_medians: dict[str, list[float]] = {v: [] for v in variants}
    wall: dict[str, dict[int, list[float]]] = {v: {} for v in variants}
    for r in range(args.rounds):
        steps = args.steps if r % 2 == 0 else 2 * args.steps
        for v in round_order(variants, r):
            clock, elapsed = clocked(bench.run_variant, v, steps)
            iv = clock.intervals(skip=1)
            per_step[v] += iv
            round_medians[v].append(median(iv))
            wall[v].setdefault(steps, []).append(elapsed)
            print(f"round {r} {v:>16} steps={steps:3d} median {median(iv):.4f} s/step", flush=True)

    def wall_est(v):
        w = wall[v]
        if args.steps in w and 2 * args.steps in w:
            return (median(w[2 * args.steps]) - median(w[args.steps])) / args.steps
        return float("nan")

    res = {
        v: {"median_s": median(per_step[v]), "n": len(per_step[v]), "wall_diff_s": wall_est(v)}
        for v in variants
    }

    def paired(a, b):
        return median(x / y for x, y in zip(round_medians[a], round_medians[b]))

    ratios = {
        "ours_bridge / native": (
            res["ours_bridge"]["median_s"] / res["native"]["median_s"],
            paired("ours_bridge", "native"),
        ),
        "ours_bridge / bare_bridge": (
            res["ours_bridge"]["median_s"] / res["bare_bridge"]["median_s"],
            paired("ours_bridge", "bare_bridge"),
        ),
        "native / bare_bridge": (
            res["native"]["median_s"] / res["bare_bridge"]["median_s"],
            paired("native", "bare_bridge"),
        ),
        "basegrad_bridge / bare_bridge": (
            res["basegrad_bridge"]["median_s"] / res["bare_bridge"]["median_s"],
            paired("basegrad_bridge", "bare_bridge"),
        ),
    }
    if not args.no_ref:
        ratios["ours_bridge_ref / bare_bridge_ref"] = (
            res["ours_bridge_ref"]["median_s"] / res["bare_bridge_ref"]["median_s"],
            paired("ours_bridge_ref", "bare_bridge_ref"),
        )
        ratios["ours_bridge_ref / ours_bridge"] = (
            res["ours_bridge_ref"]["median_s"] / res["ours_bridge"]["median_s"],
            paired("ours_bridge_ref", "ours_bridge"),
        )
        ratios["ours_kontext / ours_bridge_ref"] = (
            res["ours_kontext"]["median_s"] / res["ours_bridge_ref"]["median_s"],
            paired("ours_kontext", "ours_bridge_ref"),
        )
    return {"variants": res, "ratios": ratios, "adapters": summary, "round_medians": round_medians}


# -- memory: one fresh process per variant ----------------------------------------------------
def memory_child(args) -> dict:
    # Every variant pays the trainer's diffusers import, so the comparison shows training memory;
    # the import's own cost is reported apart.
    diffusers_mb = import_trainer_deps()
    bench = Bench(args)
    before = peak_rss_mb()
    if args.memory_variant != "model":
        bench.run_variant(args.memory_variant, args.memory_steps)
    return {
        "variant": args.memory_variant,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_setup_mb": before,
        "diffusers_import_mb": diffusers_mb,
        "base_param_bytes": param_bytes(bench.model.model.diffusion_model),
    }


def memory(args) -> dict:
    variants = ["model", "ours_bridge", "native", "bare_bridge", "basegrad_bridge"]
    if not args.no_ref:
        variants += ["ours_bridge_ref"]
    rows: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(args.memory_reps):
        for v in round_order(variants, rep, rotate=False):
            data = run_child(__file__, [*config_argv(args), "--memory-variant", v])
            rows[v].append(data)
            print(f"memory rep {rep} {v:>16} peak {data['peak_rss_mb']:.0f} MiB", flush=True)
    return {
        v: {
            "peak_rss_mb": median(d["peak_rss_mb"] for d in rows[v]),
            "rss_after_setup_mb": median(d["rss_after_setup_mb"] for d in rows[v]),
            "diffusers_import_mb": median(d["diffusers_import_mb"] for d in rows[v]),
            "base_param_bytes": rows[v][0]["base_param_bytes"],
        }
        for v in variants
    }


def config_argv(args) -> list[str]:
    out = [
        "--width", str(args.width), "--double", str(args.double), "--single", str(args.single),
        "--latent", str(args.latent), "--batch", str(args.batch), "--rank", str(args.rank),
        "--text-tokens", str(args.text_tokens), "--memory-steps", str(args.memory_steps),
        "--threads", str(args.threads),
    ]  # fmt: skip
    if not args.checkpointing:
        out.append("--no-checkpointing")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--double", type=int, default=2)
    p.add_argument("--single", type=int, default=2)
    p.add_argument("--latent", type=int, default=32, help="latent side (image side / 8)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--steps", type=int, default=6, help="steps per run (N); odd rounds run 2N")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--no-ref", action="store_true", help="skip the reference-token variants")
    p.add_argument("--memory", action="store_true", help="peak RSS per variant in fresh processes")
    p.add_argument("--memory-reps", type=int, default=2)
    p.add_argument("--memory-steps", type=int, default=4)
    p.add_argument("--memory-variant", help=argparse.SUPPRESS)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: robust against other load; 0: torch's default)",
    )
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bootstrap(cpu=True)
    if args.memory_variant:
        print(json.dumps(memory_child(args)))
        return

    config = {k: v for k, v in vars(args).items() if k not in ("json", "memory_variant")}
    report = {"machine": machine_info(), "config": config, "command": " ".join(sys.argv)}
    if args.memory:
        mem = memory(args)
        report["memory"] = mem
        model_peak = mem["model"]["peak_rss_mb"]
        rows = [
            [v, d["peak_rss_mb"], d["peak_rss_mb"] - model_peak, d["base_param_bytes"] / 2**20]
            for v, d in mem.items()
        ]
        print(md_table(["variant", "peak RSS MiB", "over model-only MiB", "base params MiB"], rows))
    else:
        res = timing(args)
        report["timing"] = res
        rows = [[v, d["median_s"], d["n"], d["wall_diff_s"]] for v, d in res["variants"].items()]
        print(md_table(["variant", "median s/step", "steps timed", "(wall 2N - wall N)/N s"], rows))
        print()
        print(
            md_table(
                ["ratio", "of medians", "median of per-round ratios"],
                [[k, *v] for k, v in res["ratios"].items()],
            )
        )
        print()
        print(json.dumps(res["adapters"]))
    write_json(args.json, report)


if __name__ == "__main__":
    main()
