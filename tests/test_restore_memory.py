"""The restore memory guard and the tile limit: the refusal logic, the estimate for ComfyUI's
objects, and the extremes of the Restore node's size-like inputs through a real server's /prompt."""

from __future__ import annotations

import pytest
from server_host import ServerError, server_fixture, write_png

from kontext_train.data.buckets import bucket_resolutions
from kontext_train.restore.restore import MAX_TILES_PER_IMAGE, check_tiles, plan_restoration
from kontext_train.restore.restore_memory import (
    GIB,
    FreeMemory,
    RestoreMemoryError,
    RestoreNeed,
    check_restore_memory,
    memory_refusal,
)

comfy_server = server_fixture()


# -- the refusal ---------------------------------------------------------------------------------
def _estimate(gib_at_scale_1: float, on_device: bool = False):
    """A restore whose need grows with the bucket's area (bucket_scale squared)."""
    tried = []

    def estimate(scale: float) -> RestoreNeed:
        tried.append(scale)
        need = int(gib_at_scale_1 * GIB * scale**2)
        side = int(1024 * scale) // 16 * 16
        if on_device:
            return RestoreNeed(
                scale, (side, side), (side // 16) ** 2, 1, GIB // 10, need, {"model call": need}
            )
        return RestoreNeed(scale, (side, side), (side // 16) ** 2, 1, need, None, {"VAE": need})

    return estimate, tried


def test_a_restore_that_fits_is_not_refused_and_nothing_else_is_estimated():
    estimate, tried = _estimate(8)
    assert memory_refusal(1.0, estimate, FreeMemory(host=16 * GIB)) is None
    assert tried == [1.0]


def test_a_restore_that_does_not_fit_names_the_largest_smaller_bucket_scale_that_does():
    estimate, tried = _estimate(8)  # 4.0: 128 GiB; 2.0: 32; 1.5: 18; 1.0: 8 GiB
    text = memory_refusal(4.0, estimate, FreeMemory(host=16 * GIB))
    assert text.startswith("Not restoring: it would run out of memory. bucket_scale 4 samples in a 4096x4096")
    assert "128.0 GiB of host memory (16.0 GiB available)" in text and "[VAE 128.0 GiB]" in text
    assert "bucket_scale 1 fits" in text and tried == [4.0, 3.0, 2.0, 1.5, 1.0]
    with pytest.raises(RestoreMemoryError, match="bucket_scale 1 fits"):
        check_restore_memory(4.0, estimate, FreeMemory(host=16 * GIB))
    # A GPU model: the device's free memory decides; the message names both.
    estimate, _ = _estimate(8, on_device=True)
    text = memory_refusal(2.0, estimate, FreeMemory(host=64 * GIB, device=24 * GIB, device_name="CUDA"))
    assert "32.0 GiB of CUDA memory (24.0 GiB free)" in text and "bucket_scale 1.5 fits" in text
    assert "No smaller" in memory_refusal(1.0, _estimate(500)[0], FreeMemory(host=GIB))


def test_the_estimate_follows_the_bucket_and_counts_the_vae_on_the_host(comfy_root, tiny_vae):
    """The tiny model and VAE on the CPU: everything is on the host; the bucket (not the image)
    sets the size, and the reference tokens add to the model call."""
    from conftest import make_conditioning, make_tiny_flux

    from kontext_train.comfyui.restore_memory_check import free_memory, restore_estimator
    from kontext_train.restore.restore_settings import resolve_restore_settings

    def settings(mode):
        return resolve_restore_settings(
            None, mode=mode, steps=1, sampler="euler", scheduler="as_trained", seed=0,
            guidance=None, bucket_scale=1.0, prompt=None,
        )  # fmt: skip

    model = make_tiny_flux()
    ref = restore_estimator(model, tiny_vae, make_conditioning(), settings("bridge_ref"), [(400, 400)])
    plain = restore_estimator(model, tiny_vae, make_conditioning(), settings("bridge"), [(400, 400)])
    big, small = ref(4.0), ref(0.5)
    assert big.bucket == (4096, 4096) and big.tokens == 65536 and small.bucket == (512, 512)
    assert big.device is None and big.host == sum(big.parts.values())
    assert big.parts["VAE"] == pytest.approx(64 * small.parts["VAE"], rel=0.01)
    assert big.parts["model call"] > 16 * small.parts["model call"] > 0
    assert plain(1.0).parts["model call"] < ref(1.0).parts["model call"]
    assert free_memory(model).device is None and free_memory(model).host > 0


# -- the tile limit ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "tiles", "fits_at"), [((1024, 1024), 375, 0.125), ((4000, 3000), 4104, 0.25)]
)
def test_too_many_tiles_are_refused_naming_a_bucket_scale_that_is_not(size, tiles, fits_at):
    plan = plan_restoration(*size, bucket_resolutions(0.0625))
    assert len(plan.tiles) == tiles
    with pytest.raises(ValueError) as err:
        check_tiles([plan], 0.0625)
    text = str(err.value)
    assert f"{tiles:,} tiles" in text and f"limit of {MAX_TILES_PER_IMAGE} tiles per image" in text
    assert f"bucket_scale {fits_at:g} makes" in text
    assert len(plan_restoration(*size, bucket_resolutions(fits_at)).tiles) <= MAX_TILES_PER_IMAGE


def test_the_largest_image_at_scale_1_and_a_24_mp_photo_at_half_scale_are_not_refused():
    for size, scale in (((8000, 8000), 1.0), ((6000, 4000), 0.5)):
        check_tiles([plan_restoration(*size, bucket_resolutions(scale))], scale)


# -- through the server --------------------------------------------------------------------------
def _restore_graph(image: str, bucket_scale: float, steps: int, guidance: float, seed: int) -> dict:
    return {
        "1": {"class_type": "KontextRestoreTestTinyFlux", "inputs": {"seed": 0}},
        "2": {"class_type": "KontextRestoreTestTinyVAE", "inputs": {"seed": 0}},
        "3": {"class_type": "KontextRestoreTestTinyClip", "inputs": {"seed": 0}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0], "text": "restore"}},
        "5": {"class_type": "LoadImage", "inputs": {"image": image}},
        "6": {
            "class_type": "KontextRestoreRestore",
            "inputs": {
                "model": ["1", 0],
                "vae": ["2", 0],
                "conditioning": ["4", 0],
                "images": ["5", 0],
                "mode": "bridge_ref",
                "steps": steps,
                "guidance": guidance,
                "sampler_name": "euler",
                "scheduler": "as_trained",
                "seed": seed,
                "bucket_scale": bucket_scale,
                "lora_name": "none",
            },
        },  # fmt: skip
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


@pytest.mark.server
@pytest.mark.timeout(600)
def test_the_largest_allowed_restore_is_refused_and_the_server_keeps_answering(comfy_server):
    """bucket_scale 4.0 (the maximum) samples a 400x400 image at 4096x4096: it used to get the
    server killed for memory. Every other input at its maximum too."""
    write_png(comfy_server.input_dir / "memory_400.png", 400, 400, seed=5)
    graph = _restore_graph("memory_400.png", bucket_scale=4.0, steps=200, guidance=100.0, seed=0xFFFFFFFF)
    with pytest.raises(ServerError) as err:
        comfy_server.run_prompt(graph, timeout=300)
    text = str(err.value)
    assert "Not restoring: it would run out of memory" in text and "4096x4096 bucket" in text
    assert " fits (" in text, text[-2000:]
    comfy_server.check_alive()
    info = comfy_server.get("/object_info/KontextRestoreRestore")
    assert "KontextRestoreRestore" in info
    # The smallest values still run: bucket_scale 0.0625, 1 step, guidance 0 (as trained).
    write_png(comfy_server.input_dir / "memory_96.png", 96, 96, seed=5)
    entry = comfy_server.run_prompt(_restore_graph("memory_96.png", 0.0625, 1, 0.0, 0), timeout=300)
    assert entry["outputs"]["7"]["images"]


@pytest.mark.server
@pytest.mark.timeout(600)
def test_restoring_in_hundreds_of_tiny_tiles_is_refused_through_the_server(comfy_server):
    write_png(comfy_server.input_dir / "memory_1024.png", 1024, 1024, seed=6)
    with pytest.raises(ServerError) as err:
        comfy_server.run_prompt(_restore_graph("memory_1024.png", 0.0625, 8, 1.5, 0), timeout=300)
    text = str(err.value)
    assert "375 tiles of 48x80" in text and "limit of 256 tiles per image" in text
    assert "bucket_scale 0.125 makes" in text
    comfy_server.check_alive()
