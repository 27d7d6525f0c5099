"""How much of a LoRA's effect survives when ComfyUI merges it into the stored weights?

    .host/0.33.0/venv/bin/python benchmarks/merge_loss.py --json merge_loss.json

Training applies the LoRA on activations: an adapted layer computes ``W x + scale * up (down x)``
exactly. The stock LoraLoader instead patches the weight ``W + delta`` through ComfyUI's
``ModelPatcher``, rounded into the dtype the weight is stored in. This script measures, on single
Linear layers of real Flux width and 512 tokens, the output change ("effect") each way, against the
exact effect ``x delta^T``:

- ``bf16 merged``: a bf16 weight patched at load time (``ModelPatcher.patch_weight_to_device``:
  float32 math, then rounded to bf16).
- ``fp8 merged``: weights stored as float8_e4m3fn (``weight_dtype`` fp8_e4m3fn: the bf16 weight
  rounded to nearest), patched at load time, which rounds ``W + delta`` back to fp8 with the host's
  own stochastic rounding (``comfy.float.stochastic_rounding``, seeded by the key).
- ``fp8 scaled merged``: the same with a per-tensor scale (``amax / 448``, as fp8 "scaled"
  checkpoints store it): ``set_weight`` divides by the scale and rounds stochastically. Emulated
  with the host's ``stochastic_rounding``; the scaled layer classes themselves are not built.
- ``fp8 on the fly``: ComfyUI's ``LowVramPatch`` (layers that did not fit in VRAM, and 0.33's
  dynamic VRAM on first use): the fp8 weight cast to bf16 and patched in bf16 on every forward.
- ``activations, bf16 out``: the exact term added to a bf16 output and rounded there (what the
  training form gives under bf16 compute); a floor every path shares.

The merged effect is ``x (W_patched - W_stored)^T`` in float32 (the two weights dequantized).
Reported per layer shape, weight init and ``|delta| / |W|`` (Frobenius norms): cosine with the
exact effect and relative error ``|effect - exact| / |exact|``. ``noise/quant``: the merge's error
``|x (W_patched - W_stored - delta)^T|`` over the fp8 base's own rounding error ``|x (W_stored -
W)^T|``: 1 means the merge adds as much noise again as storing the model in fp8 did.

Weights: ``default`` is torch's Linear init (uniform, std ``1 / sqrt(3 * in)``, 0.0104 at 3072),
``n002`` is N(0, 0.02^2); Flux's trained weights are not available here. The LoRA delta is a random
rank-16 ``up @ down`` scaled to the given ratio; inputs are N(0, 1).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = ((3072, 3072), (3072, 9216), (3072, 12288))  # (in, out): attention proj, qkv, MLP / linear1
RATIOS = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
INITS = ("default", "n002")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
KEY = "diffusion_model.double_blocks.0.img_attn.proj.weight"


def make_weight(shape: tuple[int, int], init: str, g: torch.Generator) -> torch.Tensor:
    fan_in, out = shape
    if init == "default":
        bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) of torch.nn.Linear
        return (torch.rand(out, fan_in, generator=g) * 2 - 1) * bound
    return torch.randn(out, fan_in, generator=g) * 0.02


def make_lora(w: torch.Tensor, ratio: float, rank: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A kohya LoRA for one layer ``lora_unet_layer`` whose delta has |delta| = ratio * |W|."""
    out, fan_in = w.shape
    up = torch.randn(out, rank, generator=g)
    down = torch.randn(rank, fan_in, generator=g)
    norm = torch.linalg.matrix_norm(up @ down)
    factor = math.sqrt(float(ratio * torch.linalg.matrix_norm(w) / norm))
    return {
        "lora_unet_layer.lora_up.weight": up * factor,
        "lora_unet_layer.lora_down.weight": down * factor,
        "lora_unet_layer.alpha": torch.tensor(float(rank)),
    }


def comfy_patcher(weight: torch.Tensor, lora: dict[str, torch.Tensor]):
    """A ModelPatcher around one Linear holding ``weight`` (its stored dtype), with the LoRA added
    the way LoraLoader adds it (``comfy.lora.load_lora`` + ``add_patches``)."""
    import comfy.lora
    import comfy.model_patcher
    import comfy.ops

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = comfy.ops.manual_cast.Linear(
                weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype
            )
            self.layer.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)

    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(One(), load_device=cpu, offload_device=cpu)
    patches = comfy.lora.load_lora(lora, {"lora_unet_layer": "layer.weight"})
    patcher.add_patches(patches, 1.0)
    return patcher


