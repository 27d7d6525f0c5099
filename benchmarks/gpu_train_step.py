"""Full-size Flux training step on one GPU: this pack vs ComfyUI's TrainLoraNode, and the 24 GB
question (fp8 base weights, 1024 px with Kontext reference tokens, process capped at 24 GiB).

    python benchmarks/gpu_train_step.py --out-dir "$OUT"          # on an H100/H200, < 8 minutes
    .venv/bin/python benchmarks/gpu_train_step.py --tiny          # CPU dry run of every code path

The model has FLUX.1 [dev]/Kontext's width and depth (19 double + 38 single blocks, width 3072,
24 heads, context 4096, guidance embedding) with random weights, built through
``comfy.supported_models.Flux`` directly on the GPU in bf16 (weights drawn in place, no checkpoint
file needed). Settings: rank 16, LoRA on the pack's default ``blocks`` targets (the native node
puts LoRA on every Linear plus bias deltas - it has no target choice), fp32 LoRA parameters in
both, bf16 compute, gradient checkpointing on, batch 1, 256 text tokens (ComfyUI's T5 minimum for
Flux), buckets 512 and 1024 px (square).

Variants per bucket: ``ours_bridge`` (no reference, comparable to the native node, which cannot
take reference latents; LoRA on the activations, the trainer's default),
``ours_bridge_weights`` (the same with ``lora_form="weights"``, the weight-wrapper fallback),
``native`` (TrainLoraNode.execute, noise -> x0 loss; on ComfyUI 0.33 in
bypass mode with per-block checkpointing, ``_common.NATIVE_NEWER_INPUTS``, on a copy of the model
made on the offload device as its reload would) and
``ours_bridge_ref`` (the degraded latent as Kontext reference tokens: twice the image tokens).
Seconds per step: median interval between optimizer steps after warm-up (both loops call
``loss.item()`` every step, which synchronises). Peak VRAM: ``torch.cuda.max_memory_allocated``
per variant, reset before each run, base weights included.

Planner: next to each measured peak of ``ours_bridge``/``ours_bridge_ref`` the script prints the
prediction of ``kontext-train plan`` for the same model size, bucket, reference, weight dtype,
rank and text length (``comfyui.memory_probe.plan_memory``, run on the meta device before the
GPU run): ``plan_alloc_gib`` (weights + LoRA/AdamW + step peak, comparable with
``max_memory_allocated``) and ``plan_total_gib`` (plus the 1.5 GiB context estimate).

fp8 check: the bf16 model is freed, the same architecture is built with float8_e4m3fn weights and
bf16 manual cast (``set_inference_dtype(fp8, bf16)`` -> ComfyUI's ``manual_cast`` ops, which cast
each weight to bf16 per layer and then apply the LoRA weight wrapper), the process is capped with
``torch.cuda.set_per_process_memory_fraction`` to 24 GiB, and ``ours_bridge_ref`` at 1024 runs a
few steps: "fits" or "OOM", with the peak.

Output: JSON and a markdown table in ``--out-dir`` (default: $OUT if set, else the working folder).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    StepClock,
    bootstrap,
    machine_info,
    md_table,
    median,
    native_train_lora,
    peak_rss_mb,
)

GIB = 2**30
FULL = {"hidden": 3072, "heads": 24, "double": 19, "single": 38, "context": 4096, "text_tokens": 256}
TINY = {"hidden": 256, "heads": 2, "double": 2, "single": 2, "context": 64, "text_tokens": 16}


def build_flux(
    shape: dict, weight_dtype: torch.dtype, compute_dtype: torch.dtype | None, device, seed: int = 0
):
    """A random Flux Kontext MODEL (ModelPatcher) built in place on ``device``."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    from kontext_train.comfyui import flux_unet_config
    from kontext_train.comfyui.tiny_models import is_norm_module

    unet_config = flux_unet_config(
        shape["hidden"], shape["heads"], shape["double"], shape["single"], shape["context"]
    )
    cfg = comfy.supported_models.Flux(unet_config)
    cfg.set_inference_dtype(weight_dtype, compute_dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.inference_mode(False), torch.no_grad():
        base = cfg.get_model({}, device=device)
        init_dtype = compute_dtype or weight_dtype
        for module in base.diffusion_model.modules():
            norm = is_norm_module(module)
            for _, p in module.named_parameters(recurse=False):
                # Cheap init in place (ComfyUI's ops leave weights uninitialised): N(0, 1/fan_in)
                # for matrices, ones for norm gains (".scale" or ".weight" by ComfyUI version),
                # small values for biases. fp8 goes through bf16.
                if norm:
                    p.fill_(1.0)
                elif p.ndim >= 2:
                    tmp = torch.empty(p.shape, device=device, dtype=init_dtype).normal_(generator=g)
                    p.copy_(tmp.mul_(p.shape[1] ** -0.5))
                else:
                    tmp = torch.empty(p.shape, device=device, dtype=init_dtype)
                    p.copy_(tmp.uniform_(-0.02, 0.02, generator=g))
                del p
    patcher = comfy.model_patcher.ModelPatcher(
        base, load_device=torch.device(device), offload_device=mm.unet_offload_device()
    )
    # ComfyUI 0.33's TrainLoraNode deep-copies its model by loading it again through this hook
    # (core loaders set it); here "loading again" copies the weights to a new model on the offload
    # device, as a loader reading the file would.
    patcher.cached_patcher_init = (reload_copy, (patcher,))
    return patcher


def reload_copy(source, disable_dynamic: bool = False):
    """A fresh model with ``source``'s weights on its offload device (a plain ModelPatcher)."""
    import comfy.model_patcher

    with torch.inference_mode(False), torch.no_grad():
        fresh = source.model.model_config.get_model({}, device=source.offload_device)
        fresh.diffusion_model.load_state_dict(source.model.diffusion_model.state_dict())
    return comfy.model_patcher.ModelPatcher(
        fresh, load_device=source.load_device, offload_device=source.offload_device
    )


class MemoryBatches:
    def __init__(self, clean: torch.Tensor, degraded: torch.Tensor) -> None:
        self.clean, self.degraded = clean, degraded

    def batches_per_epoch(self) -> int:
        return 1

    def stream(self, epoch: int = 0, position: int = 0):
        from kontext_train.data.batches import LatentBatch

        while True:
            yield LatentBatch(epoch, 0, self.clean, self.degraded, ["0"])
            epoch += 1


def conditioning(shape: dict, guidance: float | None = None):
    g = torch.Generator().manual_seed(0)
    extras = {"pooled_output": torch.randn(1, 768, generator=g)}
    if guidance is not None:
        extras["guidance"] = guidance
    return [[torch.randn(1, shape["text_tokens"], shape["context"], generator=g), extras]]


def latents(side: int):
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(1, 16, side, side, generator=g)
    return clean, 0.5 * clean + 0.3


def is_oom(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


class Runner:
    def __init__(self, args, model, device) -> None:
        self.args, self.model, self.device = args, model, device
        self.tmp = Path(tempfile.mkdtemp(prefix="kr_gpu_"))
        self.n = 0

    def ours(
        self, formulation: str, side: int, steps: int, shape: dict, lora_form: str = "activations"
    ) -> None:
        from kontext_train.comfyui import FluxLoraModel
        from kontext_train.train.trainer import TrainConfig, Trainer

        cfg = TrainConfig(
            steps=steps,
            learning_rate=1e-4,
            rank=self.args.rank,
            batch_size=1,
            lr_schedule="constant_with_warmup",
            warmup_steps=0,
            checkpoint_every=0,
            validate_every_epochs=0,
            formulation="bridge",
            lora_targets="blocks",
            gradient_checkpointing=True,
        )
        # bridge_ref is no longer trainable; its step is timed anyway (set past the check, with the
        # 0.1 bridge noise it was last trained with).
        cfg.formulation, cfg.bridge_noise = formulation, (0.1 if formulation == "bridge_ref" else 0.0)
        clean, degraded = latents(side)
        self.n += 1
        with torch.inference_mode(False):
            lm = FluxLoraModel(
                self.model, rank=cfg.rank, alpha=float(cfg.rank), targets="blocks", lora_form=lora_form
            )
            try:
                cond = lm.prepare_conditioning(conditioning(shape))
                Trainer(cfg, lm, MemoryBatches(clean, degraded), cond, self.tmp / f"r{self.n}").run(
                    resume=False
                )
            finally:
                lm.release()

    def native(self, side: int, steps: int, shape: dict) -> None:
        clean, _ = latents(side)
        native_train_lora(
            model=[self.model],
            # Two LATENTs: a single one trips an UnboundLocalError (multi_res) in 0.3.75.
            latents=[{"samples": clean}, {"samples": clean.clone()}],
            positive=[conditioning(shape, guidance=1.5)],
            steps=[steps],
            rank=[self.args.rank],
            training_dtype=["bf16"],
        )

    def measure(self, variant: str, side: int, shape: dict) -> dict:
        steps = self.args.warmup + self.args.steps
        cuda = self.device.type == "cuda"
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        row = {"variant": variant, "bucket_px": side * 8, "latent": side}
        t0 = time.perf_counter()
        try:
            with StepClock() as clock:
                if variant == "native":
                    self.native(side, steps, shape)
                elif variant.endswith("_weights"):
                    self.ours(variant[5 : -len("_weights")], side, steps, shape, lora_form="weights")
                else:
                    self.ours(variant[5:], side, steps, shape)
            if cuda:
                torch.cuda.synchronize()
            iv = clock.intervals(skip=self.args.warmup)
            row.update(status="ok", s_per_step=median(iv), steps_timed=len(iv))
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            row.update(status="OOM" if is_oom(e) else f"error: {type(e).__name__}: {e}"[:300])
            if not is_oom(e):
                traceback.print_exc()
        row["wall_s"] = time.perf_counter() - t0
        if cuda:
            row["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / GIB
            row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        else:
            row["peak_rss_gib"] = peak_rss_mb() / 1024
        print(json.dumps(row), flush=True)
        return row


def planned(shape: dict, side: int, reference: bool, weight_dtype: str, rank: int) -> dict:
    """The planner's prediction for one measured row (meta device; no GPU memory used)."""
    from kontext_train.comfyui.memory_probe import PlanSettings, plan_memory

    settings = PlanSettings(
        weight_dtype=weight_dtype,
        width=side * 8,
        height=side * 8,
        reference=reference,
        rank=rank,
        text_tokens=shape["text_tokens"],
        hidden_size=shape["hidden"],
        num_heads=shape["heads"],
        depth=shape["double"],
        depth_single_blocks=shape["single"],
        context_in_dim=shape["context"],
    )
    t0 = time.perf_counter()
    plan = plan_memory(settings)
    return {
        "plan_alloc_gib": (plan.total - plan.overhead) / GIB,
        "plan_total_gib": plan.total / GIB,
        "plan_s": time.perf_counter() - t0,
    }


def free_everything() -> None:
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.cleanup_models_gc()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU dry run at tiny size (checks the script)")
    p.add_argument("--buckets", default="512,1024", help="square bucket sides in pixels")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    p.add_argument("--rounds", type=int, default=1, help="repeat the bf16 variants (alternating order)")
    p.add_argument("--cap-gib", type=float, default=24.0)
    p.add_argument("--fp8-steps", type=int, default=3)
    p.add_argument("--skip-fp8", action="store_true")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    args = p.parse_args()

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        sys.exit("No CUDA device: run with --tiny for the CPU dry run.")
    bootstrap(cpu=not cuda)
    import comfy.model_management as mm

    device = mm.get_torch_device()
    shape = TINY if args.tiny else FULL
    # Tiny mode: the "512"/"1024" buckets become 64/128 px so the dry run takes seconds.
    sides = [int(b) // (64 if args.tiny else 8) for b in args.buckets.split(",")]
    started = time.perf_counter()
    report: dict = {
        "machine": machine_info(),
        "command": " ".join(sys.argv),
        "shape": shape,
        "args": vars(args),
        "rows": [],
    }
    if cuda:
        report["machine"]["gpu_total_gib"] = torch.cuda.get_device_properties(0).total_memory / GIB

    # Planned before any model exists on the device, so planning cannot disturb the measured peaks.
    plans = {}
    for side in sides:
        for reference in (False, True):
            plans[(side, reference, "bf16")] = planned(shape, side, reference, "bf16", args.rank)
    if not args.skip_fp8:
        plans[(sides[-1], True, "fp8_e4m3fn")] = planned(shape, sides[-1], True, "fp8_e4m3fn", args.rank)
    report["plans"] = {f"{k[0] * 8}px ref={k[1]} {k[2]}": v for k, v in plans.items()}

    t0 = time.perf_counter()
    model = build_flux(shape, torch.bfloat16, None, device)
    report["build_bf16_s"] = time.perf_counter() - t0
    report["base_param_gib_bf16"] = sum(p.numel() * p.element_size() for p in model.model.parameters()) / GIB
    report["base_params"] = sum(p.numel() for p in model.model.parameters())
    print(
        f"built bf16 model: {report['base_params'] / 1e9:.2f} B params in {report['build_bf16_s']:.1f} s",
        flush=True,
    )
    runner = Runner(args, model, device)
    variants = ["ours_bridge", "ours_bridge_weights", "native", "ours_bridge_ref"]
    for r in range(args.rounds):
        for side in sides:
            for v in variants if r % 2 == 0 else variants[::-1]:
                row = runner.measure(v, side, shape)
                row["round"] = r
                if v in ("ours_bridge", "ours_bridge_ref"):
                    row.update(plans[(side, v == "ours_bridge_ref", "bf16")])
                report["rows"].append(row)

    if not args.skip_fp8:
        del runner, model
        free_everything()
        t0 = time.perf_counter()
        fp8 = build_flux(shape, torch.float8_e4m3fn, torch.bfloat16, device)
        report["build_fp8_s"] = time.perf_counter() - t0
        report["base_param_gib_fp8"] = sum(p.numel() * p.element_size() for p in fp8.model.parameters()) / GIB
        ops = type(fp8.model.diffusion_model.double_blocks[0].img_attn.qkv)
        report["fp8_ops"] = f"{ops.__module__}.{ops.__qualname__}"
        if cuda:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / total))
        fp8_args = argparse.Namespace(**{**vars(args), "steps": args.fp8_steps, "warmup": 1})
        row = Runner(fp8_args, fp8, device).measure("ours_bridge_ref", sides[-1], shape)
        row.update(variant="ours_bridge_ref fp8 (capped)", cap_gib=args.cap_gib if cuda else None)
        row.update(plans[(sides[-1], True, "fp8_e4m3fn")])
        row["fits"] = row["status"] == "ok"
        report["rows"].append(row)
        report["fp8_24gb"] = row

    report["total_s"] = time.perf_counter() - started
    table = md_table(
        [
            "variant",
            "bucket px",
            "status",
            "s/step (median)",
            "peak VRAM GiB" if cuda else "peak RSS GiB",
            "planned GiB (alloc / total)",
            "wall s",
        ],
        [
            [
                r["variant"],
                r["bucket_px"] if not args.tiny else f"{r['bucket_px']} (tiny)",
                r["status"],
                r.get("s_per_step", float("nan")),
                r.get("peak_alloc_gib", r.get("peak_rss_gib", float("nan"))),
                f"{r['plan_alloc_gib']:.2f} / {r['plan_total_gib']:.2f}" if "plan_alloc_gib" in r else "-",
                r["wall_s"],
            ]
            for r in report["rows"]
        ],
    )
    ratios = []
    for side in sides:
        by = {r["variant"]: r for r in report["rows"] if r["latent"] == side and r.get("round", 0) == 0}
        needed = ("ours_bridge", "ours_bridge_weights", "native", "ours_bridge_ref")
        if all(k in by and by[k]["status"] == "ok" for k in needed):
            ratios.append(
                [
                    side * 8,
                    by["ours_bridge"]["s_per_step"] / by["native"]["s_per_step"],
                    by["ours_bridge"]["s_per_step"] / by["ours_bridge_weights"]["s_per_step"],
                    by["ours_bridge_ref"]["s_per_step"] / by["ours_bridge"]["s_per_step"],
                ]
            )
    md = (
        f"{report['machine'].get('cuda') or 'CPU (tiny dry run)'}; torch {report['machine']['torch']}; "
        f"{report['base_params'] / 1e9:.3f} B params; rank {args.rank}; total {report['total_s']:.0f} s\n\n"
        + table
        + "\n\n"
        + md_table(
            ["bucket px", "ours_bridge / native", "activations / weights", "ours_bridge_ref / ours_bridge"],
            ratios,
        )
        + "\n"
    )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_train_step_tiny" if args.tiny else "gpu_train_step"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    (out / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
