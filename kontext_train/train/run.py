"""One training run, prepared and run the same way by the Train LoRA node and ``kontext-train train``.

``train_lora`` takes the dataset with its latent cache, a ComfyUI Flux MODEL, the prompt's
conditioning, the settings and where to write, and does everything in between, in this order
(``open_run`` does steps 1-3 alone, so a caller that loads heavy weights can check first):

1. checks the file names the run will write fit the filesystem (``run_checks.check_output_names``);
2. takes the run folder's lock (``run_lock``): a second run on the same folder is refused;
3. fingerprints the dataset and decides between a new run, a resume and a finished run
   (``run_checks.plan_run``): a new run never overwrites an existing LoRA, a resume must be on the
   same data, a finished run is not trained or written again;
4. warms the latent cache (unless the cache node already did);
5. creates the LoRA training model on a clone of the MODEL, the validator and the LoRA metadata,
   trains, and releases the model in ``finally``.

The caller only turns its inputs into these arguments and the ``RunHooks`` into progress, cancel and
messages. In a data-parallel run (``dist``, launched by torchrun) rank 0 alone locks, checks,
warms the cache, validates and writes; every rank trains its slice of each batch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import comfyui
from ..data.batches import LatentBatches
from ..data.dataset import RestorationDataset
from ..method.lora import to_kohya_state_dict
from ..method.train_config import LORA_DTYPES, TrainConfig
from ..method.training_prompt import PROMPT_KEY
from .checkpoints import latest_checkpoint, load_state
from .distributed import (
    DataParallelTrainer,
    DistContext,
    all_equal,
    barrier,
    on_main_process,
    sync_gradients,
)
from .optimizers import require_optimizer
from .run_checks import RunError, check_output_names, check_resume_prompt, dataset_identity, plan_run
from .run_init import init_errors as _init_errors
from .run_init import init_state as _init_state
from .run_latents import CachedLatents, warm_cache
from .run_lock import RunLockedError, acquire, release
from .run_memory import check_run_memory, checkpointing_text
from .step_losses import StepInfo
from .trainer import Trainer, TrainerHooks, TrainResult
from .validation import Validator, items_from_dataset

__all__ = [
    "RunError",
    "RunHooks",
    "RunLockedError",
    "RunOutputs",
    "RunResult",
    "TrainingRun",
    "open_run",
    "train_lora",
]


@dataclass(frozen=True)
class RunOutputs:
    lora_path: Path  # the finished LoRA (its validation report goes beside it)
    run_dir: Path  # checkpoints, loss history and the lock


@dataclass
class RunHooks:
    """How the caller follows and steers a run. Every hook is optional."""

    on_step: Callable[[StepInfo], None] | None = None
    # (row of scores, [(degraded, restored, clean) images]) after each validation
    on_validation: Callable[[dict, list], None] | None = None
    on_message: Callable[[str], None] | None = None  # one line for the user (cache, resume, finished)
    on_cache_progress: Callable[[int, int], None] | None = None
    check_cancel: Callable[[], None] | None = None  # raises to cancel (ComfyUI's interrupt)
    on_cancelled: Callable[[int, Path | None], None] | None = None  # (step, checkpoint written)
    on_checkpoint: Callable[[int, Path], None] | None = None  # (step, checkpoint folder) when written
    on_resumed: Callable[[int, Path], None] | None = None  # (step, checkpoint) as training continues


@dataclass
class RunResult(TrainResult):
    lora_state: dict[str, torch.Tensor] = field(default_factory=dict)  # kohya tensors of the LoRA
    already_complete: bool = False  # the run was finished before: nothing trained or written
    train_seconds: float = 0.0


class TrainingRun:
    """A run folder that passed the checks and is locked (``open_run``); ``train`` it once.

    ``plan`` says what training will do: start (``plan.checkpoint`` None), continue from
    ``plan.checkpoint``, or nothing (``plan.complete``).
    """

    def __init__(self, dataset, data_seed, config, outputs, resume, ctx, on_message) -> None:
        self.dataset, self.data_seed, self.config = dataset, int(data_seed), config
        self.lora_path, self.run_dir = Path(outputs.lora_path), Path(outputs.run_dir)
        self.resume, self.ctx, self.on_message = resume, ctx, on_message
        check_output_names(self.lora_path, self.run_dir, config.steps)
        try:  # a missing optional package (prodigyopt, bitsandbytes) before anything is loaded
            require_optimizer(config.optimizer)
        except ValueError as e:
            raise RunError(str(e)) from None
        self._lock = on_main_process(ctx, lambda: acquire(self.run_dir))
        try:

            def check():
                identity = dataset_identity(dataset, data_seed)
                return identity, plan_run(self.run_dir, self.lora_path, resume, identity, config)

            self.identity, self.plan = on_main_process(ctx, check)
            latest = latest_checkpoint(self.run_dir)
            if not all_equal(ctx, latest.name if latest else None):
                raise RunError(
                    f"The processes see different checkpoints in {self.run_dir}: the run folder must be on "
                    "storage every process shares."
                )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Releases the lock (rank 0 holds it)."""
        if self._lock is not None and self.ctx.is_main:
            release(*self._lock)
        self._lock = None

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def train(
        self,
        latents: CachedLatents,
        model,
        conditioning,
        *,
        vae=None,
        hooks: RunHooks | None = None,
        metadata: Mapping[str, object] | None = None,
        base_model: str | None = None,
        init_lora: Path | None = None,
    ) -> RunResult:
        """Trains (or continues) the run on ``latents`` (the dataset and seed it was opened with).

        ``init_lora``: a LoRA file a new run starts from (``method/lora_init.py``); a resumed run
        takes its adapters' layout from its checkpoint instead, so the file is not read again.

        ``vae`` decodes validation restorations for PSNR/SSIM (None: latent scores only).
        ``metadata`` adds keys to the LoRA's metadata; the base model, dataset size, degradation,
        bucket scale, dataset fingerprint and batch sizes are recorded here.
        """
        hooks = hooks or RunHooks(on_message=self.on_message)
        if latents.dataset is not self.dataset or int(latents.seed) != self.data_seed:
            raise ValueError("train() needs the latents of the dataset and seed the run was opened with")
        if self.plan.complete:
            return _finished(self.plan, self.lora_path, self.config, hooks)
        comfyui.require_flux(model)
        if not latents.warmed:
            summary = on_main_process(
                self.ctx, lambda: warm_cache(latents, hooks.on_cache_progress, hooks.check_cancel)
            )
            _say(hooks, self.ctx, summary)
        name = base_model or comfyui.model_name(model)
        meta = _metadata(latents, self.config, self.identity, self.ctx, name, metadata)
        check_resume_prompt(self.plan, self.run_dir, meta.get(PROMPT_KEY))
        paths = (self.lora_path, self.run_dir)
        init = _init_state(self.plan.checkpoint if self.resume else None, init_lora)
        if init_lora is not None:
            meta["init_lora"] = Path(init_lora).name
        checkpointing = check_run_memory(
            model, latents, conditioning, self.config, lambda text: _say(hooks, self.ctx, text), self.ctx
        )
        meta["gradient_checkpointing"] = checkpointing_text(checkpointing, self.config)
        result = _train(
            latents, model, conditioning, self.config, paths, vae, self.resume, hooks, meta, self.ctx,
            checkpointing, init,
        )  # fmt: skip
        if result.resumed_from:
            _say(hooks, self.ctx, f"resumed from step {result.resumed_from} ({self.lora_path.name})")
        return result


