import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kontext_train.report.lpips_offline import LPIPSUnavailable
from kontext_train.report.metrics import (
    RestorationScores,
    evaluate_restoration,
    lpips_distance,
    psnr,
    rgb_to_y,
    ssim,
)

skimage_metrics = pytest.importorskip("skimage.metrics")


def _sk_ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """scikit-image reference for one (C, H, W) image, with the settings the brief fixes."""
    a_np, b_np = a.double().numpy(), b.double().numpy()
    kwargs = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)
    if a_np.shape[0] == 1:
        return float(skimage_metrics.structural_similarity(a_np[0], b_np[0], **kwargs))
    return float(skimage_metrics.structural_similarity(a_np, b_np, channel_axis=0, **kwargs))


def _blur(x: torch.Tensor, radius: int = 3) -> torch.Tensor:
    k = torch.ones(x.shape[1], 1, 2 * radius + 1, 2 * radius + 1) / (2 * radius + 1) ** 2
    return F.conv2d(F.pad(x, (radius,) * 4, mode="replicate"), k, groups=x.shape[1])


@pytest.fixture
def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(3, 3, 37, 53, generator=g)
    noisy = (ref + 0.08 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    return ref, noisy


# ---------------------------------------------------------------- PSNR


def test_psnr_matches_formula_on_known_mse():
    a = torch.full((2, 3, 16, 16), 0.2)
    b = a + 0.1  # MSE = 0.01 everywhere -> 10 * log10(1 / 0.01) = 20 dB
    out = psnr(a, b)
    assert out.shape == (2,)
    assert torch.allclose(out, torch.full((2,), 20.0), atol=1e-4)
    assert psnr(a, b, data_range=2.0)[0].item() == pytest.approx(20 + 20 * math.log10(2), abs=1e-4)


def test_psnr_per_image_and_matches_skimage(images):
    ref, noisy = images
    out = psnr(noisy, ref)
    for i in range(ref.shape[0]):
        expected = skimage_metrics.peak_signal_noise_ratio(ref[i].numpy(), noisy[i].numpy(), data_range=1)
        assert out[i].item() == pytest.approx(expected, abs=1e-3)


def test_psnr_identical_images_is_inf():
    a = torch.rand(2, 3, 8, 8)
    assert torch.isinf(psnr(a, a.clone())).all()
    assert torch.isinf(psnr(a, a.clone(), channel="y")).all()


def test_psnr_accepts_single_chw_image():
    a = torch.zeros(3, 8, 8)
    assert psnr(a, a + 0.1).shape == (1,)


# ---------------------------------------------------------------- SSIM


def test_ssim_identical_is_one(images):
    ref, _ = images
    assert torch.allclose(ssim(ref, ref.clone()), torch.ones(ref.shape[0]), atol=1e-5)
    assert torch.allclose(ssim(ref, ref.clone(), channel="y"), torch.ones(ref.shape[0]), atol=1e-5)


@pytest.mark.parametrize("kind", ["noise", "blur"])
def test_ssim_agrees_with_skimage_rgb(images, kind):
    ref, noisy = images
    other = noisy if kind == "noise" else _blur(ref)
    out = ssim(other, ref)
    assert out.shape == (ref.shape[0],)
    for i in range(ref.shape[0]):
        assert out[i].item() == pytest.approx(_sk_ssim(other[i], ref[i]), abs=1e-3)


@pytest.mark.parametrize("kind", ["noise", "blur"])
def test_ssim_agrees_with_skimage_y(images, kind):
    ref, noisy = images
    other = noisy if kind == "noise" else _blur(ref)
    out = ssim(other, ref, channel="y")
    y_other, y_ref = rgb_to_y(other), rgb_to_y(ref)
    for i in range(ref.shape[0]):
        assert out[i].item() == pytest.approx(_sk_ssim(y_other[i], y_ref[i]), abs=1e-3)


def test_ssim_rejects_images_smaller_than_window():
    a = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a, a)


def test_bad_channel_name():
    a = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="channel"):
        psnr(a, a, channel="lab")


# ---------------------------------------------------------------- Y conversion


def test_rgb_to_y_known_values():
    white = torch.ones(1, 3, 2, 2)
    black = torch.zeros(1, 3, 2, 2)
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1
    assert rgb_to_y(white).shape == (1, 1, 2, 2)
    assert torch.allclose(rgb_to_y(white), torch.full((1, 1, 2, 2), 235 / 255), atol=1e-6)
    assert torch.allclose(rgb_to_y(black), torch.full((1, 1, 2, 2), 16 / 255), atol=1e-6)
    assert torch.allclose(rgb_to_y(red), torch.full((1, 1, 2, 2), (16 + 65.481) / 255), atol=1e-6)


