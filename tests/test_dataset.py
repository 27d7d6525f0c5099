"""The restoration dataset (kontext_train/data/dataset.py): folders, split, buckets, pairs, degradations."""

import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from _bad_images import noise_image, write_exif_rotated_jpeg, write_good
from PIL import Image

from kontext_train.data.buckets import bucket_resolutions
from kontext_train.data.dataset import build_dataset, held_out_limit, resolve_dataset_path, split_sizes
from kontext_train.data.degradations import DegradationConfig, degradation_seed, degrade

SCALE = 0.125  # buckets around 128 px keep the tests fast


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
    root = _folder(tmp_path / "hq", 20)
    a = build_dataset(root, val_count=3, seed=1, bucket_scale=SCALE)
    b = build_dataset(root, val_count=3, seed=1, bucket_scale=SCALE)
    keys = lambda ds: ([s.key for s in ds.train], [s.key for s in ds.val])  # noqa: E731
    assert keys(a) == keys(b)
    assert len(a.val) == 3 and len(a.train) == 17
    assert not {s.key for s in a.train} & {s.key for s in a.val}
    others = {tuple(keys(build_dataset(root, val_count=3, seed=s, bucket_scale=SCALE))[1]) for s in range(5)}
    assert len(others) > 1  # the seed matters
    assert len(build_dataset(root, val_count=0, bucket_scale=SCALE).val) == 0
    with pytest.raises(ValueError, match="val_count must be a whole number >= 0, got -1"):
        build_dataset(root, val_count=-1, bucket_scale=SCALE)


def test_images_named_held_out_first_are_held_out_whatever_the_seed(tmp_path):
    """The demo's unseen photo: named, it is held out for every seed, counts toward val_count
    (the rest of the count still follows the seed), and val_count 0 holds out nothing."""
    root = _folder(tmp_path / "hq", 20)
    name = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))[7]
    rest = set()
    for seed in range(6):
        ds = build_dataset(root, val_count=2, seed=seed, bucket_scale=SCALE, held_out_first=(name,))
        vals = [s.key for s in ds.val]
        assert name in vals and len(vals) == 2 and name not in {s.key for s in ds.train}
        rest |= set(vals) - {name}
    assert len(rest) > 1  # the other held-out image still depends on the seed
    assert build_dataset(root, val_count=0, bucket_scale=SCALE, held_out_first=(name,)).val == []


def test_a_reduced_split_keeps_the_images_a_larger_one_held_out(tmp_path):
    """Capping the count takes the first of the same ranking, so the held-out images of a small
    count are a subset of a larger one's (evaluation later sees the same images)."""
    root = _folder(tmp_path / "hq", 10)
    capped = build_dataset(root, val_count=7, seed=2, bucket_scale=SCALE)
    assert len(capped.val) == 2  # 20% of 10
    one = build_dataset(root, val_count=1, seed=2, bucket_scale=SCALE)
    assert {s.key for s in one.val} < {s.key for s in capped.val}


def test_six_photos_hold_out_one_and_say_why(tmp_path, caplog):
    # The default val_count (4) once held out 4 of 6 photos and trained on 2, silently.
    with caplog.at_level(logging.WARNING, logger="kontext_train.data.dataset"):
        ds = build_dataset(_folder(tmp_path / "six", 6), bucket_scale=SCALE)
    assert (len(ds.train), len(ds.val)) == (5, 1)
    summary = ds.summary()
    assert "used 6 image(s): 5 train, 1 held out" in summary
    assert "val_count 4 reduced to 1: at most 20% of the 6 usable images are held out" in summary
    assert "5 remain for training" in summary
    # Few photos remain: the summary names the number and says what to do.
    assert "only 5 training image(s)" in summary and "add photos" in summary
    assert "val_count 4 reduced to 1" in caplog.text and "only 5 training image(s)" in caplog.text


def test_a_large_folder_keeps_the_asked_count_without_warnings(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="kontext_train.data.dataset"):
        ds = build_dataset(_folder(tmp_path / "many", 100), val_count=4, bucket_scale=SCALE, min_size=8)
    assert (len(ds.train), len(ds.val)) == (96, 4)
    assert ds.split_warnings == [] and "warning" not in ds.summary() and caplog.text == ""


def test_single_image_has_no_val(tmp_path):
    ds = build_dataset(_folder(tmp_path / "one", 1), val_count=1, bucket_scale=SCALE)
    assert len(ds.train) == 1 and ds.val == []
    assert "val_count 1 reduced to 0: the only usable image is needed for training" in ds.summary()
    default = build_dataset(tmp_path / "one", bucket_scale=SCALE)
    assert (len(default.train), len(default.val)) == (1, 0)


