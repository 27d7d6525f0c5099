"""Restoring with ComfyUI's samplers on the training clock (kontext_train/comfyui/sampling.py).

Training samples sigmas with the time shift for the image's size (``flow.flux_shift_mu`` of its
token count); a Flux MODEL's own clock is a fixed shift of 1.15. Restore patches a clone of the
MODEL the way ComfyUI's ModelSamplingFlux node does, so every ComfyUI scheduler spaces its sigmas
on the trained clock. Checked at 512 and 1024 px (64x64 and 128x128 latents).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_conditioning, make_tiny_flux
from conftest import recording_model as _recording

from kontext_train import comfyui
from kontext_train.method.flow import flux_shift_mu, image_tokens, sampling_sigmas, time_shift
from kontext_train.restore.restore_settings import RestoreSettings

SIZES = [(512, 512), (1024, 1024)]
SCHEDULERS = ("simple", "normal", "sgm_uniform", "beta")


def _latent_size(width: int, height: int) -> tuple[int, int]:
    return height // 8, width // 8


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_the_patched_clock_is_the_trainers_shift(comfy_root, width, height):
    model = make_tiny_flux()
    lh, lw = _latent_size(width, height)
    mu = flux_shift_mu(image_tokens(lh, lw))
    clocked = comfyui.on_trained_clock(model, RestoreSettings().mu(lh, lw))
    t = torch.linspace(0.0, 1.0, 101)[1:]
    sampling = clocked.get_model_object("model_sampling")
    assert torch.allclose(sampling.sigma(t), time_shift(mu, t), atol=1e-6)
    # The MODEL given to the node keeps its own clock for the rest of the graph.
    assert model.get_model_object("model_sampling").shift == 1.15
    # With 'simple', ComfyUI's schedule is the trainer's own (as_trained) sigmas.
    settings = RestoreSettings(steps=8, scheduler="simple")
    sigmas = comfyui.restore_sigmas(clocked, settings, lh, lw)
    assert torch.allclose(sigmas, sampling_sigmas(8, mu), atol=1e-6)
    assert torch.allclose(sigmas, settings.as_trained_sigmas(lh, lw), atol=1e-6)


def test_without_the_patch_512_would_run_on_another_clock(comfy_root):
    """What the patch fixes: the MODEL's fixed 1.15 shift is far from the trained clock at 512."""
    model = make_tiny_flux()
    lh, lw = _latent_size(512, 512)
    settings = RestoreSettings(steps=8, scheduler="simple")
    fixed = comfyui.restore_sigmas(model, settings, lh, lw)
    trained = settings.as_trained_sigmas(lh, lw)
    assert (fixed - trained).abs().max() > 0.05


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_every_scheduler_matches_the_stock_model_sampling_flux_node(comfy_root, width, height):
    """Our clone is what ComfyUI's own ModelSamplingFlux node makes for this size (its defaults are
    the trainer's shift line, 0.5 at 256 tokens to 1.15 at 4096)."""
    import comfy.samplers
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    model = make_tiny_flux()
    lh, lw = _latent_size(width, height)
    (stock,) = ModelSamplingFlux().patch(model, 1.15, 0.5, width, height)
    ours = comfyui.on_trained_clock(model, RestoreSettings().mu(lh, lw))
    names = [s for s in SCHEDULERS if s in comfyui.scheduler_names()]
    assert "simple" in names and "normal" in names
    for name in names:
        expected = comfy.samplers.calculate_sigmas(stock.get_model_object("model_sampling"), name, 6)
        got = comfyui.restore_sigmas(ours, RestoreSettings(steps=6, scheduler=name), lh, lw)
        assert torch.allclose(got, expected.cpu(), atol=1e-6), name


def test_restore_pixels_with_a_comfy_scheduler_samples_at_the_trained_sigmas(comfy_root, tiny_vae):
    model, calls = _recording(make_tiny_flux())
    pixels = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    settings = RestoreSettings(steps=4, scheduler="simple", formulation="bridge_ref")
    with torch.inference_mode():
        out = comfyui.restore_pixels(model, tiny_vae, make_conditioning(), pixels, settings)
    assert out.shape == pixels.shape
    expected = settings.as_trained_sigmas(8, 12)[:-1]
    assert torch.allclose(torch.cat([c["sigma"].flatten()[:1] for c in calls]), expected, atol=1e-6)


