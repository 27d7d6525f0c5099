"""On-disk cache of VAE latents for training pairs.

Encoding a 1024 px image through the Flux VAE costs about as much as a training step, so targets
(clean images) and deterministic controls are encoded once and stored as safetensors files.

Keys are content based: sha256 of the image file bytes, the bucket, the VAE id and a format
version, plus for controls the LQ file hash or the degradation config, seed, image key and
variant. Renaming a folder keeps the cache; editing an image, changing the degradation or the VAE
misses it. Every entry stores its key in the metadata and is checked on load (key, shape, dtype,
finite values); anything wrong is re-encoded and counted as ``corrupt``, never trusted. Files are
written to a temporary name and moved into place with ``os.replace`` so a crash never leaves a
half-written entry under a real name.

Controls:

* real LQ files and fixed degradations are deterministic: one cached latent per image.
* random (Real-ESRGAN) degradations, ``control_mode``:
  - ``"pool"``: ``pool_size`` variants per image are cached; epoch e uses variant e % pool_size,
    degraded as if it were epoch ``variant``. Fast (after the first pass over the pool, no VAE
    work), but the model only ever sees ``pool_size`` degradations of each image and can overfit
    to them on long runs.
  - ``"reencode"``: degrade and encode afresh every epoch, never cached. Full diversity, at the
    price of one VAE encode per sample per step.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..files.atomic import atomic_path
from ..setting import TRAINING, Setting, arg_default
from .dataset import RestorationDataset, Sample

__all__ = ["CACHE_FORMAT_VERSION", "CACHE_SETTINGS", "CONTROL_MODES", "LatentCache", "file_sha256"]

CACHE_FORMAT_VERSION = 1
CONTROL_MODES = ("pool", "reencode")
VAE_DOWNSCALE = 8

_hash_memo: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, memoised per process by (path, mtime, size)."""
    st = os.stat(path)
    memo_key = (str(Path(path).resolve()), st.st_mtime_ns, st.st_size)
    with _hash_lock:
        cached = _hash_memo.get(memo_key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _hash_lock:
        _hash_memo[memo_key] = digest
    return digest


def check_cache_folder(cache_dir: Path) -> None:
    """ValueError naming ``cache_dir`` (or the part of its path) that is in the way as something
    other than a folder: a file, a pipe or a device cannot hold the cache."""
    for path in [Path(cache_dir), *Path(cache_dir).parents]:
        if path.exists() or path.is_symlink():
            if path.is_dir():
                return
            what = "a file" if path.is_file() else "not a folder (a pipe, socket, device or broken link)"
            where = (
                "The latent cache folder"
                if path == Path(cache_dir)
                else "A folder on the latent cache's path,"
            )
            raise ValueError(
                f"{where} {path} is {what}: the cache cannot be kept there. Move it away, or choose another "
                "cache folder (cache_folder / --cache-dir)."
            )


class LatentCache:
    """Target and control latents for dataset samples, (C, h/8, w/8) float32 on the CPU.

    ``encode`` receives a CPU float32 batch (B, 3, H, W) in [0, 1] and returns raw VAE latents
    (B, C, H/8, W/8); moving to its device and back is the callable's business.
    """

    def __init__(
        self,
        cache_dir: Path,
        vae_id: str,
        encode: Callable[[torch.Tensor], torch.Tensor],
        control_mode: str = "pool",
        pool_size: int = 4,
    ) -> None:
        if control_mode not in CONTROL_MODES:
            raise ValueError(f"control_mode must be one of {CONTROL_MODES}, got {control_mode!r}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        self.cache_dir = Path(cache_dir)
        check_cache_folder(self.cache_dir)
        self.vae_id = str(vae_id)
        self.encode = encode
        self.control_mode = control_mode
        self.pool_size = int(pool_size)
        self._stats = {"hits": 0, "misses": 0, "corrupt": 0, "uncached": 0}

    @property
    def stats(self) -> dict[str, int]:
        """hits, misses (encoded and stored), corrupt (bad entries re-encoded; also counted as
        misses), uncached (encoded without caching, "reencode" mode)."""
        return dict(self._stats)

    # -- keys -------------------------------------------------------------------------------

    def _base_key(self, kind: str, sample: Sample) -> dict:
        return {
            "format": CACHE_FORMAT_VERSION,
            "kind": kind,
            "vae": self.vae_id,
            "hq_sha256": file_sha256(sample.hq_path),
            "bucket": [int(sample.bucket[0]), int(sample.bucket[1])],
        }

    def target_key(self, sample: Sample) -> dict:
        return self._base_key("target", sample)

    def control_key(self, dataset: RestorationDataset, sample: Sample, variant: int, seed: int) -> dict:
        """Key of a cacheable control. The seed and image key are part of it for synthetic
        degradations because the noise is drawn from ``degradation_seed(seed, key, ...)``."""
        if sample.lq_path is not None:
            key = self._base_key("control-lq", sample)
            key["lq_sha256"] = file_sha256(sample.lq_path)
            return key
        key = self._base_key("control-synthetic", sample)
        key.update(
            degradation=dataset.degradation.to_dict(),
            seed=int(seed),
            image_key=sample.key,
            variant=int(variant),
        )
        return key

    # -- public ---------------------------------------------------------------------------

    def target(self, dataset: RestorationDataset, sample: Sample) -> torch.Tensor:
        """Latent of the clean image at the sample's bucket."""
        return self._cached(self.target_key(sample), sample, lambda: dataset.load_clean(sample))

    def control(self, dataset: RestorationDataset, sample: Sample, epoch: int, seed: int) -> torch.Tensor:
        """Latent of the degraded image for ``epoch`` (see the module docstring for the modes)."""
        deterministic = sample.lq_path is not None or not dataset.degradation.is_random
        if deterministic:
            key = self.control_key(dataset, sample, 0, seed)
            return self._cached(key, sample, lambda: dataset.load_degraded(sample, 0, seed))
        if self.control_mode == "reencode":
            self._stats["uncached"] += 1
            return self._encode_one(dataset.load_degraded(sample, epoch, seed))
        variant = int(epoch) % self.pool_size
        key = self.control_key(dataset, sample, variant, seed)
        return self._cached(key, sample, lambda: dataset.load_degraded(sample, variant, seed))

    # -- storage --------------------------------------------------------------------------

    def path_for(self, key: dict) -> Path:
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.cache_dir / f"{name}.safetensors"

    def _encode_one(self, image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = self.encode(image.unsqueeze(0).float().cpu())
        if z.ndim != 4 or z.shape[0] != 1:
            raise ValueError(f"encode must return (B, C, H/8, W/8); got {tuple(z.shape)} for batch 1")
        return z[0].detach().to("cpu", torch.float32).contiguous()

    def _load_valid(self, path: Path, key_json: str, sample: Sample) -> torch.Tensor | None:
        """The stored latent if the entry is intact and is the one asked for, else None."""
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key_json:
                    return None
                z = f.get_tensor("latent")
        except Exception:  # any unreadable file is simply re-encoded
            return None
        bw, bh = sample.bucket
        expected_hw = (bh // VAE_DOWNSCALE, bw // VAE_DOWNSCALE)
        if z.dtype != torch.float32 or z.ndim != 3 or tuple(z.shape[1:]) != expected_hw:
            return None
        if not bool(torch.isfinite(z).all()):
            return None
        return z

    def _cached(self, key: dict, sample: Sample, make_image: Callable[[], torch.Tensor]) -> torch.Tensor:
        key_json = json.dumps(key, sort_keys=True)
        path = self.path_for(key)
        if os.path.lexists(path):
            # Only a regular file is opened: reading a FIFO put in an entry's place blocks forever,
            # and a folder or device is no entry either; all of these count as corrupt.
            z = self._load_valid(path, key_json, sample) if path.is_file() else None
            if z is not None:
                self._stats["hits"] += 1
                return z
            self._stats["corrupt"] += 1
        self._stats["misses"] += 1
        z = self._encode_one(make_image())
        self._write(path, z, key_json)
        return z

    def _write(self, path: Path, z: torch.Tensor, key_json: str) -> None:
        check_cache_folder(self.cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        # A folder in the entry's place is refused by atomic_path (a rename cannot replace it, and
        # deleting a user's folder is not ours to do).
        with atomic_path(path, suffix=".safetensors.tmp") as tmp:
            save_file({"latent": z}, str(tmp), metadata={"key": key_json})


# The rows of the settings table for how the cache serves random degradations.
CACHE_SETTINGS: tuple[Setting, ...] = (
    Setting("control_mode", "choice", arg_default(LatentCache.__init__, "control_mode"),
        "Random degradations only: pool caches a few degraded versions per image (fast); reencode "
        "makes fresh ones every epoch (more variety, more VAE work).",
        "random degradations: cached pool or re-encode", choices=CONTROL_MODES, commands=TRAINING),
    Setting("pool_size", "int", arg_default(LatentCache.__init__, "pool_size"),
        "pool mode: how many degraded versions of each image are cached (4 typical).",
        "degradation variants cached per image (pool mode)", min=1, max=64, commands=TRAINING),
)  # fmt: skip
