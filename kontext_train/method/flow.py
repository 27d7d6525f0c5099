"""Flow-matching math for restoration, in Flux's own convention.

Flux (and ComfyUI's ``ModelSamplingFlux`` with ``CONST`` prediction) defines the path
``x_sigma = sigma * start + (1 - sigma) * x0`` and has the model predict the velocity
``v = start - x0``; sampling integrates from sigma = 1 down to 0. For pre-training ``start`` is
Gaussian noise. All three formulations here keep that convention and only change ``start`` and
whether the degraded latent is shown to the model as Kontext reference tokens:

=============  ============================  ================  =================================
formulation    start                         reference tokens  sampling starts from
=============  ============================  ================  =================================
bridge         z_LQ (+ s * eps), sigma 1     none              the degraded latent
bridge_ref     z_LQ (+ s * eps), sigma 1     z_LQ              the degraded latent (restore only)
kontext        eps, sigma 1                  z_LQ              pure noise
shortened      s0 eps + (1 - s0) z_LQ, s0    z_LQ              the degraded latent noised to s0
=============  ============================  ================  =================================

``shortened`` (a shortened horizon, as in E-Bridge, arXiv 2604.10983) starts at sigma0 =
``SHORTENED_START_SIGMA`` from the degraded latent mixed with noise the way the base model's own
path mixes a clean latent at that sigma, and goes in a straight line to the clean latent:
``x_sigma = (sigma / s0) start + (1 - sigma / s0) z_HQ`` for sigma in (0, s0], velocity
``(start - z_HQ) / s0``. Its noise level at every sigma is the pre-trained path's (sigma eps), so
the LoRA keeps the base model's clock; training draws sigma on (0, s0] (``on_horizon``) and
sampling runs s0 -> 0 (``sampling_sigmas(..., start=s0)``).

The original design note wrote the bridge as ``x = (1 - s) z_LQ + s z_HQ`` with target
``z_HQ - z_LQ``: the same straight line with ``s = 1 - sigma`` and the opposite sign, so s = 1
meant *clean*, the reverse of everything the base model learned about time. Written this way the
LoRA only has to learn a new start point, not a new clock.

``bridge_noise`` (s) moves the bridge's start to ``z_LQ + s * eps``: a noised degraded latent; the
sampler starts from the same noised point.

Why ``bridge_ref`` needs bridge noise: with s = 0 the model sees ``x = sigma z_LQ + (1 - sigma)
z_HQ`` *and* the reference ``z_LQ``, and the target ``z_LQ - z_HQ`` equals ``(ref - x) / (1 -
sigma)`` for every sigma < 1: an identity of the inputs that drives the training loss to zero
without learning anything about restoration (only the first sampling step, at sigma = 1, would
have to restore). With s > 0 that identity is formally gone: ``x - sigma ref = sigma s eps + (1 - sigma)
z_HQ`` mixes the unknown clean latent with unknown noise, and a predictor that knows nothing of
the degradation is left with a per-element error of ``s^2 V / (sigma^2 s^2 + (1 - sigma)^2 V)``
(V the variance of the clean latent; tests/test_flow.py checks this floor by regression). But at
the noise a bridge can afford that floor is tiny: at s = 0.1 such a predictor still explains 98-99%
of the target's variance (R^2 0.994 at sigma 0.02, 0.976 at sigma 0.5), and on the toys and the
pretrained stand-in its training loss fell like bridge's while its restorations did not improve.
Training therefore no longer offers ``bridge_ref`` (``check_formulation`` says what to use);
restoring with a LoRA trained that way earlier still works. Every formulation that trains is
checked for this shortcut in tests/test_flow.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FORMULATIONS = ("bridge", "bridge_ref", "kontext", "shortened")
# What training offers: bridge_ref restores (older LoRAs) but is not trained (module docstring).
TRAINABLE_FORMULATIONS = ("bridge", "kontext", "shortened")
# Where ``shortened`` starts (sigma0); fixed, recorded with each LoRA's formulation.
SHORTENED_START_SIGMA = 0.6
# The least bridge noise ``bridge_ref`` was once trained with (older LoRAs record it).
MIN_REFERENCE_BRIDGE_NOISE = 0.1
TIMESTEP_SAMPLING = ("shifted_uniform", "logit_normal", "uniform")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def uses_reference(formulation: str) -> bool:
    return check_choice("formulation", formulation, FORMULATIONS) != "bridge"


def starts_from_degraded(formulation: str) -> bool:
    return check_choice("formulation", formulation, FORMULATIONS) != "kontext"


def start_sigma(formulation: str) -> float:
    """The sigma the formulation's path starts at: 1, or sigma0 for ``shortened``."""
    return (
        SHORTENED_START_SIGMA
        if check_choice("formulation", formulation, FORMULATIONS) == "shortened"
        else 1.0
    )


def check_formulation(formulation: str, bridge_noise: float) -> None:
    """Refuses training settings whose targets leak through the inputs (a ValueError that says what to
    use instead)."""
    check_choice("formulation", formulation, FORMULATIONS)
    if not (isinstance(bridge_noise, (int, float)) and math.isfinite(bridge_noise) and bridge_noise >= 0):
        raise ValueError(f"bridge_noise must be a finite number >= 0, got {bridge_noise!r}")
    if formulation not in TRAINABLE_FORMULATIONS:
        raise ValueError(
            f"formulation {formulation!r} is no longer offered for training: its reference gives the target "
            "away (a predictor that knows nothing of the degradation explains 98-99% of it, even with "
            "bridge_noise), so the LoRA learns that identity instead of restoring. Train 'shortened' (the "
            "degraded image with noise as start and as reference), 'kontext' or 'bridge'; LoRAs trained as "
            f"{formulation!r} before still restore."
        )


