"""Restoration Metrics and Loss Plot nodes, through the pack as ComfyUI loaded it."""

from __future__ import annotations

import math

import pytest
import torch

from kontext_train.report.metrics import evaluate_restoration


def _node(pack_nodes, name):
    """The V3 node class ComfyUI registered; its ``execute`` is what ComfyUI calls."""
    return pack_nodes.NODE_CLASS_MAPPINGS[name]


def _images(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, h, w, 3, generator=g)


def _bchw(images):
    return images.permute(0, 3, 1, 2)


def test_metrics_node_reports_the_library_numbers(pack_nodes):
    reference = _images(2, 32, 40, 0)
    restored = (reference + 0.05 * _images(2, 32, 40, 1)).clamp(0, 1)
    degraded = (reference + 0.3 * _images(2, 32, 40, 2)).clamp(0, 1)
    out = _node(pack_nodes, "KontextRestoreMetrics").execute(restored, reference, degraded)
    table, psnr, ssim, psnr_y, ssim_y = out.result
    expected = evaluate_restoration(_bchw(restored), _bchw(degraded), _bchw(reference), with_lpips=True)
    means = expected.means()
    assert psnr == pytest.approx(means["psnr_restored"])
    assert ssim == pytest.approx(means["ssim_restored"])
    assert psnr_y == pytest.approx(means["psnr_y_restored"])
    assert ssim_y == pytest.approx(means["ssim_y_restored"])
    # The library's table, each line but the last ending in a Markdown hard break.
    lines = table.split("\n")
    assert [line.removesuffix("  ") for line in lines] == expected.table().split("\n")
    assert all(line.endswith("  ") for line in lines[:-1]) and not lines[-1].endswith(" ")
    assert list(out.ui.as_dict()["text"]) == [table]
    assert "baseline" in table and psnr > means["psnr_degraded"]
    assert all(isinstance(v, float) for v in (psnr, ssim, psnr_y, ssim_y))


def test_metrics_node_without_degraded(pack_nodes):
    reference = _images(1, 24, 24, 3)
    table, psnr, *_ = _node(pack_nodes, "KontextRestoreMetrics").execute(reference.clone(), reference).result
    assert math.isinf(psnr) and psnr > 0  # identical images: PSNR is +inf, reported as such
    assert "baseline" not in table and "inf" in table


def test_metrics_node_rejects_mismatched_inputs(pack_nodes):
    node = _node(pack_nodes, "KontextRestoreMetrics")
    reference = _images(2, 32, 32, 0)
    with pytest.raises(ValueError, match="resize the reference"):
        node.execute(_images(2, 32, 40, 1), reference)
    with pytest.raises(ValueError, match="same number of images"):
        node.execute(_images(1, 32, 32, 1), reference)
    with pytest.raises(ValueError, match="degraded"):
        node.execute(_images(2, 32, 32, 1), reference, _images(3, 32, 32, 2))


def test_loss_plot_node_returns_an_image(pack_nodes):
    loss = {
        "loss": [1.0 / (i + 1) + 0.01 * (i % 3) for i in range(50)],
        "validation": [
            {"step": 25, "psnr_restored": 24.0, "psnr_degraded": 22.0},
            {"step": 50, "psnr_restored": 26.0, "psnr_degraded": 22.0},
        ],
        "lora": "kontext_restore.safetensors",
    }
    node = _node(pack_nodes, "KontextRestoreLossPlot")
    (image,) = node.execute(loss, 0.9, False).result
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert image.dtype == torch.float32 and 0.0 <= image.min() and image.max() <= 1.0
    assert image.std() > 0  # something was drawn
    (log_image,) = node.execute(loss, 0.5, True).result
    assert log_image.shape == image.shape and not torch.equal(log_image, image)
    (empty,) = node.execute({"loss": [], "validation": [], "lora": "x"}).result
    assert empty.shape == image.shape


def test_loss_plot_node_rejects_other_inputs(pack_nodes):
    with pytest.raises(ValueError, match="trainer's loss output"):
        _node(pack_nodes, "KontextRestoreLossPlot").execute([0.1, 0.2])


def test_shown_text_breaks_every_line_for_markdown_previews(pack_nodes):
    """Text our nodes show keeps its lines in a Markdown preview: each non-empty line followed by
    another ends in two spaces (a hard break); blank lines still separate paragraphs."""
    import sys

    shown_text = sys.modules[_node(pack_nodes, "KontextRestoreMetrics").__module__].shown_text
    assert shown_text("a\nb\n\nc") == "a  \nb  \n\nc"
    assert shown_text("a \nb\n") == "a  \nb  \n"
    assert shown_text("one line") == "one line"
    assert shown_text("") == ""
