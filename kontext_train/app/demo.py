"""The offline demo: real photographs, the pretrained stand-in, the whole pipeline in minutes.

Photos come from the scikit-image wheel (``skimage.data`` reads files bundled inside the wheel;
nothing is downloaded). The model is the pack's pretrained stand-in (``standin.py``): a tiny Flux
transformer built through ComfyUI's own classes and pre-trained here on other bundled photos, with
a photo VAE (a linear patch autoencoder loaded through ComfyUI's VAE class) and a fixed random
"restore" prompt embedding; its weights (about 4 MB) ship with the pack, so no download is needed.
The demo trains a restoration LoRA on it with the same code a real run uses, restores the held-out
photo (never seen in pre-training or by the LoRA) with ComfyUI's sampler and scores it. What that
shows is that the method and the plumbing restore real photo degradations; it says nothing of the
quality of a LoRA on FLUX.1 Kontext, which the same command trains with real weights.
"""

from __future__ import annotations

import itertools
import os
import shlex
import shutil
import sys
from pathlib import Path

from ..files.atomic import atomic_path
from .standin import PRETRAIN_PHOTOS, STANDIN_BASE_MODEL

# Bundled photos the demo trains and validates on (scikit-image 0.19-0.26 ship these inside the
# wheel): the stand-in's pre-training photos, which the LoRA learns to restore (the base only
# generated and edited them), and last "motorcycle" (the left view of the stereo pair), held out
# whatever the seed (DEMO_HELD_OUT): neither the stand-in nor the LoRA ever sees it.
SAMPLE_PHOTOS: tuple[str, ...] = (*PRETRAIN_PHOTOS, "motorcycle")
DEMO_HELD_OUT: tuple[str, ...] = ("motorcycle.png",)
# Each training photo is also written as its 2x2 and 3x3 tiles, each fitted to a ~128 px bucket
# like the whole photo: 193 training images instead of 14, more varied views of the same photos.
# With them the held-out gain at 8 sampling steps went from +0.34 to +0.60 dB over three seeds
# (BENCHMARKS.md section 14). The held-out photo is written whole only.
DEMO_TILE_GRIDS: tuple[int, ...] = (2, 3)
_PHOTO_SOURCE = {"motorcycle": "motorcycle_left"}
DEMO_BASE_MODEL = STANDIN_BASE_MODEL

# Settings the demo uses instead of the real-run defaults when the stand-in is used (flags, config
# file and environment still override them), sized to about two minutes on a 2-core CPU: ~128 px
# buckets (the stand-in's VAE downsamples 4x: 32x32 latents). Adapters on every linear layer and
# 800 steps: on the held-out photo, blocks-only adapters and 200 steps restored below the degraded
# input (BENCHMARKS.md section 14 has the measurements behind each choice).
DEMO_DEFAULTS: dict[str, object] = {
    "steps": 800,
    "learning_rate": 2e-3,
    "rank": 16,
    "lora_targets": "all_linear",
    "batch_size": 2,
    "warmup_steps": 20,
    "checkpoint_every": 200,
    "validate_every_steps": 200,  # four times a run, however many images
    "gradient_checkpointing": "off",
    "bucket_scale": 0.125,
    "val_count": 1,  # the motorcycle
    "name": "kontext_restore_demo",
}
# Restoring the held-out photo once per seed (mean and spread in the report).
DEMO_RESTORE_SEEDS = (0, 1, 2)


class DemoUnavailable(RuntimeError):
    pass


