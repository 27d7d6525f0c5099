"""LoRA on activations vs LoRA on weights at Flux's real width (3072), where the Linear layers
dominate the step: this pack in both forms, ComfyUI's TrainLoraNode and a bare loop (CPU, fp32).

    $PY benchmarks/wide_step.py --json benchmarks/results/wide_step_<host>.json            # timing
    $PY benchmarks/wide_step.py --memory --json benchmarks/results/wide_memory_<host>.json  # peak RSS
    $PY benchmarks/wide_step.py --smoke                                                     # seconds

Model: ``_training.build_flux`` (ComfyUI's ``comfy.supported_models.Flux``, random weights)
with FLUX.1's width 3072, 24 heads of 128, MLP ratio 4, context 4096, but ONE double and ONE single
block (0.53 B parameters, 2.0 GiB fp32). LoRA rank 16 (alpha 16) on ``all_linear`` (the layers the
native node adapts), gradient checkpointing on, batch 1, 64 text tokens, fp32 weights and compute.
A config is ``<image tokens>`` or ``<image tokens>r``: with ``r`` the degraded latent is added as
Kontext reference tokens (twice the image tokens); 256 tokens = 32x32 latent (256 px).

Variants (the same model object, LoRA initialisation and sigma for ours and bare):

* ``ours_act`` / ``ours_weights``: ``Trainer.run`` with ``FluxLoraModel(lora_form=...)``, in-memory
  latents; formulation ``bridge`` (no reference) or ``kontext`` (with reference).
* ``native``: ComfyUI's ``TrainLoraNode.execute`` (``_common.native_train_lora``; on 0.33 bypass
  mode and per-block checkpointing). It cannot take reference latents, so it is absent from ``r``
  configs.
* ``bare_act`` (the floor): the ``ours_act`` model's ``velocity`` on one fixed training example
  (sigma 0.6, fixed noise) + MSE + ``backward`` + ``AdamW.step`` in a plain loop: no sigma or noise
  sampling, no ``loss.item()``, no gradient clipping, no LR scheduler, no hooks.

Each variant runs 1 + ``--steps`` optimizer steps per round; a step is the interval between
consecutive ``optimizer.step()`` returns (``_common.StepClock``), so the first step (setup, first
call) is never timed. It is measured twice: in this process's CPU seconds (user + system; the
headline, since on a shared machine it does not depend on the share of the cores the process
got) and in wall seconds; user CPU time alone is reported too (system time here is mostly page
faults on freshly allocated large tensors, which the CPU allocator hands back to the OS). Rounds
rotate and alternately reverse the variant order; ratios are the median of per-round ratios.
``--memory`` runs each variant (and ``model``: the model built, no
training) in a fresh process and reports its peak RSS (``getrusage``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import tempfile
import time
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
from _training import (  # noqa: E402
    MemoryBatches,
    bare_steps,
    build_flux,
    lora_model,
    random_latents,
    train_ours,
)

WIDE = {"hidden": 3072, "heads": 24, "double": 1, "single": 1, "context": 4096, "text_tokens": 64}
SMOKE = {"hidden": 256, "heads": 2, "double": 1, "single": 1, "context": 64, "text_tokens": 8}
VARIANTS = ("ours_act", "ours_weights", "native", "bare_act")
# The constructor argument that selects the LoRA form (issue 14); absent before that change, when
# the only form was the weight wrapper.
FORM_ARG = "lora_form"
FORMS = {"act": "activations", "weights": "weights", "half": "activations"}
# ``half`` (issue 19): LoRA on activations with only the first half of the blocks checkpointed,
# what gradient_checkpointing auto chooses under a memory budget that allows half of them
# uncheckpointed. Run it with --variants ours_half,bare_half,native,ours_act.


def has_forms() -> bool:
    from kontext_train.comfyui import FluxLoraModel

    return FORM_ARG in inspect.signature(FluxLoraModel.__init__).parameters


def parse_config(text: str) -> tuple[int, bool]:
    ref = text.endswith("r")
    tokens = int(text.rstrip("r"))
    side = 2 * round(tokens**0.5)
    if (side // 2) ** 2 != tokens:
        raise ValueError(f"--configs: {text!r} is not a square number of image tokens (256, 1024, ...)")
    return side, ref


class Bench:
    def __init__(self, args, forms: tuple[str, ...]) -> None:
        self.args = args
        self.shape = SMOKE if args.smoke else WIDE
        t0 = time.perf_counter()
        self.model = build_flux(self.shape, torch.float32, None, torch.device("cpu"))
        self.build_s = time.perf_counter() - t0
        self.raw_cond = make_conditioning(self.shape["context"], self.shape["text_tokens"], guidance=1.5)
        self.lms = {form: self.lora_model(form) for form in forms}
        self.tmp = Path(tempfile.mkdtemp(prefix="kr_widestep_"))
        self.runs = 0

    def lora_model(self, form: str):
        extra = {FORM_ARG: FORMS[form]} if has_forms() else {}
        if not extra and form != "weights":
            raise RuntimeError(f"This FluxLoraModel has no {FORM_ARG!r} argument: only ours_weights exists.")
        lm, cond = lora_model(
            self.model,
            self.args.rank,
            "all_linear",
            self.raw_cond,
            gradient_checkpointing=True,
            seed=0,
            **extra,
        )
        if form == "half":
            lm.gradient_checkpointing = lm.block_count // 2
        # FluxLoraModel falls back to weights when it cannot use activations: never silently.
        if getattr(lm, FORM_ARG, FORMS[form]) != FORMS[form]:
            raise RuntimeError(f"asked for LoRA on {FORMS[form]}, got {getattr(lm, FORM_ARG)}")
        return lm, cond

    def latents(self, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        return random_latents(2, side)

    # -- variants -------------------------------------------------------------------------
    def ours(self, form: str, side: int, ref: bool, steps: int) -> None:
        lm, cond = self.lms[form]
        self.runs += 1
        clean, degraded = self.latents(side)
        formulation = "kontext" if ref else "bridge"
        try:
            batches, out_dir = MemoryBatches(clean, degraded, 1), self.tmp / f"r{self.runs}"
            train_ours(
                lm, cond, batches, out_dir, steps, formulation, rank=self.args.rank, targets="all_linear"
            )
        finally:
            lm.release()  # one form attached at a time: both share the base model

    def bare(self, form: str, side: int, ref: bool, steps: int) -> None:
        lm, cond = self.lms[form]
        clean, degraded = self.latents(side)
        with torch.inference_mode(False):
            lm.load()
            try:
                bare_steps(lm, cond, clean[:1], degraded[:1], "kontext" if ref else "bridge", steps)
            finally:
                lm.release()

    def native(self, side: int, steps: int) -> None:
        clean, _ = self.latents(side)
        native_train_lora(
            model=[self.model],
            # Two LATENTs: a single one trips an UnboundLocalError (multi_res) in 0.3.75.
            latents=[{"samples": clean[i : i + 1]} for i in range(len(clean))],
            positive=[self.raw_cond],
            steps=[steps],
            rank=[self.args.rank],
            training_dtype=["fp32"],
        )

    def run_variant(self, name: str, side: int, ref: bool, steps: int) -> None:
        kind, _, form = name.partition("_")
        if kind == "native":
            self.native(side, steps)
        elif kind == "ours":
            self.ours(form, side, ref, steps)
        elif kind == "bare":
            self.bare(form, side, ref, steps)
        else:
            raise ValueError(name)


def forms_of(variants: list[str]) -> tuple[str, ...]:
    return tuple(sorted({v.partition("_")[2] for v in variants if v != "native"}))


def timing(args, variants: list[str], report: dict) -> None:
    bench = Bench(args, forms_of(variants))
    report["build_s"] = bench.build_s
    report["base_params"] = sum(p.numel() for p in bench.model.model.diffusion_model.parameters())
    report["base_param_mib"] = param_bytes(bench.model.model.diffusion_model) / 2**20
    report["lora_params"] = sum(p.numel() for p in next(iter(bench.lms.values()))[0].parameters())
    report["runs"] = []
    for config in args.configs.split(","):
        side, ref = parse_config(config)
        names = [v for v in variants if not (ref and v == "native")]
        for r in range(args.rounds):
            for v in round_order(names, r):
                clock, wall = clocked(bench.run_variant, v, side, ref, 1 + args.steps)
                steps, cpu = clock.intervals(skip=0), clock.cpu_intervals(skip=0)
                run = {"config": config, "round": r, "variant": v, "steps_s": steps, "cpu_s": cpu}
                run.update(user_s=clock.cpu_intervals(skip=0, user_only=True), wall_s=wall)
                report["runs"].append(run)
                line = " ".join(f"{s:.2f}" for s in steps) + " | cpu " + " ".join(f"{s:.2f}" for s in cpu)
                print(f"{config:>6} round {r} {v:>12} {line}", flush=True)
                write_json(args.json, report)  # partial results survive an interrupted run


RATIOS = (
    ("ours_act", "ours_weights"),
    ("ours_act", "native"),
    ("ours_weights", "native"),
    ("ours_act", "bare_act"),
    ("ours_weights", "bare_act"),
    ("native", "bare_act"),
    ("ours_half", "native"),
    ("ours_half", "bare_half"),
    ("ours_half", "ours_act"),
    ("ours_weights", "bare_weights"),  # only before the activations form existed
)


def summarise(runs: list[dict], key: str = "cpu_s") -> tuple[list[list], list[list]]:
    """Median seconds per step per (config, variant) and the median of per-round ratios of round
    medians; ``key`` is ``cpu_s`` (this process's CPU time) or ``steps_s`` (wall time)."""
    per: dict[tuple[str, str], list[float]] = {}
    rounds: dict[tuple[str, str, int], float] = {}
    for run in runs:
        per.setdefault((run["config"], run["variant"]), []).extend(run[key])
        rounds[run["config"], run["variant"], run["round"]] = median(run[key])
    configs = list(dict.fromkeys(c for c, _ in per))
    times = [[c, v, median(s), len(s), min(s), max(s)] for (c, v), s in per.items()]
    ratios = []
    for c in configs:
        for a, b in RATIOS:
            paired = [
                rounds[c, a, r] / rounds[c, b, r]
                for (cc, v, r) in rounds
                if cc == c and v == a and (c, b, r) in rounds
            ]
            if paired:
                ratios.append([c, f"{a} / {b}", median(paired), min(paired), max(paired), len(paired)])
    return times, ratios


# -- memory: one fresh process per variant ----------------------------------------------------
def memory_child(args) -> dict:
    import_trainer_deps()  # paid by every variant
    v = args.memory_variant
    side, ref = parse_config(args.configs.split(",")[0])
    bench = Bench(args, () if v in ("model", "native") else forms_of([v]))
    setup = peak_rss_mb()
    if v != "model":
        bench.run_variant(v, side, ref, 1 + args.steps)
    return {"variant": v, "peak_rss_mb": peak_rss_mb(), "rss_after_setup_mb": setup}


def memory(args, variants: list[str], report: dict) -> None:
    rows = []
    for config in args.configs.split(","):
        names = ["model", *(v for v in variants if not (config.endswith("r") and v == "native"))]
        for rep in range(args.memory_reps):
            for v in round_order(names, rep, rotate=False):
                data = run_child(__file__, [*child_argv(args), "--configs", config, "--memory-variant", v])
                row = {"config": config, "rep": rep, **data}
                rows.append(row)
                print(f"memory {config:>6} rep {rep} {v:>12} peak {row['peak_rss_mb']:.0f} MiB", flush=True)
                report["memory"] = rows
                write_json(args.json, report)


def memory_summary(rows: list[dict]) -> list[list]:
    """Median peak RSS per (config, variant) and its excess over the ``model`` process."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["config"], row["variant"]), []).append(row)
    out = []
    for (config, v), rs in groups.items():
        peak = median(r["peak_rss_mb"] for r in rs)
        base = groups.get((config, "model"))
        over = peak - median(r["peak_rss_mb"] for r in base) if base else float("nan")
        out.append([config, v, peak, over, median(r["rss_after_setup_mb"] for r in rs), len(rs)])
    return out


def child_argv(args) -> list[str]:
    out = ["--rank", str(args.rank), "--steps", str(args.steps), "--threads", str(args.threads)]
    return out + (["--smoke"] if args.smoke else [])


def code_version() -> dict:
    """The commit measured and whether the library had uncommitted changes (shared working tree)."""

    def git(*a: str) -> str:
        run = subprocess.run(["git", *a], cwd=Path(__file__).parents[1], capture_output=True, text=True)
        return run.stdout.strip()

    import hashlib

    root = Path(__file__).parents[1] / "kontext_train"
    files = ("comfyui/training_model.py", "comfyui/lora_forward.py", "method/lora.py")
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": git("status", "--porcelain", "kontext_train"),
        "sha256": {
            f: hashlib.sha256((root / f).read_bytes()).hexdigest()[:16] for f in files if (root / f).exists()
        },
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="256,256r,1024", help="image tokens, 'r' = with reference")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=2, help="timed steps per run (after 1 warm-up step)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--memory", action="store_true", help="peak RSS per variant, fresh processes")
    p.add_argument("--memory-reps", type=int, default=1)
    p.add_argument("--memory-variant", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help="torch threads for every variant")
    p.add_argument("--smoke", action="store_true", help="width 256 and 16 image tokens: checks the script")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.smoke and args.configs == p.get_default("configs"):
        args.configs = "16,16r"
    torch.set_num_threads(args.threads)
    bootstrap(cpu=True)
    variants = [v for v in args.variants.split(",") if v]
    if not has_forms():  # before "LoRA on activations": the weight wrapper is the only form
        variants = [v for v in variants if not v.endswith("_act")]
        variants += ["bare_weights"] if "bare_act" in args.variants else []
    if args.memory_variant:
        result = memory_child(args)
        print(json.dumps(result))
        return result

    report = {
        "machine": machine_info(),
        "command": " ".join(sys.argv if argv is None else ["wide_step.py", *argv]),
        "args": vars(args),
        "shape": SMOKE if args.smoke else WIDE,
        "variants": variants,
        "has_lora_forms": has_forms(),
        "code": code_version(),
    }
    if args.memory:
        memory(args, variants, report)
        report["memory_summary"] = memory_summary(report["memory"])
        headers = ["config", "variant", "peak RSS MiB", "over model-only MiB", "after setup MiB", "reps"]
        print(md_table(headers, report["memory_summary"]))
    else:
        timing(args, variants, report)
        for key, what in (("cpu_s", "CPU"), ("user_s", "user CPU"), ("steps_s", "wall")):
            times, ratios = summarise(report["runs"], key)
            report[f"times_{key}"], report[f"ratios_{key}"] = times, ratios
            print(md_table(["config", "variant", f"median {what} s/step", "steps", "min", "max"], times))
            print()
            print(
                md_table(
                    ["config", f"ratio ({what})", "median of per-round ratios", "min", "max", "rounds"],
                    ratios,
                )
            )
            print()
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    import logging

    # The trainer warns on every run that diffusers skips all_linear's outer layers: noise here.
    logging.getLogger("kontext_restore").setLevel(logging.ERROR)
    main()