def open_run(
    dataset: RestorationDataset,
    data_seed: int,
    config: TrainConfig,
    outputs: RunOutputs,
    *,
    resume: bool = True,
    dist: DistContext | None = None,
    on_message: Callable[[str], None] | None = None,
) -> TrainingRun:
    """Checks and locks a run before anything heavy is loaded (steps 1-3 of the module docstring).

    ``data_seed`` is the seed of the synthetic degradations (``CachedLatents.seed``). Raises
    ``RunError`` (a ValueError that says what to do) when the run must not start; no LoRA,
    checkpoint or cache entry is written then. Use as a context manager, or call ``close()``, to
    release the lock.
    """
    return TrainingRun(dataset, data_seed, config, outputs, resume, dist or DistContext(), on_message)


def train_lora(
    latents: CachedLatents,
    model,
    conditioning,
    config: TrainConfig,
    outputs: RunOutputs,
    *,
    vae=None,
    resume: bool = True,
    hooks: RunHooks | None = None,
    metadata: Mapping[str, object] | None = None,
    base_model: str | None = None,
    dist: DistContext | None = None,
    init_lora: Path | None = None,
) -> RunResult:
    """One training run from start to end: ``open_run`` then ``TrainingRun.train``, lock released
    at the end whatever happens. See those two for the arguments."""
    hooks = hooks or RunHooks()
    with open_run(
        latents.dataset, latents.seed, config, outputs, resume=resume, dist=dist, on_message=hooks.on_message
    ) as run:
        return run.train(
            latents,
            model,
            conditioning,
            vae=vae,
            hooks=hooks,
            metadata=metadata,
            base_model=base_model,
            init_lora=init_lora,
        )


def _say(hooks: RunHooks, ctx: DistContext, text: str) -> None:
    if hooks.on_message is not None and ctx.is_main:
        hooks.on_message(text)


