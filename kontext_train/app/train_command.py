"""`kontext-train train` (and `demo`): a training run from the command line, with console progress and
the closing report."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from ..files.atomic import atomic_write_text
from ..method.training_prompt import PROMPT_KEY
from .demo import DEMO_RESTORE_SEEDS
from .report import demo_real_command, render_report
from .restore_command import evaluate_samples, lora_restore_settings, patched_with_lora, write_evaluation
from .runtime import (
    _save_png,
    _say,
    build_run_dataset,
    check_output_dir,
    load_pipeline,
    locate_comfyui,
    main_first,
    prepare_output_dir,
    removed_if_failed_empty,
    resolve_weights,
    train_config,
)
from .settings import (
    PROG,
    WEIGHT_KEYS,
    Settings,
    UsageError,
)

log = logging.getLogger("kontext_restore")


class ConsoleProgress:
    """tqdm on a terminal; otherwise one line every ``every`` steps (logs, CI, torchrun). A resumed
    run's first step sets where the bar starts."""

    def __init__(self, total: int, every: int, enabled: bool) -> None:
        self.total, self.every, self.enabled = total, max(1, every), enabled
        self.started = time.perf_counter()
        self.start_step: int | None = None
        self.bar = None

    def _begin(self, info) -> None:
        self.start_step = info.step - 1
        self.started = time.perf_counter() - info.seconds_per_step
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=self.total,
                    initial=self.start_step,
                    desc="training",
                    unit="step",
                    dynamic_ncols=True,
                )
            except ImportError:
                self.bar = None

    def update(self, info) -> None:
        if not self.enabled:
            return
        if self.start_step is None:
            self._begin(info)
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
            self.bar = None


def cmd_train(settings: Settings, ctx) -> int:
    from ..method.lora import sanitize_lora_name

    wall_start = time.perf_counter()
    if settings.demo and settings.is_main:
        _say(
            "Offline demo: the pretrained stand-in (a tiny Flux and a photo VAE that ship with the pack) on "
            "bundled sample photos (no weights needed)."
        )
    config = train_config(settings)
    try:
        name = sanitize_lora_name(settings.name)
    except ValueError as e:
        raise UsageError(f"--name: {e}") from None
    # The checks, cheapest first and before anything is written: the output folder, ComfyUI, every
    # model file (all missing ones in one error), then the dataset scan.
    out = check_output_dir(settings.output_dir)
    locate_comfyui(settings)
    tiny_model = settings.demo and not any(settings.values.get(k) for k in WEIGHT_KEYS)
    weights = None if tiny_model else resolve_weights(settings)
    with removed_if_failed_empty(out, enabled=settings.is_main):
        return _train_alone(settings, ctx, config, out, out / name, weights, wall_start)


def _train_alone(
    settings: Settings, ctx, config, out: Path, lora_path: Path, weights, wall_start: float
) -> int:
    """``_train`` holding OUTPUT_DIR's lock (the main process): the report, plots, samples and
    latent cache there are written by one run at a time, whatever its LoRA name."""
    from ..train.run_lock import RunLockedError, acquire, release

    try:
        # The lock lives in OUTPUT_DIR: create and prove it writable first (a one-line error).
        lock = acquire(prepare_output_dir(out)) if settings.is_main else None
    except RunLockedError as e:
        raise UsageError(str(e)) from None
    try:
        return _train(settings, ctx, config, out, lora_path, weights, wall_start)
    finally:
        if lock is not None:
            release(*lock)


def run_folder(out: Path, lora_name: str) -> Path:
    """The run folder of LoRA ``lora_name`` (sanitised) in OUTPUT_DIR: its checkpoints, loss
    history and lock. One per name, as the node keeps one per name in ComfyUI's output folder: a
    new ``--name`` in the same OUTPUT_DIR starts its own run instead of continuing another's."""
    return Path(out) / "runs" / lora_name[: -len(".safetensors")]


def check_earlier_layout(out: Path, run_dir: Path) -> None:
    """UsageError when OUTPUT_DIR holds checkpoints where earlier versions kept the one run of the
    folder (``OUTPUT_DIR/checkpoints``) and this name has no run folder yet: whose run it is cannot
    be told, and it must neither be continued under another name nor silently left behind."""
    from ..train.checkpoints import latest_checkpoint

    old = latest_checkpoint(out)
    if old is None or latest_checkpoint(run_dir) is not None:
        return
    raise UsageError(
        f"{out / 'checkpoints'} holds a run in the layout of an earlier version (one run per output folder, "
        f"latest {old.name}); runs are now kept per LoRA name in {out / 'runs'}. To continue that run as "
        f"{run_dir.name}, move {out / 'checkpoints'} (and {out / 'loss_history.json'}) into {run_dir}/; "
        "for a new LoRA, choose another --output-dir."
    )


