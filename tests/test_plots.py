import math

import numpy as np
import pytest
from PIL import Image

from kontext_train.report.plots import (
    BASELINE_COLOR,
    RAW_COLOR,
    RESTORED_COLOR,
    SMOOTH_COLOR,
    ema,
    image_grid,
    render_loss_plot,
)
from kontext_train.report.sample_grid import SAMPLE_COLUMNS, sample_rows

# The legend sits on the title line; curves are drawn below this many pixels.
_BELOW_LEGEND = 40


def _mask(img: Image.Image, color: tuple[int, int, int]) -> np.ndarray:
    arr = np.asarray(img.convert("RGB"))
    return np.all(arr == np.array(color, dtype=arr.dtype), axis=-1)


def _decaying(n: int = 300) -> list[float]:
    rng = np.random.default_rng(0)
    return [float(0.5 * math.exp(-i / 80) + 0.05 + 0.03 * rng.random()) for i in range(n)]


# ---------------------------------------------------------------- ema


def test_ema_bias_corrected_values():
    assert ema([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 1.25 / 0.75, 2.125 / 0.875])
    # Bias correction: a constant series stays constant from the first point on.
    assert ema([4.0] * 5, 0.9) == pytest.approx([4.0] * 5)
    assert ema([1.0, 5.0, 2.0], 0.0) == pytest.approx([1.0, 5.0, 2.0])
    assert ema([], 0.9) == []


def test_ema_skips_non_finite():
    out = ema([1.0, float("nan"), 3.0, float("inf")], 0.5)
    assert out[0] == pytest.approx(1.0)
    assert math.isnan(out[1]) and math.isnan(out[3])
    assert out[2] == pytest.approx((0.25 + 1.5) / 0.75)  # as if the NaN were not there


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_ema_rejects_bad_smoothing(bad):
    with pytest.raises(ValueError):
        ema([1.0], bad)


# ---------------------------------------------------------------- render_loss_plot


@pytest.mark.parametrize("size", [(768, 432), (500, 300)])
def test_render_size(size):
    img = render_loss_plot(_decaying(), width=size[0], height=size[1])
    assert isinstance(img, Image.Image)
    assert img.size == size and img.mode == "RGB"
    assert render_loss_plot(_decaying(), validation=[], width=size[0], height=size[1]).size == size


def test_smoothed_and_raw_curves_drawn():
    img = render_loss_plot(_decaying(), width=600, height=400)
    strong = _mask(img, SMOOTH_COLOR)[_BELOW_LEGEND:]
    assert strong.sum() > 500
    assert _mask(img, RAW_COLOR)[_BELOW_LEGEND:].sum() > 100
    # The curve spans most of the width and, for a decaying loss, falls from left to right.
    cols = np.nonzero(strong.any(axis=0))[0]
    assert cols.max() - cols.min() > 0.7 * 600
    left_rows = np.nonzero(strong[:, cols.min() : cols.min() + 20].any(axis=1))[0]
    right_rows = np.nonzero(strong[:, cols.max() - 20 : cols.max() + 1].any(axis=1))[0]
    assert left_rows.mean() < right_rows.mean()


def test_log_scale_renders_and_ignores_non_positive():
    losses = _decaying() + [0.0, -1.0]
    img = render_loss_plot(losses, log_y=True)
    assert _mask(img, SMOOTH_COLOR)[_BELOW_LEGEND:].sum() > 500


@pytest.mark.parametrize(
    "losses",
    [[], [float("nan")] * 5, [float("inf"), float("-inf")]],
)
def test_no_usable_data_draws_placeholder(losses):
    img = render_loss_plot(losses)
    assert img.size == (768, 432)
    assert not _mask(img, SMOOTH_COLOR).any()  # no curve, no legend: just "no data yet"


def test_nan_and_inf_mixed_in_are_skipped():
    losses = _decaying()
    losses[10] = float("nan")
    losses[50] = float("inf")
    img = render_loss_plot(losses)
    assert _mask(img, SMOOTH_COLOR)[_BELOW_LEGEND:].sum() > 500


def test_single_point():
    img = render_loss_plot([0.3])
    assert _mask(img, SMOOTH_COLOR)[_BELOW_LEGEND:].any()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("log_y", [False, True])
def test_single_step_whose_ema_differs_in_the_last_bit(log_y):
    """A one-step run's loss and its bias-corrected EMA can differ by one ulp; the axis once took
    that 2e-16 span for a real range and looped forever adding ticks too small to move a float
    (a 13 GB server on ComfyUI 0.33 before this was found)."""
    loss = 1.484965205192566
    assert ema([loss])[0] != loss  # the case itself: otherwise this test checks nothing
    img = render_loss_plot([loss], log_y=log_y)
    assert img.size == (768, 432) and _mask(img, SMOOTH_COLOR)[_BELOW_LEGEND:].any()


def test_explicit_steps_length_checked():
    with pytest.raises(ValueError, match="one step per loss"):
        render_loss_plot([0.1, 0.2], steps=[1])
    assert render_loss_plot([0.1, 0.2], steps=[100, 200]).size == (768, 432)


