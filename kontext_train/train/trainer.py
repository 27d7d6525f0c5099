"""The flow-matching LoRA training loop.

The whole method, on one screen: for each batch of (clean, degraded) latents, pick sigmas, build
the point on the path between the formulation's start and the clean latent, have the model predict
the velocity there (with the degraded latent as Kontext reference tokens where the formulation
uses them), and regress it onto ``start - clean``. Everything around that - schedule,
accumulation, checkpoints, resume, validation, cancel, NaN and out-of-memory handling - is
bookkeeping that a user of a serious trainer expects.

The model is anything with ``adapters``, ``parameters()``, ``load()``, ``training()``,
``to_model_space()`` and ``velocity()``: ``comfyui.FluxLoraModel`` in real use, small torch
modules in tests.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from .. import __version__
from ..data.batches import LatentBatch, LatentBatches
from ..files.atomic import atomic_write_text
from ..method.flow import (
    flux_shift_mu,
    image_tokens,
    loss_weights,
    make_training_example,
    on_horizon,
    sample_training_sigmas,
)
from ..method.lora import atomic_save_safetensors, diffusers_support, load_kohya_into, to_kohya_state_dict
from ..method.train_config import LORA_DTYPES, LR_SCHEDULES, TrainConfig, check_resume_compatible
from ..restore.restore_settings import (  # as restoring reads
    DEFAULT_BASE_SHIFT,
    DEFAULT_MAX_SHIFT,
    METADATA_PREFIX,
)
from .checkpoints import find_resumable, save_checkpoint
from .optimizers import build_optimizer, loss_per_sample
from .step_losses import LOSS_READ_EVERY, StepInfo, read_step_losses
from .validation import write_validation_report

__all__ = ["LORA_DTYPES", "LR_SCHEDULES", "TrainConfig", "Trainer", "TrainerHooks"]


@dataclass
class TrainerHooks:
    """How the host (node, command line, tests) follows and steers a run."""

    on_step: Callable[[StepInfo], None] | None = None
    check_cancel: Callable[[], None] | None = None  # raises one of cancel_exceptions to stop
    cancel_exceptions: tuple[type[BaseException], ...] = (KeyboardInterrupt,)
    oom_exceptions: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError,)
    on_validation: Callable[[dict], None] | None = None
    on_checkpoint: Callable[[int, Path], None] | None = None  # (step, folder) after each one is written
    on_resumed: Callable[[int, Path], None] | None = None  # (step, checkpoint) once its state is loaded
    # Multi-process training: average gradients across ranks; only the main process writes.
    sync_gradients: Callable[[list[torch.nn.Parameter]], None] | None = None
    is_main_process: bool = True


@dataclass
class TrainResult:
    step: int
    losses: list[float]
    validation: list[dict]
    lora_path: Path | None
    checkpoint: Path | None
    resumed_from: int = 0
    last_restored: list = field(default_factory=list)  # images of the last validation


def lora_metadata(config: TrainConfig, step: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Safetensors metadata: every setting, the step, the pack version, and kohya's common keys."""
    meta = {
        METADATA_PREFIX + "version": __version__,
        METADATA_PREFIX + "config": json.dumps(config.to_dict(), sort_keys=True),
        METADATA_PREFIX + "formulation": config.formulation,
        METADATA_PREFIX + "bridge_noise": str(config.bridge_noise),
        METADATA_PREFIX + "guidance": str(config.guidance),
        METADATA_PREFIX + "base_shift": str(DEFAULT_BASE_SHIFT),
        METADATA_PREFIX + "max_shift": str(DEFAULT_MAX_SHIFT),
        METADATA_PREFIX + "step": str(step),
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.lora_alpha),
        "ss_steps": str(step),
        "ss_learning_rate": str(config.learning_rate),
        "modelspec.architecture": "flux-1-dev/lora",
        # kohya's and LyCORIS' way to say the adapter kind (tools that list LoRAs read it).
        "ss_network_module": "networks.lora_flux" if config.adapter == "lora" else "lycoris.kohya",
    }
    if config.adapter != "lora":
        meta["ss_network_args"] = json.dumps({"algo": config.adapter})
    for k, v in (extra or {}).items():
        key = k if "." in k or k.startswith("ss_") else METADATA_PREFIX + k
        meta[key] = v if isinstance(v, str) else json.dumps(v)
    return meta