def test_sample_from_reads_formulation_guidance_and_bridge_noise_from_the_settings(comfy_root):
    model, calls = _recording(make_tiny_flux())
    degraded = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    settings = RestoreSettings(formulation="bridge", bridge_noise=0.1, guidance=2.5, steps=2, seed=3)
    sigmas = settings.as_trained_sigmas(8, 8)
    with torch.inference_mode():
        comfyui.sample_from(model, make_conditioning(), degraded, sigmas, settings, seed=11)
    start = model.get_model_object("latent_format").process_in(degraded)
    eps = torch.randn(start.shape, generator=torch.Generator().manual_seed(11))  # the seed argument wins
    assert torch.allclose(calls[0]["input"], start + 0.1 * eps, atol=1e-6)
    assert calls[0]["refs"] is None  # bridge: no reference tokens
    assert calls[0]["guidance"] == 2.5 and len(calls) == 2


def test_shortened_starts_at_sigma0_from_the_noised_degraded_latent(comfy_root):
    """ComfyUI's sampler builds the shortened path's start itself: at sigmas[0] = sigma0 its first
    model input is sigma0 * eps + (1 - sigma0) * z_LQ (eps the seed's noise), with the degraded
    latent as the reference; the plain sampler starts at the same sigma."""
    from kontext_train.method.flow import SHORTENED_START_SIGMA

    model, calls = _recording(make_tiny_flux())
    degraded = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    settings = RestoreSettings(formulation="shortened", steps=3, seed=5)
    sigmas = settings.as_trained_sigmas(8, 8)
    assert sigmas[0].item() == pytest.approx(SHORTENED_START_SIGMA) and sigmas[-1] == 0
    with torch.inference_mode():
        comfyui.sample_from(model, make_conditioning(), degraded, sigmas, settings)
    import comfy.sample

    z = model.get_model_object("latent_format").process_in(degraded)
    eps = comfy.sample.prepare_noise(degraded, 5, None)
    s0 = SHORTENED_START_SIGMA
    assert torch.allclose(calls[0]["input"], s0 * eps + (1 - s0) * z, atol=1e-5)
    assert calls[0]["sigma"].flatten()[0].item() == pytest.approx(s0, abs=1e-6)
    assert calls[0]["refs"] is not None and len(calls) == 3


def test_unknown_sampler_or_scheduler_is_named(comfy_root):
    model = make_tiny_flux()
    with pytest.raises(ValueError, match="no_such_sampler"):
        comfyui.sample_from(
            model,
            make_conditioning(),
            torch.zeros(1, 16, 4, 4),
            torch.tensor([1.0, 0.0]),
            RestoreSettings(sampler="no_such_sampler"),
        )
    with pytest.raises(ValueError, match="no_such_scheduler"):
        comfyui.restore_sigmas(model, RestoreSettings(scheduler="no_such_scheduler"), 4, 4)


# --------------------------------------------------------------------------------------------
# Every offered sampler and scheduler finishes the path (issue 20): with an exact model each must
# land on the clean latent in 8 steps.
# --------------------------------------------------------------------------------------------


def _exact_model(clean_raw: torch.Tensor, start=None):
    """The tiny MODEL with its prediction replaced by an exact one, on the trained clock.

    ``start`` None: the denoiser of a one-image data set (the clean latent, from any x and sigma),
    exact for every sampler, stochastic ones included. ``start`` given (model space): the constant
    velocity ``start - clean`` of the straight path from ``start`` at sigma 1, exact only at the
    sigma the path gives each point, so a schedule that labels the start with another sigma misses.
    """
    model = make_tiny_flux()
    clean = model.get_model_object("latent_format").process_in(clean_raw)

    def exact(apply_model, args):
        x, sigma = args["input"], args["timestep"].reshape(-1, 1, 1, 1).to(args["input"])
        if start is None:
            return clean.to(x).expand_as(x)
        return x - sigma * (start - clean).to(x)  # ComfyUI's wrapper returns the denoised latent

    patched = model.clone()
    patched.set_model_unet_function_wrapper(exact)
    return comfyui.on_trained_clock(patched, RestoreSettings().mu(8, 8)), model


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)


def _restore(model, degraded, settings) -> torch.Tensor:
    with torch.inference_mode():
        sigmas = comfyui.restore_sigmas(model, settings, 8, 8)
        return comfyui.sample_from(model, make_conditioning(), degraded, sigmas, settings)


def _all_samplers() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.SAMPLER_NAMES)


