"""A restoration dataset: clean (HQ) images, optionally paired degraded (LQ) ones, in buckets.

``build_dataset`` validates every file up front (a corrupt image found at step 2,000 wastes the
run), assigns buckets, and makes a held-out split that depends only on the seed and file names.
The held-out count adapts to small folders: at most 20% of the usable images (rounded down), at
least one from two images on, none of a single image; a larger ``val_count`` is reduced and the
summary says so (4 of 6 photos held out once left 2 to train on without a word).

Seeds of synthetic degradations: a fixed pipeline uses ``degradation_seed(seed, key, 0)`` for
every epoch, so each image has one degraded version (its noise included) that can be cached. A
random (Real-ESRGAN) pipeline uses ``degradation_seed(seed, key, epoch)``: a new degradation every
epoch, reproducible from (seed, key, epoch).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..setting import WITH_DATA, Setting, arg_default
from .buckets import bucket_histogram, bucket_resolutions, fit_to_bucket, format_histogram, nearest_bucket
from .degradations import DegradationConfig, degradation_seed, degrade, describe
from .images import IMAGE_EXTENSIONS, ImageLoadError, load_rgb, pil_to_tensor, scan_image_folder

__all__ = [
    "DATASET_SETTINGS",
    "RestorationDataset",
    "Sample",
    "build_dataset",
    "held_out_limit",
    "resolve_dataset_path",
    "split_sizes",
]

NO_COUNTERPART = "no degraded counterpart"

# Largest relative difference between an HQ image's aspect ratio and its LQ partner's. A paired
# LQ may be a downscaled copy, whose sides were rounded to whole pixels (allowed on top of this);
# beyond that the two are different pictures or crops (e.g. a portrait LQ for a landscape HQ),
# which would teach the model to invent content.
PAIR_ASPECT_TOLERANCE = 0.02

DEFAULT_VAL_COUNT = 4
MAX_HELD_OUT_PERCENT = 20  # of the usable images, rounded down
# Below this many training images the summary warns and suggests adding photos.
FEW_TRAINING_IMAGES = 8


@dataclass
class Sample:
    """One training pair. ``key`` is the HQ path relative to the HQ folder, posix style."""

    key: str
    hq_path: Path
    lq_path: Path | None
    size: tuple[int, int]
    bucket: tuple[int, int]


def _reason_category(reason: str) -> str:
    return reason.split(" (", 1)[0]


@dataclass
class RestorationDataset:
    hq_dir: Path
    lq_dir: Path | None
    train: list[Sample]
    val: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    bucket_scale: float = 1.0
    # Warnings about the split (val_count reduced, few training images), shown in the summary.
    split_warnings: list[str] = field(default_factory=list)

    def bucket_histogram(self, split: str = "all") -> dict[str, int]:
        """Images per bucket for "train", "val" or "all"."""
        samples = {"train": self.train, "val": self.val, "all": self.train + self.val}[split]
        return bucket_histogram([s.bucket for s in samples])

    def summary(self, brief: bool = False) -> str:
        """Human-readable report: what is used, what was skipped and why, split, buckets.

        ``brief``: the split, warnings and skipped counts only, the lines a node has room for.
        """
        n = len(self.train) + len(self.val)
        lines = [f"used {n} image(s): {len(self.train)} train, {len(self.val)} held out for validation"]
        lines += [f"warning: {w}" for w in self.split_warnings]
        if self.skipped:
            by_reason = Counter(_reason_category(r) for _, r in self.skipped)
            lines.append(
                f"skipped {len(self.skipped)}: "
                + ", ".join(f"{k}: {v}" for k, v in sorted(by_reason.items()))
            )
        if brief:
            return "\n".join(lines)
        source = (
            f"paired LQ from {self.lq_dir}" if self.lq_dir else f"synthetic LQ ({describe(self.degradation)})"
        )
        lines.insert(0, f"Dataset {self.hq_dir}: {source}")
        lines += [f"  - {path}: {reason}" for path, reason in self.skipped[:10]]
        if len(self.skipped) > 10:
            lines.append(f"  ... and {len(self.skipped) - 10} more")
        # A blank line also ends the list of skipped files where the summary is shown as Markdown.
        lines += ["", f"buckets (scale {self.bucket_scale:g}):", format_histogram(self.bucket_histogram())]
        return "\n".join(lines)

    def load_clean(self, sample: Sample) -> torch.Tensor:
        """The HQ image fitted to its bucket, (3, h, w) in [0, 1]."""
        return pil_to_tensor(fit_to_bucket(load_rgb(sample.hq_path, min_size=1), sample.bucket))

    def degradation_seed_for(self, sample: Sample, epoch: int, seed: int) -> int:
        """Seed of the synthetic degradation; the epoch only counts for random pipelines."""
        return degradation_seed(seed, sample.key, epoch if self.degradation.is_random else 0)

    def load_degraded(
        self, sample: Sample, epoch: int, seed: int, clean: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The LQ image at the sample's bucket: the real paired file (fitted to the same bucket,
        whatever its own size) or a synthetic degradation of ``clean`` (loaded if not given)."""
        if sample.lq_path is not None:
            return pil_to_tensor(fit_to_bucket(load_rgb(sample.lq_path, min_size=1), sample.bucket))
        if clean is None:
            clean = self.load_clean(sample)
        return degrade(clean, self.degradation, self.degradation_seed_for(sample, epoch, seed))

    def load_pair(self, sample: Sample, epoch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean, degraded), both (3, h, w) float32 in [0, 1] at the sample's bucket size."""
        clean = self.load_clean(sample)
        return clean, self.load_degraded(sample, epoch, seed, clean=clean)


