import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from kontext_train.data.degradations import (
    DegradationConfig,
    add_gaussian_noise,
    degradation_seed,
    degrade,
    describe,
    gaussian_blur,
    gaussian_kernel1d,
    jpeg_roundtrip,
    resize_down_up,
)
from kontext_train.data.images import pil_to_tensor


def _test_image(h: int = 96, w: int = 128) -> torch.Tensor:
    """Edges, a gradient and noise: something every degradation visibly changes."""
    rng = np.random.default_rng(0)
    yy, xx = np.indices((h, w))
    arr = np.stack(
        [((xx // 8 + yy // 8) % 2) * 200 + 20, (yy * 255 // h), rng.integers(0, 256, (h, w))], -1
    ).astype(np.uint8)
    return pil_to_tensor(Image.fromarray(arr))


def _high_freq_energy(img: torch.Tensor) -> float:
    spec = torch.fft.fftshift(torch.fft.fft2(img - img.mean()), dim=(-2, -1)).abs() ** 2
    h, w = img.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    high = (yy.abs() > h // 4) | (xx.abs() > w // 4)
    return spec[..., high].sum().item()


# -- noise ---------------------------------------------------------------------------------------


def test_noise_std_matches_sigma_on_mid_grey():
    img = torch.full((3, 128, 128), 0.5)
    g = torch.Generator().manual_seed(0)
    out = add_gaussian_noise(img, 0.05, g)
    diff = out - img
    assert diff.std().item() == pytest.approx(0.05, rel=0.03)
    assert abs(diff.mean().item()) < 0.002


def test_noise_is_clamped_and_seeded():
    img = torch.full((1, 3, 32, 32), 0.5)
    a = add_gaussian_noise(img, 1.0, torch.Generator().manual_seed(1))
    b = add_gaussian_noise(img, 1.0, torch.Generator().manual_seed(1))
    c = add_gaussian_noise(img, 1.0, torch.Generator().manual_seed(2))
    assert a.min() >= 0 and a.max() <= 1 and a.shape == img.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(add_gaussian_noise(img, 0.0, torch.Generator()), img)


# -- blur ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.5, 3.0])
def test_blur_kernel_is_a_normalised_gaussian(sigma):
    k = gaussian_kernel1d(sigma).double()
    assert k.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(k, k.flip(0))
    x = torch.arange(k.numel(), dtype=torch.float64) - k.numel() // 2
    assert torch.allclose(k, torch.exp(-0.5 * (x / sigma) ** 2) / torch.exp(-0.5 * (x / sigma) ** 2).sum())
    if sigma >= 1.0:  # below one pixel a sampled Gaussian is narrower than its sigma
        assert (k * x**2).sum().sqrt().item() == pytest.approx(sigma, rel=0.01)


@pytest.mark.parametrize("radius", [1.0, 1.5, 3.0])
def test_blur_matches_pillow_gaussian_blur(radius):
    img = _test_image()
    ours = gaussian_blur(img, radius)
    pillow = pil_to_tensor(
        Image.fromarray((img * 255).round().byte().permute(1, 2, 0).numpy()).filter(
            ImageFilter.GaussianBlur(radius)
        )
    )
    # Pillow approximates the Gaussian with three box filters (visibly so below radius ~1) and
    # replicates borders (we reflect), so compare away from the border: within a few 8-bit
    # steps, under one step on average.
    m = 14
    diff = (ours - pillow)[:, m:-m, m:-m].abs() * 255
    assert diff.mean().item() < 1.0
    assert diff.max().item() < 6.0


def test_blur_identity_constant_and_batch():
    img = _test_image(40, 48)
    assert torch.equal(gaussian_blur(img, 0), img)
    flat = torch.full((2, 3, 16, 20), 0.3)
    assert torch.allclose(gaussian_blur(flat, 2.0), flat, atol=1e-6)
    tiny = torch.rand(3, 4, 4)  # too small to reflect-pad: replicate fallback
    assert gaussian_blur(tiny, 3.0).shape == tiny.shape


# -- JPEG ----------------------------------------------------------------------------------------


def test_jpeg_roundtrip_is_a_real_jpeg():
    img = _test_image()
    out = jpeg_roundtrip(img, 85)
    assert out.shape == img.shape and out.dtype == img.dtype
    err = (out - img).abs().mean().item()
    assert err > 1 / 255  # pixels really change
    # Same as saving and reading a file with Pillow.
    buf = io.BytesIO()
    Image.fromarray((img * 255).round().byte().permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=85)
    ref = pil_to_tensor(Image.open(io.BytesIO(buf.getvalue())))
    assert torch.equal(out, ref)
    # Lower quality, larger error; batches work.
    assert (jpeg_roundtrip(img, 20) - img).abs().mean().item() > err
    assert jpeg_roundtrip(img.unsqueeze(0).repeat(2, 1, 1, 1), 50).shape == (2, 3, 96, 128)
    with pytest.raises(ValueError):
        jpeg_roundtrip(img, 0)


# -- down/up -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "area", "nearest"])
def test_down_up_removes_high_frequencies(mode):
    img = _test_image()
    out = resize_down_up(img, 4.0, mode)
    assert out.shape == img.shape
    assert 0 <= out.min() and out.max() <= 1
    # Smooth modes remove the top band; area/nearest upsample blockily, which keeps some
    # (aliased) energy there, but the content above the new Nyquist limit is still gone.
    limit = {"bilinear": 0.25, "bicubic": 0.25, "area": 0.5, "nearest": 0.7}[mode]
    assert _high_freq_energy(out) < limit * _high_freq_energy(img)
    assert abs(out.mean().item() - img.mean().item()) < 0.03


def test_down_up_identity_and_errors():
    img = _test_image(32, 32)
    assert torch.equal(resize_down_up(img, 1.0), img)
    with pytest.raises(ValueError):
        resize_down_up(img, 0.5)
    with pytest.raises(ValueError):
        resize_down_up(img, 2.0, "lanczos")


# -- config --------------------------------------------------------------------------------------


def test_config_defaults_and_json_roundtrip():
    cfg = DegradationConfig()
    assert (cfg.kind, cfg.noise_sigma, cfg.blur_radius, cfg.jpeg_quality, cfg.downscale) == (
        "fixed",
        0.02,
        1.5,
        85,
        1.0,
    )
    assert not cfg.is_random and DegradationConfig(kind="realesrgan").is_random
    for c in (cfg, DegradationConfig(kind="realesrgan", resize_range=(1.5, 3.0))):
        text = json.dumps(c.to_dict(), sort_keys=True)
        back = DegradationConfig.from_dict(json.loads(text))
        assert back == c and json.dumps(back.to_dict(), sort_keys=True) == text


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "bsrgan"},
        {"noise_sigma": -0.1},
        {"downscale": 0.5},
        {"jpeg_quality": 101},
        {"resize_range": (3.0, 2.0)},
        {"shuffle_prob": 1.5},
        {"resize_modes": ("lanczos",)},
    ],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        DegradationConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="sinc"):
        DegradationConfig.from_dict({"kind": "fixed", "sinc": 1})


def test_degradation_seed_is_stable_and_distinct():
    # A fixed value: the seed must not depend on the process (unlike hash()).
    assert degradation_seed(7, "a/b.png", 3) == 7400475108741892015
    seeds = {degradation_seed(s, k, e) for s in (0, 1) for k in ("a.png", "b.png") for e in (0, 1)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)


# -- pipelines -----------------------------------------------------------------------------------


def test_fixed_pipeline_is_blur_noise_jpeg():
    img = _test_image(64, 64)
    cfg = DegradationConfig()
    out = degrade(img, cfg, seed=5)
    g = torch.Generator().manual_seed(5)
    expected = jpeg_roundtrip(add_gaussian_noise(gaussian_blur(img, 1.5), 0.02, g), 85)
    assert torch.equal(out, expected)
    assert torch.equal(degrade(img, cfg, 5), out)
    assert not torch.equal(degrade(img, cfg, 6), out)


def test_fixed_downscale_is_applied_only_when_asked():
    img = _test_image(64, 64)
    plain = DegradationConfig(noise_sigma=0, jpeg_quality=0)
    assert torch.equal(degrade(img, plain, 0), gaussian_blur(img, 1.5))
    scaled = DegradationConfig(noise_sigma=0, jpeg_quality=0, downscale=2.0)
    assert torch.equal(degrade(img, scaled, 0), resize_down_up(gaussian_blur(img, 1.5), 2.0, "bicubic"))


def test_realesrgan_is_deterministic_per_seed_and_varies():
    img = _test_image(64, 64)
    cfg = DegradationConfig(kind="realesrgan", shuffle_prob=0.5, second_order_prob=0.5)
    a = degrade(img, cfg, seed=11)
    assert torch.equal(a, degrade(img, cfg, seed=11))
    outs = [degrade(img, cfg, degradation_seed(0, "x.png", epoch)) for epoch in range(6)]
    errors = {round((o - img).abs().mean().item(), 5) for o in outs}
    assert len(errors) == 6  # every epoch a different degradation
    assert all(o.shape == img.shape and o.min() >= 0 and o.max() <= 1 for o in outs)


def test_describe_mentions_the_settings():
    assert "JPEG q85" in describe(DegradationConfig())
    assert "x3" in describe(DegradationConfig(downscale=3.0))
    text = describe(DegradationConfig(kind="realesrgan"))
    assert text.startswith("realesrgan") and "second pass" in text