def merged_at_load(weight: torch.Tensor, lora: dict[str, torch.Tensor]) -> torch.Tensor:
    patcher = comfy_patcher(weight, lora)
    patcher.patch_weight_to_device("layer.weight")
    return patcher.model.layer.weight.detach()


def on_the_fly(weight: torch.Tensor, lora: dict[str, torch.Tensor]) -> torch.Tensor:
    """The weight a lowvram layer computes with: cast to bf16, then ``LowVramPatch``."""
    import comfy.model_patcher

    patcher = comfy_patcher(weight, lora)
    return comfy.model_patcher.LowVramPatch("layer.weight", patcher.patches)(weight.to(torch.bfloat16))


def merged_scaled_fp8(stored: torch.Tensor, scale: float, delta: torch.Tensor, seed: int) -> torch.Tensor:
    """A scaled fp8 layer's ``set_weight``: (dequantized + delta) / scale, stochastically rounded."""
    import comfy.float

    patched = stored.float() * scale + delta
    return comfy.float.stochastic_rounding(patched / scale, FP8, seed=seed).float() * scale


def compare(effect: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    cos = torch.nn.functional.cosine_similarity(effect.flatten(), exact.flatten(), dim=0).item()
    return cos, (torch.linalg.vector_norm(effect - exact) / torch.linalg.vector_norm(exact)).item()


def measure(shape, init: str, ratios, tokens: int, seed: int) -> list[dict]:
    import comfy.utils

    g = torch.Generator().manual_seed(seed)
    w = make_weight(shape, init, g)
    x = torch.randn(tokens, shape[0], generator=g)
    w_bf16 = w.to(torch.bfloat16)
    w_fp8 = w.to(FP8)  # weight_dtype fp8_e4m3fn: round to nearest
    scale = float(w.abs().max()) / FP8_MAX
    w_fp8s = (w / scale).to(FP8)
    quant_noise = {
        "fp8": torch.linalg.vector_norm(x @ (w_fp8.float() - w).T).item(),
        "fp8 scaled": torch.linalg.vector_norm(x @ (w_fp8s.float() * scale - w).T).item(),
    }
    base_out = (x.to(torch.bfloat16) @ w_bf16.T).float()
    seed_key = comfy.utils.string_to_seed(KEY) if hasattr(comfy.utils, "string_to_seed") else 0
    rows = []
    for ratio in ratios:
        lora = make_lora(w, ratio, 16, g)
        up, down = lora["lora_unet_layer.lora_up.weight"], lora["lora_unet_layer.lora_down.weight"]
        delta = up @ down
        exact = (x @ down.T) @ up.T
        with_lora = (base_out + exact).to(torch.bfloat16).float()  # the training form, bf16 output
        variants = {
            "activations, bf16 out": (with_lora - base_out, None),
            "bf16 merged": (x @ (merged_at_load(w_bf16, lora).float() - w_bf16.float()).T, None),
            "fp8 merged": (x @ (merged_at_load(w_fp8, lora).float() - w_fp8.float()).T, "fp8"),
            "fp8 scaled merged": (
                x @ (merged_scaled_fp8(w_fp8s, scale, delta, seed_key) - w_fp8s.float() * scale).T,
                "fp8 scaled",
            ),
            "fp8 on the fly": (x @ (on_the_fly(w_fp8, lora).float() - w_fp8.float()).T, None),
        }
        for name, (effect, base) in variants.items():
            cos, rel = compare(effect, exact)
            row = {"shape": f"{shape[0]}→{shape[1]}", "init": init, "ratio": ratio, "path": name}
            row.update(cosine=cos, rel_error=rel)
            if base is not None:
                noise = torch.linalg.vector_norm(effect - exact).item()
                row["noise_over_quant"] = noise / quant_noise[base]
            rows.append(row)
    return rows


def toy_ratio(steps: int, learning_rate: float, targets: str, seed: int = 0) -> dict:
    """|delta| / |W| per adapted layer after a short toy run with the pack's Trainer (tests/toy.py)."""
    import tempfile

    from _common import make_conditioning
    from toy import ToyBatches, toy_latents

    from kontext_train.comfyui import FluxLoraModel, build_tiny_flux
    from kontext_train.comfyui.tiny_models import TINY_CONTEXT_DIM
    from kontext_train.train.trainer import TrainConfig, Trainer

    cfg = TrainConfig(
        steps=steps,
        learning_rate=learning_rate,
        rank=8,
        batch_size=4,
        lr_schedule="constant_with_warmup",
        warmup_steps=0,
        checkpoint_every=0,
        validate_every_epochs=0,
        lora_targets=targets,
        gradient_checkpointing=False,
        seed=seed,
    )
    model = build_tiny_flux(hidden_size=128, context_in_dim=TINY_CONTEXT_DIM, seed=seed)
    with torch.inference_mode(False), tempfile.TemporaryDirectory() as tmp:
        lm = FluxLoraModel(model, rank=8, alpha=8.0, targets=targets, gradient_checkpointing=False, seed=seed)
        cond = lm.prepare_conditioning(make_conditioning(TINY_CONTEXT_DIM, 8))
        Trainer(cfg, lm, ToyBatches(toy_latents(32, seed=seed), 4, seed=seed), cond, Path(tmp)).run(
            resume=False
        )
        modules = dict(lm.base.diffusion_model.named_modules())
        ratios = sorted(
            (
                torch.linalg.matrix_norm(a.delta().float())
                / torch.linalg.matrix_norm(modules[p].weight.float())
            ).item()
            for p, a in lm.adapters.items()
        )
    return {
        "steps": steps,
        "learning_rate": learning_rate,
        "targets": targets,
        "layers": len(ratios),
        "median": ratios[len(ratios) // 2],
        "max": ratios[-1],
    }


def summary(rows: list[dict]) -> list[list]:
    """One row per (path, ratio): the range over layer shapes and inits."""

    def span(values: list[float], fmt: str) -> str:
        lo, hi = min(values), max(values)
        return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"

    out = []
    paths = list(dict.fromkeys(r["path"] for r in rows))
    for path in paths:
        for ratio in sorted({r["ratio"] for r in rows}):
            group = [r for r in rows if r["path"] == path and r["ratio"] == ratio]
            noise = [r["noise_over_quant"] for r in group if "noise_over_quant" in r]
            out.append(
                [
                    path,
                    f"{ratio:g}",
                    span([r["cosine"] for r in group], "{:.2f}"),
                    span([r["rel_error"] for r in group], "{:.2g}"),
                    span(noise, "{:.2f}") if noise else "",
                ]
            )
    return out


SUMMARY_HEADERS = ["path", "|Δ|/|W|", "cosine", "rel. error", "noise/quant"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--toy-steps", type=int, default=300, help="0 skips the toy run")
    p.add_argument("--quick", action="store_true", help="one small layer and two ratios (for tests)")
    p.add_argument("--json")
    p.add_argument("--summary-of", help="print the summary table of a --json written before, and stop")
    args = p.parse_args()
    if args.summary_of:
        import json

        from _common import md_table

        data = json.loads(Path(args.summary_of).read_text())
        print(md_table(SUMMARY_HEADERS, summary(data["rows"])))
        return
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    from _common import bootstrap, machine_info, md_table, write_json

    bootstrap(cpu=True)
    shapes, ratios = (((256, 512),), (1e-3, 1e-1)) if args.quick else (SHAPES, RATIOS)
    t0 = time.perf_counter()
    rows = [
        r for shape in shapes for init in INITS for r in measure(shape, init, ratios, args.tokens, args.seed)
    ]
    toys = []
    if args.toy_steps:
        with torch.enable_grad():
            # the toy's own settings (lr 2e-3, all_linear) and the trainer's defaults (lr 1e-4, blocks)
            toys = [toy_ratio(args.toy_steps, 2e-3, "all_linear"), toy_ratio(args.toy_steps, 1e-4, "blocks")]
    seconds = time.perf_counter() - t0
    table = md_table(
        ["layer", "init", "|Δ|/|W|", "path", "cosine", "rel. error", "noise/quant"],
        [
            [
                r["shape"],
                r["init"],
                f"{r['ratio']:g}",
                r["path"],
                f"{r['cosine']:.3f}",
                f"{r['rel_error']:.3g}",
                f"{r['noise_over_quant']:.2f}" if "noise_over_quant" in r else "",
            ]
            for r in rows
        ],
    )
    print(table)
    print(md_table(SUMMARY_HEADERS, summary(rows)))
    for t in toys:
        print(
            f"toy run, {t['steps']} steps, lr {t['learning_rate']:g}, {t['targets']}: |Δ|/|W| median "
            f"{t['median']:.3g}, max {t['max']:.3g} over {t['layers']} layers"
        )
    print(f"{seconds:.0f} s")
    write_json(args.json, {"machine": machine_info(), "rows": rows, "toy_runs": toys, "seconds": seconds})


if __name__ == "__main__":
    main()