def export_sample_photos(
    folder: Path, count: int = len(SAMPLE_PHOTOS), tile_grids: tuple[int, ...] | None = None
) -> list[Path]:
    """Writes ``count`` bundled scikit-image photos as PNGs into ``folder`` (kept if present): the
    first ``count - 1`` training photos, each also as its ``g`` x ``g`` tiles for every ``g`` in
    ``tile_grids`` (default ``DEMO_TILE_GRIDS``, read when called; ``astronaut_tile2x2_01.png``: row 0,
    column 1), and the held-out one, whole."""
    tile_grids = DEMO_TILE_GRIDS if tile_grids is None else tile_grids
    if not 1 <= count <= len(SAMPLE_PHOTOS):
        raise ValueError(f"demo_images must be between 1 and {len(SAMPLE_PHOTOS)}, got {count}")
    try:
        import skimage  # noqa: F401
    except ImportError:
        raise DemoUnavailable(
            "The demo's sample photos come from scikit-image, which is not installed: "
            "pip install scikit-image (or give real data with --hr-root and weights with --unet ...)."
        ) from None
    from PIL import Image

    from ..data.dataset import build_dataset
    from ..setting import arg_default
    from .standin import load_photo

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    min_side = arg_default(build_dataset, "min_size")
    written = []
    # The held-out photo (last) is always among them: fewer photos means fewer to train on.
    for name in (*SAMPLE_PHOTOS[: count - 1], SAMPLE_PHOTOS[-1]):
        array = load_photo(_PHOTO_SOURCE.get(name, name)).mul(255).round().byte()
        photo = Image.fromarray(array.permute(1, 2, 0).numpy()).convert("RGB")
        views = {f"{name}.png": None}
        for g in () if f"{name}.png" in DEMO_HELD_OUT else tile_grids:
            for r, c in itertools.product(range(g), range(g)):
                left, top, right, bottom = _tile_box(photo.size, g, r, c)
                # A tile the dataset would skip as too small (its default min_size) is not written.
                if min(right - left, bottom - top) >= min_side:
                    views[f"{name}_tile{g}x{g}_{r}{c}.png"] = (g, r, c)
        for file_name, tile in views.items():
            path = folder / file_name
            if not path.is_file():
                view = photo if tile is None else photo.crop(_tile_box(photo.size, *tile))
                with atomic_path(path, suffix=".png") as tmp:
                    view.save(tmp, format="PNG")
            written.append(path)
    return written


def _tile_box(size: tuple[int, int], grid: int, row: int, col: int) -> tuple[int, int, int, int]:
    w, h = size
    return (w * col // grid, h * row // grid, w * (col + 1) // grid, h * (row + 1) // grid)


def build_demo_models():
    """(MODEL, VAE, CONDITIONING, metadata) of the demo: the pretrained stand-in, its photo VAE and
    the fixed "restore" prompt."""
    from .standin import load_standin, restore_conditioning

    model, vae, meta = load_standin()
    return model, vae, restore_conditioning(meta["settings"]["arch"]["context_in_dim"]), meta


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.model.diffusion_model.parameters())


