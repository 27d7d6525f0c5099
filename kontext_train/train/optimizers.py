"""The optimizers and losses a run can choose, and what each optimizer keeps per parameter.

- ``adamw`` (default), ``adam``, ``adafactor``: torch's own (``torch.optim.Adafactor`` since 2.5).
- ``prodigy``: the ``prodigyopt`` package (``pip install prodigyopt``), which estimates the step
  size itself; its ``learning_rate`` is a multiplier of that estimate, 1.0 as its authors advise.
- ``adamw8bit``: bitsandbytes' ``AdamW8bit`` (``pip install bitsandbytes``): its two moments in
  8 bits (blockwise quantised). bitsandbytes 0.50 runs its optimizers on the CPU as well as CUDA
  (checked here on a CPU-only machine: a step and a resume match), so no CUDA-only build is needed.

A missing optional package is a one-line error saying what to install. ``state_bytes_per_number``
is what the memory plan counts for the optimizer's state (``plan/optimizer_state.py``).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence

import torch

from ..method.train_config import LOSSES, OPTIMIZERS

# The package an optional optimizer needs (import name, pip name).
_PACKAGES = {"prodigy": ("prodigyopt", "prodigyopt"), "adamw8bit": ("bitsandbytes", "bitsandbytes")}

log = logging.getLogger("kontext_restore")


def optimizer_available(name: str) -> bool:
    """Whether ``name``'s package is installed (torch's own are always)."""
    module = _PACKAGES.get(name, ("torch",))[0]
    return importlib.util.find_spec(module) is not None


def require_optimizer(name: str) -> None:
    """ValueError with the pip command when ``name`` needs a package that is not installed."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {name!r}")
    if not optimizer_available(name):
        module, pip_name = _PACKAGES[name]
        raise ValueError(
            f"optimizer {name!r} needs the {module} package, which is not installed: run "
            f"'pip install {pip_name}' in ComfyUI's Python environment, or choose adamw."
        )


def build_optimizer(
    name: str, params: Sequence[torch.nn.Parameter], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params`` (decoupled weight decay where the optimizer has it)."""
    require_optimizer(name)
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adafactor":
        # torch scales Adafactor's step by max(eps2, RMS of the parameter): a LoRA factor that
        # starts at zero would then move by lr * 1e-3 (measured: no learning in 30 toy steps).
        # eps2 = 1 makes learning_rate the step size, as AdamW's is (the RMS of a LoRA factor is
        # far below 1), which is what a LoRA trainer's learning rate means.
        return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay, eps=(None, 1.0))
    if name == "prodigy":
        from prodigyopt import Prodigy

        if lr < 0.1:
            log.warning(
                "Kontext Restore: Prodigy finds its own step size; learning_rate multiplies it and is "
                "usually 1.0 (got %g), so this run may learn very slowly.",
                lr,
            )
        # Adam's bias correction, as prodigyopt's README advises for diffusion models. (Its
        # safeguard_warmup as well kept the step size at d0 = 1e-6 for 30 steps of a small
        # least-squares LoRA problem, measured here; bias correction alone lets it grow.)
        return Prodigy(params, lr=lr, weight_decay=weight_decay, use_bias_correction=True)
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


def state_bytes_per_number(
    name: str, shape: Sequence[int], element_size: int, starts_at_zero: bool = False
) -> int:
    """Bytes of optimizer state for one parameter of ``shape`` (``element_size`` bytes each).

    AdamW/Adam: two moments in the parameter's dtype. Adafactor (torch): a matrix keeps a row and a
    column second-moment vector, a vector the full one; no first moment. Prodigy: four tensors
    (two moments, ``s`` and the initial value ``p0``, which is one number for a parameter that
    ``starts_at_zero``, as a fresh adapter's zero factor does). AdamW8bit: two 1-byte moments, plus a
    float32 scale per 256-number block each (tensors under 4096 numbers stay 32-bit).
    """
    numel = 1
    for d in shape:
        numel *= int(d)
    if name in ("adamw", "adam"):
        return 2 * numel * element_size
    if name == "adafactor":
        if len(shape) >= 2:
            rows = numel // int(shape[-1])
            return (rows + int(shape[-1])) * element_size
        return numel * element_size
    if name == "prodigy":
        return (3 * numel + (1 if starts_at_zero else numel)) * element_size
    if name == "adamw8bit":
        if numel < 4096:
            return 2 * numel * 4
        return 2 * (numel + 4 * ((numel + 255) // 256))
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {name!r}")


def loss_per_sample(
    pred: torch.Tensor, target: torch.Tensor, kind: str, huber_delta: float = 1.0
) -> torch.Tensor:
    """Mean over all but the batch dimension of the element loss ``kind`` (float32 or wider)."""
    pred, target = pred.float(), target.float()
    if kind == "mse":
        element = (pred - target).pow(2)
    elif kind == "l1":
        element = (pred - target).abs()
    elif kind == "huber":
        element = torch.nn.functional.huber_loss(pred, target, reduction="none", delta=huber_delta)
    else:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}; got {kind!r}")
    return element.mean(dim=tuple(range(1, pred.ndim)))