def _metadata(latents, config, identity, ctx, base_model, extra) -> dict:
    dataset = latents.dataset
    return {
        "base_model": base_model,
        "dataset_size": len(dataset.train),
        "validation_size": len(dataset.val),
        "degradation": json.dumps(dataset.degradation.to_dict(), sort_keys=True),
        "bucket_scale": dataset.bucket_scale,
        "dataset": identity["description"],
        "dataset_fingerprint": identity["fingerprint"],
        "world_size": ctx.world_size,
        "global_batch": config.batch_size * ctx.world_size,
        **dict(extra or {}),
    }


def _finished(plan, lora_path: Path, config: TrainConfig, hooks: RunHooks) -> RunResult:
    from safetensors.torch import load_file

    state = load_state(plan.checkpoint)
    if hooks.on_message is not None:
        hooks.on_message(
            f"{lora_path.name} is already trained to step {plan.step} (steps {config.steps}): nothing was "
            "trained or written. Raise steps to continue it, or choose another LoRA name for a new run."
        )
    return RunResult(
        step=plan.step,
        losses=list(state.get("losses", [])),
        validation=list(state.get("validation", [])),
        lora_path=lora_path,
        checkpoint=plan.checkpoint,
        resumed_from=plan.step,
        lora_state=load_file(str(lora_path)),
        already_complete=True,
    )


def _train(
    latents, model, conditioning, config, paths, vae, resume, hooks, meta, ctx, checkpointing=True, init=None
) -> RunResult:
    dataset, cache = latents.dataset, latents.cache
    lora_path, run_dir = paths
    running: dict[str, Trainer] = {}

    def on_validation(row: dict) -> None:
        if hooks.on_validation is not None:
            hooks.on_validation(row, running["trainer"].last_restored)

    trainer_hooks = TrainerHooks(
        on_step=hooks.on_step,
        check_cancel=hooks.check_cancel,
        cancel_exceptions=comfyui.interrupt_exception_types(),
        oom_exceptions=comfyui.oom_exception_types(),
        on_validation=on_validation,
        on_checkpoint=hooks.on_checkpoint,
        on_resumed=hooks.on_resumed,
        sync_gradients=sync_gradients(ctx) if ctx.enabled else None,
        is_main_process=ctx.is_main,
    )
    # ComfyUI runs nodes under inference mode; LoRA parameters need autograd.
    with torch.inference_mode(False):
        with _init_errors(init):
            lora_model = comfyui.FluxLoraModel(
                model,
                rank=config.rank,
                alpha=config.lora_alpha,
                lora_dtype=LORA_DTYPES[config.lora_dtype],
                targets=config.lora_targets,
                gradient_checkpointing=checkpointing,
                seed=config.seed,
                adapter=config.adapter,
                init_state=init[0] if init else None,
                init_source=init[1] if init else "",
            )
        info = lora_model.init_info
        if info is not None:  # the file's rank and alpha, whatever the settings say
            meta.update({"ss_network_dim": str(max(info.ranks)), "ss_network_alpha": str(max(info.alphas))})
            if not init[2]:
                _say(hooks, ctx, f"LoRA adapters from {init[1]}: {info.describe()}")
        try:
            validator = None
            validates = config.validate_every_steps or config.validate_every_epochs
            if ctx.is_main and dataset.val and validates:
                validator = Validator(
                    items_from_dataset(dataset, cache, latents.seed),
                    decode=(lambda z: comfyui.vae_decode(vae, z)) if vae is not None else None,
                    seed=config.seed,
                )
            batches = LatentBatches(
                dataset, cache, config.batch_size, latents.seed, rank=ctx.rank, world_size=ctx.world_size
            )
            args = (
                config,
                lora_model,
                batches,
                lora_model.prepare_conditioning(conditioning),
                run_dir,
                lora_path,
            )
            kwargs = dict(
                metadata=meta,
                validator=validator,
                hooks=trainer_hooks,
                dataset_identity={
                    "fingerprint": meta["dataset_fingerprint"],
                    "description": meta["dataset"],
                    **({"prompt": meta[PROMPT_KEY]} if meta.get(PROMPT_KEY) else {}),
                },
                checkpoint_lora_dir=lora_path.with_suffix(""),
            )
            trainer = (
                DataParallelTrainer(*args, **kwargs, dist_context=ctx)
                if ctx.enabled
                else Trainer(*args, **kwargs)
            )
            running["trainer"] = trainer
            started = time.perf_counter()
            try:
                result = trainer.run(resume=resume)
            except trainer_hooks.cancel_exceptions:
                if hooks.on_cancelled is not None:
                    hooks.on_cancelled(trainer.step, trainer.last_checkpoint)
                raise
            seconds = time.perf_counter() - started
            lora_state = to_kohya_state_dict(lora_model.adapters)
        finally:
            lora_model.release()
    barrier(ctx)
    return RunResult(**vars(result), lora_state=lora_state, train_seconds=seconds)