def flux_shift_mu(image_tokens: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The shift ComfyUI's ModelSamplingFlux node picks for a resolution: a line through
    (256 tokens, base_shift) and (4096 tokens, max_shift). One token is a 2x2 latent patch."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return image_tokens * slope + (base_shift - slope * 256)


def image_tokens(latent_height: int, latent_width: int, patch: int = 2) -> int:
    return math.ceil(latent_height / patch) * math.ceil(latent_width / patch)


def time_unshift(mu: float, sigma: float) -> float:
    """The inverse of ``time_shift``: the t that the shift maps to ``sigma``."""
    if sigma <= 0:
        return 0.0
    return 1.0 / (1.0 + math.exp(mu) * (1.0 / sigma - 1.0))


def on_horizon(formulation: str, sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """Training sigmas moved onto the formulation's horizon: unchanged when it starts at 1, else
    ``t -> t * t0`` on the shifted clock (t0 the time of sigma0), so the same time sampling
    covers (0, sigma0]."""
    s0 = start_sigma(formulation)
    if s0 >= 1.0:
        return sigmas
    t = 1.0 / (1.0 + math.exp(mu) * (1.0 / sigmas.double().clamp_min(1e-12) - 1.0))
    return time_shift(mu, t * time_unshift(mu, s0)).to(sigmas.dtype).clamp(1e-4, s0)


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """Flux's resolution-dependent time shift, sigma = e^mu / (e^mu + 1/t - 1)."""
    t = t.clamp(0.0, 1.0)
    out = math.exp(mu) / (math.exp(mu) + (1.0 / t.clamp_min(1e-12) - 1.0))
    return torch.where(t <= 0, torch.zeros_like(t), out)


def sample_training_sigmas(
    batch: int,
    method: str,
    mu: float,
    generator: torch.Generator,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """Training sigmas in (0, 1], on the CPU (moved by the caller).

    ``shifted_uniform`` is what Flux uses: uniform t, then the time shift for this resolution.
    ``logit_normal`` (SD3) and ``uniform`` come from diffusers' training utilities.
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    check_choice("timestep_sampling", method, TIMESTEP_SAMPLING)
    scheme = "logit_normal" if method == "logit_normal" else "uniform"
    u = compute_density_for_timestep_sampling(
        weighting_scheme=scheme,
        batch_size=batch,
        logit_mean=logit_mean,
        logit_std=logit_std,
        generator=generator,
    )
    if method == "shifted_uniform":
        u = time_shift(mu, u)
    return u.clamp(1e-4, 1.0)


def loss_weights(sigmas: torch.Tensor, scheme: str) -> torch.Tensor:
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    check_choice("loss_weighting", scheme, LOSS_WEIGHTING)
    # sigma_sqrt is sigma^-2: bounded here so a sigma near 0 cannot blow up one step's loss.
    return compute_loss_weighting_for_sd3(scheme, sigmas.clamp_min(1e-2))


@dataclass
class TrainingExample:
    x: torch.Tensor  # model input at sigma
    target: torch.Tensor  # velocity the model should predict
    reference: torch.Tensor | None  # Kontext reference latent, or None


def path_start(
    formulation: str, degraded: torch.Tensor, noise: torch.Tensor, bridge_noise: float = 0.0
) -> torch.Tensor:
    """Where the path begins (at ``start_sigma(formulation)``)."""
    if formulation == "shortened":
        s0 = SHORTENED_START_SIGMA
        return s0 * noise + (1.0 - s0) * degraded
    if starts_from_degraded(formulation):
        return degraded + bridge_noise * noise if bridge_noise > 0 else degraded
    return noise


def make_training_example(
    formulation: str,
    clean: torch.Tensor,
    degraded: torch.Tensor,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    bridge_noise: float = 0.0,
) -> TrainingExample:
    """x_sigma = (sigma / s0) * start + (1 - sigma / s0) * clean; target v = (start - clean) / s0,
    with s0 the formulation's start sigma (1 but for ``shortened``; its sigmas come from
    ``on_horizon``)."""
    start = path_start(formulation, degraded, noise, bridge_noise)
    s0 = start_sigma(formulation)
    s = sigmas.reshape(-1, *([1] * (clean.ndim - 1))).to(clean) / s0
    x = s * start + (1.0 - s) * clean
    reference = degraded if uses_reference(formulation) else None
    return TrainingExample(x=x, target=(start - clean) / s0, reference=reference)


def sampling_sigmas(steps: int, mu: float | None = None, start: float = 1.0) -> torch.Tensor:
    """steps + 1 sigmas from ``start`` (1, or a formulation's sigma0) to 0, evenly spaced on the
    training clock (time-shifted like training when ``mu`` is given)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    t0 = start if mu is None else time_unshift(mu, start)
    t = torch.linspace(t0, 0.0, steps + 1)
    sigmas = time_shift(mu, t) if mu is not None else t
    sigmas[0] = start  # exactly, whatever the rounding of the inverse shift
    return sigmas


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    return x + (sigma_next - sigma) * v


def denoised_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
    """The clean estimate the velocity implies: x0 = x - sigma * v."""
    return x - sigma * v
