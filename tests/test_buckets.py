import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from kontext_train.data.buckets import (
    KONTEXT_RESOLUTIONS,
    BucketBatchSampler,
    bucket_histogram,
    bucket_resolutions,
    fit_to_bucket,
    format_histogram,
    nearest_bucket,
)


def test_kontext_resolutions_are_the_17_preferred_ones():
    assert len(KONTEXT_RESOLUTIONS) == 17
    assert KONTEXT_RESOLUTIONS[8] == (1024, 1024)
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in KONTEXT_RESOLUTIONS)
    # Symmetric: the list read backwards is the list transposed.
    assert [(h, w) for w, h in KONTEXT_RESOLUTIONS] == list(reversed(KONTEXT_RESOLUTIONS))
    assert bucket_resolutions() == list(KONTEXT_RESOLUTIONS)


@pytest.mark.parametrize("bucket", KONTEXT_RESOLUTIONS)
def test_each_preferred_resolution_maps_to_itself(bucket):
    assert nearest_bucket(*bucket, KONTEXT_RESOLUTIONS) == bucket
    # Same aspect at another size too.
    assert nearest_bucket(bucket[0] * 3, bucket[1] * 3, KONTEXT_RESOLUTIONS) == bucket


def test_extreme_ratios_map_to_extreme_buckets():
    assert nearest_bucket(10000, 1000, KONTEXT_RESOLUTIONS) == (1568, 672)
    assert nearest_bucket(1000, 10000, KONTEXT_RESOLUTIONS) == (672, 1568)
    assert nearest_bucket(4032, 3024, KONTEXT_RESOLUTIONS) == (1184, 880)  # 4:3 phone photo


def test_nearest_bucket_ties_and_errors():
    buckets = [(32, 16), (16, 32)]
    assert nearest_bucket(50, 50, buckets) == (32, 16)  # equal distance: first listed wins
    assert nearest_bucket(50, 50, list(reversed(buckets))) == (16, 32)
    with pytest.raises(ValueError):
        nearest_bucket(0, 10, buckets)
    with pytest.raises(ValueError):
        nearest_bucket(10, 10, [])


@pytest.mark.parametrize("scale", [0.5, 0.25, 0.1, 0.77, 2.0])
def test_scaled_buckets_are_multiples_of_16(scale):
    buckets = bucket_resolutions(scale)
    assert all(w % 16 == 0 and h % 16 == 0 and w >= 16 and h >= 16 for w, h in buckets)
    assert len(buckets) == len(set(buckets)) <= 17
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)  # order kept (tall to wide)


def test_half_scale_values():
    half = bucket_resolutions(0.5)
    assert (512, 512) in half and half[0] == (336, 784)


@pytest.mark.parametrize("scale", [0, -1, 4.5, float("nan")])
def test_bad_scale_is_named(scale):
    with pytest.raises(ValueError, match="bucket_scale"):
        bucket_resolutions(scale)


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (128, 128), (1000, 90), (64, 640), (96, 64)])
@pytest.mark.parametrize("bucket", [(96, 64), (64, 96), (80, 80)])
def test_fit_to_bucket_exact_size_without_distortion(size, bucket):
    w, h = size
    im = Image.new("RGB", size, "black")
    r = min(w, h) // 4
    ImageDraw.Draw(im).ellipse((w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r), fill="white")
    out = fit_to_bucket(im, bucket)
    assert out.size == bucket
    # The centred circle stays a circle: equal extent across and down (up to resampling).
    arr = np.asarray(out.convert("L")) > 127
    ys, xs = np.nonzero(arr)
    if len(xs):
        across, down = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        if across < bucket[0] - 1 and down < bucket[1] - 1:  # not clipped by the crop
            assert abs(across - down) <= 2


