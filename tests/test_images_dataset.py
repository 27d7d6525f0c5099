import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from _bad_images import noise_image, write_corpus, write_exif_rotated_jpeg, write_good
from PIL import Image

from kontext_train.buckets import bucket_resolutions
from kontext_train.dataset import build_dataset, resolve_dataset_path
from kontext_train.degradations import DegradationConfig, degradation_seed, degrade
from kontext_train.images import (
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


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        build_dataset(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a folder"):
        build_dataset(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match=r"empty.*no image files"):
        build_dataset(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"nope")
    noise_image(8, 8).save(bad / "b.png")
    with pytest.raises(ValueError, match=r"no usable image.*not an image: 1.*too small: 1"):
        build_dataset(bad)


def _folder(root: Path, n: int) -> Path:
    for i in range(n):
        write_good(root / f"img{i:02d}.png", 96 if i % 2 else 64, 64, seed=i)
    return root


def test_split_is_deterministic_and_disjoint(tmp_path):
    root = _folder(tmp_path / "hq", 12)
    a = build_dataset(root, val_fraction=0.25, seed=1, bucket_scale=SCALE)
    b = build_dataset(root, val_fraction=0.25, seed=1, bucket_scale=SCALE)
    keys = lambda ds: ([s.key for s in ds.train], [s.key for s in ds.val])  # noqa: E731
    assert keys(a) == keys(b)
    assert len(a.val) == 3 and len(a.train) == 9
    assert not {s.key for s in a.train} & {s.key for s in a.val}
    others = {
        tuple(keys(build_dataset(root, val_fraction=0.25, seed=s, bucket_scale=SCALE))[1]) for s in range(5)
    }
    assert len(others) > 1  # the seed matters
    assert len(build_dataset(root, val_count=5, bucket_scale=SCALE).val) == 5
    assert len(build_dataset(root, val_count=50, bucket_scale=SCALE).train) == 1
    assert len(build_dataset(root, val_fraction=0.0, bucket_scale=SCALE).val) == 0


def test_single_image_has_no_val(tmp_path):
    root = _folder(tmp_path / "one", 1)
    ds = build_dataset(root, val_count=1, bucket_scale=SCALE)
    assert len(ds.train) == 1 and ds.val == []


def test_buckets_assigned_at_scale(tmp_path):
    ds = build_dataset(_folder(tmp_path / "hq", 4), val_count=0, bucket_scale=SCALE)
    allowed = set(bucket_resolutions(SCALE))
    assert all(s.bucket in allowed for s in ds.train)
    assert sum(ds.bucket_histogram().values()) == 4


def test_paired_lq_matched_by_relative_path(tmp_path):
    hq, lq = tmp_path / "hq", tmp_path / "lq"
    write_good(hq / "a.png", 96, 64, seed=1)
    write_good(hq / "sub" / "b.png", 64, 96, seed=2)
    write_good(hq / "c.png", 96, 64, seed=3)
    write_good(lq / "a.jpg", 48, 32, seed=4)  # other extension, lower resolution
    write_good(lq / "sub" / "b.png", 64, 96, seed=5)
    write_good(lq / "b.png", 64, 96, seed=6)  # same name, other folder: not a match for c
    ds = build_dataset(hq, lq, val_count=0, bucket_scale=SCALE)
    pairs = {s.key: s.lq_path.relative_to(lq).as_posix() for s in ds.train}
    assert pairs == {"a.png": "a.jpg", "sub/b.png": "sub/b.png"}
    assert [(Path(p).name, r) for p, r in ds.skipped] == [("c.png", "no degraded counterpart")]
    sample = next(s for s in ds.train if s.key == "a.png")
    clean, degraded = ds.load_pair(sample, epoch=0, seed=0)
    w, h = sample.bucket
    assert clean.shape == degraded.shape == (3, h, w)
    assert not torch.allclose(clean, degraded)
    assert "paired LQ" in ds.summary()


def test_load_pair_synthetic_fixed_ignores_epoch(tmp_path):
    ds = build_dataset(_folder(tmp_path / "hq", 2), val_count=0, bucket_scale=SCALE)
    s = ds.train[0]
    clean, d0 = ds.load_pair(s, epoch=0, seed=3)
    _, d5 = ds.load_pair(s, epoch=5, seed=3)
    assert torch.equal(d0, d5)
    assert torch.equal(d0, degrade(clean, ds.degradation, degradation_seed(3, s.key, 0)))
    assert clean.shape == (3, s.bucket[1], s.bucket[0])


def test_load_pair_random_changes_with_epoch(tmp_path):
    cfg = DegradationConfig(kind="realesrgan")
    ds = build_dataset(_folder(tmp_path / "hq", 2), val_count=0, bucket_scale=SCALE, degradation=cfg)
    s = ds.train[0]
    _, d0 = ds.load_pair(s, epoch=0, seed=3)
    _, d0b = ds.load_pair(s, epoch=0, seed=3)
    _, d1 = ds.load_pair(s, epoch=1, seed=3)
    assert torch.equal(d0, d0b) and not torch.equal(d0, d1)


def test_resolve_dataset_path(tmp_path):
    assert resolve_dataset_path("train/hq", str(tmp_path)) == tmp_path / "train" / "hq"
    assert resolve_dataset_path(str(tmp_path / "abs"), "/elsewhere") == tmp_path / "abs"
    assert resolve_dataset_path(f'  "{tmp_path}"  ', None) == tmp_path
    assert resolve_dataset_path("~/data", None) == Path.home() / "data"
    assert resolve_dataset_path("rel", None) == Path.cwd() / "rel"
    with pytest.raises(ValueError):
        resolve_dataset_path("  ", None)


def test_exif_rotated_sample_gets_portrait_bucket(tmp_path):
    write_exif_rotated_jpeg(tmp_path / "r.jpg")
    ds = build_dataset(tmp_path, bucket_scale=1.0)
    assert ds.train[0].bucket[0] < ds.train[0].bucket[1]


def test_folder_signature_follows_contents(tmp_path):
    from PIL import Image

    from kontext_train.images import folder_signature

    Image.new("RGB", (80, 80), "red").save(tmp_path / "a.png")
    first = folder_signature(tmp_path)
    assert folder_signature(tmp_path) == first
    Image.new("RGB", (80, 80), "blue").save(tmp_path / "b.png")
    assert folder_signature(tmp_path) != first
    (tmp_path / "notes.txt").write_text("not an image")
    second = folder_signature(tmp_path)
    (tmp_path / "b.png").unlink()
    assert folder_signature(tmp_path) not in (second,)