def test_a_user_count_above_the_limit_is_reduced_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="kontext_train.data.dataset"):
        ds = build_dataset(_folder(tmp_path / "twenty", 20), val_count=10, bucket_scale=SCALE)
    assert (len(ds.train), len(ds.val)) == (16, 4)
    expected = "val_count 10 reduced to 4: at most 20% of the 20 usable images are held out"
    assert ds.split_warnings == [expected + " (at least 1), so that 16 remain for training"]
    assert expected in ds.summary() and expected in caplog.text
    assert "training image(s)" not in ds.summary()  # 16 is enough: no few-images warning


def test_the_limit_counts_usable_images_only(tmp_path):
    root = _folder(tmp_path / "hq", 10)
    (root / "broken.png").write_bytes(b"not a png")
    noise_image(8, 8).save(root / "tiny.png")
    ds = build_dataset(root, val_count=4, bucket_scale=SCALE)
    assert len(ds.skipped) == 2 and (len(ds.train), len(ds.val)) == (8, 2)
    assert "of the 10 usable images" in ds.summary()


@pytest.mark.parametrize(
    ("n", "limit"), [(0, 0), (1, 0), (2, 1), (4, 1), (5, 1), (9, 1), (10, 2), (14, 2), (15, 3), (100, 20)]
)
def test_held_out_limit(n, limit):
    assert held_out_limit(n) == limit
    assert split_sizes(n, 1000)[0] == limit and split_sizes(n, 0)[0] == 0


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

    from kontext_train.data.images import folder_signature

    Image.new("RGB", (80, 80), "red").save(tmp_path / "a.png")
    first = folder_signature(tmp_path)
    assert folder_signature(tmp_path) == first
    Image.new("RGB", (80, 80), "blue").save(tmp_path / "b.png")
    assert folder_signature(tmp_path) != first
    (tmp_path / "notes.txt").write_text("not an image")
    second = folder_signature(tmp_path)
    (tmp_path / "b.png").unlink()
    assert folder_signature(tmp_path) not in (second,)