def _check_sampler(buckets_of, batch_size, drop_last, seed=0, epoch=0):
    s = BucketBatchSampler(buckets_of, batch_size, seed=seed, drop_last=drop_last)
    s.set_epoch(epoch)
    batches = list(s)
    assert len(batches) == len(s)
    for b in batches:
        assert 1 <= len(b) <= batch_size
        assert len({buckets_of[i] for i in b}) == 1, "mixed sizes in one batch"
        if drop_last:
            assert len(b) == batch_size
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))
    if not drop_last:
        assert sorted(flat) == list(range(len(buckets_of)))
    return batches


def test_never_mixes_sizes_over_random_assignments():
    rng = random.Random(1234)
    choices = bucket_resolutions(0.5)
    for trial in range(60):
        n = rng.randint(1, 120)
        k = rng.randint(1, 6)
        pool = rng.sample(choices, k)
        buckets_of = [rng.choice(pool) for _ in range(n)]
        _check_sampler(buckets_of, rng.randint(1, 9), drop_last=bool(trial % 2), seed=trial, epoch=trial % 3)


def test_deterministic_by_seed_and_epoch():
    buckets_of = [(64, 64)] * 20 + [(96, 64)] * 13 + [(64, 96)] * 7
    a = _check_sampler(buckets_of, 4, False, seed=3, epoch=1)
    assert a == _check_sampler(buckets_of, 4, False, seed=3, epoch=1)
    assert a != _check_sampler(buckets_of, 4, False, seed=3, epoch=2)
    assert a != _check_sampler(buckets_of, 4, False, seed=4, epoch=1)
    # The order of the input does not decide which bucket group comes first.
    s = BucketBatchSampler(list(reversed(buckets_of)), 4, seed=3)
    assert len(list(s)) == len(a)


def test_small_buckets():
    buckets_of = [(64, 64)] * 3 + [(96, 64)] * 8
    batches = _check_sampler(buckets_of, 4, drop_last=False)
    assert sorted(len(b) for b in batches) == [3, 4, 4]
    batches = _check_sampler(buckets_of, 4, drop_last=True)
    assert len(batches) == 2 and all(buckets_of[b[0]] == (96, 64) for b in batches)


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError):
        BucketBatchSampler([(64, 64)], 0)
    with pytest.raises(ValueError):
        BucketBatchSampler([(64, 64)], 1, rank=2, world_size=2)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_distributed_position_k_is_one_global_batch(world_size, drop_last):
    rng = random.Random(world_size)
    pool = bucket_resolutions(0.25)[:5]
    buckets_of = [rng.choice(pool) for _ in range(77)]
    bs = 3
    per_rank = []
    for rank in range(world_size):
        s = BucketBatchSampler(buckets_of, bs, seed=9, drop_last=drop_last, rank=rank, world_size=world_size)
        s.set_epoch(2)
        per_rank.append(list(s))
        assert len(per_rank[-1]) == len(s)
    assert len({len(r) for r in per_rank}) == 1  # same number of batches everywhere
    seen = set()
    for position in zip(*per_rank):
        assert all(len(b) == bs for b in position)
        union = [i for b in position for i in b]
        assert len(union) == bs * world_size
        assert len({buckets_of[i] for i in union}) == 1
        seen.update(union)
    if not drop_last:
        assert seen == set(range(len(buckets_of)))  # padding only repeats, never loses


def test_distributed_tiny_bucket_is_padded_by_repetition():
    buckets_of = [(64, 64)]  # one image, two ranks, batch 2: four slots
    out = [list(BucketBatchSampler(buckets_of, 2, rank=r, world_size=2)) for r in range(2)]
    assert out == [[[0, 0]], [[0, 0]]]


def test_histogram():
    hist = bucket_histogram([(96, 64), (64, 64), (96, 64), (64, 96)])
    assert hist == {"64x96": 1, "64x64": 1, "96x64": 2}
    assert list(hist) == ["64x96", "64x64", "96x64"]  # tall to wide
    text = format_histogram(hist)
    assert "96x64" in text and "2" in text and len(text.splitlines()) == 3
    assert format_histogram({}) == "(no images)"
