"""The restore library without ComfyUI: bucket geometry and tiles, and the per-image/per-tile loop
with its progress, cancel and seeds (driven here by fake region restorers)."""

from __future__ import annotations

import pytest
import torch

from kontext_train.data.buckets import bucket_resolutions
from kontext_train.restore.restore import (
    MAX_MEGAPIXELS,
    Box,
    RestorePlan,
    axis_tiles,
    check_size,
    fit_inside,
    plan_restoration,
    restore_image,
    restore_images,
    tile_seed,
    unfit,
)
from kontext_train.restore.restore_settings import RestoreSettings

SCALE = 0.0625  # buckets of ~64 px

# ------------------------------------------------------------------ geometry


def test_fit_inside_pads_without_cropping_and_unfit_inverts():
    image = torch.rand(3, 30, 50)
    padded, box = fit_inside(image, (64, 64))
    assert padded.shape == (3, 64, 64)
    assert (box.width, box.height) == (64, 38)  # uniform scale 64/50, nothing cut off
    back = unfit(padded, box, 50, 30)
    assert back.shape == image.shape
    # Same-size content round-trips exactly.
    region = image[:, :, :32]  # 32 wide, 30 high in a 32x32 bucket: scale 1, two rows of padding
    exact, box2 = fit_inside(region, (32, 32))
    assert box2 == Box(0, 1, 32, 30)
    assert torch.equal(unfit(exact, box2, 32, 30), region)


def test_axis_tiles_cover_with_overlap():
    tiles = axis_tiles(1000, 256, 32)
    assert tiles[0][0] == 0 and tiles[-1][0] + tiles[-1][1] == 1000
    for (s0, n0), (s1, _) in zip(tiles, tiles[1:]):
        assert s0 + n0 - s1 >= 32
    assert axis_tiles(200, 256, 32) == [(0, 200)]


def test_plan_uses_one_pass_for_bucket_sized_images_and_tiles_for_large_ones():
    buckets = bucket_resolutions(1.0)
    single = plan_restoration(1100, 1100, buckets)  # shrinks to 93%: one pass
    assert not single.tiled and single.bucket == (1024, 1024)
    large = plan_restoration(3000, 700, buckets)
    assert large.tiled
    bw, bh = large.bucket
    covered = torch.zeros(700, 3000, dtype=torch.bool)
    for t in large.tiles:
        assert t.width <= bw and t.height <= bh
        covered[t.top : t.top + t.height, t.left : t.left + t.width] = True
    assert covered.all()
    # The cheapest cover of a 3000x700 strip is one row of wide tiles.
    assert len({t.top for t in large.tiles}) == 1


def test_tiled_restore_with_identity_returns_the_image():
    image = torch.rand(3, 70, 150)
    plan = plan_restoration(150, 70, bucket_resolutions(SCALE))
    seen = []

    def identity(pixels, index):
        seen.append((index, tuple(pixels.shape)))
        return pixels.clone()

    out = restore_image(image, plan, identity)
    assert torch.allclose(out, image, atol=1e-6)
    bw, bh = plan.bucket
    assert [s for _, s in seen] == [(1, 3, bh, bw)] * len(plan.tiles)


def test_tiles_blend_smoothly_across_overlaps():
    image = torch.zeros(3, 64, 200)
    plan = RestorePlan(200, 64, (64, 64), tuple(Box(x, 0, 64, 64) for x, _ in axis_tiles(200, 64, 8)))
    out = restore_image(image, plan, lambda p, i: torch.full_like(p, float(i) / 4))
    row = out[0, 32]
    # Monotone ramp between tile values instead of a step at a seam.
    assert torch.all(row[1:] - row[:-1] >= -1e-6)
    assert (row[1:] - row[:-1]).max() < 0.1


def test_too_large_images_are_refused_with_the_limit_named():
    with pytest.raises(ValueError, match=f"{MAX_MEGAPIXELS:g} MP"):
        check_size(10000, 8000)
    check_size(8000, 8000)  # 64 MP exactly is allowed


# ------------------------------------------------------------------ the loop


