"""The benchmarks' ComfyUI-facing pieces work on the ComfyUI under test (the scripts themselves are
run by hand: benchmarks/train_step.py, benchmarks/gpu_train_step.py --tiny; benchmarks/wide_step.py
runs here end to end in its --smoke mode)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from conftest import make_conditioning, make_tiny_flux

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import native_train_lora  # noqa: E402


def test_native_trainer_runs_with_this_comfyuis_inputs(comfy_root):
    """ComfyUI 0.33's TrainLoraNode has five more required inputs and deep-copies its model
    through the loader's reload hook, which the tiny model provides."""
    lora = native_train_lora(
        model=[make_tiny_flux()],
        latents=[{"samples": torch.randn(1, 16, 4, 4)} for _ in range(2)],
        positive=[make_conditioning()],
        steps=[1],
        rank=[2],
        training_dtype=["fp32"],
    )
    downs = [k for k in lora if k.endswith("lora_down.weight")]
    assert any(k.startswith("diffusion_model.double_blocks.0.") for k in downs), sorted(lora)[:5]


def test_gpu_script_model_has_unit_norm_gains_and_reloads_as_a_copy(comfy_root):
    import gpu_train_step
    from _training import build_flux

    model = build_flux(gpu_train_step.TINY, torch.float32, None, torch.device("cpu"))
    gains = [p for p in model.model.diffusion_model.parameters() if p.ndim == 1 and torch.all(p == 1)]
    assert len(gains) == 4 * gpu_train_step.TINY["double"] + 2 * gpu_train_step.TINY["single"]
    factory, args = model.cached_patcher_init
    copy = factory(*args, disable_dynamic=True)
    assert copy.model is not model.model
    ours, theirs = model.model.diffusion_model.state_dict(), copy.model.diffusion_model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].data_ptr() != theirs[k].data_ptr() for k in ours)


def test_rounds_rotate_and_alternate_the_order_of_the_variants():
    from _common import round_order

    names = ["a", "b", "c"]
    assert [round_order(names, r) for r in range(4)] == [
        ["a", "b", "c"],
        ["a", "c", "b"],  # rotated by one, reversed
        ["c", "a", "b"],
        ["c", "b", "a"],  # rotated by three (none), reversed
    ]
    assert [round_order(names, r, rotate=False) for r in range(2)] == [names, names[::-1]]


def test_gpu_script_every_variant_trains_and_has_a_plan(comfy_root, tmp_path):
    """Each variant of benchmarks/gpu_train_step.py runs one step at tiny size on this host (a
    variant that raises is reported in its row, so the row's status is what shows it), and the
    planner's prediction comes out for the rows that carry one."""
    import argparse

    import gpu_train_step

    shape = gpu_train_step.TINY
    model = gpu_train_step.build_flux(shape, torch.float32, None, torch.device("cpu"))
    runner = gpu_train_step.Runner(argparse.Namespace(rank=4, warmup=0, steps=1), model, torch.device("cpu"))
    # The native node last: 0.3.75's TrainLoraNode casts the float32 test model's weights to its
    # bf16 training dtype in place (the GPU script's model is bf16 to begin with).
    for variant in ("ours_bridge", "ours_bridge_weights", "ours_bridge_ref", "native"):
        row = runner.measure(variant, 8, shape)
        assert row["status"] == "ok", row
    plan = gpu_train_step.planned(shape, 8, True, "bf16", 4)
    assert 0 < plan["plan_alloc_gib"] < plan["plan_total_gib"]


def test_wide_step_smoke_runs_every_variant_end_to_end(comfy_root, tmp_path):
    """benchmarks/wide_step.py --smoke in a fresh process on this host: every variant trains and is
    timed (the native node, which cannot take reference latents, only without them),
    LoRA on activations and on weights are both measured, and the ratios come out."""
    import json
    import os
    import subprocess

    from wide_step import VARIANTS

    out = tmp_path / "wide.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "wide_step.py"
    cmd = [sys.executable, str(script), "--smoke", "--configs", "16,16r", "--rounds", "1", "--steps", "1"]
    run = subprocess.run([*cmd, "--json", str(out)], capture_output=True, text=True, env=dict(os.environ))
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["has_lora_forms"] is True
    seen = {(r["config"], r["variant"], r["round"]) for r in report["runs"]}
    for config, variants in (("16", VARIANTS), ("16r", [v for v in VARIANTS if v != "native"])):
        assert {(config, v, 0) for v in variants} == {s for s in seen if s[0] == config}
    assert all(len(r["steps_s"]) == len(r["cpu_s"]) == 1 and r["cpu_s"][0] > 0 for r in report["runs"])
    ratios = {(c, name) for c, name, *_ in report["ratios_cpu_s"]}
    assert {
        ("16", "ours_act / native"),
        ("16", "ours_act / bare_act"),
        ("16r", "ours_act / ours_weights"),
    } <= ratios
    assert not any(c == "16r" and "native" in name for c, name in ratios)


def test_wide_step_ratios_are_medians_of_per_round_ratios(comfy_root):
    from wide_step import summarise

    def run(variant, rnd, *steps):
        return {"config": "256", "round": rnd, "variant": variant, "cpu_s": list(steps), "steps_s": [9.0]}

    runs = [
        run("ours_act", 0, 2.0, 4.0), run("native", 0, 1.0, 1.0),  # round median 3 / 1
        run("ours_act", 1, 6.0), run("native", 1, 4.0),  # 1.5
        run("ours_act", 2, 1.0), run("native", 2, 2.0),  # 0.5
        run("ours_weights", 3, 5.0),  # alone in its round: in no ratio
    ]  # fmt: skip
    times, ratios = summarise(runs)
    assert ["256", "ours_act", 3.0, 4, 1.0, 6.0] in times  # median of 1, 2, 4, 6
    assert ratios == [["256", "ours_act / native", 1.5, 0.5, 3.0, 3]]


def test_train_step_script_times_every_variant_on_a_tiny_model(comfy_root, tmp_path):
    """benchmarks/train_step.py in a fresh process at a tiny size: every variant, bridge_ref
    included (it needs bridge noise since issue 11), trains and gives finite ratios."""
    import json
    import math
    import os
    import subprocess

    out = tmp_path / "train_step.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"
    tiny = ["--width", "64", "--double", "1", "--single", "1", "--latent", "8", "--text-tokens", "8"]
    cmd = [sys.executable, str(script), *tiny, "--steps", "3", "--rounds", "1", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    text = json.dumps(json.loads(out.read_text()))
    for ratio in ("ours_bridge / native", "ours_bridge_ref / ours_bridge", "ours_kontext / ours_bridge_ref"):
        assert ratio in run.stdout, ratio
        line = next(row for row in run.stdout.splitlines() if row.startswith(f"| {ratio} |"))
        assert all(math.isfinite(float(cell)) for cell in line.strip("|").split("|")[1:]), line
    assert "bridge_ref" in text
