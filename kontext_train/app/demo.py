"""The offline demo: real photographs, a tiny random model, the whole pipeline in seconds.

Photos come from the scikit-image wheel (``skimage.data`` reads files bundled inside the wheel;
nothing is downloaded). The model is a tiny randomly initialised Flux transformer built through
ComfyUI's own classes, with a tiny random TAESD-format VAE and random text conditioning, so no
weights are needed. Such a model cannot restore photographs; the demo proves that every stage -
degradation, buckets, latent cache, training, checkpoints, restoration with ComfyUI's sampler,
metrics, plots, report - runs end to end, and the same command with real weights does the job.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

import torch

from ..comfyui.tiny_models import TINY_CONTEXT_DIM
from ..files.atomic import atomic_path

# skimage.data functions that read a bundled colour photograph (checked in scikit-image 0.19-0.26:
# these files ship inside the wheel; other datasets need pooch and a download).
SAMPLE_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
)

# Width of the demo's tiny model (see comfyui.build_tiny_flux).
TINY_HIDDEN = 128
DEMO_BASE_MODEL = "demo:tiny-random-flux"

# Settings the demo uses instead of the real-run defaults when the tiny model is used (flags,
# config file and environment still override them). Tuned to finish in seconds on a 2-core CPU.
DEMO_DEFAULTS: dict[str, object] = {
    "steps": 150,
    "learning_rate": 2e-3,
    "rank": 8,
    "batch_size": 1,
    "warmup_steps": 10,
    "checkpoint_every": 50,
    "validate_every_epochs": 10,
    "validation_steps": 8,
    "lora_targets": "all_linear",
    "gradient_checkpointing": False,
    "bucket_scale": 0.25,
    "val_count": 1,  # of 6 photos: the most the held-out limit (20%, at least 1) allows
    "restore_steps": 8,
    "name": "kontext_restore_demo",
}


class DemoUnavailable(RuntimeError):
    pass


def export_sample_photos(folder: Path, count: int = len(SAMPLE_PHOTOS)) -> list[Path]:
    """Writes ``count`` bundled scikit-image photos as PNGs into ``folder`` (kept if present)."""
    if not 1 <= count <= len(SAMPLE_PHOTOS):
        raise ValueError(f"demo_images must be between 1 and {len(SAMPLE_PHOTOS)}, got {count}")
    try:
        from skimage import data
    except ImportError:
        raise DemoUnavailable(
            "The demo's sample photos come from scikit-image, which is not installed: "
            "pip install scikit-image (or give real data with --hr-root and weights with --unet ...)."
        ) from None
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SAMPLE_PHOTOS[:count]:
        path = folder / f"{name}.png"
        if not path.is_file():
            array = getattr(data, name)()
            with atomic_path(path, suffix=".png") as tmp:
                Image.fromarray(array).convert("RGB").save(tmp, format="PNG")
        written.append(path)
    return written


def random_conditioning(seed: int = 0, tokens: int = 8, width: int = TINY_CONTEXT_DIM) -> list:
    """CONDITIONING shaped like CLIPTextEncode's for Flux, with random values (the tiny model
    has no text encoder)."""
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(1, tokens, width, generator=g)
    pooled = torch.randn(1, 768, generator=g)
    return [[context, {"pooled_output": pooled}]]


def build_demo_models(seed: int = 0):
    """(MODEL, VAE, CONDITIONING) of the demo: tiny random Flux, tiny random VAE, random text."""
    from .. import comfyui

    model = comfyui.build_tiny_flux(hidden_size=TINY_HIDDEN, context_in_dim=TINY_CONTEXT_DIM, seed=seed)
    vae = comfyui.build_tiny_vae(seed=seed)
    return model, vae, random_conditioning(seed)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.model.diffusion_model.parameters())


def honest_paragraph(
    n_params: int,
    steps: int,
    n_train: int,
    vae_roundtrip_psnr: float | None,
    real_command: str,
    latent_mse: tuple[float, float, float] | None = None,
) -> str:
    """What the demo numbers mean, and the command that does the real job.

    ``latent_mse``: (degraded, first validation's restored, last validation's restored) latent MSE
    of the held-out images."""
    ceiling = (
        f" The random VAE alone (encode, then decode the clean image) scores {vae_roundtrip_psnr:.1f} dB "
        'PSNR, so no restoration through it can score better than that: the samples\' "VAE round trip" '
        "column shows what it does to a clean photo."
        if vae_roundtrip_psnr is not None
        else ""
    )
    latent = ""
    if latent_mse is not None:
        degraded, first, last = latent_mse
        trend = "fell" if last < first else "did not fall"
        beat = "below" if last < degraded else "still above"
        latent = (
            f" In latent space, the one place a model this small can learn anything, the held-out error "
            f"{trend} from {first:.4g} to {last:.4g} during training ({beat} the degraded latents' {degraded:.4g}): the lower panel of the loss plot."
        )
    return (
        "**What these numbers mean.** This run used a tiny, randomly initialised Flux transformer "
        f"({n_params / 1e6:.2f}M parameters, one double and one single block) with a random 16-channel "
        f"VAE and random text conditioning, trained for {steps} steps on {n_train} photos. A model like "
        "that cannot restore real photographs, and it did not: the restored images are worse than the "
        f"degraded ones, as expected.{ceiling}{latent} What the run does show is that every stage ran end "
        "to end on real photographs: synthetic degradation, Kontext buckets, the latent cache, LoRA "
        "training with checkpoints and resume, restoration with ComfyUI's own sampler starting from the "
        "degraded latent, PSNR/SSIM scoring, the loss plot and this report.\n\n"
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