def _train(settings: Settings, ctx, config, out: Path, lora_path: Path, weights, wall_start: float) -> int:
    from ..train.run import RunError, RunHooks, RunOutputs, open_run
    from ..train.run_latents import latents_from_vae
    from ..train.step_losses import NonFiniteLossError
    from ..train.validation import format_validation_row

    if not settings.demo:  # a real dataset is scanned before OUTPUT_DIR is created
        dataset = build_run_dataset(settings, out, ctx)
    main_first(ctx, lambda: prepare_output_dir(out))
    if settings.demo:  # the demo's photos are exported into OUTPUT_DIR/demo_images
        dataset = build_run_dataset(settings, out, ctx)
    if settings.is_main:
        _say(dataset.summary())
    say = _say if settings.is_main else (lambda text: None)
    run_dir = run_folder(out, lora_path.relative_to(out).as_posix())
    check_earlier_layout(out, run_dir)
    try:
        run = open_run(
            dataset,
            settings.seed,
            config,
            RunOutputs(lora_path, run_dir),
            resume=settings.resume,
            dist=ctx,
            on_message=say,
        )
    except RunError as e:
        raise UsageError(str(e)) from None
    with run:
        pipe = load_pipeline(settings, weights)  # after the checks: loading real weights takes minutes
        cache_dir = Path(settings.cache_dir).expanduser() if settings.cache_dir else out / "latent_cache"
        latents = latents_from_vae(
            dataset, pipe.vae, cache_dir, settings.control_mode, settings.pool_size, settings.seed
        )
        progress = ConsoleProgress(config.steps, settings.log_every, settings.is_main)

        def on_cancelled(step: int, saved: Path | None) -> None:
            progress.close()
            if settings.is_main:
                print(
                    f"{PROG}: interrupted at step {step}; "
                    + (f"checkpoint {saved} saved. " if saved else "no checkpoint yet (step 0). ")
                    + "Run the same command again to resume.",
                    file=sys.stderr,
                    flush=True,
                )

        hooks = RunHooks(
            on_step=progress.update,
            on_validation=lambda row, images: say("validation: " + format_validation_row(row)),
            on_message=say,
            on_cancelled=on_cancelled,
        )
        if settings.is_main and not run.plan.complete:
            where = f"{ctx.world_size} processes ({ctx.backend}), " if ctx.enabled else ""
            _say(
                f"training {pipe.description} on {where}{getattr(pipe.model, 'load_device', ctx.device)}: {config.steps} steps, batch "
                f"{config.batch_size * ctx.world_size}, rank {config.rank}, lr {config.learning_rate:g} -> {out}"
            )
        trained_with = "kontext-train " + settings.command + (" (demo)" if settings.demo else "")
        try:
            result = run.train(
                latents,
                pipe.model,
                pipe.conditioning,
                vae=pipe.vae,
                hooks=hooks,
                metadata={"trained_with": trained_with, PROMPT_KEY: settings.prompt},
                base_model=pipe.base_model,
                init_lora=Path(settings.init_lora).expanduser() if settings.init_lora else None,
            )
        except KeyboardInterrupt:
            return 130
        except RunError as e:  # an init_lora file that cannot be continued
            raise UsageError(str(e)) from None
        except NonFiniteLossError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
            return 1
        finally:
            progress.close()
    if not settings.is_main:
        return 0
    _say(f"LoRA: {result.lora_path}")

    from ..report.plots import render_loss_plot

    metric = "psnr"
    plot = render_loss_plot(result.losses, validation=result.validation or None, validation_metric=metric)
    _save_png(plot, out / "loss.png")

    ev, seed_evs = None, []
    if dataset.val:
        rs = lora_restore_settings(result.lora_path, settings)
        samples_eval = dataset.val[: settings.eval_count]
        # The demo restores with several seeds and reports mean and spread; a real run with its own.
        seeds = DEMO_RESTORE_SEEDS if pipe.demo else (rs.seed,)
        _say(
            f"restoring {len(samples_eval)} held-out image(s) with ComfyUI's {settings.sampler} sampler, {rs.steps} steps"
            + (f", seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else "")
            + " ..."
        )
        with patched_with_lora(pipe, result.lora_state) as patched:
            for seed in seeds:
                seed_evs.append(
                    evaluate_samples(pipe, patched, dataset, samples_eval, rs.with_seed(seed), settings)
                )
        ev = seed_evs[0]
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
        result.train_seconds,
        time.perf_counter() - wall_start,
        seed_evs if len(seed_evs) > 1 else (),
    )
    atomic_write_text(out / "report.md", report)
    _say(f"report: {out / 'report.md'}  (total {time.perf_counter() - wall_start:.1f} s)")
    if pipe.demo:
        _say(
            "Real training: put your photos in HR_ROOT and the weights in place, then run\n"
            + demo_real_command(settings, out)
        )
    return 0