def cuda_autocast(model) -> AbstractContextManager:
    """The default forward context: bf16 autocast when the model computes in a reduced precision
    on CUDA (bf16 weights, or fp8 weights cast to bf16), else none."""
    device = getattr(model, "device", torch.device("cpu"))
    if torch.device(device).type == "cuda" and getattr(model, "dtype", torch.float32) != torch.float32:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        model,
        batches: LatentBatches,
        cond,
        run_dir: Path,
        lora_path: Path | None = None,
        metadata: Mapping[str, str] | None = None,
        validator=None,
        hooks: TrainerHooks | None = None,
        dataset_identity: Mapping | None = None,
        checkpoint_lora_dir: Path | None = None,
        autocast: Callable[[], AbstractContextManager] | None = None,
    ) -> None:
        """``dataset_identity`` (what the run trains on, see ``run.dataset_identity``) is stored in
        every checkpoint, so a resume can be checked against it. ``checkpoint_lora_dir``: where
        each checkpoint's LoRA is also written (``loras/<name>/``) when ``checkpoint_loras`` is on.
        ``autocast`` makes the context the model's forward runs in (default ``cuda_autocast``: bf16
        autocast on CUDA; the tests pass CPU bf16 autocast to run that precision path without a GPU)."""
        self.config = config
        self.model = model
        self.batches = batches
        self.cond = cond
        self.run_dir = Path(run_dir)
        self.lora_path = Path(lora_path) if lora_path else None
        self.extra_metadata = dict(metadata or {})
        self.validator = validator
        self.hooks = hooks or TrainerHooks()
        self.dataset_identity = dict(dataset_identity) if dataset_identity else None
        self.checkpoint_lora_dir = Path(checkpoint_lora_dir) if checkpoint_lora_dir else None
        self.autocast = autocast
        self.step = 0
        self.epoch = 0
        self.position = 0
        self.losses: list[float] = []
        # Per-micro-step losses of the steps since the last read, still on the device (reading a
        # GPU tensor waits for the GPU, so the loop reads only when a value is needed).
        self._unread_losses: list[list[torch.Tensor]] = []
        self.validation: list[dict] = []
        self.last_saved_step = -1
        self.last_saved_validations = 0
        self.last_checkpoint: Path | None = None
        self.last_restored: list = []

    # -- one step of the method -------------------------------------------------------------
    def sample_generator(self, micro_step: int, index: int) -> torch.Generator:
        """The random source of one sample: keyed on (seed, step, micro-step, global index).

        Keying by position instead of carrying one generator along makes a resumed run draw
        exactly what an uninterrupted one would, and lets N processes with batch B draw exactly
        what one process with batch N*B draws (each rank owns a slice of the global indices).
        """
        key = ((self.config.seed * 1_000_003 + self.step) * 1_009 + micro_step) * 65_537 + index
        return torch.Generator().manual_seed(key % (2**63 - 1))

    def batch_loss(self, batch: LatentBatch, micro_step: int = 0) -> torch.Tensor:
        cfg, model = self.config, self.model
        device = model.device
        clean = model.to_model_space(batch.clean.to(device))
        degraded = model.to_model_space(batch.degraded.to(device))
        n, _, h, w = clean.shape
        mu = flux_shift_mu(image_tokens(h, w), DEFAULT_BASE_SHIFT, DEFAULT_MAX_SHIFT)
        sigmas, noises = [], []
        for j in range(n):
            g = self.sample_generator(micro_step, batch.first_index + j)
            drawn = sample_training_sigmas(1, cfg.timestep_sampling, mu, g, cfg.logit_mean, cfg.logit_std)
            sigmas.append(on_horizon(cfg.formulation, drawn, mu))
            # Drawn on the CPU: identical on any device.
            noises.append(torch.randn(clean.shape[1:], generator=g))
        sigmas_d = torch.cat(sigmas).to(device)
        noise = torch.stack(noises).to(device)
        example = make_training_example(cfg.formulation, clean, degraded, sigmas_d, noise, cfg.bridge_noise)
        with self._autocast():
            pred = model.velocity(example.x, sigmas_d, self.cond, cfg.guidance, example.reference)
        per_sample = loss_per_sample(pred, example.target, cfg.loss, cfg.huber_delta)
        return (loss_weights(sigmas_d, cfg.loss_weighting) * per_sample).mean()

    def _autocast(self) -> AbstractContextManager:
        return self.autocast() if self.autocast is not None else cuda_autocast(self.model)

    # -- losses -----------------------------------------------------------------------------
    def read_losses(self) -> list[float]:
        """Every step's loss, after bringing the unread ones to the host in one read
        (``step_losses.read_step_losses``: raises NonFiniteLossError naming the first step whose
        loss is not finite)."""
        if not self._unread_losses:
            return self.losses
        pending, self._unread_losses = self._unread_losses, []
        first = self.step - len(pending) + 1
        read_step_losses(pending, first, self.config.grad_accum, self.losses, self.last_checkpoint)
        return self.losses

    def _loss_of(self, step: int) -> float:
        return self.read_losses()[step - 1]

    # -- state ----------------------------------------------------------------------------
    def _state(self, optimizer, scheduler) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "losses": list(self.losses),
            "validation": list(self.validation),
            "config": self.config.to_dict(),
            "version": __version__,
            "dataset": self.dataset_identity,
        }

    def _metadata(self) -> dict[str, str]:
        # Which layers diffusers' loader would skip (ComfyUI loads all): see lora.diffusers_support.
        extra = {"diffusers": diffusers_support(self.model.adapters), **self.extra_metadata}
        return lora_metadata(self.config, self.step, extra)

    def save_checkpoint(self, optimizer, scheduler) -> Path | None:
        self.read_losses()  # a non-finite loss stops here, before its state is saved
        # Saved again at the same step when a validation ran since (the run's last one comes after
        # the last step's checkpoint): a finished run read back then has every validation row.
        unchanged = self.step == self.last_saved_step and len(self.validation) == self.last_saved_validations
        if not self.hooks.is_main_process or unchanged or self.step == 0:
            return self.last_checkpoint
        self.last_checkpoint = save_checkpoint(
            self.run_dir,
            self.step,
            self.model.adapters,
            self._state(optimizer, scheduler),
            self._metadata(),
            keep=self.config.keep_checkpoints,
            lora_copy=self._checkpoint_lora_path(),
        )
        self.last_saved_step = self.step
        self.last_saved_validations = len(self.validation)
        if self.hooks.on_checkpoint:
            self.hooks.on_checkpoint(self.step, self.last_checkpoint)
        return self.last_checkpoint

    def _checkpoint_lora_path(self) -> Path | None:
        """``loras/<name>/<name>_step_000500.safetensors`` for this step, or None when off."""
        if self.checkpoint_lora_dir is None or not self.config.checkpoint_loras:
            return None
        return self.checkpoint_lora_dir / f"{self.checkpoint_lora_dir.name}_step_{self.step:06d}.safetensors"

    def _resume(self, optimizer, scheduler) -> int:
        resumable = find_resumable(self.run_dir, move_aside=self.hooks.is_main_process)
        if resumable is None:
            return 0
        found, lora, state = resumable
        check_resume_compatible(state.get("config", {}), self.config)
        load_kohya_into(self.model.adapters, lora)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.losses = list(state["losses"])
        self.validation = list(state["validation"])
        self.last_saved_step = self.step
        self.last_saved_validations = len(self.validation)
        self.last_checkpoint = found
        if self.hooks.on_resumed and self.hooks.is_main_process:
            self.hooks.on_resumed(self.step, found)
        return self.step

    # -- validation -----------------------------------------------------------------------
    def _validate(self, epoch: int) -> None:
        if self.validator is None:
            return
        with torch.no_grad():
            row, restored = self.validator.run(self.model, self.cond, self.config)
        row = {"step": self.step, "epoch": epoch, **row}
        self.validation.append(row)
        self.last_restored = restored
        if self.hooks.on_validation:
            self.hooks.on_validation(row)
        if self.hooks.is_main_process and self.lora_path is not None:
            write_validation_report(self.validation, self.lora_path)

    # -- the loop -------------------------------------------------------------------------
    def run(self, resume: bool = True) -> TrainResult:
        from diffusers.optimization import get_scheduler

        cfg = self.config
        self.model.load()
        support = diffusers_support(self.model.adapters)
        if support != "full" and self.hooks.is_main_process:
            logging.getLogger("kontext_restore").warning(
                "lora_targets=%s: diffusers' load_lora_weights %s of this LoRA without a warning; ComfyUI "
                "loads every layer. Use 'blocks' or 'blocks+modulation' for a file diffusers loads whole.",
                cfg.lora_targets,
                support,
            )
        params = self.model.parameters()
        optimizer = build_optimizer(cfg.optimizer, params, cfg.learning_rate, cfg.weight_decay)
        scheduler = get_scheduler(
            cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps
        )
        resumed_from = self._resume(optimizer, scheduler) if resume else 0
        per_epoch = self.batches.batches_per_epoch()
        stream = self.batches.stream(self.epoch, self.position)
        try:
            with self.model.training():
                while self.step < cfg.steps:
                    started = time.perf_counter()
                    optimizer.zero_grad(set_to_none=True)
                    micro_losses = []
                    finished_epochs = []
                    for micro in range(cfg.grad_accum):
                        batch = next(stream)
                        loss = self.batch_loss(batch, micro)
                        (loss / cfg.grad_accum).backward()
                        micro_losses.append(loss.detach().float())  # read later: no GPU wait here
                        self.epoch, self.position = batch.epoch, batch.position + 1
                        if self.position >= per_epoch:
                            finished_epochs.append(self.epoch)
                            self.epoch, self.position = self.epoch + 1, 0
                    if self.hooks.sync_gradients:
                        self.hooks.sync_gradients(params)
                    if cfg.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    self.step += 1
                    self._unread_losses.append(micro_losses)
                    if len(self._unread_losses) >= LOSS_READ_EVERY:
                        self.read_losses()
                    if self.hooks.on_step:
                        self.hooks.on_step(
                            StepInfo(
                                self.step,
                                cfg.steps,
                                partial(self._loss_of, self.step),
                                scheduler.get_last_lr()[0],
                                self.epoch,
                                time.perf_counter() - started,
                            )
                        )
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint(optimizer, scheduler)
                    if cfg.validate_every_steps:
                        if self.step % cfg.validate_every_steps == 0:
                            self._validate(self.epoch)
                    else:
                        for e in finished_epochs:
                            if cfg.validate_every_epochs and (e + 1) % cfg.validate_every_epochs == 0:
                                self._validate(e)
                    if self.hooks.check_cancel and self.step < cfg.steps:
                        self.hooks.check_cancel()
                if self.validator is not None and (
                    not self.validation or self.validation[-1]["step"] != self.step
                ):
                    self._validate(self.epoch)
        except self.hooks.cancel_exceptions:
            self.save_checkpoint(optimizer, scheduler)
            raise
        except self.hooks.oom_exceptions as e:
            optimizer.zero_grad(set_to_none=True)
            raise RuntimeError(
                f"Out of memory at step {self.step + 1} ({e.__class__.__name__}). Try batch size 1, a smaller "
                "bucket scale (e.g. 0.5 for ~512 px buckets), gradient checkpointing on, fp8 base weights, or a "
                f"lower LoRA rank. Last checkpoint: {self.last_checkpoint or 'none'}."
            ) from e

        lora_path = None
        self.read_losses()
        if self.hooks.is_main_process:
            self.save_checkpoint(optimizer, scheduler)
            if self.lora_path is not None:
                lora_path = atomic_save_safetensors(
                    to_kohya_state_dict(self.model.adapters), self.lora_path, self._metadata()
                )
            atomic_write_text(self.run_dir / "loss_history.json", json.dumps(self.losses))
        return TrainResult(
            step=self.step,
            losses=self.losses,
            validation=self.validation,
            lora_path=lora_path,
            checkpoint=self.last_checkpoint,
            resumed_from=resumed_from,
            last_restored=self.last_restored,
        )
