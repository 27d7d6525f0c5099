"""The restoration sampler in plain torch: Euler steps along the trained path.

ComfyUI's own samplers do the same job in the Restore node (any sampler and scheduler); this
version needs only a velocity function, so validation during training and the tests can restore
without ComfyUI's sampling stack. With Euler and the same sigmas the two agree.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .flow import euler_step, path_start, sampling_sigmas, start_sigma

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def restore_latents(
    velocity: VelocityFn,
    degraded: torch.Tensor,
    formulation: str,
    steps: int,
    mu: float | None = None,
    seed: int = 0,
    bridge_noise: float = 0.0,
) -> torch.Tensor:
    """Integrates x from the start the formulation trained with (sigma 1, or sigma0) to 0.

    ``degraded`` and the result are model-space latents (B, C, h, w). ``velocity(x, sigma,
    reference)`` is the model; the reference is the degraded latent where the formulation uses one.
    """
    from .flow import uses_reference

    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(degraded.shape, generator=generator).to(degraded)
    x = path_start(formulation, degraded, noise, bridge_noise)
    reference = degraded if uses_reference(formulation) else None
    sigmas = sampling_sigmas(steps, mu, start_sigma(formulation)).tolist()
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        s = torch.full((x.shape[0],), sigma, device=x.device)
        x = euler_step(x, velocity(x, s, reference), sigma, sigma_next)
    return x
