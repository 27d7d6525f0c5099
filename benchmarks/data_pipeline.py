"""Data-pipeline benchmark: images per second for scan/validate + load + bucket + degrade at ~1 MP,
and latent-cache miss vs hit with a tiny 16-channel VAE.

    .venv/bin/python benchmarks/data_pipeline.py

Images: skimage's sample photos resized to about one megapixel (Lanczos, aspect kept), saved as
JPEG q95 into a temporary folder; bucket scale 1.0 (the 17 Kontext resolutions, ~1 MP).
Phases, repeated and interleaved (order alternates every repetition):

* ``build_dataset``: scan, open and validate every file, assign buckets, split.
* ``load_clean``: decode + fit to bucket (``RestorationDataset.load_clean``).
* ``load_pair fixed`` / ``load_pair realesrgan``: clean + synthetic degradation
  (``RestorationDataset.load_pair``; Real-ESRGAN draws new strengths per epoch).
* latent cache: ``LatentCache.target`` per image on an empty cache (miss: load + encode + write)
  and again on the filled cache (hit: read + key/shape/finite checks), plus the bare VAE encode.

The VAE is a TAESD-format model (~2.5M parameters, the test fixture): a real Flux VAE (84M
parameters) makes a miss far more expensive, so the hit/miss ratio here is a lower bound.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bootstrap, machine_info, md_table, median, write_json  # noqa: E402

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "camera",
)
MISS = "cache target miss (load + encode + write)"
HIT = "cache target hit (read + checks)"
ENCODE = "VAE encode only (tiny VAE)"


def make_photos(folder: Path, megapixels: float = 1.0) -> list[Path]:
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PHOTOS:
        a = getattr(skimage.data, name)()
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        img = Image.fromarray(a[..., :3].astype(np.uint8))
        s = (megapixels * 1e6 / (img.width * img.height)) ** 0.5
        img = img.resize((round(img.width * s), round(img.height * s)), Image.LANCZOS)
        path = folder / f"{name}.jpg"
        img.save(path, quality=95)
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--megapixels", type=float, default=1.0)
    p.add_argument("--cache-scale", type=float, default=0.5, help="bucket scale for the latent-cache phase")
    p.add_argument("--cache-images", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bootstrap(cpu=True)
    from conftest import make_tiny_vae

    from kontext_train import comfyui
    from kontext_train.data.dataset import build_dataset
    from kontext_train.data.degradations import DegradationConfig
    from kontext_train.data.latent_cache import LatentCache

    tmp = Path(tempfile.mkdtemp(prefix="kr_data_"))
    paths = make_photos(tmp / "hq", args.megapixels)
    sizes = [Image.open(p).size for p in paths]
    vae = make_tiny_vae()

    def encode(images):
        return comfyui.vae_encode(vae, images)

    configs = {"fixed": DegradationConfig(), "realesrgan": DegradationConfig(kind="realesrgan")}
    datasets = {k: build_dataset(tmp / "hq", val_count=0, degradation=c) for k, c in configs.items()}
    cache_ds = build_dataset(tmp / "hq", val_count=0, bucket_scale=args.cache_scale)
    cache_ds.train = cache_ds.train[: args.cache_images]
    nc = len(cache_ds.train)
    samples = datasets["fixed"].train
    n = len(samples)
    t: dict[str, list[float]] = {}

    def rec(name, seconds):
        t.setdefault(name, []).append(seconds)

    def phase_build():
        t0 = time.perf_counter()
        build_dataset(tmp / "hq", val_count=0)
        rec("build_dataset (scan + validate + bucket)", (time.perf_counter() - t0) / n)

    def phase_clean():
        ds = datasets["fixed"]
        t0 = time.perf_counter()
        for s in ds.train:
            ds.load_clean(s)
        rec("load_clean (decode + fit bucket)", (time.perf_counter() - t0) / n)

    def phase_pair(kind, epoch):
        ds = datasets[kind]
        t0 = time.perf_counter()
        for s in ds.train:
            ds.load_pair(s, epoch, 0)
        rec(f"load_pair {kind} (decode + bucket + degrade)", (time.perf_counter() - t0) / n)

    def phase_cache(rep):
        ds = cache_ds
        cache = LatentCache(tmp / f"cache{rep}", "tiny-vae", encode)
        t0 = time.perf_counter()
        for s in ds.train:
            cache.target(ds, s)
        rec(MISS, (time.perf_counter() - t0) / nc)
        t0 = time.perf_counter()
        for s in ds.train:
            cache.target(ds, s)
        rec(HIT, (time.perf_counter() - t0) / nc)
        assert cache.stats["hits"] == nc and cache.stats["misses"] == nc, cache.stats
        images = [ds.load_clean(s) for s in ds.train]
        t0 = time.perf_counter()
        for im in images:
            encode(im[None])
        rec(ENCODE, (time.perf_counter() - t0) / nc)

    for rep in range(args.reps):
        phases = [
            phase_build,
            phase_clean,
            lambda r=rep: phase_pair("fixed", r),
            lambda r=rep: phase_pair("realesrgan", r),
            lambda r=rep: phase_cache(r),
        ]
        for ph in phases if rep % 2 == 0 else phases[::-1]:
            ph()
        print(f"rep {rep} done", flush=True)

    rows = [[k, median(v), 1.0 / median(v), len(v)] for k, v in t.items()]
    print(f"{n} images, sizes {sorted(set(sizes))}, buckets {sorted({s.bucket for s in samples})}")
    print(md_table(["phase", "median s/image", "images/s", "reps"], rows))
    print(
        f"cache phase: {nc} images at bucket scale {args.cache_scale}: {sorted({s.bucket for s in cache_ds.train})}"
    )
    miss, hit = median(t[MISS]), median(t[HIT])
    print(f"\ncache miss / hit = {miss / hit:.1f}x")
    write_json(
        args.json,
        {
            "machine": machine_info(),
            "command": " ".join(sys.argv),
            "images": n,
            "sizes": sizes,
            "buckets": sorted({s.bucket for s in samples}),
            "cache_phase": {"images": nc, "bucket_scale": args.cache_scale},
            "phases": {k: {"median_s_per_image": median(v), "all": v} for k, v in t.items()},
            "cache_miss_over_hit": miss / hit,
        },
    )


if __name__ == "__main__":
    main()
