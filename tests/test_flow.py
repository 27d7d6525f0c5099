"""The flow-matching formulations have no shortcut: a predictor that sees only the model's inputs
(x, sigma, reference) and knows nothing about the degradation cannot reach zero training loss.

The clean and degraded latents are drawn independently here, so nothing about restoration can be
learned from the reference; any loss below the "knows nothing" floor could only come from an
identity between the inputs and the target. The best such predictor for Gaussian data is linear,
so it is fitted by least squares at each sigma (one coefficient per input, shared by all elements).
"""

from __future__ import annotations

import pytest
import torch

from kontext_train.method.flow import (
    FORMULATIONS,
    MIN_REFERENCE_BRIDGE_NOISE,
    SHORTENED_START_SIGMA,
    TRAINABLE_FORMULATIONS,
    check_formulation,
    make_training_example,
    start_sigma,
    uses_reference,
)

SIGMAS = (0.05, 0.2, 0.5, 0.8, 0.95)
N = 200_000  # elements per sigma: the fitted residual is within ~1% of its limit


def best_cheat_loss(
    formulation: str, sigma: float, bridge_noise: float, seed: int = 0
) -> tuple[float, float]:
    """(least-squares residual of the target given the inputs, variance of the target), per element."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(N, generator=g, dtype=torch.float64)
    degraded = torch.randn(N, generator=g, dtype=torch.float64)  # independent of the clean latent
    noise = torch.randn(N, generator=g, dtype=torch.float64)
    ex = make_training_example(
        formulation,
        clean[None],
        degraded[None],
        torch.tensor([sigma], dtype=torch.float64),
        noise[None],
        bridge_noise,
    )
    features = [ex.x[0], torch.ones(N, dtype=torch.float64)]
    if ex.reference is not None:
        features.append(ex.reference[0])
    design = torch.stack(features, dim=1)
    target = ex.target[0]
    coef = torch.linalg.lstsq(design, target[:, None]).solution
    residual = target - (design @ coef)[:, 0]
    return residual.pow(2).mean().item(), target.var().item()


def knows_nothing_floor(formulation: str, sigma: float, s: float, v: float = 1.0) -> float:
    """The per-element error left to a predictor that knows nothing of the degradation (Gaussian data,
    clean variance v, degraded variance v, noise variance 1); derivation in kontext_train/method/flow.py."""
    if formulation == "bridge_ref":  # x - sigma*ref = sigma*s*eps + (1-sigma)*z; v - ref = s*eps - z
        return s * s * v / (sigma**2 * s * s + (1 - sigma) ** 2 * v)
    start_var = v + s * s if formulation == "bridge" else 1.0  # start = z_LQ + s*eps, or eps
    return start_var * v / (sigma**2 * start_var + (1 - sigma) ** 2 * v)


def test_old_bridge_ref_without_noise_leaks_the_target():
    """The defect that made bridge_ref the default: zero loss without learning anything."""
    for sigma in SIGMAS:
        loss, target_var = best_cheat_loss("bridge_ref", sigma, 0.0)
        assert loss < 1e-12 * target_var, (sigma, loss)


@pytest.mark.parametrize(
    "formulation,bridge_noise",
    [("bridge", 0.0), ("bridge", MIN_REFERENCE_BRIDGE_NOISE), ("bridge_ref", MIN_REFERENCE_BRIDGE_NOISE),
     ("bridge_ref", 0.3), ("kontext", 0.0)],
)  # fmt: skip
def test_the_cheat_reaches_the_derived_floor(formulation, bridge_noise):
    """The floor formula in kontext_train/method/flow.py is right (bridge_ref included: it still
    restores older LoRAs)."""
    for sigma in SIGMAS:
        loss, _ = best_cheat_loss(formulation, sigma, bridge_noise)
        floor = knows_nothing_floor(formulation, sigma, bridge_noise)
        assert loss == pytest.approx(floor, rel=0.03), (sigma, loss, floor)


def clean_recovery_r2(formulation: str, sigma: float, bridge_noise: float, seed: int = 0) -> float:
    """R^2 of the best linear estimate of the *clean* latent from the model's inputs (x, reference),
    with a degraded latent that says nothing about it. The base model's own task (x = sigma eps +
    (1 - sigma) z) allows (1 - sigma)^2 / ((1 - sigma)^2 + sigma^2); a formulation whose inputs give
    the clean latent away beyond that teaches a shortcut instead of restoration."""
    g = torch.Generator().manual_seed(seed)
    clean, degraded, noise = (torch.randn(N, generator=g, dtype=torch.float64) for _ in range(3))
    ex = make_training_example(
        formulation,
        clean[None],
        degraded[None],
        torch.tensor([sigma], dtype=torch.float64),
        noise[None],
        bridge_noise,
    )
    features = [ex.x[0], torch.ones(N, dtype=torch.float64)]
    if ex.reference is not None:
        features.append(ex.reference[0])
    design = torch.stack(features, dim=1)
    coef = torch.linalg.lstsq(design, clean[:, None]).solution
    return 1.0 - (clean - (design @ coef)[:, 0]).var().item() / clean.var().item()


def base_task_r2(sigma: float) -> float:
    return (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma**2)


# Every setting training accepts: each trainable formulation with bridge noise from none to the most.
TRAINABLE_SETTINGS = [
    (f, s) for f in TRAINABLE_FORMULATIONS for s in (0.0, MIN_REFERENCE_BRIDGE_NOISE, 0.5, 1.0)
]


@pytest.mark.parametrize("formulation,bridge_noise", TRAINABLE_SETTINGS)
def test_no_trainable_setting_gives_the_clean_latent_away(formulation, bridge_noise):
    check_formulation(formulation, bridge_noise)  # accepted for training
    s0 = start_sigma(formulation)
    for t in SIGMAS:
        sigma = t * s0  # the sigmas this formulation trains on
        assert clean_recovery_r2(formulation, sigma, bridge_noise) <= base_task_r2(sigma) + 0.01, sigma


@pytest.mark.parametrize("bridge_noise", [MIN_REFERENCE_BRIDGE_NOISE, 0.3])
def test_bridge_ref_gives_the_clean_latent_away_and_is_not_trainable(bridge_noise):
    """What retired it (issue 20): even with bridge noise its inputs reveal the clean latent far
    beyond the base task, and the issue's measure (R^2 of the target) is 0.98-0.99 at s = 0.1."""
    leaks = [clean_recovery_r2("bridge_ref", s, bridge_noise) - base_task_r2(s) for s in SIGMAS]
    assert max(leaks) > 0.2
    loss, target_var = best_cheat_loss("bridge_ref", 0.5, MIN_REFERENCE_BRIDGE_NOISE)
    assert 1 - loss / target_var > 0.97
    with pytest.raises(ValueError, match=r"'bridge_ref' is no longer offered for training.*still restore"):
        check_formulation("bridge_ref", bridge_noise)


