"""The VRAM planner against real CPU training steps (issue 14): predicted vs measured peak bytes.

For a few small random Flux models (built through ComfyUI's classes), plans one training step on
the meta device (``comfyui.memory_probe.plan_memory``, no autocast, the attention CPU training
uses) and runs the same step for real on the CPU, measured two ways:
- ``LiveBytes``: the planner's own counter on real tensors (same counting, real kernels);
- the profiler: torch.profiler's allocator events (``profile_memory``), summed in time order;
  independent of the counter, and it sees workspaces freed inside an op.
Attention "native" is ComfyUI's CPU attention (sub-quadratic, math); "flash" replaces it with
torch's SDPA, whose CPU flash kernel keeps what ``memory_plan.FlashAttention`` models.

    COMFYUI_PATH=.host/0.3.75/ComfyUI .host/0.3.75/venv/bin/python benchmarks/memory_plan_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = [  # width, heads, double, single, side, text tokens, reference, checkpointing
    (256, 2, 1, 1, 256, 64, True, True),
    (256, 2, 1, 1, 256, 64, True, False),
    (384, 3, 2, 2, 512, 128, True, True),
    (384, 3, 2, 2, 512, 128, False, False),
    (512, 4, 2, 2, 512, 256, True, False),
]


def main() -> None:
    import comfy.ldm.flux.math as flux_math
    import comfy.ldm.modules.attention as comfy_attention

    from kontext_train import comfyui
    from kontext_train.comfyui.memory_probe import PlanSettings, measure_step, plan_memory
    from kontext_train.plan.memory_plan import LiveBytes, allocator_peak

    mib = 2**20
    print(
        "| model (width, blocks) | bucket | text | ref | ckpt | attention | planned | LiveBytes | profiler |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for width, heads, depth, single, side, text, ref, ckpt in CASES:
        size = dict(
            hidden_size=width, num_heads=heads, depth=depth, depth_single_blocks=single, context_in_dim=64
        )
        s = PlanSettings(weight_dtype="fp32", width=side, height=side, reference=ref, rank=8,
                         gradient_checkpointing=ckpt, text_tokens=text, **size)  # fmt: skip
        for attention in ("native", "flash"):
            planned = plan_memory(s, attention=attention, autocast=False).step_peak
            model = comfyui.FluxLoraModel(
                comfyui.build_tiny_flux(**size), rank=8, alpha=8.0, gradient_checkpointing=ckpt
            )
            model.load()
            original = flux_math.optimized_attention
            if attention == "flash":
                flux_math.optimized_attention = comfy_attention.attention_pytorch
            try:
                counter = LiveBytes("cpu")
                measure_step(model, s, counter)
                for p in model.parameters():
                    p.grad = None
                profiled = allocator_peak(lambda m=model, s=s: measure_step(m, s, LiveBytes("cpu")))
            finally:
                flux_math.optimized_attention = original
                model.release()
            print(
                f"| {width}, {depth}+{single} | {side}² | {text} | {'on' if ref else 'off'} | {'on' if ckpt else 'off'} "
                f"| {attention} | {planned / mib:.1f} MiB | {counter.peak / mib:.1f} MiB "
                f"({(planned / counter.peak - 1) * 100:+.1f}%) | {profiled / mib:.1f} MiB "
                f"({(planned / profiled - 1) * 100:+.1f}%) |",
                flush=True,
            )


if __name__ == "__main__":
    from kontext_train import comfyui

    comfyui.bootstrap_comfyui(cpu=True)
    main()
