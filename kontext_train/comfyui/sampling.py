"""Sampling from the degraded latent with ComfyUI's own samplers, schedulers and guiders, on the
training clock (the time shift training used at the image's size)."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import torch

from ..method.flow import start_sigma, starts_from_degraded, uses_reference
from ..restore.restore_settings import AS_TRAINED, RestoreSettings
from .host import sampler_names, scheduler_names, vae_decode, vae_encode
from .training_model import check_conditioning

log = logging.getLogger("kontext_restore")


class DegradedStartNoise:
    """A ComfyUI NOISE (``.seed`` + ``.generate_noise``) whose sample *is* the degraded latent.

    ComfyUI starts sampling at ``sigma0 * noise + (1 - sigma0) * process_in(latent_image)`` and
    does not pass the noise through ``process_in``; so with sigma0 = 1 the first model input is
    exactly the model-space latent held here, the start the bridge was trained from. With
    ``bridge_noise`` s > 0 it is ``z_LQ + s * eps`` with eps drawn from ``seed`` on the CPU, the
    same draw as ``sampler.restore_latents``.
    """

    def __init__(self, degraded_model_space: torch.Tensor, seed: int = 0, bridge_noise: float = 0.0) -> None:
        if not isinstance(degraded_model_space, torch.Tensor) or degraded_model_space.ndim != 4:
            shape = tuple(getattr(degraded_model_space, "shape", ()))
            raise ValueError(
                f"The degraded latent must be a (batch, channels, h, w) tensor, got shape {shape}."
            )
        if not (bridge_noise >= 0 and math.isfinite(bridge_noise)):
            raise ValueError(f"bridge_noise must be a finite number >= 0, got {bridge_noise}")
        self.degraded = degraded_model_space.detach().to(device="cpu", dtype=torch.float32)
        self.seed = int(seed)
        self.bridge_noise = float(bridge_noise)

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        samples = input_latent.get("samples") if isinstance(input_latent, dict) else None
        if isinstance(samples, torch.Tensor) and not samples.is_nested:
            if samples.shape[0] != self.degraded.shape[0] or samples.shape[-2:] != self.degraded.shape[-2:]:
                raise ValueError(
                    f"The sampler's latent_image is {tuple(samples.shape)} but the degraded start is "
                    f"{tuple(self.degraded.shape)}. Connect the same degraded LATENT (VAE Encode of the degraded "
                    "image) to both 'Degraded Image as Start' and the sampler's latent_image."
                )
        start = self.degraded.clone()
        if self.bridge_noise > 0:
            g = torch.Generator().manual_seed(self.seed)
            start = start + self.bridge_noise * torch.randn(start.shape, generator=g)
        return start


def degraded_start_noise(model, degraded_raw: torch.Tensor, seed: int = 0, bridge_noise: float = 0.0):
    """The NOISE for a raw (VAE-space) degraded latent, in this MODEL's latent space."""
    process_in = model.get_model_object("latent_format").process_in
    return DegradedStartNoise(
        process_in(degraded_raw.detach().float().cpu()), seed=seed, bridge_noise=bridge_noise
    )


