import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _bad_images import write_good
from safetensors.torch import save_file

from kontext_train.data.dataset import build_dataset
from kontext_train.data.degradations import DegradationConfig
from kontext_train.data.latent_cache import LatentCache, file_sha256

SCALE = 0.125


class FakeVAE:
    """Average-pool by 8, then a fixed random 3 -> 16 channel projection: cheap and deterministic."""

    def __init__(self):
        self.weight = torch.randn(16, 3, 1, 1, generator=torch.Generator().manual_seed(0))
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4 and x.shape[1] == 3
        self.calls += 1
        return F.conv2d(F.avg_pool2d(x, 8), self.weight)


@pytest.fixture
def data(tmp_path):
    hq = tmp_path / "hq"
    write_good(hq / "a.png", 96, 64, seed=1)
    write_good(hq / "b.png", 64, 64, seed=2)
    return tmp_path, hq


def _ds(hq, lq=None, kind="fixed", **kw):
    return build_dataset(
        hq, lq, val_count=0, bucket_scale=SCALE, degradation=DegradationConfig(kind=kind, **kw)
    )


def _cache(tmp_path, vae=None, **kw):
    vae = vae or FakeVAE()
    return LatentCache(tmp_path / "cache", "fake-vae-1", vae, **kw), vae


def _entries(tmp_path):
    return sorted((tmp_path / "cache").glob("*.safetensors"))