def resolve_dataset_path(path: str, base_dir: str | None) -> Path:
    """A user-typed folder path: ``~`` expanded, surrounding quotes and spaces removed (pasted
    Windows paths often have them); relative paths resolve against ``base_dir`` (ComfyUI's input
    folder when called from a node), else against the working directory."""
    text = str(path).strip().strip("\"'").strip()
    if not text:
        raise ValueError(
            "dataset path is empty: enter a folder path (absolute, or relative to the input folder)"
        )
    p = Path(text).expanduser()
    if p.is_absolute():
        return p
    base = Path(base_dir).expanduser() if base_dir else Path.cwd()
    return base / p


def same_folder_problem(hq: Path, lq: Path | None) -> str | None:
    """Why ``lq`` cannot be the paired degraded folder of ``hq`` (None when it can): the same
    folder (after symlinks) would pair every image with itself and train the identity."""
    if lq is None:
        return None
    try:
        same = Path(hq).expanduser().resolve() == Path(lq).expanduser().resolve()
    except (OSError, RuntimeError):
        return None
    if not same:
        return None
    return (
        f"the LQ (degraded) folder {lq} is the HQ folder {hq}: every pair would be an image with itself. "
        "Give the folder of the degraded copies, or leave the LQ folder empty to degrade the HQ images."
    )


def _check_folder(folder: Path, role: str) -> None:
    if not folder.exists():
        raise ValueError(f"{role} folder {folder} does not exist: create it or fix the path")
    if not folder.is_dir():
        raise ValueError(f"{role} path {folder} is not a folder: give the folder that holds the images")


def _index_lq(lq_dir: Path) -> dict[str, list[Path]]:
    """LQ files by relative path without extension (so a.png may pair with a.jpg)."""
    index: dict[str, list[Path]] = {}
    for p in scan_image_folder(lq_dir):
        stem_key = p.relative_to(lq_dir).with_suffix("").as_posix()
        index.setdefault(stem_key, []).append(p)
    return index


def _pick_lq(hq: Path, candidates: list[Path]) -> Path:
    # Same extension first, then alphabetical, so the choice is deterministic.
    return sorted(candidates, key=lambda p: (p.suffix.lower() != hq.suffix.lower(), p.name))[0]


