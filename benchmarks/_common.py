"""The benchmarks' harness: ComfyUI bootstrap, machine info, clocks, interleaved rounds, fresh
processes per variant, tables and JSON, and ComfyUI's native trainer (``native_train_lora``).
What the step benchmarks train, and how, is in ``_training``.

Benchmarks are scripts, not tests: run them from the repository root with the project's venv,
e.g. ``.venv/bin/python benchmarks/train_step.py``. Each prints a markdown table and can write
JSON (``--json PATH``).
"""

from __future__ import annotations

import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def bootstrap(cpu: bool | None = None, quiet: bool = True) -> Path:
    """Imports ComfyUI in-process (no server), with its output folders in a temp directory."""
    import logging
    import tempfile

    from kontext_train import comfyui

    root = comfyui.bootstrap_comfyui(cpu=cpu)
    import folder_paths

    base = Path(tempfile.mkdtemp(prefix="kr_bench_"))
    for sub in ("input", "output", "temp", "loras"):
        (base / sub).mkdir()
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.add_model_folder_path("loras", str(base / "loras"), is_default=True)
    if quiet:
        logging.getLogger().setLevel(logging.WARNING)
        import comfy.utils

        comfy.utils.PROGRESS_BAR_ENABLED = False
    return root


def machine_info() -> dict:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "nproc": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import comfyui_version  # type: ignore

        info["comfyui"] = comfyui_version.__version__
    except Exception:
        pass
    return info


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class StepClock:
    """Timestamps of every optimizer step in the process (a global post-step hook), so the
    per-step time of any training loop - ours, ComfyUI's native node, a bare loop - is measured
    the same way: the interval between consecutive ``optimizer.step()`` returns."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        # This process's CPU time (user + system, all threads) at the same moments: on a shared
        # machine it measures the work of a step whatever share of the cores the process got.
        self.cpu_stamps: list[float] = []
        # User CPU time alone: system time is mostly page faults of freshly allocated tensors.
        self.user_stamps: list[float] = []
        self._handle = None

    def _stamp(self, *args, **kwargs) -> None:
        self.stamps.append(time.perf_counter())
        cpu = os.times()
        self.cpu_stamps.append(cpu.user + cpu.system)
        self.user_stamps.append(cpu.user)

    def __enter__(self) -> StepClock:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.stamps, self.cpu_stamps, self.user_stamps = [], [], []
        self._handle = register_optimizer_step_post_hook(self._stamp)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def intervals(self, skip: int = 1) -> list[float]:
        """Step intervals, dropping the first ``skip`` ones (warm-up after setup)."""
        d = [b - a for a, b in zip(self.stamps[:-1], self.stamps[1:])]
        return d[skip:]

    def cpu_intervals(self, skip: int = 1, user_only: bool = False) -> list[float]:
        """CPU seconds (user + system, or user only) of this process per step, like ``intervals``."""
        stamps = self.user_stamps if user_only else self.cpu_stamps
        return [b - a for a, b in zip(stamps[:-1], stamps[1:])][skip:]


def clocked(run: Callable[..., object], *args: object) -> tuple[StepClock, float]:
    """Runs ``run(*args)`` under a ``StepClock``; returns the clock and the wall seconds of the run."""
    with StepClock() as clock:
        t0 = time.perf_counter()
        run(*args)
        wall = time.perf_counter() - t0
    return clock, wall


def round_order(names: list[str], r: int, rotate: bool = True) -> list[str]:
    """The order of the variants in round ``r``: rotated by ``r`` (so no variant always runs
    first) unless ``rotate`` is off, and reversed in odd rounds."""
    k = r % len(names) if rotate else 0
    order = names[k:] + names[:k]
    return order[::-1] if r % 2 else order


def import_trainer_deps() -> float:
    """Imports what the trainer imports from diffusers (LR schedules, timestep sampling), so the
    peak of every variant in a fresh process includes it; returns the MiB the import itself
    added to the peak."""
    start = peak_rss_mb()
    import diffusers.optimization  # noqa: F401
    import diffusers.training_utils  # noqa: F401

    return peak_rss_mb() - start


def run_child(script: str, argv: list[str]) -> dict:
    """Runs ``script`` in a fresh Python process; returns the JSON object on its last output line."""
    out = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{Path(script).name} {' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, default=str))


def md_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def make_conditioning(context_dim: int, tokens: int, seed: int = 0, guidance: float | None = None):
    """CONDITIONING shaped like CLIPTextEncode's for Flux (random values)."""
    g = torch.Generator().manual_seed(seed)
    extras = {"pooled_output": torch.randn(1, 768, generator=g)}
    if guidance is not None:
        extras["guidance"] = guidance
    return [[torch.randn(1, tokens, context_dim, generator=g), extras]]


