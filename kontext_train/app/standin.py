"""The pretrained stand-in: a tiny Flux Kontext that knows photographs, and a photo VAE.

The real FLUX.1 Kontext was pre-trained to go from noise to an image while reading reference
tokens; a restoration LoRA is trained on top of that. A *random* tiny Flux knows nothing, so
rankings and demos on it say little about the real model. This stand-in is pre-trained here, on
the CPU, the way Kontext was in miniature:

- Latents come from ``comfyui.photo_vae``: a linear 4x4-patch autoencoder (16 channels, PCA)
  fitted to the pre-training photos; it round-trips photos (about 33 dB PSNR), so image-space
  metrics mean something.
- The transformer is ComfyUI's own Flux class (``tiny_models.build_tiny_flux``), width 128,
  2 heads, 2 double + 2 single blocks (1.95M parameters).
- Training is ordinary flow matching from noise to the clean latent (Flux's convention, the
  pack's shifted-uniform time sampling) on random 64 px crops of scikit-image's bundled photos at
  several scales, flipped and colour-jittered. A third of the examples are plain generation; the
  rest are Kontext-style edits with the source as reference tokens: a colour change (the reference
  is the crop with its colours altered) and a zoom (the reference is a 2x wider view, downscaled).
  Each task has its own fixed random "prompt" embedding (the tiny model has no text encoder).
- The photos the demo and the benchmarks hold out (``HELD_OUT_PHOTOS``) are never seen.

``scripts/pretrain_standin.py`` runs it; the result (fp16, about 4 MB, with its settings and seed in
the file's metadata) ships as ``kontext_train/assets/standin.safetensors``.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..files.atomic import atomic_path
from ..method.flow import flux_shift_mu, image_tokens, sample_training_sigmas

ASSET = Path(__file__).resolve().parents[1] / "assets" / "standin.safetensors"
STANDIN_BASE_MODEL = "demo:pretrained-standin-flux"

# Never used in pre-training: the demo's held-out photo and its stereo partner.
HELD_OUT_PHOTOS: tuple[str, ...] = ("motorcycle_left", "motorcycle_right")
# Colour photos, then grey ones (as RGB) for more texture.
PRETRAIN_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "retina",
    "camera",
    "coins",
    "moon",
    "grass",
    "gravel",
    "brick",
    "page",
    "clock",
)
TASKS = ("generate", "recolour", "zoom")
CONTEXT_TOKENS = 8


@dataclass
class PretrainSettings:
    seed: int = 0
    steps: int = 400
    batch_size: int = 8
    save_every: int = 50
    crop: int = 64  # pixels; latents are crop / 4
    scales: tuple[int, ...] = (128, 176, 256)  # longest side of the photos the crops come from
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    threads: int = 1
    arch: dict = field(
        default_factory=lambda: {
            "hidden_size": 128,
            "num_heads": 2,
            "depth": 2,
            "depth_single_blocks": 2,
            "context_in_dim": 64,
        }
    )


def load_photo(name: str) -> torch.Tensor:
    """A photo bundled in scikit-image's wheel as (3, H, W) float in [0, 1] (grey ones as RGB)."""
    import numpy as np
    from skimage import data

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = data.stereo_motorcycle()
        array = left if name == "motorcycle_left" else right
    else:
        array = getattr(data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    array = np.ascontiguousarray(array[..., :3])
    if array.dtype != np.uint8:  # e.g. float images
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0


def resize_longest(image: torch.Tensor, side: int, multiple: int = 16) -> torch.Tensor:
    """(3, H, W) -> longest side about ``side``, both sides a multiple of ``multiple`` (area filter)."""
    h, w = image.shape[-2:]
    s = side / max(h, w)
    size = (
        max(multiple, round(h * s / multiple) * multiple),
        max(multiple, round(w * s / multiple) * multiple),
    )
    return F.interpolate(image.unsqueeze(0), size=size, mode="area").squeeze(0)


def task_conditioning(task: str, width: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed random (context (1, 8, width), pooled (1, 768)) "prompt" of a pre-training task,
    or of ``"restore"``, the prompt the demo's LoRA is trained with."""
    index = (*TASKS, "restore").index(task)
    g = torch.Generator().manual_seed(1000 + index)
    return torch.randn(1, CONTEXT_TOKENS, width, generator=g), torch.randn(1, 768, generator=g)


def _recolour(crop: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """A colour edit: a channel permutation or per-channel gains, and a brightness shift."""
    if rng.random() < 0.5:
        perm = [0, 1, 2]
        while perm == [0, 1, 2]:
            rng.shuffle(perm)
        crop = crop[perm]
    else:
        gains = torch.tensor([rng.uniform(0.5, 1.5) for _ in range(3)]).view(3, 1, 1)
        crop = crop * gains
    return (crop + rng.uniform(-0.15, 0.15)).clamp(0, 1)


def make_example(
    photos: list[torch.Tensor], crop: int, rng: random.Random
) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    """(task, target crop (3, c, c), reference (3, c, c) or None) from a random photo and place."""
    task = TASKS[rng.randrange(len(TASKS))]
    image = photos[rng.randrange(len(photos))]
    h, w = image.shape[-2:]
    margin = crop // 2 if task == "zoom" else 0
    if h < crop + 2 * margin or w < crop + 2 * margin:
        task, margin = "generate", 0
    top = rng.randrange(margin, h - crop - margin + 1)
    left = rng.randrange(margin, w - crop - margin + 1)
    target = image[:, top : top + crop, left : left + crop]
    if rng.random() < 0.5:
        target = target.flip(-1)
        image = image.flip(-1)
        left = w - left - crop
    jitter = torch.tensor([rng.uniform(0.9, 1.1) for _ in range(3)]).view(3, 1, 1)
    target = (target * jitter).clamp(0, 1)
    reference = None
    if task == "recolour":
        reference = _recolour(target, rng)
    elif task == "zoom":
        wide = (
            image[:, top - margin : top + crop + margin, left - margin : left + crop + margin] * jitter
        ).clamp(0, 1)
        reference = F.interpolate(wide.unsqueeze(0), size=(crop, crop), mode="area").squeeze(0)
    return task, target, reference


def pretrain(
    settings: PretrainSettings,
    out: Path,
    photos: dict[str, torch.Tensor] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Fits the photo VAE, pre-trains the tiny Flux, writes ``out`` (safetensors); returns the
    metadata written (settings, losses, time)."""
    from .. import comfyui
    from ..comfyui import photo_vae
    from ..comfyui.tiny_models import full_training

    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    photos = photos or {name: load_photo(name) for name in PRETRAIN_PHOTOS}
    if set(photos) & set(HELD_OUT_PHOTOS):
        raise ValueError(f"held-out photos {HELD_OUT_PHOTOS} must not be pre-trained on")
    scaled = [resize_longest(p, s) for p in photos.values() for s in settings.scales]
    pca = photo_vae.fit_patch_pca(scaled)
    patcher = comfyui.build_tiny_flux(**settings.arch, seed=settings.seed)
    base = patcher.model
    net = base.diffusion_model
    net.requires_grad_(True)
    params = [p for p in net.parameters()]
    opt = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    width = settings.arch["context_in_dim"]
    prompts = {t: task_conditioning(t, width) for t in TASKS}
    latent = settings.crop // photo_vae.PATCH
    mu = flux_shift_mu(image_tokens(latent, latent))
    gen = torch.Generator().manual_seed(settings.seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    with full_training(net) as options:
        for step in range(settings.steps):
            lr = settings.learning_rate * min(1.0, (step + 1) / settings.warmup_steps)
            lr *= 0.55 + 0.45 * math.cos(math.pi * step / settings.steps)  # cosine to 10%
            for group in opt.param_groups:
                group["lr"] = lr
            examples = [make_example(scaled, settings.crop, rng) for _ in range(settings.batch_size)]
            loss = _step_loss(base, net, options, examples, pca, prompts, mu, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            opt.step()
            losses.append(loss.item())
            if (step + 1) % 50 == 0 or step == 0:
                recent = sum(losses[-50:]) / len(losses[-50:])
                log(f"step {step + 1}/{settings.steps}: loss {recent:.4f} ({time.perf_counter() - t0:.0f} s)")
            if (step + 1) % settings.save_every == 0 or step + 1 == settings.steps:
                # Saved as it goes: the file always says how many steps it holds.
                meta = {
                    "settings": asdict(settings),
                    "steps_done": step + 1,
                    "photos": list(photos),
                    "held_out": list(HELD_OUT_PHOTOS),
                    "seconds": round(time.perf_counter() - t0, 1),
                    "loss_first_50": sum(losses[:50]) / len(losses[:50]),
                    "loss_last_50": sum(losses[-50:]) / len(losses[-50:]),
                    "torch": torch.__version__,
                }
                save_standin(out, net, pca, meta)
    return meta


def _step_loss(base, net, options, examples, pca, prompts, mu, gen) -> torch.Tensor:
    from ..comfyui import photo_vae

    def latents(images: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return base.process_latent_in(photo_vae.encode(pca, torch.stack(images)))

    clean = latents([e[1] for e in examples])
    noise = torch.randn(clean.shape, generator=gen)
    sigmas = sample_training_sigmas(len(examples), "shifted_uniform", mu, gen)
    s = sigmas.view(-1, 1, 1, 1)
    x = s * noise + (1 - s) * clean
    guidance = torch.rand(len(examples), generator=gen) * 3 + 1
    total = torch.zeros(())
    # One forward per task (the reference is per batch in Flux's forward).
    for task in TASKS:
        idx = [i for i, e in enumerate(examples) if e[0] == task]
        if not idx:
            continue
        refs = [examples[i][2] for i in idx]
        reference = [latents(refs)] if refs[0] is not None else None
        context, pooled = prompts[task]
        out = net(
            x[idx],
            sigmas[idx],
            context.expand(len(idx), -1, -1),
            y=pooled.expand(len(idx), -1),
            guidance=guidance[idx],
            ref_latents=reference,
            transformer_options=options,
        )
        total = total + ((out.float() - (noise[idx] - clean[idx])) ** 2).mean() * len(idx)
    return total / len(examples)


def save_standin(out: Path, net: torch.nn.Module, pca: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"flux.{k}": v.detach().to(torch.float16).contiguous() for k, v in net.state_dict().items()}
    tensors.update({f"vae.{k}": v.detach().float().contiguous().reshape(v.shape) for k, v in pca.items()})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"kontext_restore_standin": json.dumps(meta)})


def read_standin(path: Path = ASSET) -> tuple[dict, dict]:
    """(photo VAE PCA dict, metadata) of a stand-in weights file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the pretrained stand-in ships with the pack; rebuild it with "
            "python scripts/pretrain_standin.py"
        )
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("kontext_restore_standin", "{}"))
        pca = {k[4:]: f.get_tensor(k) for k in f.keys() if k.startswith("vae.")}
    if not meta or set(pca) != {"mean", "components", "gain"}:
        raise ValueError(f"{path} is not a stand-in weights file (no metadata or VAE tensors); rebuild it")
    return pca, meta


def load_standin(path: Path = ASSET):
    """(MODEL, VAE, metadata): the pretrained tiny Flux and the photo VAE, through ComfyUI."""
    from ..comfyui import photo_vae
    from ..comfyui.tiny_models import load_tiny_flux

    pca, meta = read_standin(path)
    model = load_tiny_flux({**meta["settings"]["arch"], "seed": 0}, path)
    return model, photo_vae.build_photo_vae(pca), meta


def restore_conditioning(width: int = 64) -> list:
    """The CONDITIONING the demo's LoRA is trained and restores with (the "restore" prompt)."""
    context, pooled = task_conditioning("restore", width)
    return [[context, {"pooled_output": pooled}]]
