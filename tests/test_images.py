"""Loading user images (kontext_train/data/images.py): formats, modes, EXIF, bad files with reasons."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from _bad_images import noise_image, write_corpus, write_good
from PIL import Image

from kontext_train.data.dataset import build_dataset
from kontext_train.data.images import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    comfy_image_to_tensors,
    load_rgb,
    pil_to_tensor,
    scan_image_folder,
    tensor_to_pil,
    tensors_to_comfy_image,
)

SCALE = 0.125  # buckets around 128 px keep the tests fast


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, write_corpus(root)


# -- load_rgb ------------------------------------------------------------------------------------


def test_extensions():
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"} == set(IMAGE_EXTENSIONS)


@pytest.mark.parametrize(
    "name, category",
    [
        ("corrupt.png", "corrupt"),
        ("truncated.jpg", "truncated"),
        ("tiny.png", "too small"),
        ("fake.png", "not an image"),
    ],
)
def test_bad_files_raise_with_reason(corpus, name, category):
    root, _ = corpus
    with pytest.raises(ImageLoadError) as err:
        load_rgb(root / name)
    assert err.value.path == root / name
    assert err.value.reason.startswith(category)
    assert name in str(err.value)
    assert isinstance(err.value, ValueError)


def test_too_small_gives_size_and_minimum(corpus):
    root, _ = corpus
    with pytest.raises(ImageLoadError, match=r"1x1, minimum side 64"):
        load_rgb(root / "tiny.png")
    assert load_rgb(root / "tiny.png", min_size=1).size == (1, 1)


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="missing"):
        load_rgb(tmp_path / "nope.png")


def test_cmyk_becomes_rgb(corpus):
    im = load_rgb(corpus[0] / "cmyk.jpg")
    assert im.mode == "RGB"
    r, g, b = np.asarray(im)[10, 10].astype(int)
    assert r > 240 and g < 15 and b < 15


def test_16bit_is_scaled_not_clipped(corpus):
    arr = np.asarray(load_rgb(corpus[0] / "deep.png")).astype(int)
    assert np.all(np.abs(arr[:, :48] - 128) <= 1)  # 32768/65535 of white, not clipped to 255
    assert np.all(arr[:, 48:] == 255)


def test_alpha_is_composited_on_white(corpus):
    arr = np.asarray(load_rgb(corpus[0] / "alpha.png"))
    assert tuple(arr[5, 5]) == (255, 255, 255)  # transparent red -> white
    assert tuple(arr[5, 80]) == (0, 0, 255)


def test_palette_with_transparency(corpus):
    arr = np.asarray(load_rgb(corpus[0] / "palette.png"))
    assert tuple(arr[5, 5]) == (255, 255, 255)
    assert tuple(arr[5, 80]) == (0, 0, 255)


def test_exif_orientation_is_applied(corpus):
    im = load_rgb(corpus[0] / "rotated.JPG")
    assert im.size == (80, 120)  # stored 120x80, orientation 6 = rotate 90 degrees clockwise
    arr = np.asarray(im).astype(int)
    # The red block stored top-left is displayed top-right.
    assert arr[5, 74, 0] > 200 and arr[5, 74, 1] < 60
    assert arr[5, 5, 0] < 60


def test_greyscale_and_bilevel(tmp_path):
    noise_image(80, 70, mode="L").save(tmp_path / "grey.png")
    Image.new("1", (80, 70), 1).save(tmp_path / "bw.bmp")
    grey = np.asarray(load_rgb(tmp_path / "grey.png"))
    assert grey.shape == (70, 80, 3) and np.array_equal(grey[..., 0], grey[..., 2])
    assert np.all(np.asarray(load_rgb(tmp_path / "bw.bmp")) == 255)


# -- scan and conversions ------------------------------------------------------------------------


def test_scan_by_extension_sorted_hidden_ignored(tmp_path):
    write_good(tmp_path / "b.PNG")
    write_good(tmp_path / "a.jpg")
    write_good(tmp_path / "sub" / "c.webp")
    write_good(tmp_path / ".hidden" / "d.png")
    write_good(tmp_path / ".e.png")
    (tmp_path / "f.txt").write_text("x")
    names = [p.relative_to(tmp_path).as_posix() for p in scan_image_folder(tmp_path)]
    assert names == ["a.jpg", "b.PNG", "sub/c.webp"]
    assert [p.name for p in scan_image_folder(tmp_path, recursive=False)] == ["a.jpg", "b.PNG"]


def test_tensor_conversions_roundtrip():
    im = noise_image(40, 30)
    t = pil_to_tensor(im)
    assert t.shape == (3, 30, 40) and t.dtype == torch.float32 and 0 <= t.min() and t.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_pil(t)), np.asarray(im))
    batch = torch.stack([t, 1 - t])
    comfy = tensors_to_comfy_image(batch)
    assert comfy.shape == (2, 30, 40, 3)
    assert torch.equal(comfy_image_to_tensors(comfy), batch)
    rgba = torch.cat([comfy, torch.ones(2, 30, 40, 1)], -1)
    assert torch.equal(comfy_image_to_tensors(rgba), batch)


# -- build_dataset -------------------------------------------------------------------------------


def test_corpus_is_loaded_or_skipped_with_reasons(corpus, caplog):
    root, expected = corpus
    with caplog.at_level(logging.WARNING):
        ds = build_dataset(root, bucket_scale=SCALE, val_count=0)
    used = {s.key for s in ds.train + ds.val}
    assert used == {n for n, cat in expected.items() if cat is None}
    skipped = {Path(p).name: reason.split(" (")[0] for p, reason in ds.skipped}
    assert skipped == {n: cat for n, cat in expected.items() if cat is not None}
    for name in skipped:
        assert name in caplog.text  # each warning names the file
    rotated = next(s for s in ds.train if s.key == "rotated.JPG")
    assert rotated.size == (80, 120)
    summary = ds.summary()
    assert f"used {len(used)} image(s)" in summary and "truncated: 1" in summary
    assert "buckets" in summary


def test_image_above_the_pixel_limit_is_skipped_before_decoding(tmp_path, monkeypatch):
    from kontext_train.data.images import MAX_IMAGE_PIXELS

    side = int(MAX_IMAGE_PIXELS**0.5) + 100
    Image.new("1", (side, side)).save(tmp_path / "bomb.png")  # a small file, a huge image
    write_good(tmp_path / "good.png")
    assert (tmp_path / "bomb.png").stat().st_size < 2_000_000

    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda im: decoded.append(im.size) or real_load(im))
    with pytest.raises(ImageLoadError, match=rf"too large \({side}x{side} .*64 MP limit.*scale it down"):
        load_rgb(tmp_path / "bomb.png")
    assert (side, side) not in decoded  # refused from the header

    ds = build_dataset(tmp_path, bucket_scale=SCALE, val_count=0)
    assert [s.key for s in ds.train] == ["good.png"]
    assert [(Path(p).name, r.split(" (")[0]) for p, r in ds.skipped] == [("bomb.png", "too large")]