def test_validation_panel_drawn_below_loss():
    rows = [
        {"step": s, "psnr_restored": 20 + s / 100, "psnr_degraded": 18.0, "ssim_restored": 0.8}
        for s in range(0, 301, 50)
    ]
    rows.append({"step": 350, "psnr_restored": "inf", "psnr_degraded": 18.0})  # from to_dict(): skipped
    rows.append({"step": 400})  # missing metrics: skipped
    height = 432
    with_val = render_loss_plot(_decaying(), validation=rows, height=height)
    restored = _mask(with_val, RESTORED_COLOR)
    baseline = _mask(with_val, BASELINE_COLOR)
    assert restored.sum() > 100 and baseline.sum() > 100
    # The panel is the lower part of the image.
    assert np.nonzero(restored.any(axis=1))[0].min() > height // 2
    without = render_loss_plot(_decaying(), height=height)
    assert not _mask(without, RESTORED_COLOR).any()


def test_validation_rows_without_metric_do_not_crash():
    img = render_loss_plot(_decaying(), validation=[{"step": 10, "loss": 0.1}])
    assert img.size == (768, 432)
    assert not _mask(img, RESTORED_COLOR).any()


def _panel_slope(img: Image.Image, top: int) -> tuple[float, float]:
    """Mean row of the restored curve at its left and right ends, below ``top``."""
    lower = _mask(img, RESTORED_COLOR)[top:]
    assert lower.sum() > 100
    cols = np.nonzero(lower.any(axis=0))[0]
    left = np.nonzero(lower[:, cols.min() : cols.min() + 8].any(axis=1))[0].mean()
    right = np.nonzero(lower[:, cols.max() - 8 : cols.max() + 1].any(axis=1))[0].mean()
    return left, right


def test_latent_mse_panel_draws_the_held_out_latent_error():
    """The demo plots held-out latent MSE (what its training lowers) instead of the PSNR its random
    VAE caps: the panel follows the latent MSE values."""
    rows = [
        {
            "step": s,
            "latent_mse_restored": 0.004 - s * 1e-5,
            "latent_mse_degraded": 0.0001,
            "psnr_restored": 19.0,
        }
        for s in (50, 100, 150, 200, 250, 300)
    ]
    height = 432
    panel_curves = int(height * 0.58) + _BELOW_LEGEND  # the panel's plot area, below its legend
    mse = render_loss_plot(_decaying(), validation=rows, validation_metric="latent_mse", height=height)
    left, right = _panel_slope(mse, panel_curves)
    assert left < right - 20  # 0.004 at the top left, 0.001 far lower on the right
    # The same rows as PSNR: a flat line at 19 dB, the picture the demo's loss plot used to show.
    psnr = render_loss_plot(_decaying(), validation=rows, validation_metric="psnr", height=height)
    left, right = _panel_slope(psnr, panel_curves)
    assert abs(left - right) <= 2


# ---------------------------------------------------------------- image_grid


def test_sample_grid_has_a_vae_round_trip_column():
    degraded, restored, clean = (
        Image.new("RGB", (40, 40), c) for c in ((200, 0, 0), (0, 200, 0), (0, 0, 200))
    )
    roundtrip = Image.new("RGB", (40, 40), (90, 90, 0))
    rows = sample_rows([(degraded, restored, clean), (degraded, restored, clean)], [roundtrip])
    assert SAMPLE_COLUMNS == ("degraded", "restored", "VAE round trip", "clean")
    grid = image_grid(rows, list(SAMPLE_COLUMNS), cell=40, gap=4)
    assert grid.width == 4 * 40 + 3 * 4  # columns x cell width (+ gaps)
    bottom = grid.height - 1 - 40 - 4  # inside the first row, below the label band
    assert grid.getpixel((2 * 44 + 20, bottom - 20)) == (90, 90, 0)  # the round trip, third column
    assert grid.getpixel((3 * 44 + 20, bottom - 20)) == (0, 0, 200)  # clean moved to the fourth
    assert grid.getpixel((2 * 44 + 20, grid.height - 20)) == (255, 255, 255)  # no round trip: blank


def test_grid_size_and_content():
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    tall = Image.new("RGBA", (30, 90), (0, 0, 255, 255))
    grid = image_grid([[red, tall, red], [tall, red, tall]], cell=64, gap=4)
    assert grid.size == (3 * 64 + 2 * 4, 2 * 64 + 4)
    assert grid.getpixel((32, 32)) == (255, 0, 0)
    assert grid.getpixel((64 + 4 + 32, 32)) == (0, 0, 255)  # tall image centred in its cell


def test_grid_labels_add_a_band_and_ragged_rows():
    img = Image.new("RGB", (100, 50), (0, 128, 0))
    plain = image_grid([[img, img], [img]], cell=80)
    labelled = image_grid(
        [[img, img], [img]], labels=["degraded", "restored by the LoRA at step 1000"], cell=80
    )
    assert labelled.width == plain.width == 2 * 80 + 4
    assert labelled.height > plain.height == 2 * 80 + 4


def test_grid_rejects_bad_input():
    img = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError):
        image_grid([])
    with pytest.raises(ValueError, match="labels"):
        image_grid([[img]], labels=["a", "b"])