def held_out_limit(n_usable: int) -> int:
    """The most images held out of ``n_usable``: 20% rounded down, but at least one from two
    images on (validation needs one), and none of a single image (training needs it)."""
    if n_usable < 2:
        return 0
    return max(1, n_usable * MAX_HELD_OUT_PERCENT // 100)


def split_sizes(n_usable: int, val_count: int) -> tuple[int, list[str]]:
    """(images held out, warnings): ``val_count`` capped by ``held_out_limit``, and a warning
    naming the count used and why when it was reduced or when few training images remain."""
    limit = held_out_limit(n_usable)
    n_val = min(val_count, limit)
    warnings = []
    if n_val < val_count:
        if n_usable == 1:
            why = "the only usable image is needed for training"
        else:
            why = (
                f"at most {MAX_HELD_OUT_PERCENT}% of the {n_usable} usable images are held out "
                f"(at least 1), so that {n_usable - n_val} remain for training"
            )
        warnings.append(f"val_count {val_count} reduced to {n_val}: {why}")
    n_train = n_usable - n_val
    if n_train < FEW_TRAINING_IMAGES:
        warnings.append(
            f"only {n_train} training image(s) (fewer than {FEW_TRAINING_IMAGES}): the LoRA "
            "learns from these alone; add photos to the folder"
        )
    return n_val, warnings


def _split_rank(seed: int, key: str) -> bytes:
    # Ranking by a per-key hash (not a shuffle of the list) keeps most of the split when files
    # are added or removed.
    return hashlib.sha256(f"split\x00{int(seed)}\x00{key}".encode()).digest()


def _text(name: str) -> str:
    """A file name as valid text. On POSIX a name that is not valid UTF-8 (Latin-1 "caf\\xe9.png")
    arrives from os.walk with surrogate escapes, which cannot be encoded for hashing, JSON
    reports, logs or safetensors metadata; its undecodable bytes are shown as \\xNN instead.
    Valid names are returned unchanged."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def _aspect_mismatch(hq_size: tuple[int, int], lq_size: tuple[int, int]) -> str | None:
    """Why an LQ image cannot be the HQ image's partner by shape, or None when it can."""
    (hw, hh), (lw, lh) = hq_size, lq_size
    hq_ratio, lq_ratio = hw / hh, lw / lh
    # Half a pixel of rounding on each LQ side shifts its ratio by up to about 0.5/w + 0.5/h.
    allowed = PAIR_ASPECT_TOLERANCE + 0.5 / lw + 0.5 / lh
    if abs(lq_ratio / hq_ratio - 1.0) <= allowed:
        return None
    return (
        f"aspect mismatch (HQ {hw}x{hh}, LQ {lw}x{lh}: ratios {hq_ratio:.3f} and {lq_ratio:.3f} differ by "
        f"more than {PAIR_ASPECT_TOLERANCE:.0%}); pair it with the same picture, same crop and orientation"
    )


def build_dataset(
    hq_dir: str | os.PathLike,
    lq_dir: str | os.PathLike | None = None,
    *,
    val_count: int = DEFAULT_VAL_COUNT,
    seed: int = 0,
    bucket_scale: float = 1.0,
    min_size: int = 64,
    degradation: DegradationConfig | None = None,
    logger: logging.Logger | None = None,
    held_out_first: Collection[str] = (),
) -> RestorationDataset:
    """Scan, validate, pair, bucket and split. Unusable files are skipped with a warning.

    ``val_count`` images are held out for validation, fewer in a small folder (``split_sizes``):
    the reduction and a training set under ``FEW_TRAINING_IMAGES`` are logged as warnings and
    shown in ``summary()``. The images named in ``held_out_first`` (paths relative to the folder)
    are held out before the seed's choice, as far as the count allows (the demo's unseen photo).

    Raises ValueError (naming the folder and what to do) when a folder is missing, not a folder,
    has no image files, or has no usable image.
    """
    log = logger or logging.getLogger(__name__)
    if isinstance(val_count, bool) or not isinstance(val_count, int) or val_count < 0:
        raise ValueError(f"val_count must be a whole number >= 0, got {val_count!r}")
    hq = Path(hq_dir).expanduser()
    lq = Path(lq_dir).expanduser() if lq_dir is not None else None
    _check_folder(hq, "HQ image")
    if lq is not None:
        _check_folder(lq, "LQ (degraded) image")
        problem = same_folder_problem(hq, lq)
        if problem:
            raise ValueError(problem)
    buckets = bucket_resolutions(bucket_scale)
    exts = ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))

    files = scan_image_folder(hq)
    if not files:
        raise ValueError(f"HQ image folder {hq} contains no image files ({exts}): put the clean images there")
    lq_index = _index_lq(lq) if lq is not None else {}

    usable: list[Sample] = []
    skipped: list[tuple[str, str]] = []

    def skip(path: Path, reason: str) -> None:
        shown = _text(str(path))
        skipped.append((shown, reason))
        log.warning("skipping %s: %s", shown, reason)

    seen_keys: set[str] = set()
    for path in files:
        key = _text(path.relative_to(hq).as_posix())
        if key in seen_keys:  # only possible when an escaped name equals a real one
            skip(path, f"duplicate name (another file is also shown as {key!r}); rename one of them")
            continue
        lq_path = None
        if lq is not None:
            candidates = lq_index.get(path.relative_to(hq).with_suffix("").as_posix())
            if not candidates:
                skip(path, NO_COUNTERPART)
                continue
            lq_path = _pick_lq(path, candidates)
        try:
            with load_rgb(path, min_size=min_size) as img:
                size = img.size
            if lq_path is not None:
                with load_rgb(lq_path, min_size=1) as lq_img:
                    lq_size = lq_img.size
                mismatch = _aspect_mismatch(size, lq_size)
                if mismatch is not None:
                    skip(path, mismatch)
                    continue
        except ImageLoadError as e:
            skip(e.path, e.reason)
            continue
        seen_keys.add(key)
        usable.append(Sample(key, path, lq_path, size, nearest_bucket(*size, buckets)))

    if not usable:
        reasons = Counter(_reason_category(r) for _, r in skipped)
        listed = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
        raise ValueError(
            f"no usable image in {hq} ({len(files)} file(s) found, all skipped: {listed}); "
            "fix or replace the files listed in the log"
        )

    n_val, split_warnings = split_sizes(len(usable), val_count)
    for warning in split_warnings:
        log.warning("%s: %s", hq, warning)
    ranked = sorted(usable, key=lambda s: (s.key not in held_out_first, _split_rank(seed, s.key)))
    val_keys = {s.key for s in ranked[:n_val]}
    train = [s for s in usable if s.key not in val_keys]
    val = [s for s in usable if s.key in val_keys]
    return RestorationDataset(
        hq_dir=hq,
        lq_dir=lq,
        train=train,
        val=val,
        skipped=skipped,
        degradation=degradation if degradation is not None else DegradationConfig(),
        bucket_scale=bucket_scale,
        split_warnings=split_warnings,
    )


# The rows of the settings table for ``build_dataset``'s arguments (``bucket_scale``'s row is
# ``buckets.BUCKET_SCALE``; ``degradation``'s are ``degradations.DEGRADATION_SETTINGS``).
DATASET_SETTINGS: tuple[Setting, ...] = (
    Setting("val_count", "int", arg_default(build_dataset, "val_count"),
        "How many images are held out of training to measure progress (4 typical; 0: none); at most "
        "20% of the images, fewer in a small folder.",
        "held-out images for validation and evaluation; at most 20% of the images (at least 1)",
        min=0, max=1000, commands=WITH_DATA),
    Setting("min_size", "int", arg_default(build_dataset, "min_size"),
        "Images with a side shorter than this many pixels are skipped.", min=8, max=4096,
        commands=WITH_DATA),
)  # fmt: skip
