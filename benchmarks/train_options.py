"""Step time and memory per optimizer and per adapter kind (issue 24), on a small Flux on the CPU.

    .host/0.33.0/venv/bin/python benchmarks/train_options.py [--steps 12] [--json out.json]

Each variant changes one setting from the defaults (AdamW, LoRA): the optimizers with a LoRA, and
LoKr/LoHa with AdamW. All train the same random Flux (width 512, 2 double + 2 single blocks, fp32)
with adapters of rank 16 on the block layers, through ``Trainer.run`` on in-memory toy latents
(bridge, batch 1, 32x32 latents, no checkpoints or validation), gradient checkpointing on.

Columns: median seconds per optimizer step (``StepClock``, the first interval dropped); the adapter
parameters and the optimizer's state after training (their real tensors, bitsandbytes' shared
quantisation maps aside); and the peak of the first step (forward, backward and the optimizer's
first step, which allocates its state), counted by ``plan.memory_plan.LiveBytes`` on the CPU.
Variants run in one process, interleaved over ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
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
    write_json,
)

SIZE = dict(hidden_size=512, num_heads=4, depth=2, depth_single_blocks=2, context_in_dim=64)
VARIANTS = [
    ("adamw", "lora"),
    ("adam", "lora"),
    ("adafactor", "lora"),
    ("prodigy", "lora"),
    ("adamw8bit", "lora"),
    ("adamw", "lokr"),
    ("adamw", "loha"),
]


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for k, v in state.items()
        if torch.is_tensor(v) and k != "step" and not k.startswith("qmap")
    )


def run_variant(optimizer: str, adapter: str, steps: int) -> dict:
    from toy import ToyBatches, toy_latents

    from kontext_train import comfyui
    from kontext_train.plan.memory_plan import LiveBytes
    from kontext_train.train import trainer as trainer_module
    from kontext_train.train.optimizers import optimizer_available
    from kontext_train.train.trainer import TrainConfig, Trainer

    if not optimizer_available(optimizer):
        return {"optimizer": optimizer, "adapter": adapter, "skipped": "package not installed"}
    lr = 1.0 if optimizer == "prodigy" else 1e-4
    cfg = TrainConfig(
        steps=steps, learning_rate=lr, rank=16, batch_size=1, warmup_steps=0, checkpoint_every=0,
        validate_every_epochs=0, optimizer=optimizer, adapter=adapter, lr_schedule="constant_with_warmup",
    )  # fmt: skip
    patcher = comfyui.build_tiny_flux(seed=0, **SIZE)
    model = comfyui.FluxLoraModel(patcher, rank=16, alpha=16.0, targets="blocks", adapter=adapter)
    cond = model.prepare_conditioning(make_conditioning(SIZE["context_in_dim"], 8))
    batches = ToyBatches(toy_latents(8, seed=0, size=32), 1)
    built = {}
    original = trainer_module.build_optimizer

    def recording(*args, **kwargs):
        built["optimizer"] = original(*args, **kwargs)
        return built["optimizer"]

    # The first step's peak, counted around the trainer's own first step.
    counter = LiveBytes("cpu")
    first = {"done": False}
    step = trainer_module.Trainer.batch_loss

    def counted_batch_loss(self, *a, **k):
        if not first["done"]:
            counter.__enter__()
        return step(self, *a, **k)

    def on_step(info):
        if not first["done"]:
            counter.__exit__(None, None, None)
            first["done"] = True

    trainer_module.build_optimizer = recording
    trainer_module.Trainer.batch_loss = counted_batch_loss
    try:
        with tempfile.TemporaryDirectory() as run_dir, StepClock() as clock:
            hooks = trainer_module.TrainerHooks(on_step=on_step)
            result = Trainer(cfg, model, batches, cond, Path(run_dir), hooks=hooks).run(resume=False)
    finally:
        trainer_module.build_optimizer = original
        trainer_module.Trainer.batch_loss = step
        model.release()
    params = model.parameters()
    return {
        "optimizer": optimizer,
        "adapter": adapter,
        "s_per_step": median(clock.intervals(skip=1)),
        "cpu_s_per_step": median(clock.cpu_intervals(skip=1)),
        "adapter_params": sum(p.numel() for p in params),
        "adapter_bytes": sum(p.numel() * p.element_size() for p in params),
        "state_bytes": _state_bytes(built["optimizer"]),
        "first_step_peak": counter.peak,
        "final_loss": result.losses[-1],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    bootstrap(cpu=True)
    torch.set_num_threads(args.threads)  # as the other CPU benchmarks (BENCHMARKS.md, Machine)
    rows: dict[tuple, list[dict]] = {}
    for r in range(args.rounds):
        order = VARIANTS if r % 2 == 0 else list(reversed(VARIANTS))
        for optimizer, adapter in order:
            rows.setdefault((optimizer, adapter), []).append(run_variant(optimizer, adapter, args.steps))
    table, out = [], []
    mib = 1024**2
    for (optimizer, adapter), runs in rows.items():
        if "skipped" in runs[0]:
            table.append([optimizer, adapter, runs[0]["skipped"], "", "", "", "", ""])
            continue
        times = [x["s_per_step"] for x in runs]
        cpu = [x["cpu_s_per_step"] for x in runs]
        first = runs[0]
        table.append([
            optimizer, adapter, f"{median(times):.3f} ({min(times):.3f}-{max(times):.3f})", f"{median(cpu):.3f}",
            f"{first['adapter_params']:,}", f"{first['adapter_bytes'] / mib:.2f}",
            f"{first['state_bytes'] / mib:.2f}", f"{max(x['first_step_peak'] for x in runs) / mib:.1f}",
        ])  # fmt: skip
        out.append({"optimizer": optimizer, "adapter": adapter, "runs": runs})
    headers = [
        "optimizer", "adapter", "wall s/step (min-max of rounds)", "CPU s/step", "adapter numbers",
        "adapter MiB", "optimizer state MiB", "first-step peak MiB",
    ]  # fmt: skip
    print(md_table(headers, table))
    write_json(args.json, {"machine": machine_info(), "size": SIZE, "steps": args.steps, "variants": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