def test_rgb_to_y_grey_single_channel_matches_rgb():
    grey = torch.rand(2, 1, 4, 4)
    assert torch.allclose(rgb_to_y(grey), rgb_to_y(grey.expand(-1, 3, -1, -1)), atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        rgb_to_y(torch.rand(1, 4, 4, 4))


# ---------------------------------------------------------------- evaluate_restoration


def test_shape_mismatch_in_low_level_metrics():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 17))


def test_batch_mismatch_message():
    ref = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError) as exc:
        evaluate_restoration(ref[:1], None, ref)
    msg = str(exc.value)
    assert "(1, 3, 16, 16)" in msg and "(2, 3, 16, 16)" in msg
    assert "pass the same number of images" in msg


def test_size_mismatch_message():
    ref = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError) as exc:
        evaluate_restoration(torch.rand(1, 3, 24, 32), None, ref)
    msg = str(exc.value)
    assert "(1, 3, 24, 32)" in msg and "(1, 3, 32, 32)" in msg
    assert "resize the reference to the restored size" in msg


def test_degraded_mismatch_is_named():
    ref = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="degraded"):
        evaluate_restoration(ref, torch.rand(1, 3, 16, 16), ref)


def test_evaluate_with_baseline_table_and_dict(images):
    ref, noisy = images
    worse = (ref + 0.2 * torch.randn_like(ref)).clamp(0, 1)
    scores = evaluate_restoration(noisy, worse, ref)
    assert isinstance(scores, RestorationScores)
    assert len(scores) == 3
    assert scores.psnr_restored == pytest.approx(psnr(noisy, ref).tolist(), abs=1e-4)
    assert scores.ssim_y_restored == pytest.approx(ssim(noisy, ref, channel="y").tolist(), abs=1e-4)
    assert scores.psnr_degraded is not None and scores.lpips_restored is None
    means = scores.means()
    assert means["psnr_restored"] == pytest.approx(float(np.mean(scores.psnr_restored)))
    assert scores.gain("psnr") == pytest.approx(means["psnr_restored"] - means["psnr_degraded"])
    assert scores.gain("psnr") > 0

    table = scores.table()
    lines = table.splitlines()
    assert "baseline" in table and "gain" in table
    # A Markdown table: header, rule, then a row per metric for the mean and for each image.
    assert lines[1].startswith("|:--") and lines[1].endswith(":|")
    assert len({len(line) for line in lines}) == 1  # aligned as plain text too
    assert sum(1 for line in lines if line.startswith("| mean ")) == 5
    assert len(lines) == 2 + 5 * (1 + 3)
    assert f"{scores.psnr_restored[0]:.2f}" in table
    assert f"{means['psnr_restored']:.2f}" in table
    assert f"{means['ssim_degraded']:.4f}" in table
    assert "n/a" in table  # LPIPS was not computed

    d = scores.to_dict()
    json.dumps(d)
    assert d["n_images"] == 3 and len(d["per_image"]) == 3
    assert d["mean"]["psnr_restored"] == pytest.approx(means["psnr_restored"])


def test_evaluate_without_baseline_and_inf_serialisation():
    ref = torch.rand(2, 3, 16, 16)
    scores = evaluate_restoration(ref.clone(), None, ref)
    assert scores.psnr_degraded is None and not scores.has_baseline
    assert scores.gain("psnr") is None
    table = scores.table()
    assert "inf" in table and "baseline" not in table
    d = scores.to_dict()
    assert d["per_image"][0]["psnr_restored"] == "inf"
    assert d["mean"]["psnr_restored"] == "inf"
    json.loads(json.dumps(d))  # strict JSON: no bare Infinity/NaN needed


# ---------------------------------------------------------------- LPIPS


def test_lpips_returns_none_when_weights_absent(tmp_path):
    a = torch.rand(1, 3, 32, 32)
    assert lpips_distance(a, a, str(tmp_path / "missing_alex.pth")) is None
    scores = evaluate_restoration(a, a, a, with_lpips=True, lpips_weights=str(tmp_path / "missing_alex.pth"))
    assert scores.lpips_restored is None and scores.lpips_degraded is None
    assert issubclass(LPIPSUnavailable, RuntimeError)
