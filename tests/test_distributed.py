"""Data-parallel training: two CPU processes (gloo) must train the same LoRA as one process with
the same global batch.

The model here is a small pure-torch velocity model with real ``LoraAdapter``s, so the test needs
no ComfyUI and takes a few seconds; everything else is the real pipeline: ``build_dataset`` on
image files in two aspect-ratio buckets, ``LatentCache``, ``LatentBatches(rank=, world_size=)``
(the bucket sampler's sharding), ``Trainer`` / ``DataParallelTrainer``, the gradient all-reduce
hook and ``init_from_env`` reading the variables torchrun sets.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

from kontext_train.data.batches import LatentBatches
from kontext_train.data.dataset import build_dataset
from kontext_train.data.latent_cache import LatentCache
from kontext_train.method.lora import create_adapters, to_kohya_state_dict
from kontext_train.train.distributed import (
    DataParallelTrainer,
    DistContext,
    init_from_env,
    shutdown,
    sync_gradients,
)
from kontext_train.train.trainer import TrainConfig, Trainer, TrainerHooks

STEPS = 5
PER_RANK_BATCH = 2
WORLD = 2


class ToyVelocityModel:
    """A frozen 1x1 "transformer" (x and reference in, velocity out) with LoRA on its weight.

    Has the interface the Trainer expects: adapters, parameters(), load(), training(),
    to_model_space(), velocity(), device.
    """

    def __init__(self, seed: int, rank: int = 4) -> None:
        g = torch.Generator().manual_seed(1234)
        self.base = torch.randn(16, 32, generator=g) * 0.3
        self.adapters = create_adapters({"proj": (16, 32)}, rank=rank, alpha=rank, seed=seed)
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for a in self.adapters.values() for p in a.parameters()]

    def load(self) -> torch.device:
        for a in self.adapters.values():
            a.requires_grad_(True)
        return self.device

    @contextlib.contextmanager
    def training(self):
        with torch.enable_grad():
            yield

    def to_model_space(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def from_model_space(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def velocity(self, x, sigma, cond, guidance, reference=None):
        w = self.adapters["proj"](self.base)
        ref = reference if reference is not None else torch.zeros_like(x)
        out = torch.einsum("oc,bchw->bohw", w, torch.cat([x, ref], dim=1))
        return out * (1.0 + sigma.view(-1, 1, 1, 1))


def _encode(images: torch.Tensor) -> torch.Tensor:
    """A fixed stand-in VAE: 8x average pooling, 3 -> 16 channels."""
    pooled = F.avg_pool2d(images, 8)
    parts = [pooled, pooled**2, 1 - pooled, 0.5 * pooled, pooled.sqrt(), pooled.mean(1, keepdim=True)]
    return torch.cat(parts, dim=1)  # 3 * 5 + 1 = 16 channels


def _make_images(folder: Path) -> None:
    """8 square and 4 wide photo-like images: two buckets, each a multiple of the global batch (4),
    so no padding is involved (a padded last batch repeats images, which one process does not)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = [(96, 96)] * 8 + [(144, 80)] * 4
    for i, (w, h) in enumerate(sizes):
        small = (rng.random((max(2, h // 8), max(2, w // 8), 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(folder / f"img_{i:02d}.png")


def _config() -> TrainConfig:
    return TrainConfig(
        steps=STEPS,
        learning_rate=5e-2,
        rank=4,
        batch_size=PER_RANK_BATCH,
        lr_schedule="constant_with_warmup",
        warmup_steps=0,
        checkpoint_every=2,
        validate_every_epochs=0,
        seed=7,
        bridge_noise=0.1,  # so the per-sample noise matters, not just the sigmas
        gradient_checkpointing=False,
    )


def _train(data_dir: Path, run_dir: Path, batch_size: int, ctx: DistContext | None):
    cfg = _config()
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "batch_size": batch_size})
    dataset = build_dataset(data_dir, val_count=0, seed=cfg.seed, bucket_scale=0.0625, min_size=8)
    cache = LatentCache(run_dir.parent / "cache", vae_id="toy", encode=_encode)
    rank, world = (ctx.rank, ctx.world_size) if ctx else (0, 1)
    batches = LatentBatches(dataset, cache, cfg.batch_size, cfg.seed, rank=rank, world_size=world)
    model = ToyVelocityModel(cfg.seed)
    if ctx is not None and ctx.enabled:
        hooks = TrainerHooks(sync_gradients=sync_gradients(ctx), is_main_process=ctx.is_main)
        trainer = DataParallelTrainer(cfg, model, batches, None, run_dir, hooks=hooks, dist_context=ctx)
    else:
        trainer = Trainer(cfg, model, batches, None, run_dir)
    result = trainer.run(resume=False)
    return (
        to_kohya_state_dict(model.adapters),
        result.losses,
        [len(dataset.train), batches.batches_per_epoch()],
    )


def _worker(rank: int, world: int, port: int, data_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    ctx = init_from_env(backend="gloo")
    try:
        assert (ctx.rank, ctx.world_size, ctx.backend) == (rank, world, "gloo")
        # Separate run folders per rank: rank 1's must stay empty (only rank 0 writes).
        run_dir = Path(out_dir) / f"run_rank{rank}"
        run_dir.mkdir(parents=True)
        state, losses, info = _train(Path(data_dir), run_dir, PER_RANK_BATCH, ctx)
        torch.save({"state": state, "losses": losses, "info": info}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        shutdown(ctx)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    data = tmp_path / "hq"
    _make_images(data)
    out = tmp_path / "dist"
    out.mkdir()
    mp.spawn(_worker, args=(WORLD, _free_port(), str(data), str(out)), nprocs=WORLD, join=True)

    single_run = tmp_path / "single" / "run"
    single_run.mkdir(parents=True)
    state, losses, info = _train(data, single_run, PER_RANK_BATCH * WORLD, None)

    r0 = torch.load(out / "rank0.pt", weights_only=True)
    r1 = torch.load(out / "rank1.pt", weights_only=True)
    # 12 images, 3 global batches of 2 x 2 per epoch: the 5 steps cross an epoch boundary.
    assert info == [12, 3] and r0["info"] == [12, 3]
    assert state.keys() == r0["state"].keys()
    moved = 0.0
    for key, ref in state.items():
        # Every rank ends with the same LoRA, and it is the single-process LoRA.
        torch.testing.assert_close(r0["state"][key], r1["state"][key], rtol=0, atol=0)
        torch.testing.assert_close(r0["state"][key], ref, rtol=1e-5, atol=1e-6)
        if key.endswith("lora_up.weight"):
            moved = max(moved, ref.abs().max().item())
    assert moved > 1e-3, "training should have moved the LoRA away from its zero init"
    # The logged loss is the global mean on every rank, equal to the single-process loss.
    assert len(losses) == STEPS
    np.testing.assert_allclose(r0["losses"], losses, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r1["losses"], losses, rtol=1e-5, atol=1e-7)
    # Only rank 0 wrote checkpoints and the loss history.
    assert (out / "run_rank0" / "checkpoints" / f"step_{STEPS:06d}").is_dir()
    assert (out / "run_rank0" / "loss_history.json").is_file()
    assert list((out / "run_rank1").iterdir()) == []


def test_rank_batches_join_to_the_single_process_batches():
    """Position k on every rank comes from one bucket, and the ranks' batches concatenated are the
    single-process batch of the same global size (buckets that need no padding)."""
    from kontext_train.data.buckets import BucketBatchSampler

    buckets = [(16, 16)] * 8 + [(32, 16)] * 4
    single = BucketBatchSampler(buckets, 4, seed=3)
    ranks = [BucketBatchSampler(buckets, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for epoch in range(3):
        for s in (single, *ranks):
            s.set_epoch(epoch)
        joined = [a + b for a, b in zip(*ranks)]
        assert [b for b in single] == joined


def test_init_from_env_single_process_and_bad_values():
    ctx = init_from_env(environ={})
    assert not ctx.enabled and ctx.is_main and ctx.world_size == 1
    assert not init_from_env(environ={"WORLD_SIZE": "1"}).enabled
    with pytest.raises(ValueError, match="RANK"):
        init_from_env(environ={"WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="not an integer"):
        init_from_env(environ={"WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="outside"):
        init_from_env(environ={"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})


@pytest.mark.slow
def test_the_command_runs_under_torchrun_with_two_cpu_processes(comfy_root, tmp_path):
    """The real command (tiny demo model) under torchrun: collectives in the CLI do not hang,
    rank 0 writes the LoRA and the report, and the report names both processes."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("HR_ROOT", "OUTPUT_DIR", "RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(root), OMP_NUM_THREADS="1", COMFYUI_PATH=str(comfy_root))
    # torchrun's own module: always installed with torch, whatever the venv's bin folder holds.
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "kontext_train",
    ]
    args += ["demo", "--output-dir", str(out), "--steps", "2", "--demo-images", "3", "--val-count", "1"]
    args += ["--bucket-scale", "0.125", "--validation-steps", "2", "--restore-steps", "2", "--log-every", "1"]
    proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("report: ") == 1  # only rank 0 reports
    assert (out / "kontext_restore_demo.safetensors").is_file()
    assert "2 processes (gloo)" in (out / "report.md").read_text()