def _write_bytes_name(folder: Path, name: bytes, w: int = 96, h: int = 64, seed: int = 0) -> Path:
    """An image under a raw (bytes) file name, as a camera card or an old archive may have."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = os.path.join(os.fsencode(folder), name)
    with open(raw, "wb") as f:
        noise_image(w, h, seed).save(f, format="PNG")
    return Path(os.fsdecode(raw))


@pytest.mark.skipif(sys.platform == "win32", reason="Windows file names are always Unicode")
def test_file_name_that_is_not_utf8_loads_and_does_not_fail_the_dataset(tmp_path, caplog):
    from kontext_train.data.images import folder_signature

    hq, lq = tmp_path / "hq", tmp_path / "lq"
    write_good(hq / "plain.png", seed=1)
    _write_bytes_name(hq, b"caf\xe9.png", seed=2)  # Latin-1, not valid UTF-8
    ds = build_dataset(hq, val_count=1, bucket_scale=SCALE, seed=3)
    keys = sorted(s.key for s in ds.train + ds.val)
    assert keys == ["caf\\xe9.png", "plain.png"]  # shown with the undecodable byte escaped
    sample = next(s for s in ds.train + ds.val if s.key.startswith("caf"))
    clean, degraded = ds.load_pair(sample, epoch=0, seed=2**64 - 1)  # synthetic: seeds hash the key
    assert clean.shape == degraded.shape
    json.dumps(ds.summary()).encode("utf-8")  # reports and logs can carry every name

    # Paired: the odd name pairs with its LQ partner; a skipped one is shown with its byte escaped.
    _write_bytes_name(lq, b"caf\xe9.png", seed=4)
    _write_bytes_name(hq, b"na\xefve.png", seed=5)
    with caplog.at_level(logging.WARNING):
        paired = build_dataset(hq, lq, val_count=0, bucket_scale=SCALE)
    assert [s.key for s in paired.train] == ["caf\\xe9.png"]
    assert sorted(Path(p).name for p, _ in paired.skipped) == ["na\\xefve.png", "plain.png"]
    assert "na\\xefve.png" in caplog.text

    first = folder_signature(hq)  # IS_CHANGED: must not raise either
    os.utime(os.path.join(os.fsencode(hq), b"caf\xe9.png"), ns=(1, 1))
    assert folder_signature(hq) != first


def test_pair_with_another_aspect_ratio_is_skipped_with_reason(tmp_path):
    hq, lq = tmp_path / "hq", tmp_path / "lq"
    write_good(hq / "ok.png", 96, 64, seed=1)
    write_good(lq / "ok.png", 47, 31, seed=2)  # a downscaled copy, sides rounded: accepted
    write_good(hq / "turned.png", 96, 64, seed=3)
    write_good(lq / "turned.png", 64, 96, seed=4)  # portrait LQ for a landscape HQ
    write_good(hq / "cropped.png", 100, 100, seed=5)
    write_good(lq / "cropped.png", 100, 96, seed=6)  # 4% off: another crop
    ds = build_dataset(hq, lq, val_count=0, bucket_scale=SCALE)
    assert [s.key for s in ds.train] == ["ok.png"]
    reasons = {Path(p).name: r for p, r in ds.skipped}
    assert set(reasons) == {"turned.png", "cropped.png"}
    assert reasons["turned.png"].startswith("aspect mismatch (HQ 96x64, LQ 64x96")
    assert "2%" in reasons["cropped.png"]
    assert "aspect mismatch: 2" in ds.summary()


def test_the_dataset_node_shows_the_split_and_why(pack_nodes, comfy_dirs, tmp_path, monkeypatch):
    folder = _folder(comfy_dirs["input"] / f"six_{tmp_path.name}", 6)
    write_good(folder / "tiny.png", 20, 20)
    cls = pack_nodes.NODE_CLASS_MAPPINGS["KontextRestoreDataset"]
    drawn = []
    monkeypatch.setattr(sys.modules[cls.__module__].comfyui, "show_on_node", lambda *a: drawn.append(a))
    if hasattr(cls, "define_schema"):  # a V3 node: ComfyUI calls its execute classmethod
        out = cls.execute(folder.name, SCALE, 4, 0)
        (dataset, summary), shown = out.result, list(out.ui.as_dict()["text"])
    else:
        out = cls().load(folder.name, SCALE, 4, 0)
        (dataset, summary), shown = out["result"], list(out["ui"]["text"])
    assert (len(dataset.train), len(dataset.val)) == (5, 1)
    assert shown == [summary]  # on the node, and the summary output
    assert "5 train, 1 held out" in summary and "warning: val_count 4 reduced to 1" in summary
    assert "warning: only 5 training image(s)" in summary
    # Drawn on the node as soon as it runs: the counts and warnings, not the file list or buckets.
    ((brief, _node_id),) = drawn
    assert brief == dataset.summary(brief=True) and brief.splitlines() == [
        line.rstrip() for line in summary.splitlines() if line.startswith(("used ", "warning: ", "skipped "))
    ]
    assert "skipped 1: too small: 1" in brief and "tiny.png" in summary and "tiny.png" not in brief


def test_text_drawn_on_a_node_is_escaped(comfy_root, monkeypatch):
    """Both frontends insert a node's progress text as HTML: a file name shows as written."""
    import types

    from kontext_train import comfyui

    sent = []
    fake = types.SimpleNamespace(send_progress_text=lambda text, node_id: sent.append((text, node_id)))
    monkeypatch.setitem(
        sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=fake))
    )
    comfyui.show_on_node("skipped 1:\n  - <b>&.png", "7")
    comfyui.show_on_node("not sent", None)
    assert sent == [("skipped 1:\n  - &lt;b&gt;&amp;.png", "7")]


def test_a_fifo_in_the_folder_is_skipped_as_not_a_regular_file(tmp_path):
    # Once reported as "missing file" though it is right there.
    hq = _folder(tmp_path / "hq", 2)
    os.mkfifo(hq / "pipe.png")
    ds = build_dataset(hq, val_count=0, bucket_scale=SCALE)
    assert len(ds.train) == 2
    reasons = dict(ds.skipped)
    assert any(name.endswith("pipe.png") for name in reasons)
    assert list(reasons.values()) == ["not a regular file (a pipe, socket or device)"]
    assert "not a regular file" in ds.summary()


def test_an_lq_folder_equal_to_the_hq_folder_is_refused(tmp_path):
    # Once accepted: every pair was an image with itself, and the LoRA learned the identity.
    hq = _folder(tmp_path / "hq", 3)
    (tmp_path / "link").symlink_to(hq)
    for lq in (hq, tmp_path / "link", hq / "."):
        with pytest.raises(ValueError, match="is the HQ folder"):
            build_dataset(hq, lq, val_count=0, bucket_scale=SCALE)
