"""Sampling benchmark on the toy restoration task (tests/toy.py): bridge from the degraded latent
in a few steps vs noise-start (kontext formulation) in 28 steps - time and latent MSE to clean.

    .venv/bin/python benchmarks/sampling.py

One LoRA is trained per formulation with the pack's Trainer on the tiny model the toy is made for
(width 128, 1 double + 1 single block, rank 8 on all_linear, AdamW lr 2e-3 constant, batch 4,
300 steps), then held-out latents are restored with ``kontext_train.method.sampler.restore_latents``
(Euler, the training time shift). Restore timings are interleaved across (formulation, steps)
and repeated; the quality numbers are deterministic (fixed seeds). MSE is measured in model space,
as the trainer's validation does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bootstrap, machine_info, make_conditioning, md_table, median, write_json  # noqa: E402

from kontext_train.comfyui.tiny_models import TINY_CONTEXT_DIM as CONTEXT_DIM  # noqa: E402


def train(formulation: str, args, clean_train: torch.Tensor, tmp: Path):
    from toy import ToyBatches

    from kontext_train.comfyui import FluxLoraModel, build_tiny_flux
    from kontext_train.train.trainer import TrainConfig, Trainer

    model = build_tiny_flux(hidden_size=128, context_in_dim=CONTEXT_DIM, seed=0)
    from toy import TOY_TRAIN_SETTINGS

    cfg = TrainConfig(steps=args.train_steps, formulation=formulation, seed=0, **TOY_TRAIN_SETTINGS)
    with torch.inference_mode(False):
        lm = FluxLoraModel(model, rank=8, alpha=8.0, targets="all_linear", gradient_checkpointing=False)
        cond = lm.prepare_conditioning(make_conditioning(CONTEXT_DIM, 8))
        t0 = time.perf_counter()
        result = Trainer(cfg, lm, ToyBatches(clean_train, 4, seed=0), cond, tmp / formulation).run(
            resume=False
        )
        seconds = time.perf_counter() - t0
    return lm, cond, seconds, result.losses


def restore(lm, cond, formulation: str, steps: int, clean_raw: torch.Tensor):
    from toy import degrade_latent

    from kontext_train.method.flow import flux_shift_mu, image_tokens
    from kontext_train.method.sampler import restore_latents

    clean = lm.to_model_space(clean_raw)
    degraded = lm.to_model_space(degrade_latent(clean_raw))
    mu = flux_shift_mu(image_tokens(*clean.shape[-2:]))

    def velocity(x, sigma, reference):
        return lm.velocity(x, sigma, cond, 1.5, reference)

    with torch.no_grad():
        t0 = time.perf_counter()
        out = restore_latents(velocity, degraded, formulation, steps, mu, seed=0)
        seconds = time.perf_counter() - t0
    return (
        seconds,
        torch.mean((out - clean) ** 2).item(),
        torch.mean((degraded - clean) ** 2).item(),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--formulations", default="bridge,bridge_ref,kontext")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bootstrap(cpu=True)
    from toy import toy_latents

    formulations = args.formulations.split(",")
    clean_train = toy_latents(32, seed=0)
    clean_val = toy_latents(8, seed=123)
    tmp = Path(tempfile.mkdtemp(prefix="kr_sampling_"))
    models, train_rows = {}, []
    for f in formulations:
        lm, cond, seconds, losses = train(f, args, clean_train, tmp)
        models[f] = (lm, cond)
        train_rows.append([f, seconds, seconds / args.train_steps, median(losses[:20]), median(losses[-20:])])
        print(f"trained {f}: {seconds:.1f} s", flush=True)

    step_grid = {
        "bridge": [1, 2, 4, 8, 28],
        "bridge_ref": [1, 2, 4, 8, 28],
        "kontext": [8, 28],
    }
    cells = [(f, s) for f in formulations for s in step_grid[f]]
    times: dict = {c: [] for c in cells}
    quality: dict = {}
    for _rep in range(args.reps):  # interleaved: every cell once per rep, order alternating
        for c in cells if _rep % 2 == 0 else cells[::-1]:
            lm, cond = models[c[0]]
            seconds, mse, mse_deg = restore(lm, cond, c[0], c[1], clean_val)
            times[c].append(seconds)
            quality[c] = (mse, mse_deg)
    rows = [[f, s, median(times[(f, s)]), *quality[(f, s)]] for f, s in cells]
    headline = {}
    if ("bridge_ref", 8) in times and ("kontext", 28) in times:
        t_b, t_k = median(times[("bridge_ref", 8)]), median(times[("kontext", 28)])
        headline["kontext28 / bridge_ref8 time"] = t_k / t_b
        headline["bridge_ref8 mse"] = quality[("bridge_ref", 8)][0]
        headline["kontext28 mse"] = quality[("kontext", 28)][0]
    if ("bridge", 8) in times and ("kontext", 28) in times:
        headline["kontext28 / bridge8 time"] = median(times[("kontext", 28)]) / median(times[("bridge", 8)])

    print(
        md_table(["formulation", "train s", "s/step", "loss first 20 (median)", "loss last 20"], train_rows)
    )
    print()
    print(
        md_table(
            ["formulation", "steps", "restore s (8 latents, median)", "MSE restored", "MSE degraded"], rows
        )
    )
    print()
    print(headline)
    write_json(
        args.json,
        {
            "machine": machine_info(),
            "command": " ".join(sys.argv),
            "config": vars(args),
            "train": train_rows,
            "restore": [
                dict(zip(["formulation", "steps", "median_s", "mse_restored", "mse_degraded"], r))
                for r in rows
            ],
            "headline": headline,
        },
    )


if __name__ == "__main__":
    main()