def comfy_sigmas(model, scheduler: str, steps: int) -> torch.Tensor:
    """Sigmas from one of ComfyUI's schedulers with the MODEL's own model sampling (its shift)."""
    import comfy.samplers

    if scheduler in UNFIT_SCHEDULERS:
        raise ValueError(
            f"Scheduler {scheduler!r} is not offered for Kontext Restore: {UNFIT_SCHEDULERS[scheduler]}"
        )
    names = scheduler_names()
    if scheduler not in names:
        raise ValueError(f"Unknown scheduler {scheduler!r}; ComfyUI has: {', '.join(names)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()


@functools.cache
def _flux_model_sampling_class():
    # The class ComfyUI's ModelSamplingFlux node builds: Flux's shifted clock with CONST (velocity)
    # prediction. Made once so every patched clone carries the same type.
    import comfy.model_sampling

    class KontextRestoreModelSampling(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
        pass

    return KontextRestoreModelSampling


def on_trained_clock(model, mu: float):
    """A clone of the MODEL whose model sampling uses the time shift ``mu``, the way ComfyUI's
    ModelSamplingFlux node sets it (an object patch on ``model_sampling``); the input MODEL is
    unchanged. Every ComfyUI scheduler then spaces its sigmas on this clock."""
    if not math.isfinite(mu):
        raise ValueError(f"The time shift must be finite, got {mu}")
    patched = model.clone()
    sampling = _flux_model_sampling_class()(model.model.model_config)
    sampling.set_parameters(shift=float(mu))
    patched.add_object_patch("model_sampling", sampling)
    return patched


def restore_sigmas(model, settings: RestoreSettings, latent_height: int, latent_width: int) -> torch.Tensor:
    """``as_trained`` (the training time shift for this latent size, ``flow.sampling_sigmas``) or a
    ComfyUI scheduler run on ``model``'s clock (``on_trained_clock`` it first)."""
    if settings.scheduler == AS_TRAINED:
        return settings.as_trained_sigmas(latent_height, latent_width)
    # A shortened horizon starts at sigma0: the scheduler's sigmas scaled to end there.
    return comfy_sigmas(model, settings.scheduler, settings.steps) * start_sigma(settings.formulation)


def with_reference_and_guidance(conditioning, reference_raw: torch.Tensor | None, guidance: float):
    """The conditioning as training saw it: Flux guidance set, and exactly one reference (the
    degraded latent) or none. References already on the conditioning (e.g. from a ReferenceLatent
    node) are replaced, not appended: a second reference was never part of training."""
    import node_helpers

    # The same conditioning rules as training: what one refuses, the other does too.
    check_conditioning(conditioning)
    had_refs = any(len(c) > 1 and c[1].get("reference_latents") for c in conditioning)
    refs = [reference_raw] if reference_raw is not None else None
    if had_refs:
        log.warning(
            "Kontext Restore: reference latents already on the conditioning were dropped; %s",
            "the degraded image is the reference." if refs else "a 'bridge' LoRA was trained without one.",
        )
    return node_helpers.conditioning_set_values(
        conditioning, {"guidance": float(guidance), "reference_latents": refs}
    )


def sample_from(
    model,
    conditioning,
    degraded_raw: torch.Tensor,
    sigmas: torch.Tensor,
    settings: RestoreSettings,
    *,
    seed: int | None = None,
    callback: Callable | None = None,
) -> torch.Tensor:
    """Restores one batch of raw degraded latents with ComfyUI's sampler; returns raw latents.

    Uses the settings' formulation, sampler, guidance and bridge noise; ``seed`` (default
    ``settings.seed``) seeds the noise. Bridge formulations start at the degraded latent through
    ``DegradedStartNoise`` (exactly, when ``sigmas[0]`` is 1); ``kontext`` starts from seeded
    Gaussian noise like a stock sampler.
    """
    import comfy.samplers

    if settings.sampler not in sampler_names():
        raise ValueError(f"Unknown sampler {settings.sampler!r}; ComfyUI has: {', '.join(sampler_names())}")
    seed = settings.seed if seed is None else int(seed)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten().cpu()
    if sigmas.numel() < 2:
        raise ValueError(f"Need at least 2 sigmas (one step), got {sigmas.tolist()}")
    degraded_raw = degraded_raw.detach().float().cpu()
    reference = degraded_raw if uses_reference(settings.formulation) else None
    cond = with_reference_and_guidance(conditioning, reference, settings.guidance)
    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": cond})
    guider.set_cfg(1.0)
    sampler = finishing_sampler(settings.sampler)
    if settings.formulation == "shortened":
        # ComfyUI starts at sigmas[0] * noise + (1 - sigmas[0]) * latent_image: the degraded latent
        # noised to sigma0, the shortened path's start, when sigmas[0] is sigma0.
        latent_image = degraded_raw
        noise = _SeededNoise(seed)
    elif starts_from_degraded(settings.formulation):
        noise = degraded_start_noise(model, degraded_raw, seed=seed, bridge_noise=settings.bridge_noise)
        # The degraded latent as latent_image too keeps the start exact when sigmas[0] < 1.
        latent_image = degraded_raw
    else:
        latent_image = torch.zeros_like(degraded_raw)
        noise = _SeededNoise(seed)
    noise_tensor = noise.generate_noise({"samples": latent_image})
    out = guider.sample(
        noise_tensor, latent_image, sampler, sigmas, callback=callback, disable_pbar=True, seed=seed
    )
    return out.float().cpu()


# ComfyUI samplers that stop short of sigma 0 on a schedule ending there: dpm_fast and dpm_adaptive
# integrate to the last non-zero sigma and return that latent; uni_pc/uni_pc_bh2 replace the final
# 0 by 0.001. With an exact velocity field they missed the clean latent by up to 0.9 and 3.5e-3
# (max abs, 8 steps). ``finishing_sampler`` adds the missing step.
STOPS_SHORT_OF_ZERO = ("dpm_fast", "dpm_adaptive", "uni_pc", "uni_pc_bh2")
# ComfyUI schedulers this model cannot sample with, and why (offered nowhere; refused by name).
UNFIT_SCHEDULERS = {
    "ddim_uniform": (
        "ddim_uniform is a schedule of a discrete-timestep model: on Flux it starts at sigma 0.92-0.96, "
        "so the degraded (or noise) start would be labelled with a sigma it was not trained at. "
        "Use as_trained, simple or another scheduler."
    )
}


def restore_scheduler_names() -> list[str]:
    """ComfyUI's schedulers that restore along the trained path (all but ``UNFIT_SCHEDULERS``)."""
    return [n for n in scheduler_names() if n not in UNFIT_SCHEDULERS]


class _FinishAtZero:
    """A sampler function that ends where the schedule ends: when the wrapped sampler returns the
    latent at a sigma above 0 although the schedule ends at 0, one Euler step to 0 follows. On the
    straight path that step lands on the model's prediction of the clean latent (one more model
    call), as Euler's last step would."""

    def __init__(self, function: Callable) -> None:
        self.function = function

    def __call__(self, model, x, sigmas, *args, extra_args=None, **kwargs):
        inner = sigmas.clone()  # uni_pc writes its 0.001 into the sigmas it gets
        out = self.function(model, x, inner, *args, extra_args=extra_args, **kwargs)
        if sigmas.numel() < 2 or float(sigmas[-1]) != 0.0:
            return out
        end = inner[-1] if float(inner[-1]) > 0 else inner[-2]
        return model(out, end * out.new_ones([out.shape[0]]), **(extra_args or {}))


def finishing_sampler(name: str):
    """ComfyUI's sampler object ``name``, made to finish at sigma 0 where it would stop short."""
    import comfy.samplers

    sampler = comfy.samplers.sampler_object(name)
    if name in STOPS_SHORT_OF_ZERO:
        sampler = comfy.samplers.KSAMPLER(
            _FinishAtZero(sampler.sampler_function), sampler.extra_options, sampler.inpaint_options
        )
    return sampler


class _SeededNoise:
    """ComfyUI's own seeded noise (what RandomNoise / KSampler draw for this seed)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        import comfy.sample

        return comfy.sample.prepare_noise(input_latent["samples"], self.seed, None)


def restore_pixels(
    model,
    vae,
    conditioning,
    pixels: torch.Tensor,
    settings: RestoreSettings,
    *,
    seed: int | None = None,
    callback: Callable | None = None,
) -> torch.Tensor:
    """(B, 3, H, W) degraded pixels at a bucket size -> restored pixels: encode, sample, decode.

    Sampling runs on a clone of ``model`` set to the training time shift for this latent size, so
    any ComfyUI scheduler (and anything else that reads the model's clock) matches training.
    """
    raw = vae_encode(vae, pixels)
    clocked = on_trained_clock(model, settings.mu(raw.shape[-2], raw.shape[-1]))
    sigmas = restore_sigmas(clocked, settings, raw.shape[-2], raw.shape[-1])
    restored = sample_from(clocked, conditioning, raw, sigmas, settings, seed=seed, callback=callback)
    return vae_decode(vae, restored)


def region_restorer(model, vae, conditioning, settings: RestoreSettings):
    """``restore.restore_images``' ``RegionRestorer`` for this MODEL, VAE and prompt."""

    def restore_region(pixels: torch.Tensor, seed: int, on_step: Callable[[int], None]) -> torch.Tensor:
        return restore_pixels(
            model, vae, conditioning, pixels, settings, seed=seed, callback=lambda step, *_: on_step(step)
        )

    return restore_region