def test_target_miss_then_hit_across_instances(data):
    tmp_path, hq = data
    ds = _ds(hq)
    cache, vae = _cache(tmp_path)
    s = ds.train[0]
    z = cache.target(ds, s)
    w, h = s.bucket
    assert z.shape == (16, h // 8, w // 8) and z.dtype == torch.float32
    assert torch.allclose(z, vae(ds.load_clean(s).unsqueeze(0))[0])
    assert torch.equal(cache.target(ds, s), z)
    assert cache.stats["misses"] == 1 and cache.stats["hits"] == 1
    fresh, vae2 = _cache(tmp_path)
    assert torch.equal(fresh.target(ds, s), z)
    assert vae2.calls == 0 and fresh.stats == {"hits": 1, "misses": 0, "corrupt": 0, "uncached": 0}
    assert not list((tmp_path / "cache").glob("*.tmp"))  # no temporary files left behind


def _corrupt_case(path: Path, how: str, other: Path) -> None:
    if how == "garbage":
        path.write_bytes(b"\x00garbage" * 50)
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    elif how == "wrong_shape":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        save_file({"latent": torch.zeros(16, 3, 3)}, str(path), metadata=meta)
    elif how == "wrong_dtype":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta, z = f.metadata(), f.get_tensor("latent")
        save_file({"latent": z.half()}, str(path), metadata=meta)
    elif how == "nan":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta, z = f.metadata(), f.get_tensor("latent")
        z[0, 0, 0] = float("nan")
        save_file({"latent": z}, str(path), metadata=meta)
    elif how == "other_key":
        shutil.copyfile(other, path)  # a valid entry, but for another image


@pytest.mark.parametrize("how", ["garbage", "truncated", "wrong_shape", "wrong_dtype", "nan", "other_key"])
def test_bad_entry_is_reencoded_and_counted(data, how):
    tmp_path, hq = data
    write_good(hq / "c.png", 96, 64, seed=9)  # same bucket as a.png, for "other_key"
    ds = _ds(hq)
    cache, vae = _cache(tmp_path)
    a, c = (next(s for s in ds.train if s.key == k) for k in ("a.png", "c.png"))
    good = cache.target(ds, a)
    cache.target(ds, c)
    path_a = cache.path_for(cache.target_key(a))
    path_c = cache.path_for(cache.target_key(c))
    _corrupt_case(path_a, how, path_c)
    again, vae2 = _cache(tmp_path)
    assert torch.equal(again.target(ds, a), good)
    assert again.stats["corrupt"] == 1 and again.stats["misses"] == 1 and vae2.calls == 1
    # The entry was rewritten: now a plain hit.
    assert torch.equal(again.target(ds, a), good) and again.stats["hits"] == 1


def test_vae_id_and_degradation_change_miss(data):
    tmp_path, hq = data
    ds = _ds(hq)
    s = ds.train[0]
    cache, _ = _cache(tmp_path)
    cache.target(ds, s)
    cache.control(ds, s, epoch=0, seed=0)
    other_vae = LatentCache(tmp_path / "cache", "fake-vae-2", FakeVAE())
    other_vae.target(ds, s)
    assert other_vae.stats["misses"] == 1 and other_vae.stats["corrupt"] == 0
    stronger = _ds(hq, noise_sigma=0.05)
    same, _ = _cache(tmp_path)
    same.target(stronger, s)  # targets do not depend on the degradation
    same.control(stronger, s, epoch=0, seed=0)
    assert same.stats == {"hits": 1, "misses": 1, "corrupt": 0, "uncached": 0}
    same.control(ds, s, epoch=0, seed=1)  # the seed picks the noise: also a miss
    assert same.stats["misses"] == 2


def test_editing_the_image_misses(data):
    tmp_path, hq = data
    ds = _ds(hq)
    s = next(x for x in ds.train if x.key == "a.png")
    cache, _ = _cache(tmp_path)
    before = cache.target(ds, s)
    write_good(hq / "a.png", 96, 64, seed=42)
    os.utime(hq / "a.png", ns=(1, 1))  # new bytes, and a new mtime for the hash memo
    after = cache.target(ds, s)
    assert cache.stats["misses"] == 2 and not torch.equal(before, after)


def test_fixed_control_is_cached_once(data):
    tmp_path, hq = data
    ds = _ds(hq)
    s = ds.train[0]
    cache, vae = _cache(tmp_path)
    zs = [cache.control(ds, s, epoch=e, seed=0) for e in range(4)]
    assert all(torch.equal(z, zs[0]) for z in zs)
    assert cache.stats["misses"] == 1 and cache.stats["hits"] == 3
    _, degraded = ds.load_pair(s, epoch=0, seed=0)
    assert torch.allclose(zs[0], vae(degraded.unsqueeze(0))[0])


def test_random_pool_mode(data):
    tmp_path, hq = data
    ds = _ds(hq, kind="realesrgan")
    s = ds.train[0]
    cache, vae = _cache(tmp_path, control_mode="pool", pool_size=2)
    zs = [cache.control(ds, s, epoch=e, seed=0) for e in range(6)]
    assert cache.stats["misses"] == 2 and cache.stats["hits"] == 4 and vae.calls == 2
    assert torch.equal(zs[0], zs[2]) and torch.equal(zs[1], zs[5])
    assert not torch.equal(zs[0], zs[1])
    _, variant1 = ds.load_pair(s, epoch=1, seed=0)
    assert torch.allclose(zs[1], vae(variant1.unsqueeze(0))[0])
    assert len(_entries(tmp_path)) == 2


def test_random_reencode_mode_never_caches(data):
    tmp_path, hq = data
    ds = _ds(hq, kind="realesrgan")
    s = ds.train[0]
    cache, vae = _cache(tmp_path, control_mode="reencode")
    zs = [cache.control(ds, s, epoch=e, seed=0) for e in range(3)]
    assert vae.calls == 3 and cache.stats["uncached"] == 3 and cache.stats["hits"] == 0
    assert not torch.equal(zs[0], zs[1]) and not torch.equal(zs[1], zs[2])
    assert torch.equal(zs[0], cache.control(ds, s, epoch=0, seed=0))  # reproducible, just not stored
    assert _entries(tmp_path) == []


def test_real_lq_control_cached_and_keyed_by_lq_bytes(data):
    tmp_path, hq = data
    lq = tmp_path / "lq"
    write_good(lq / "a.png", 48, 32, seed=7)
    write_good(lq / "b.png", 32, 32, seed=8)
    ds = _ds(hq, lq, kind="realesrgan")  # a real LQ is deterministic whatever the config
    s = next(x for x in ds.train if x.key == "a.png")
    cache, _ = _cache(tmp_path)
    z = cache.control(ds, s, epoch=0, seed=0)
    assert torch.equal(cache.control(ds, s, epoch=3, seed=5), z)
    assert cache.stats["misses"] == 1 and cache.stats["hits"] == 1
    write_good(lq / "a.png", 48, 32, seed=99)
    os.utime(lq / "a.png", ns=(2, 2))
    cache.control(ds, s, epoch=0, seed=0)
    assert cache.stats["misses"] == 2


def test_file_hash_is_memoised(tmp_path, monkeypatch):
    p = write_good(tmp_path / "x.png")
    first = file_sha256(p)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    assert file_sha256(p) == first and opened == []


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        LatentCache(tmp_path, "v", FakeVAE(), control_mode="fresh")
    with pytest.raises(ValueError):
        LatentCache(tmp_path, "v", FakeVAE(), pool_size=0)


# Run in a child process: reading a FIFO blocks inside safetensors without releasing the GIL, so
# neither a thread nor a signal could end the test; a child can be killed at the timeout.
_FIFO_PROBE = """
import sys
import torch.nn.functional as F
from kontext_train.data.dataset import build_dataset
from kontext_train.data.latent_cache import LatentCache
ds = build_dataset(sys.argv[1], val_count=0, bucket_scale=0.125)
cache = LatentCache(sys.argv[2], "fake-vae-1", lambda x: F.avg_pool2d(x, 8).repeat(1, 6, 1, 1)[:, :16])
z = cache.target(ds, ds.train[0])
print(cache.stats["corrupt"], tuple(z.shape))
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_entry_replaced_by_a_fifo_is_reencoded_not_read(tmp_path):
    hq = tmp_path / "hq"
    write_good(hq / "a.png", 96, 64, seed=1)
    cache_dir = tmp_path / "cache"
    run = [sys.executable, "-c", _FIFO_PROBE, str(hq), str(cache_dir)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    first = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120, check=True)
    assert first.stdout.split()[0] == "0"
    (entry,) = sorted(cache_dir.glob("*.safetensors"))
    entry.unlink()
    os.mkfifo(entry)
    try:
        second = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60, check=True)
    except subprocess.TimeoutExpired:
        pytest.fail("reading a latent-cache entry that is a FIFO blocked")
    assert second.stdout == first.stdout.replace("0", "1", 1)  # counted corrupt, same latent shape
    assert entry.is_file()  # the FIFO was replaced by a real entry


def test_entry_that_is_a_folder_is_a_clear_error(data):
    tmp_path, hq = data
    ds = _ds(hq)
    cache, _ = _cache(tmp_path)
    s = ds.train[0]
    cache.target(ds, s)
    (entry,) = _entries(tmp_path)
    entry.unlink()
    (entry / "inside").mkdir(parents=True)

    fresh, _ = _cache(tmp_path)
    with pytest.raises(OSError, match=rf"{entry.name}: a folder of that name is in the way. Move or delete"):
        fresh.target(ds, s)
    assert fresh.stats["corrupt"] == 1


@pytest.mark.parametrize("what", ["file", "fifo", "file_above"])
def test_a_cache_folder_that_is_not_a_folder_is_a_clear_error(tmp_path, what):
    # Once FileExistsError from mkdir, naming neither the setting nor what to do.
    if what == "fifo":
        os.mkfifo(tmp_path / "cache")
        cache_dir = tmp_path / "cache"
    else:
        (tmp_path / "cache").write_text("a file")
        cache_dir = tmp_path / "cache" / "sub" if what == "file_above" else tmp_path / "cache"
    with pytest.raises(ValueError) as e:
        LatentCache(cache_dir, "fake-vae-1", FakeVAE())
    message = str(e.value)
    assert str(tmp_path / "cache") in message and "cache_folder / --cache-dir" in message
    assert ("a file" if what != "fifo" else "not a folder (a pipe") in message


def test_a_full_disk_while_caching_names_the_entry(data, monkeypatch):
    # safetensors raises SafetensorError without the file's name on a full disk.
    from safetensors import SafetensorError

    from kontext_train.data import latent_cache
    from kontext_train.files.atomic import WriteError

    def full(*args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    tmp_path, hq = data
    ds = _ds(hq)
    cache, _ = _cache(tmp_path)
    monkeypatch.setattr(latent_cache, "save_file", full)
    with pytest.raises(WriteError) as e:
        cache.target(ds, ds.train[0])
    message = str(e.value)
    assert "\n" not in message and "no space left on device" in message and "free some space" in message
    assert str(tmp_path / "cache") in message and ".safetensors" in message
    assert _entries(tmp_path) == [] and list((tmp_path / "cache").iterdir()) == []
