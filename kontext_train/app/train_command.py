"""`kontext-train train` (and `demo`): a training run from the command line, with console progress and
the closing report."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch

from ..atomic import atomic_write_text
from .report import format_validation_row, render_report
from .restore_command import evaluate_samples, lora_restore_settings, patched_with_lora, write_evaluation
from .runtime import (
    _save_png,
    _say,
    build_run_dataset,
    load_pipeline,
    locate_comfyui,
    main_first,
    prepare_output_dir,
    train_config,
)
from .settings import (
    PROG,
    Settings,
    UsageError,
)

log = logging.getLogger("kontext_restore")


class ConsoleProgress:
    """tqdm on a terminal; otherwise one line every ``every`` steps (logs, CI, torchrun)."""

    def __init__(self, total: int, start: int, every: int, enabled: bool) -> None:
        self.total, self.every, self.enabled = total, max(1, every), enabled
        self.started = time.perf_counter()
        self.start_step = start
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, desc="training", unit="step", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, info) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = info.step
            self.bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}", refresh=False)
            self.bar.refresh()
            return
        if info.step % self.every == 0 or info.step == info.total:
            done = info.step - self.start_step
            elapsed = time.perf_counter() - self.started
            rate = elapsed / done if done else 0.0
            eta = rate * (info.total - info.step)
            _say(
                f"step {info.step}/{info.total}  loss {info.loss:.4f}  lr {info.lr:.2e}  "
                f"{rate:.3f} s/step  ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _notice_demo(settings: Settings) -> None:
    if not settings.is_main:
        return
    if settings.command == "train":
        _say(
            "No Kontext model given (--unet / KONTEXT_UNET): running the offline DEMO with a tiny random "
            "model on bundled sample photos. Give --unet, --clip-l, --t5xxl and --vae for real training."
        )
    else:
        _say(
            "Offline demo: tiny random Flux model + random VAE on bundled sample photos (no weights needed)."
        )


def cmd_train(settings: Settings, ctx) -> int:
    from .. import comfyui
    from ..batches import LatentBatches
    from ..checkpoints import latest_checkpoint, list_checkpoints
    from ..distributed import DataParallelTrainer, all_equal, barrier, sync_gradients
    from ..latent_cache import LatentCache
    from ..lora import sanitize_lora_name, to_kohya_state_dict
    from ..trainer import LORA_DTYPES, NonFiniteLossError, Trainer, TrainerHooks
    from ..validation import Validator, items_from_dataset

    wall_start = time.perf_counter()
    if settings.demo:
        _notice_demo(settings)
    config = train_config(settings)
    out = (
        main_first(ctx, lambda: prepare_output_dir(settings.output_dir))
        or Path(settings.output_dir).expanduser().absolute()
    )
    try:
        name = sanitize_lora_name(settings.name)
    except ValueError as e:
        raise UsageError(f"--name: {e}") from None
    lora_path = out / name
    existing = latest_checkpoint(out)
    if not settings.resume and (list_checkpoints(out) or lora_path.exists()):
        raise UsageError(
            f"OUTPUT_DIR {out} already holds a run ({existing or lora_path}); --no-resume does not overwrite it. "
            "Resume it (drop --no-resume) or choose another --output-dir."
        )
    if not all_equal(ctx, existing.name if existing else None):
        raise UsageError(
            f"the processes see different checkpoints in {out}: OUTPUT_DIR must be on storage every process shares"
        )
    locate_comfyui(settings)  # fail fast, before the dataset is scanned
    dataset = build_run_dataset(settings, out, ctx)
    if settings.is_main:
        _say(dataset.summary())
    pipe = load_pipeline(settings)
    cache_dir = Path(settings.cache_dir).expanduser() if settings.cache_dir else out / "latent_cache"
    cache = LatentCache(
        cache_dir,
        vae_id=comfyui.vae_identity(pipe.vae),
        encode=lambda images: comfyui.vae_encode(pipe.vae, images),
        control_mode=settings.control_mode,
        pool_size=settings.pool_size,
    )
    samples = dataset.train + dataset.val

    def warm_cache() -> None:
        t = time.perf_counter()
        for sample in samples:
            cache.target(dataset, sample)
            if settings.control_mode == "pool" or not dataset.degradation.is_random:
                cache.control(dataset, sample, 0, settings.seed)
        _say(
            f"latent cache {cache_dir}: {len(samples)} images in {time.perf_counter() - t:.1f} s {cache.stats}"
        )

    main_first(ctx, warm_cache)

    hooks_progress = ConsoleProgress(
        config.steps,
        int(existing.name.split("_")[1]) if existing and settings.resume else 0,
        settings.log_every,
        settings.is_main,
    )
    hooks = TrainerHooks(
        on_step=hooks_progress.update,
        cancel_exceptions=(KeyboardInterrupt,),
        oom_exceptions=comfyui.oom_exception_types(),
        on_validation=(lambda row: _say("validation: " + format_validation_row(row)))
        if settings.is_main
        else None,
        sync_gradients=sync_gradients(ctx) if ctx.enabled else None,
        is_main_process=settings.is_main,
    )
    metadata = {
        "base_model": pipe.base_model,
        "dataset_size": len(dataset.train),
        "validation_size": len(dataset.val),
        "degradation": json.dumps(dataset.degradation.to_dict(), sort_keys=True),
        "bucket_scale": dataset.bucket_scale,
        "world_size": ctx.world_size,
        "global_batch": config.batch_size * ctx.world_size,
        "trained_with": "kontext-train " + (settings.command + (" (demo)" if settings.demo else "")),
    }
    with torch.inference_mode(False):
        lora_model = comfyui.FluxLoraModel(
            pipe.model,
            rank=config.rank,
            alpha=config.lora_alpha,
            lora_dtype=LORA_DTYPES[config.lora_dtype],
            targets=config.lora_targets,
            gradient_checkpointing=config.gradient_checkpointing,
            seed=config.seed,
        )
        validator = None
        if settings.is_main and dataset.val and config.validate_every_epochs:
            validator = Validator(
                items_from_dataset(dataset, cache, settings.seed),
                decode=lambda z: comfyui.vae_decode(pipe.vae, z),
                seed=settings.seed,
            )
        trainer_cls = DataParallelTrainer if ctx.enabled else Trainer
        extra = {"dist_context": ctx} if ctx.enabled else {}
        trainer = trainer_cls(
            config,
            lora_model,
            LatentBatches(
                dataset, cache, config.batch_size, settings.seed, rank=ctx.rank, world_size=ctx.world_size
            ),
            lora_model.prepare_conditioning(pipe.conditioning),
            out,
            lora_path,
            metadata=metadata,
            validator=validator,
            hooks=hooks,
            **extra,
        )
        if settings.is_main:
            where = f"{ctx.world_size} processes ({ctx.backend}), " if ctx.enabled else ""
            _say(
                f"training {pipe.description} on {where}{lora_model.device}: {config.steps} steps, batch "
                f"{config.batch_size * ctx.world_size}, rank {config.rank}, lr {config.learning_rate:g} -> {out}"
            )
        train_start = time.perf_counter()
        try:
            result = trainer.run(resume=settings.resume)
        except KeyboardInterrupt:
            hooks_progress.close()
            saved = trainer.last_checkpoint
            if settings.is_main:
                print(
                    f"{PROG}: interrupted at step {trainer.step}; "
                    + (f"checkpoint {saved} saved. " if saved else "no checkpoint yet (step 0). ")
                    + "Run the same command again to resume.",
                    file=sys.stderr,
                    flush=True,
                )
            return 130
        except NonFiniteLossError as e:
            hooks_progress.close()
            print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
            return 1
        finally:
            hooks_progress.close()
        train_seconds = time.perf_counter() - train_start
        lora_state = to_kohya_state_dict(lora_model.adapters)
        lora_model.release()
    barrier(ctx)
    if not settings.is_main:
        return 0
    if result.resumed_from:
        _say(f"resumed from step {result.resumed_from}")
    _say(f"LoRA: {result.lora_path}")

    from ..plots import render_loss_plot

    loss_png = out / "loss.png"
    _save_png(render_loss_plot(result.losses, validation=result.validation or None), loss_png)

    ev = None
    if dataset.val:
        rs = lora_restore_settings(result.lora_path, settings)
        samples_eval = dataset.val[: settings.eval_count]
        _say(
            f"restoring {len(samples_eval)} held-out image(s) with ComfyUI's {settings.sampler} sampler, {rs.steps} steps ..."
        )
        ev = evaluate_samples(pipe, patched_with_lora(pipe, lora_state), dataset, samples_eval, rs, settings)
        write_evaluation(ev, out)
        _say(ev.scores.table())
    report = render_report(
        settings,
        ctx,
        pipe,
        dataset,
        config,
        result,
        ev,
        out,
        lora_path,
        train_seconds,
        time.perf_counter() - wall_start,
    )
    atomic_write_text(out / "report.md", report)
    _say(f"report: {out / 'report.md'}  (total {time.perf_counter() - wall_start:.1f} s)")
    return 0