def test_floor_of_the_least_allowed_bridge_noise_averaged_over_training_sigmas():
    """The number the README quotes: for bridge_ref at the least allowed bridge noise, the cheat's
    mean loss over the training sigmas is 0.33 per element at 1024 px (mu = 1.15) and 0.22 at 512 px
    (mu = 0.5), with unit-variance latents: 16% and 11% of the target's variance, against 0 before."""
    from kontext_train.method.flow import sample_training_sigmas

    sigmas = sample_training_sigmas(4096, "shifted_uniform", 1.15, torch.Generator().manual_seed(0)).double()
    floors = torch.tensor(
        [knows_nothing_floor("bridge_ref", float(s), MIN_REFERENCE_BRIDGE_NOISE) for s in sigmas]
    )
    target_var = 2.0 + MIN_REFERENCE_BRIDGE_NOISE**2
    assert floors.mean().item() / target_var > 0.05


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1])
def test_bridge_noise_must_be_finite_and_non_negative(bad):
    with pytest.raises(ValueError, match="bridge_noise must be a finite number"):
        check_formulation("bridge", bad)


def test_formulations_and_references_are_consistent():
    assert set(FORMULATIONS) == {"bridge", "bridge_ref", "kontext", "shortened"}
    assert set(TRAINABLE_FORMULATIONS) == set(FORMULATIONS) - {"bridge_ref"}
    assert [uses_reference(f) for f in FORMULATIONS] == [False, True, True, True]
    assert [start_sigma(f) for f in FORMULATIONS] == [1.0, 1.0, 1.0, SHORTENED_START_SIGMA]


def test_shortened_path_starts_at_the_noised_degraded_latent_and_ends_clean():
    """x at sigma0 is sigma0 * eps + (1 - sigma0) * z_LQ (what ComfyUI's sampler builds from the
    degraded latent and seeded noise at sigma0); an exact Euler step along the target reaches z_HQ;
    the noise level at every sigma is the base path's (sigma * eps)."""
    g = torch.Generator().manual_seed(0)
    clean, degraded, noise = (torch.randn(1, 16, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    s0 = SHORTENED_START_SIGMA
    start = make_training_example("shortened", clean, degraded, torch.tensor([s0]).double(), noise)
    torch.testing.assert_close(start.x, s0 * noise + (1 - s0) * degraded)
    torch.testing.assert_close(start.x - s0 * start.target, clean)
    for sigma in (0.1, 0.3):
        ex = make_training_example("shortened", clean, degraded, torch.tensor([sigma]).double(), noise)
        signal = ex.x - sigma * noise
        torch.testing.assert_close(signal, (sigma / s0) * (1 - s0) * degraded + (1 - sigma / s0) * clean)


def test_horizon_and_sampling_sigmas_stay_below_the_start():
    from kontext_train.method.flow import on_horizon, sample_training_sigmas, sampling_sigmas

    drawn = sample_training_sigmas(2048, "shifted_uniform", 0.5, torch.Generator().manual_seed(0))
    moved = on_horizon("shortened", drawn, 0.5)
    assert moved.max() <= SHORTENED_START_SIGMA and moved.min() > 0
    assert torch.equal(on_horizon("kontext", drawn, 0.5), drawn)
    sig = sampling_sigmas(8, 0.5, SHORTENED_START_SIGMA)
    assert (
        sig[0].item() == pytest.approx(SHORTENED_START_SIGMA)
        and sig[-1] == 0
        and bool((sig[:-1] > sig[1:]).all())
    )
