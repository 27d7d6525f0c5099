"""Does the offline demo restore its held-out photo? Its settings against the earlier ones, over
training seeds, with the default 8 sampling steps and with 1, beside a bound from outside the
method: the best 7x7 linear filter (least squares, per output channel, on all three input
channels) fitted on the demo's own training pairs and applied to the held-out photo.

Each demo run is ``python -m kontext_train demo`` in a fresh process (the command a user runs);
the 1-step figures re-run the finished demo, which restores again without training. Run from the
repository root with the test host's Python and ComfyUI:

    COMFYUI_PATH=.host/0.33.0/ComfyUI .host/0.33.0/venv/bin/python benchmarks/demo_restores.py

``--json PATH`` keeps the per-run numbers. About 15 minutes on a 2-core CPU (two runs at a time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import ROOT, machine_info, md_table, write_json

# The demo's settings before this benchmark (five training photos, adapters on the blocks).
EARLIER = [
    *("--demo-images", "6", "--steps", "200", "--rank", "8", "--lora-targets", "blocks"),
    *("--warmup-steps", "10", "--checkpoint-every", "100"),
]
CONFIGS = {"demo defaults": [], "earlier demo": EARLIER}


def run_demo(out: Path, seed: int, extra: list[str], restore_steps: int | None = None) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "kontext_train",
        "demo",
        "--output-dir",
        str(out),
        "--seed",
        str(seed),
        *extra,
    ]
    if restore_steps is not None:
        cmd += ["--restore-steps", str(restore_steps)]
    # One thread per run: two runs share the two cores without oversubscribing them.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    mean = json.loads((out / "evaluation.json").read_text())["mean"]
    return {
        "seconds": time.perf_counter() - start,
        **{k: mean[k] for k in ("psnr_restored", "psnr_degraded", "ssim_restored", "ssim_degraded")},
    }


def one_seed(config: str, seed: int, root: Path) -> list[dict]:
    out = root / f"{config.replace(' ', '_')}_{seed}"
    rows = []
    for steps in (None, 1):  # None: the LoRA's own (8 for bridge); then the finished run again at 1
        row = run_demo(out, seed, CONFIGS[config], steps)
        rows.append({"config": config, "seed": seed, "restore_steps": steps or 8, **row})
    return rows


def linear_bound(demo_images: Path, seed: int) -> tuple[float, float]:
    """(degraded, filtered) PSNR of the held-out photo for the best 7x7 linear filter."""
    import torch
    import torch.nn.functional as F

    from kontext_train.app.demo import DEMO_DEFAULTS, DEMO_HELD_OUT
    from kontext_train.data.dataset import build_dataset

    ds = build_dataset(
        demo_images,
        val_count=1,
        seed=seed,
        bucket_scale=float(DEMO_DEFAULTS["bucket_scale"]),
        held_out_first=DEMO_HELD_OUT,
    )
    k = 7

    def features(img: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(img[None].double(), k, padding=k // 2)[0]
        return torch.cat([patches, torch.ones(1, patches.shape[1], dtype=patches.dtype)]).T

    xs, ys = [], []
    for sample in ds.train:
        clean, degraded = ds.load_pair(sample, 0, seed)
        xs.append(features(degraded))
        ys.append(clean.reshape(3, -1).T.double())
    weights = torch.linalg.lstsq(torch.cat(xs), torch.cat(ys)).solution
    clean, degraded = ds.load_pair(ds.val[0], 0, seed)
    filtered = (features(degraded) @ weights).T.reshape(clean.shape).float().clamp(0, 1)

    def psnr(a: torch.Tensor) -> float:
        return -10 * math.log10(F.mse_loss(a, clean).item())

    return psnr(degraded), psnr(filtered)


def mean_sd(xs: list[float], fmt: str) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):{fmt}} ± {sd:{fmt.lstrip('+')}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kr_demo_bench_"))
    jobs = [(c, s) for c in CONFIGS for s in args.seeds]
    with ThreadPoolExecutor(max_workers=2) as pool:
        rows = [r for rs in pool.map(lambda j: one_seed(*j, root), jobs) for r in rs]
    bounds = [linear_bound(root / f"demo_defaults_{s}" / "demo_images", s) for s in args.seeds]

    table = []
    for config in CONFIGS:
        for steps in (8, 1):
            sel = [r for r in rows if r["config"] == config and r["restore_steps"] == steps]
            gains = [r["psnr_restored"] - r["psnr_degraded"] for r in sel]
            table.append(
                [
                    config,
                    steps,
                    mean_sd([r["psnr_degraded"] for r in sel], ".2f"),
                    mean_sd([r["psnr_restored"] for r in sel], ".2f"),
                    mean_sd(gains, "+.2f"),
                    mean_sd([r["ssim_degraded"] for r in sel], ".4f"),
                    mean_sd([r["ssim_restored"] for r in sel], ".4f"),
                    f"{statistics.mean(r['seconds'] for r in sel):.0f}",
                ]
            )
    table.append(
        [
            "best 7x7 linear filter",
            "",
            mean_sd([b[0] for b in bounds], ".2f"),
            mean_sd([b[1] for b in bounds], ".2f"),
            mean_sd([b[1] - b[0] for b in bounds], "+.2f"),
            "",
            "",
            "",
        ]
    )
    headers = [
        "settings",
        "steps",
        "PSNR degraded",
        "PSNR restored",
        "gain dB",
        "SSIM degraded",
        "SSIM restored",
        "s/run",
    ]
    print(f"seeds {args.seeds}; machine: {machine_info()}")
    print(md_table(headers, table))
    write_json(args.json, {"rows": rows, "linear_bound": bounds, "machine": machine_info()})


if __name__ == "__main__":
    main()
