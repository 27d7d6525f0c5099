"""Time of restoring in tiles (issue 22 item 6): the pack's own work per tile, with the tiny test model.

Restores a 1024x1024 image at bucket_scale 0.0625 (375 tiles of 48x80) at 1 and 8 steps, and at
0.25 (21 tiles) for comparison, with the tiny random Flux and VAE the tests use, on the CPU, one
thread. With a 1-block model the time is almost all per-tile work (VAE encode/decode, ComfyUI's
sampler set-up, blending); FLUX adds a full model call per step per tile. This sets
``restore.MAX_TILES_PER_IMAGE``.

    COMFYUI_PATH=.host/0.33.0/ComfyUI PYTHONPATH=. .host/0.33.0/venv/bin/python benchmarks/restore_tiles.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
    import torch
    from conftest import make_conditioning, make_tiny_flux, make_tiny_vae

    from kontext_train import comfyui
    from kontext_train.data.buckets import bucket_resolutions
    from kontext_train.restore.restore import plan_restoration, restore_images
    from kontext_train.restore.restore_settings import resolve_restore_settings

    torch.set_num_threads(1)
    model, vae = make_tiny_flux(), make_tiny_vae()
    print("| image | bucket_scale | steps | tiles | seconds | per tile |\n|---|---|---|---|---|---|")
    for w, h, scale, steps in [(1024, 1024, 0.0625, 1), (1024, 1024, 0.0625, 8), (1024, 1024, 0.25, 8)]:
        s = resolve_restore_settings(
            None, mode="bridge", steps=steps, sampler="euler", scheduler="as_trained", seed=0,
            guidance=None, bucket_scale=scale, prompt=None,
        )  # fmt: skip
        tiles = len(plan_restoration(w, h, bucket_resolutions(scale)).tiles)
        start = time.perf_counter()
        with torch.inference_mode():
            restore_images(
                [torch.rand(3, h, w)], s, comfyui.region_restorer(model, vae, make_conditioning(), s)
            )
        took = time.perf_counter() - start
        print(f"| {w}x{h} | {scale:g} | {steps} | {tiles} | {took:.1f} | {took / tiles:.2f} s |", flush=True)


if __name__ == "__main__":
    from kontext_train import comfyui

    comfyui.bootstrap_comfyui(cpu=True)
    main()
