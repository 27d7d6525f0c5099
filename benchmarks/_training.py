"""The training side of the step benchmarks (``train_step.py``, ``wide_step.py``,
``gpu_train_step.py``): random Flux models, in-memory latents, the pack's LoRA model and
``Trainer`` at the benchmarks' settings, and the bare loop that is the floor. ComfyUI's own
``TrainLoraNode`` is ``_common.native_train_lora``; clocks, rounds and output are in ``_common``.
"""

from __future__ import annotations

from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)
import torch


def build_flux(
    shape: dict, weight_dtype: torch.dtype, compute_dtype: torch.dtype | None, device, seed: int = 0
):
    """A random Flux Kontext MODEL (ModelPatcher) of ``shape`` (hidden, heads, double, single,
    context) built in place on ``device`` through ``comfy.supported_models.Flux``."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    from kontext_train.comfyui import flux_unet_config
    from kontext_train.comfyui.tiny_models import is_norm_module

    unet_config = flux_unet_config(
        shape["hidden"], shape["heads"], shape["double"], shape["single"], shape["context"]
    )
    cfg = comfy.supported_models.Flux(unet_config)
    cfg.set_inference_dtype(weight_dtype, compute_dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.inference_mode(False), torch.no_grad():
        base = cfg.get_model({}, device=device)
        init_dtype = compute_dtype or weight_dtype
        for module in base.diffusion_model.modules():
            norm = is_norm_module(module)
            for _, p in module.named_parameters(recurse=False):
                # Cheap init in place (ComfyUI's ops leave weights uninitialised): N(0, 1/fan_in)
                # for matrices, ones for norm gains (".scale" or ".weight" by ComfyUI version),
                # small values for biases. fp8 goes through bf16.
                if norm:
                    p.fill_(1.0)
                elif p.ndim >= 2:
                    tmp = torch.empty(p.shape, device=device, dtype=init_dtype).normal_(generator=g)
                    p.copy_(tmp.mul_(p.shape[1] ** -0.5))
                else:
                    tmp = torch.empty(p.shape, device=device, dtype=init_dtype)
                    p.copy_(tmp.uniform_(-0.02, 0.02, generator=g))
                del p
    patcher = comfy.model_patcher.ModelPatcher(
        base, load_device=torch.device(device), offload_device=mm.unet_offload_device()
    )
    # ComfyUI 0.33's TrainLoraNode deep-copies its model by loading it again through this hook
    # (core loaders set it); here "loading again" copies the weights to a new model on the offload
    # device, as a loader reading the file would.
    patcher.cached_patcher_init = (reload_copy, (patcher,))
    return patcher


def reload_copy(source, disable_dynamic: bool = False):
    """A fresh model with ``source``'s weights on its offload device (a plain ModelPatcher)."""
    import comfy.model_patcher

    with torch.inference_mode(False), torch.no_grad():
        fresh = source.model.model_config.get_model({}, device=source.offload_device)
        fresh.diffusion_model.load_state_dict(source.model.diffusion_model.state_dict())
    return comfy.model_patcher.ModelPatcher(
        fresh, load_device=source.load_device, offload_device=source.offload_device
    )


def random_latents(count: int, side: int, spread: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` clean latents (16 x side x side, seed 1) and degraded ones: 0.5 * clean + 0.3,
    plus ``spread`` times fresh noise (none at 0)."""
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(count, 16, side, side, generator=g)
    degraded = 0.5 * clean + 0.3
    if spread:
        degraded = degraded + spread * torch.randn(clean.shape, generator=g)
    return clean, degraded


class MemoryBatches:
    """``LatentBatches`` interface over fixed in-memory latents (no data pipeline in the step)."""

    def __init__(self, clean: torch.Tensor, degraded: torch.Tensor, batch_size: int = 1) -> None:
        self.clean, self.degraded, self.batch_size = clean, degraded, batch_size

    def batches_per_epoch(self) -> int:
        return max(1, len(self.clean) // self.batch_size)

    def stream(self, epoch: int = 0, position: int = 0):
        from kontext_train.data.batches import LatentBatch

        while True:
            for k in range(position, self.batches_per_epoch()):
                sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
                yield LatentBatch(epoch, k, self.clean[sl], self.degraded[sl], [str(k)])
            epoch, position = epoch + 1, 0


def bridge_noise(formulation: str) -> float:
    """bridge_ref trains only with noise on the start (flow.check_formulation): its smallest value,
    the planner's too; 0 for the other formulations."""
    return 0.1 if formulation == "bridge_ref" else 0.0


def lora_model(model, rank: int, targets: str, raw_cond, **options):
    """The pack's ``FluxLoraModel`` on ``model`` (alpha = rank, scale 1; ``options`` as its
    constructor takes them) and the conditioning prepared for it. The caller releases it."""
    from kontext_train.comfyui import FluxLoraModel

    with torch.inference_mode(False):
        lm = FluxLoraModel(model, rank=rank, alpha=float(rank), targets=targets, **options)
        try:
            return lm, lm.prepare_conditioning(raw_cond)
        except BaseException:
            lm.release()
            raise


def train_ours(
    lm,
    cond,
    batches: MemoryBatches,
    out_dir: Path,
    steps: int,
    formulation: str,
    *,
    rank: int,
    targets: str,
    checkpointing: bool = True,
    batch_size: int = 1,
    guidance: float = 1.5,
) -> None:
    """``Trainer.run`` as a fresh run at the benchmarks' settings: AdamW at 1e-4, a constant
    learning rate, no checkpoints and no validation inside the loop."""
    from kontext_train.train.trainer import TrainConfig, Trainer

    config = TrainConfig(
        steps=steps,
        learning_rate=1e-4,
        rank=rank,
        batch_size=batch_size,
        lr_schedule="constant_with_warmup",
        warmup_steps=0,
        guidance=guidance,
        checkpoint_every=0,
        validate_every_epochs=0,
        lora_targets=targets,
        gradient_checkpointing=checkpointing,
    )
    # bridge_ref is no longer trainable (flow.check_formulation); its step is still timed, set past
    # the check with the smallest bridge noise it was trained with.
    config.formulation, config.bridge_noise = formulation, bridge_noise(formulation)
    with torch.inference_mode(False):
        Trainer(config, lm, batches, cond, out_dir).run(resume=False)


def bare_steps(lm, cond, clean, degraded, formulation: str, steps: int, guidance: float = 1.5) -> None:
    """The floor: ``lm``'s velocity on one fixed training example (sigma 0.6, fixed noise) + MSE +
    ``backward`` + ``AdamW.step`` in a plain loop: no sigma or noise sampling, no ``loss.item()``,
    no gradient clipping, no LR scheduler, no hooks. ``lm`` is loaded by the caller."""
    from kontext_train.method.flow import make_training_example

    with torch.inference_mode(False):
        dev = lm.device
        clean, degraded = lm.to_model_space(clean.to(dev)), lm.to_model_space(degraded.to(dev))
        sigmas = torch.full((len(clean),), 0.6, device=dev)
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0)).to(dev)
        ex = make_training_example(formulation, clean, degraded, sigmas, noise, bridge_noise(formulation))
        opt = torch.optim.AdamW(lm.parameters(), lr=1e-4, weight_decay=0.01)
        with lm.training():
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                pred = lm.velocity(ex.x, sigmas, cond, guidance, ex.reference)
                torch.nn.functional.mse_loss(pred, ex.target).backward()
                opt.step()