class FakeRestorer:
    """Records each region, reports every sampling step, returns the pixels shifted by a value
    that depends on the seed (so seeds are visible in the output)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.calls: list[tuple[tuple[int, ...], int]] = []

    def __call__(self, pixels, seed, on_step):
        self.calls.append((tuple(pixels.shape), seed))
        for i in range(self.steps):
            on_step(i)
        return (pixels * 0.5 + (seed % 97) / 200).clamp(0, 1)


def test_loop_reports_every_step_of_every_region():
    settings = RestoreSettings(steps=3, bucket_scale=SCALE, seed=5)
    images = [torch.rand(3, 64, 64), torch.rand(3, 70, 150)]  # one pass, then tiles
    n_tiles = len(plan_restoration(150, 70, bucket_resolutions(SCALE)).tiles)
    assert n_tiles > 1
    seen = []
    restorer = FakeRestorer(3)
    out = restore_images(images, settings, restorer, on_progress=seen.append)
    assert [o.shape for o in out] == [im.shape for im in images]
    total = (1 + n_tiles) * 3
    assert {p.total for p in seen} == {total}
    done = [p.done for p in seen]
    assert done == sorted(done) and done[-1] == total and len(set(done)) == total
    assert seen[0].text == "image 1/2, step 1/3"
    last = seen[-1]
    assert (last.image, last.images, last.tile, last.tiles) == (1, 2, n_tiles - 1, n_tiles)
    assert last.text == f"image 2/2, tile {n_tiles}/{n_tiles}, step 3/3"
    assert len(restorer.calls) == 1 + n_tiles


def test_loop_stops_at_the_step_where_cancel_raises():
    class Cancelled(Exception):
        pass

    checks = []

    def check_cancel():
        checks.append(1)
        # Region 1: before it and after its 4 steps (5 checks); region 2: before it, after step 1,
        # after step 2 (raises there).
        if len(checks) == 8:
            raise Cancelled

    restorer = FakeRestorer(4)
    settings = RestoreSettings(steps=4, bucket_scale=SCALE)
    with pytest.raises(Cancelled):
        restore_images([torch.rand(3, 64, 64)] * 3, settings, restorer, check_cancel=check_cancel)
    assert len(restorer.calls) == 2  # the second region was stopped inside, the third never began


def test_loop_seeds_an_image_the_same_alone_or_in_a_batch():
    settings = RestoreSettings(steps=1, bucket_scale=SCALE, seed=123)
    a, b = torch.rand(3, 64, 64), torch.rand(3, 64, 64)
    batch = restore_images([a, b], settings, FakeRestorer(1))
    alone = restore_images([b], settings, FakeRestorer(1), first_index=1)
    assert torch.equal(batch[1], alone[0])
    restorer = FakeRestorer(1)
    restore_images(torch.stack([a, b]), settings, restorer)  # a (B, 3, H, W) batch works too
    assert [seed for _, seed in restorer.calls] == [tile_seed(123, 0, 0), tile_seed(123, 1, 0)]


def test_loop_uses_the_settings_bucket_scale_and_refuses_sizes_before_any_work():
    restorer = FakeRestorer(1)
    restore_images([torch.rand(3, 40, 60)], RestoreSettings(steps=1, bucket_scale=0.125), restorer)
    plan = plan_restoration(60, 40, bucket_resolutions(0.125))
    bw, bh = plan.bucket
    assert restorer.calls[0][0] == (1, 3, bh, bw)

    class Huge:  # the shape of a 10000x8000 image, never read
        shape = (3, 8000, 10000)

    restorer = FakeRestorer(1)
    with pytest.raises(ValueError, match="MP"):
        restore_images(
            [torch.rand(3, 32, 32), Huge()], RestoreSettings(steps=1, bucket_scale=SCALE), restorer
        )
    assert restorer.calls == []


def test_work_of_tiny_tiles_is_bounded_before_any_sampling():
    from kontext_train.restore.restore import MAX_REGION_STEPS

    class Large:  # the shape of an 8000x8000 image (64 MP: under the megapixel cap), never read
        shape = (3, 8000, 8000)

    restorer = FakeRestorer(1)
    # One image in 20,449 tiles is refused by the tile limit (issue 22) before the work limit.
    with pytest.raises(ValueError, match=r"20,449 tiles of .*limit of 256 tiles per image"):
        restore_images([Large()], RestoreSettings(steps=8, bucket_scale=SCALE), restorer)
    assert restorer.calls == []
    from kontext_train.restore.restore import check_work

    plan = plan_restoration(8000, 8000, bucket_resolutions(SCALE))
    with pytest.raises(
        ValueError, match=r"20,449 tile\(s\) x 8 step\(s\) = 163,592 .*limit of 20,000. Raise bucket_scale"
    ):
        check_work([plan], 8, SCALE)
    # The largest image at the default scale stays allowed even at the most steps the node offers.
    assert len(plan_restoration(8000, 8000, bucket_resolutions(1.0)).tiles) * 200 <= MAX_REGION_STEPS
