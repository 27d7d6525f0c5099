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
    check_formulation,
    make_training_example,
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
    [
        ("bridge", 0.0),
        ("bridge", MIN_REFERENCE_BRIDGE_NOISE),
        ("bridge_ref", MIN_REFERENCE_BRIDGE_NOISE),
        ("bridge_ref", 0.3),
        ("kontext", 0.0),
    ],
)
def test_every_allowed_formulation_keeps_the_cheat_above_its_floor(formulation, bridge_noise):
    check_formulation(formulation, bridge_noise)  # allowed
    for sigma in SIGMAS:
        loss, target_var = best_cheat_loss(formulation, sigma, bridge_noise)
        floor = knows_nothing_floor(formulation, sigma, bridge_noise)
        # The fitted cheat reaches the floor (the formula is right) and no lower (no identity).
        assert loss == pytest.approx(floor, rel=0.03), (sigma, loss, floor)
        # Never below min(s^2, V) at any sigma (s^2 = 0.01 at the least allowed bridge noise; the
        # noise-free formulations' start variance plays the part of s^2 and keeps it near V).
        s2 = bridge_noise**2 if formulation == "bridge_ref" else 1.0
        assert loss > 0.97 * min(s2, 1.0), (sigma, loss)


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


@pytest.mark.parametrize("noise", [0.0, 0.05, MIN_REFERENCE_BRIDGE_NOISE / 2])
def test_leaking_setting_is_refused_with_a_clear_message(noise):
    with pytest.raises(
        ValueError, match=r"bridge_ref.*needs bridge_noise >= .*reference gives the target away"
    ):
        check_formulation("bridge_ref", noise)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1])
def test_bridge_noise_must_be_finite_and_non_negative(bad):
    with pytest.raises(ValueError, match="bridge_noise must be a finite number"):
        check_formulation("bridge", bad)


def test_formulations_and_references_are_consistent():
    assert set(FORMULATIONS) == {"bridge", "bridge_ref", "kontext"}
    assert [uses_reference(f) for f in FORMULATIONS] == [False, True, True]