@pytest.mark.parametrize("formulation", ["bridge", "bridge_ref", "kontext"])
def test_every_sampler_finishes_the_path(comfy_root, formulation):
    clean, degraded = _pair()
    model, _ = _exact_model(clean)
    missed = {}
    for name in _all_samplers():
        settings = RestoreSettings(
            formulation=formulation, bridge_noise=0.1 * (formulation == "bridge_ref"), steps=8, sampler=name
        )
        error = (_restore(model, degraded, settings) - clean).abs().max().item()
        if not error <= 1e-5:
            missed[name] = error
    assert not missed, f"samplers that do not reach the clean latent in 8 steps: {missed}"


def test_samplers_that_stop_short_are_finished(comfy_root):
    """Without the added step the four samplers miss (what the wrapper fixes), and with a schedule
    that does not end at 0 it adds nothing."""
    import comfy.samplers

    clean, degraded = _pair(1)
    model, _ = _exact_model(clean)
    settings = RestoreSettings(steps=8)
    sigmas = settings.as_trained_sigmas(8, 8)
    for name in comfyui.sampling.STOPS_SHORT_OF_ZERO:
        stock = comfy.samplers.sampler_object(name)
        guider = comfy.samplers.CFGGuider(model)
        guider.inner_set_conds(
            {"positive": comfyui.with_reference_and_guidance(make_conditioning(), None, 1.5)}
        )
        start = model.get_model_object("latent_format").process_in(degraded)
        with torch.inference_mode():
            out = guider.sample(start, degraded, stock, sigmas.clone(), disable_pbar=True, seed=0)
            finished = guider.sample(
                start, degraded, comfyui.finishing_sampler(name), sigmas.clone(), disable_pbar=True, seed=0
            )
        assert (out.float() - clean).abs().max() > 1e-3, name
        assert (finished.float() - clean).abs().max() <= 1e-5, name
    assert comfyui.finishing_sampler("euler").sampler_function.__name__ == "sample_euler"


def test_every_offered_scheduler_finishes_the_path_and_starts_at_the_degraded_image(comfy_root):
    clean, degraded = _pair(2)
    probe, tiny = _exact_model(clean)
    start = tiny.get_model_object("latent_format").process_in(degraded)
    model, _ = _exact_model(clean, start=start)
    offered = ["as_trained"] + comfyui.restore_scheduler_names()
    assert "simple" in offered and "ddim_uniform" not in offered
    for name in offered:
        for sampler in ("euler", "dpm_fast"):
            settings = RestoreSettings(steps=8, sampler=sampler, scheduler=name)
            error = (_restore(model, degraded, settings) - clean).abs().max().item()
            assert error <= 1e-5, (name, sampler, error)


def test_ddim_uniform_is_refused_with_the_reason(comfy_root):
    """What the refusal avoids: ddim_uniform's schedule starts below sigma 1 on Flux, and on the
    straight path the restore then misses the clean latent."""
    import comfy.samplers

    clean, degraded = _pair(3)
    _, tiny = _exact_model(clean)
    start = tiny.get_model_object("latent_format").process_in(degraded)
    model, _ = _exact_model(clean, start=start)
    sigmas = comfy.samplers.calculate_sigmas(
        model.get_model_object("model_sampling"), "ddim_uniform", 8
    ).cpu()
    assert float(sigmas[0]) < 0.99
    settings = RestoreSettings(steps=8)
    with torch.inference_mode():
        out = comfyui.sample_from(model, make_conditioning(), degraded, sigmas, settings)
    assert (out - clean).abs().max() > 0.05
    with pytest.raises(ValueError, match="ddim_uniform is a schedule of a discrete-timestep model"):
        comfyui.restore_sigmas(model, RestoreSettings(steps=8, scheduler="ddim_uniform"), 8, 8)


def test_ddim_uniform_is_refused_at_queue_time_with_the_reason(pack_nodes):
    cls = pack_nodes.NODE_CLASS_MAPPINGS["KontextRestoreRestore"]
    options = cls.INPUT_TYPES()["required"]["scheduler"]
    assert "ddim_uniform" not in str(options) and "simple" in str(options)
    message = cls.validate_inputs(scheduler="ddim_uniform")
    assert isinstance(message, str) and "scheduler 'ddim_uniform' is not offered" in message
    assert "starts at sigma 0.92-0.96" in message
    assert cls.validate_inputs(scheduler="beta") is True