def honest_paragraph(
    n_params: int,
    steps: int,
    n_train: int,
    pretrain: dict,
    real_command: str,
    psnr: tuple[float, float] | None = None,
) -> str:
    """What the demo shows and does not, and the command that does the real job. ``psnr``:
    (degraded, restored) mean PSNR of the held-out photo, which decides what this run showed."""
    settings = pretrain.get("settings", {})
    if psnr is not None and psnr[1] > psnr[0]:
        shown = (
            f"In this run the LoRA restored the held-out photo better than the degraded input ({psnr[1]:.2f} "
            f"against {psnr[0]:.2f} dB PSNR). With the default degradation that margin is small, and the limit is "
            "the stand-in, not the photo (BENCHMARKS.md, section 14): a small CNN fitted to the same training pairs "
            "for two minutes gains about 2 dB, the stand-in with every weight trained for as long about 1 dB in one "
            "sampling step and less in eight, and sampling in several steps adds texture that PSNR counts as error. "
            "What it does show is that the method and the plumbing"
        )
    elif psnr is not None:
        shown = (
            f"In this run the LoRA did **not** beat the degraded input on the held-out photo ({psnr[1]:.2f} "
            f"against {psnr[0]:.2f} dB PSNR): with a few minutes of CPU training on a handful of photos the tiny stand-in "
            "does not generalise its restoration to an unseen photo (BENCHMARKS.md, section 10, has the "
            "formulations at this budget). What it does show is that the method and the plumbing"
        )
    else:
        shown = "The method and the plumbing"
    return (
        "**What this is.** The model is a stand-in, not FLUX.1 Kontext: a tiny Flux transformer "
        f"({n_params / 1e6:.2f}M parameters, ComfyUI's own Flux class) pre-trained by this pack on "
        f"{len(pretrain.get('photos', []))} bundled scikit-image photos ({pretrain.get('steps_done', '?')} "
        f"steps of batch {settings.get('batch_size', '?')} on 64 px crops, {pretrain.get('seconds', 0) / 60:.0f} "
        "minutes on one CPU thread, seed "
        f"{settings.get('seed', '?')}), going from noise to an image while reading reference tokens, as Kontext "
        "does. Its VAE is a linear 4x4-patch autoencoder fitted to those photos; for it the VAE round trip of "
        "the clean photo is the best any latent can decode to. The restoration LoRA was trained here for "
        f"{steps} steps on {n_train} images through the same code a real run uses: the photos the stand-in was "
        "pre-trained on (where it only generated and edited them), whole and cut into 2x2 and 3x3 tiles. The "
        "held-out photo was seen neither in pre-training nor by the LoRA.\n\n"
        f"**What it shows.** {shown} - synthetic degradation, Kontext buckets, the latent cache, LoRA "
        "training with checkpoints and resume, restoration with ComfyUI's own sampler, PSNR/SSIM scoring - "
        "run end to end in image space on a base that knows images. "
        "**What it does not show** is the quality of a LoRA on FLUX.1 Kontext [dev]: the stand-in is a "
        "few-MB model that has seen a handful of photos at 128 px.\n\n"
        "With FLUX.1 Kontext [dev] weights, ComfyUI's text encoders and the Flux VAE in place and your "
        "photos in HR_ROOT, this command does the real job, from any folder of this machine (real-run "
        "defaults: 3000 steps, rank 16, lr 1e-4, cosine with 100 warm-up steps, ~1024 px buckets):\n\n"
        f"```bash\n{real_command}\n```\n"
    )


def invocation(argv0: str | None = None, executable: str | None = None) -> tuple[dict[str, str], str]:
    """How to start ``kontext-train`` again from any folder: (environment it needs, program).

    The console script that is running (absolute), else the one installed beside this Python (a
    venv's ``bin/``), else this Python with ``-m kontext_train`` and the pack on PYTHONPATH."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    executable = sys.executable if executable is None else executable
    if Path(argv0).name.removesuffix(".exe") == "kontext-train":
        found = argv0 if ("/" in argv0 or os.sep in argv0) else shutil.which(argv0)
        if found:
            return {}, shlex.quote(str(Path(found).absolute()))
    # Not resolved: a venv's python is a symlink to the base interpreter, which has no venv.
    python = Path(executable).absolute()
    beside = python.parent / "kontext-train"
    if beside.is_file():
        return {}, shlex.quote(str(beside))
    pack = Path(__file__).resolve().parents[2]
    return {"PYTHONPATH": str(pack)}, f"{shlex.quote(str(python))} -m kontext_train"


def real_command(
    comfyui_root: Path, output_dir: Path, argv0: str | None = None, executable: str | None = None
) -> str:
    """The command that trains on real data and weights, runnable as printed where the demo ran:
    absolute paths, ComfyUI named, the program by its full path. HR_ROOT and the weight files are
    the user's to provide (the weights at ComfyUI's usual places)."""
    env, program = invocation(argv0, executable)
    models = Path(comfyui_root) / "models"
    q = shlex.quote
    env_text = " ".join(f"{k}={q(v)}" for k, v in env.items())
    weights = {
        "--unet": models / "diffusion_models" / "flux1-kontext-dev.safetensors",
        "--clip-l": models / "text_encoders" / "clip_l.safetensors",
        "--t5xxl": models / "text_encoders" / "t5xxl_fp16.safetensors",
        "--vae": models / "vae" / "ae.safetensors",
    }
    lines = [
        f"COMFYUI_PATH={q(str(comfyui_root))} {env_text + ' ' if env_text else ''}"
        f"HR_ROOT=/path/to/clean_photos OUTPUT_DIR={q(str(output_dir))} \\",
        f"{program} train \\",
        *(f"  {flag} {q(str(path))} \\" for flag, path in weights.items()),
    ]
    lines[-1] = lines[-1].removesuffix(" \\")
    return "\n".join(lines)