# Inputs of ComfyUI's TrainLoraNode that newer versions (0.33) have and 0.3.75 lacks, at the
# settings that make it fastest while training the same LoRA as on 0.3.75:
NATIVE_NEWER_INPUTS = {
    "quantized_backward": False,  # only for quantized base weights with training_dtype "none"
    # Depth 1 is the whole transformer (one checkpoint, no activation saving); depth 2 is each
    # top-level block, what 0.3.75's node and this pack's trainer checkpoint.
    "checkpoint_depth": 2,
    "offloading": False,  # the model fits; offloading streams weights and is slower
    "bucket_mode": False,  # one resolution
    # LoRA on the activations (forward hooks) instead of merging W + BA into every weight on
    # every forward: the same function, and faster (0.10 vs 0.15 s/step for the native node on a
    # width-256 tiny model on the CPU, ComfyUI 0.33).
    "bypass_mode": True,
}


# The native node's settings every benchmark uses (plain LoRA, AdamW on an MSE loss, fp32 LoRA
# weights, checkpointing on, a fresh LoRA); a caller passes what it varies.
NATIVE_SHARED_INPUTS = {
    "batch_size": 1,
    "grad_accumulation_steps": 1,
    "learning_rate": 1e-4,
    "optimizer": "AdamW",
    "loss_function": "MSE",
    "seed": 0,
    "lora_dtype": "fp32",
    "algorithm": "LoRA",
    "gradient_checkpointing": True,
    "existing_lora": "[None]",
}


def native_train_lora(**inputs):
    """Runs ComfyUI's ``TrainLoraNode.execute`` as ComfyUI runs nodes (in inference mode; it is a
    list-input node, so every input is a list, ``latents`` one LATENT per image) on whichever
    ComfyUI is imported: inputs the caller leaves out come from ``NATIVE_SHARED_INPUTS``, inputs
    only newer versions have from ``NATIVE_NEWER_INPUTS``.
    Returns the trained LoRA state dict (0.3.75 outputs the model first, 0.33 does not)."""
    from comfy_extras.nodes_train import TrainLoraNode

    params = inspect.signature(TrainLoraNode.execute).parameters
    call = {k: [v] for k, v in NATIVE_SHARED_INPUTS.items()}
    call.update(inputs)
    call.update({k: [v] for k, v in NATIVE_NEWER_INPUTS.items() if k in params})
    required = [
        name
        for name, p in params.items()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    unknown = [name for name in required if name not in call]
    if unknown:
        raise RuntimeError(
            f"This ComfyUI's TrainLoraNode.execute needs inputs the benchmark does not set: {unknown}. "
            "Add them to NATIVE_NEWER_INPUTS in benchmarks/_common.py."
        )
    with torch.inference_mode():
        out = TrainLoraNode.execute(**call)
    outputs = out.args if hasattr(out, "args") else out
    for value in outputs:
        if isinstance(value, dict) and any(str(k).endswith("lora_down.weight") for k in value):
            return value
    raise RuntimeError(f"TrainLoraNode returned no LoRA state dict: {[type(v).__name__ for v in outputs]}")
