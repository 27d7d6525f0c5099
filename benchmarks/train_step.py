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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    StepClock,
    bootstrap,
    machine_info,
    make_conditioning,
    md_table,
    median,
    native_train_lora,
    param_bytes,
    peak_rss_mb,
    write_json,
)

from kontext_train.comfyui.tiny_models import TINY_CONTEXT_DIM as CONTEXT_DIM  # noqa: E402


def bridge_noise(formulation: str) -> float:
    """bridge_ref trains only with noise on the start (flow.check_formulation): its smallest value."""
    return 0.1 if formulation == "bridge_ref" else 0.0


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


class MemoryBatches:
    """``LatentBatches`` interface over fixed in-memory latents (no data pipeline in the step)."""

    def __init__(self, clean: torch.Tensor, degraded: torch.Tensor, batch_size: int) -> None:
        self.clean, self.degraded, self.batch_size = clean, degraded, batch_size

    def batches_per_epoch(self) -> int:
        return max(1, len(self.clean) // self.batch_size)

    def stream(self, epoch: int = 0, position: int = 0):
        from kontext_train.data.batches import LatentBatch

        while True:
            for k in range(position, self.batches_per_epoch()):
                sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
                yield LatentBatch(epoch, k, self.clean[sl], self.degraded[sl], [str(k)])
            epoch, position = epoch + 1, 0


class Bench:
    def __init__(self, args) -> None:
        from kontext_train.comfyui import FluxLoraModel

        self.args = args
        self.model = build(args)
        g = torch.Generator().manual_seed(1)
        n = max(4, args.batch * 2)
        self.clean = torch.randn(n, 16, args.latent, args.latent, generator=g)
        self.degraded = 0.5 * self.clean + 0.3 + 0.1 * torch.randn(self.clean.shape, generator=g)
        self.raw_cond = make_conditioning(CONTEXT_DIM, args.text_tokens, guidance=args.guidance)
        with torch.inference_mode(False):
            self.lm = FluxLoraModel(
                self.model,
                rank=args.rank,
                alpha=float(args.rank),
                targets="all_linear",
                gradient_checkpointing=args.checkpointing,
                seed=0,
            )
            self.cond = self.lm.prepare_conditioning(self.raw_cond)
        self.tmp = Path(tempfile.mkdtemp(prefix="kr_trainstep_"))
        self.runs = 0

    # -- variants -------------------------------------------------------------------------
    def ours(self, formulation: str, steps: int) -> None:
        from kontext_train.train.trainer import TrainConfig, Trainer

        a = self.args
        cfg = TrainConfig(
            steps=steps,
            learning_rate=1e-4,
            rank=a.rank,
            batch_size=a.batch,
            lr_schedule="constant_with_warmup",
            warmup_steps=0,
            guidance=a.guidance,
            checkpoint_every=0,
            validate_every_epochs=0,
            formulation="bridge",
            lora_targets="all_linear",
            gradient_checkpointing=a.checkpointing,
        )
        # bridge_ref is no longer trainable; its step is timed anyway (set past the check).
        cfg.formulation, cfg.bridge_noise = formulation, bridge_noise(formulation)
        self.runs += 1
        with torch.inference_mode(False):
            trainer = Trainer(
                cfg,
                self.lm,
                MemoryBatches(self.clean, self.degraded, a.batch),
                self.cond,
                self.tmp / f"run{self.runs}",
            )
            trainer.run(resume=False)

    def bare(self, formulation: str, steps: int, base_grad: bool = False) -> None:
        from kontext_train.method.flow import make_training_example

        a, lm = self.args, self.lm
        with torch.inference_mode(False):
            lm.load()
            # base_grad: the state before FluxLoraModel.load() froze the base weights (a model
            # loaded outside inference mode kept requires_grad=True on every base weight).
            lm.base.diffusion_model.requires_grad_(base_grad)
            dev = lm.device
            clean = lm.to_model_space(self.clean[: a.batch].to(dev))
            degraded = lm.to_model_space(self.degraded[: a.batch].to(dev))
            sigmas = torch.full((a.batch,), 0.6, device=dev)
            noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0)).to(dev)
            ex = make_training_example(formulation, clean, degraded, sigmas, noise, bridge_noise(formulation))
            opt = torch.optim.AdamW(lm.parameters(), lr=1e-4, weight_decay=0.01)
            with lm.training():
                for _ in range(steps):
                    opt.zero_grad(set_to_none=True)
                    pred = lm.velocity(ex.x, sigmas, self.cond, a.guidance, ex.reference)
                    loss = torch.nn.functional.mse_loss(pred, ex.target)
                    loss.backward()
                    opt.step()
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
        k = r % len(variants)
        order = variants[k:] + variants[:k]  # rotate so no variant always runs first
        if r % 2:
            order = order[::-1]
        for v in order:
            with StepClock() as clock:
                t0 = time.perf_counter()
                bench.run_variant(v, steps)
                elapsed = time.perf_counter() - t0
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
    # The trainer imports diffusers (LR schedules, timestep sampling): import it in every variant
    # so the comparison shows training memory, and report the import's own cost separately.
    start = peak_rss_mb()
    import diffusers.optimization  # noqa: F401
    import diffusers.training_utils  # noqa: F401

    diffusers_mb = peak_rss_mb() - start
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
    base_cmd = [sys.executable, __file__, *config_argv(args)]
    for rep in range(args.memory_reps):
        order = variants if rep % 2 == 0 else variants[::-1]
        for v in order:
            out = subprocess.run(
                [*base_cmd, "--memory-variant", v], capture_output=True, text=True, check=True
            ).stdout
            data = json.loads(out.strip().splitlines()[-1])
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
