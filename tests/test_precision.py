"""The training step in the precision a GPU run uses, on the CPU.

On CUDA the trainer runs the forward under bf16 autocast (``trainer.cuda_autocast``), with the
weights ComfyUI keeps in bf16 (``weight_dtype`` default on a bf16 file) or in fp8 cast to bf16
layer by layer (``fp8_e4m3fn``/``fp8_e5m2``). Here the same tiny Flux is built the way ComfyUI
builds it on a GPU (weight dtype, manual-cast dtype) and trained under CPU bf16 autocast, passed
to the Trainer as its autocast choice. Checked: finite loss and LoRA gradients, the gradients'
direction against the float32 model's, and that the saved LoRA loads in ComfyUI.
"""

from __future__ import annotations

import contextlib
import warnings
from functools import partial

import pytest
import torch
from conftest import make_conditioning, make_tiny_flux
from safetensors.torch import load_file
from toy import TOY_TRAIN_SETTINGS, ToyBatches, toy_latents

from kontext_train import comfyui
from kontext_train.comfyui.tiny_models import TINY_CONTEXT_DIM, flux_unet_config
from kontext_train.train.trainer import TrainConfig, Trainer, cuda_autocast

# (weight dtype, manual-cast dtype) as ComfyUI picks them on a bf16-capable GPU.
GPU_STORAGE = {
    "bf16": (torch.bfloat16, None),
    "fp8_e4m3fn": (torch.float8_e4m3fn, torch.bfloat16),
    "fp8_e5m2": (torch.float8_e5m2, torch.bfloat16),
}
# Lowest cosine between the LoRA gradient under bf16 autocast and the float32 model's (same
# weights before storage, same batch; tiny Flux of width 128, LoRA rank 4 on every Linear layer
# with random up weights). Measured the same on 0.3.75 and 0.33.0 (to 3 decimals): bf16 0.986,
# fp8_e4m3fn 0.985, fp8_e5m2 0.981; losses within 0.6% of float32's.
MIN_GRAD_COSINE = {"bf16": 0.97, "fp8_e4m3fn": 0.97, "fp8_e5m2": 0.97}
CPU_BF16 = partial(torch.autocast, "cpu", dtype=torch.bfloat16)
SETTINGS = dict(TOY_TRAIN_SETTINGS, steps=2, rank=4)


def _flux_stored_as(storage: str, seed: int = 0):
    """The float32 tiny Flux of ``make_tiny_flux(seed)`` with its weights stored and cast as
    ComfyUI does on a GPU, loaded through the model's own ``load_model_weights``."""
    import comfy.model_patcher
    import comfy.supported_models

    weight_dtype, manual_cast = GPU_STORAGE[storage]
    state = make_tiny_flux(seed).model.diffusion_model.state_dict()
    cfg = comfy.supported_models.Flux(flux_unet_config(128, 1, 1, 1, TINY_CONTEXT_DIM))
    cfg.set_inference_dtype(weight_dtype, manual_cast)
    with torch.inference_mode(False):
        base = cfg.get_model({})
        base.load_model_weights({f"diffusion_model.{k}": v for k, v in state.items()}, "diffusion_model.")
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


def _lora(model, cfg: TrainConfig) -> comfyui.FluxLoraModel:
    lora = comfyui.FluxLoraModel(
        model, rank=cfg.rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets, gradient_checkpointing=True
    )
    # Non-zero up weights (the same in every model), so every LoRA weight gets a gradient.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a in lora.adapters.values():
            a.up.copy_(torch.randn(a.up.shape, generator=g) * 0.05)
    return lora


def _trainer(lora, cfg, run_dir, autocast=None, lora_path=None) -> Trainer:
    cond = lora.prepare_conditioning(make_conditioning())
    batches = ToyBatches(toy_latents(8, seed=0), cfg.batch_size, seed=cfg.seed)
    return Trainer(cfg, lora, batches, cond, run_dir, lora_path=lora_path, autocast=autocast)


def _gradient(trainer: Trainer) -> tuple[float, torch.Tensor]:
    """Loss and LoRA gradient (flattened, float32) of the first batch."""
    lora = trainer.model
    lora.load()
    for p in lora.parameters():
        p.grad = None
    with lora.training():
        loss = trainer.batch_loss(next(trainer.batches.stream(0, 0)))
        loss.backward()
    grad = torch.cat([p.grad.float().flatten() for p in lora.parameters()])
    lora.release()
    return loss.item(), grad


@pytest.fixture(scope="module")
def float32_gradient(comfy_root, tmp_path_factory):
    cfg = TrainConfig(**SETTINGS)
    return _gradient(_trainer(_lora(make_tiny_flux(0), cfg), cfg, tmp_path_factory.mktemp("f32")))


@pytest.mark.parametrize("storage", list(GPU_STORAGE))
def test_training_step_under_bf16_autocast_matches_float32(storage, float32_gradient, tmp_path):
    cfg = TrainConfig(**SETTINGS)
    lora = _lora(_flux_stored_as(storage), cfg)
    assert lora.dtype == torch.bfloat16 and lora.lora_form == "activations"
    reference_loss, reference = float32_gradient
    loss, grad = _gradient(_trainer(lora, cfg, tmp_path / "grad", autocast=CPU_BF16))
    assert torch.isfinite(torch.tensor(loss)) and torch.isfinite(grad).all()
    cosine = torch.nn.functional.cosine_similarity(grad, reference, dim=0).item()
    print(f"{storage}: loss {loss:.5f} (float32 {reference_loss:.5f}), gradient cosine {cosine:.4f}")
    assert cosine >= MIN_GRAD_COSINE[storage], cosine
    assert abs(loss - reference_loss) < 0.02 * reference_loss


@pytest.mark.parametrize("storage", ["bf16", "fp8_e4m3fn"])
def test_training_under_bf16_autocast_saves_a_lora_comfyui_loads(storage, tmp_path, monkeypatch):
    cfg = TrainConfig(**SETTINGS)
    lora = _lora(_flux_stored_as(storage), cfg)
    used = []

    def autocast():
        used.append(True)
        return CPU_BF16()

    path = tmp_path / "precision.safetensors"
    result = _trainer(lora, cfg, tmp_path / "run", autocast=autocast, lora_path=path).run(resume=False)
    assert used and result.step == cfg.steps
    assert all(torch.isfinite(torch.tensor(v)) for v in result.losses)
    state = load_file(str(path))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values())
    patched = comfyui.apply_lora(_flux_stored_as(storage), state)
    assert len(patched.patches) == len(lora.adapters)


def test_default_autocast_is_bf16_on_cuda_only():
    """The real selection, unchanged: bf16 autocast on CUDA for a reduced-precision model."""

    class Model:
        def __init__(self, device, dtype):
            self.device, self.dtype = torch.device(device), dtype

    with warnings.catch_warnings():  # CUDA autocast made on a machine without CUDA warns
        warnings.simplefilter("ignore")
        on_gpu = cuda_autocast(Model("cuda", torch.bfloat16))
    assert (
        isinstance(on_gpu, torch.autocast) and on_gpu.device == "cuda" and on_gpu.fast_dtype == torch.bfloat16
    )
    assert isinstance(cuda_autocast(Model("cuda", torch.float32)), contextlib.nullcontext)
    assert isinstance(cuda_autocast(Model("cpu", torch.bfloat16)), contextlib.nullcontext)
