"""Data-parallel training over several processes (GPUs), launched by ``torchrun`` or
``accelerate launch``.

Each process (rank) holds the frozen base model and the LoRA adapters on its own device
(``cuda:LOCAL_RANK``), trains on its own slice of every global batch, and averages the LoRA
gradients with the other ranks before each optimizer step (``TrainerHooks.sync_gradients``).
Only rank 0 writes files (``TrainerHooks.is_main_process``).

Exactness: with ``world_size`` ranks and a per-rank batch of ``B``, a run is the same computation
as one process with batch ``B * world_size``:

* data - ``BucketBatchSampler(rank=, world_size=)`` builds the same global batches of
  ``B * world_size`` indices (one bucket each) on every rank and gives rank ``r`` slice ``r``;
* randomness - the trainer draws each sample's sigma and noise from a generator keyed on
  (seed, step, micro-step, global sample index); ``LatentBatch.first_index`` tells it where this
  rank's slice starts in the global batch, so the draws do not depend on how it is split;
* gradients - each rank's loss is the mean over its samples, so the average of the rank
  gradients is the gradient of the mean over the global batch.

Only float summation order differs.
"""

from __future__ import annotations

import datetime
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .trainer import Trainer

__all__ = [
    "DataParallelTrainer",
    "DistContext",
    "all_equal",
    "barrier",
    "broadcast_error",
    "init_from_env",
    "on_main_process",
    "shutdown",
    "sync_gradients",
]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(environ: dict, name: str) -> int:
    value = environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"Environment variable {name}={value!r} is not an integer. Launch with torchrun or "
            "accelerate launch, which set RANK, WORLD_SIZE and LOCAL_RANK, or unset them."
        ) from None


def init_from_env(
    environ: dict | None = None, backend: str | None = None, timeout_minutes: float = 30.0
) -> DistContext:
    """Joins the process group described by RANK / WORLD_SIZE / LOCAL_RANK (set by ``torchrun``
    and ``accelerate launch``; MASTER_ADDR / MASTER_PORT too).

    Without those variables, or with WORLD_SIZE=1, it returns a single-process context and starts
    nothing. Backend: NCCL when CUDA is available (each rank on ``cuda:LOCAL_RANK``, made the
    current device so ComfyUI loads there), else gloo on the CPU.
    """
    environ = dict(os.environ if environ is None else environ)
    if "WORLD_SIZE" not in environ or _env_int(environ, "WORLD_SIZE") <= 1:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        return DistContext(device=device or torch.device("cpu"))
    missing = [n for n in _ENV if n not in environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun or accelerate launch."
        )
    rank, world, local = (_env_int(environ, n) for n in _ENV)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world}).")
    cuda = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    if cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA device(s) are visible: "
                "start at most one process per GPU (torchrun --nproc_per_node <number of GPUs>)."
            )
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **kwargs,
        )
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device, backend=backend)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_equal(ctx: DistContext, value) -> bool:
    """True when every rank passed the same (picklable) value."""
    if not ctx.enabled:
        return True
    gathered: list = [None] * ctx.world_size
    dist.all_gather_object(gathered, value)
    return all(v == gathered[0] for v in gathered)


def broadcast_error(ctx: DistContext, error: str | None) -> str | None:
    """Rank 0's error message (or None) on every rank."""
    if not ctx.enabled:
        return error
    payload = [error]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def on_main_process(ctx: DistContext | None, fn: Callable[[], Any]) -> Any:
    """Runs ``fn`` on rank 0 alone while the other ranks wait, and gives its (picklable) result
    to every rank. If it raises on rank 0, the same error is raised on every rank (instead of
    leaving them waiting in the next collective)."""
    if ctx is None or not ctx.enabled:
        return fn()
    payload: list = [None, None]
    failure: BaseException | None = None
    if ctx.is_main:
        try:
            payload[0] = fn()
        except Exception as e:  # noqa: BLE001 - handed to every rank, then re-raised
            failure = e
            try:
                pickle.dumps(e)
                payload[1] = e
            except Exception:  # noqa: BLE001 - an exception that does not pickle goes as text
                payload[1] = RuntimeError(f"rank 0 stopped the run: {e}")
    dist.broadcast_object_list(payload, src=0)
    if failure is not None:
        raise failure
    if payload[1] is not None:
        raise payload[1]
    return payload[0]


def any_rank(ctx: DistContext, flag: bool) -> bool:
    """True when ``flag`` is true on at least one rank (for failing together, not hanging)."""
    if not ctx.enabled:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _comm_device(ctx: DistContext) -> torch.device:
    return ctx.device if ctx.backend == "nccl" else torch.device("cpu")


def sync_gradients(ctx: DistContext) -> Callable[[list[torch.nn.Parameter]], None]:
    """The ``TrainerHooks.sync_gradients`` hook: averages the gradients of the given parameters
    over all ranks, in one flat buffer per dtype (one collective instead of one per tensor)."""

    def hook(params: list[torch.nn.Parameter]) -> None:
        if not ctx.enabled:
            return
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in params:
            if p.grad is None:  # a layer that got no gradient this step counts as zero
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        comm = _comm_device(ctx)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group]).to(comm)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= ctx.world_size
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n

    return hook


def mean_over_ranks(ctx: DistContext, value: torch.Tensor) -> torch.Tensor:
    """Mean of a scalar tensor over ranks (detached)."""
    if not ctx.enabled:
        return value.detach()
    t = value.detach().float().reshape(1).to(_comm_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / ctx.world_size).to(value.device).reshape(value.shape)


class DataParallelTrainer(Trainer):
    """``Trainer`` for one rank of a data-parallel run.

    The only difference from ``Trainer``: the loss a micro-batch returns carries the value of the
    mean over all ranks (its gradient stays this rank's own, which the gradient hook averages).
    So the loss history, the console and the non-finite check are the same on every rank and
    equal to a single-process run - a NaN on one rank stops every rank together instead of
    leaving the others waiting in the next all-reduce.
    """

    def __init__(self, *args, dist_context: DistContext, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dist = dist_context

    def batch_loss(self, batch, *args, **kwargs) -> torch.Tensor:
        local = super().batch_loss(batch, *args, **kwargs)
        if not self.dist.enabled:
            return local
        return local + (mean_over_ranks(self.dist, local) - local.detach())
