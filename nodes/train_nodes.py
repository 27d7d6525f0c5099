"""The LoRA trainer node: parse inputs, hand everything to the library, report progress."""

from __future__ import annotations

import logging

from ..kontext_train import comfyui
from ..kontext_train.comfyui.host import check_writable
from ..kontext_train.comfyui.node_api import io, ui
from ..kontext_train.data.images import tensor_to_pil
from ..kontext_train.method.lora import sanitize_lora_name
from ..kontext_train.method.training_prompt import PROMPT_KEY, prompt_from_graph
from ..kontext_train.options import NO_LORA
from ..kontext_train.report.plots import image_grid
from ..kontext_train.train.progress_text import TrainingStatus
from ..kontext_train.train.run import RunHooks, RunOutputs, train_lora
from ..kontext_train.train.trainer import TrainConfig
from ..kontext_train.train.validation import format_validation_report, format_validation_row
from .common import (
    CATEGORY,
    LATENTS,
    LORA_MODEL,
    LOSS,
    input_validator,
    output,
    setting_input,
    setting_inputs,
    shown_text,
    trainer_problems,
)

log = logging.getLogger("kontext_restore")
DEFAULTS = TrainConfig()


def run_paths(lora_name: str):
    """(file name inside loras, path of the LoRA file, run folder for checkpoints)."""
    name = sanitize_lora_name(lora_name)
    lora_path = comfyui.lora_folder() / name
    run_dir = comfyui.output_folder() / "kontext_restore" / name[: -len(".safetensors")]
    # The name is sanitised; this catches a symlink in those folders that leads elsewhere.
    for path in (lora_path, run_dir):
        check_writable(path, "lora_name", lora_name)
    return name, lora_path, run_dir


def validation_preview(triples: list, max_rows: int = 4):
    """Up to ``max_rows`` held-out images as a grid: degraded | restored | clean."""
    rows = [[tensor_to_pil(t) for t in triple] for triple in triples[:max_rows]]
    return image_grid(rows, ["degraded", "restored", "clean"], cell=192)


class KontextRestoreTrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KontextRestoreTrainLoRA",
            display_name="Kontext Restore: Train LoRA",
            category=CATEGORY + "/training",
            description="Trains a restoration LoRA by flow matching between degraded and clean latents.",
            inputs=[
                io.Model.Input("model", tooltip="FLUX.1 Kontext [dev] from any loader (fp8 weights work)."),
                io.Conditioning.Input(
                    "conditioning",
                    tooltip="The restoration prompt from CLIPTextEncode; restore with the same prompt.",
                ),
                LATENTS.Input("latents", tooltip="The cached dataset from Kontext Restore: Cache Latents."),
                io.Vae.Input("vae", tooltip="Decodes the held-out restorations to score them (PSNR/SSIM)."),
                *setting_inputs(
                    "name",
                    "steps",
                    "learning_rate",
                    "rank",
                    "batch_size",
                    "grad_accum",
                    "warmup_steps",
                    "guidance",
                    "checkpoint_every",
                    "validate_every_epochs",
                    "formulation",
                    "seed",
                    "resume",
                ),
                *setting_inputs(
                    "alpha",
                    "lr_schedule",
                    "timestep_sampling",
                    "loss_weighting",
                    "bridge_noise",
                    "lora_targets",
                    "gradient_checkpointing",
                    "lora_dtype",
                    "validation_steps",
                    optional=True,
                ),
                # Issue 24's options (optional inputs, after the existing ones).
                *setting_inputs(
                    "optimizer",
                    "adapter",
                    "loss",
                    "validate_every_steps",
                    "checkpoint_loras",
                    optional=True,
                ),
                setting_input("init_lora_choice", [NO_LORA] + comfyui.lora_names(), optional=True),
            ],
            outputs=[
                output(io.Model, "model", "The input model with the trained LoRA applied."),
                output(io.String, "lora_name", "The LoRA file inside models/loras, for Restore Image."),
                output(LOSS, "loss", "Loss history and validation scores, for Loss Plot."),
                output(io.String, "validation_report", "Held-out scores at each validation."),
                # The trained LoRA as core Save LoRA Weights / Load LoRA Model take it (LORA_MODEL).
                output(
                    LORA_MODEL, "lora", "The trained LoRA, for core Save LoRA Weights or Load LoRA Model."
                ),
            ],
            # PROMPT: the queued workflow, to record the prompt text behind the conditioning.
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
            is_output_node=True,
        )

    validate_inputs = input_validator(
        "learning_rate",
        "guidance",
        "alpha",
        "bridge_noise",
        "formulation",
        "lr_schedule",
        "timestep_sampling",
        "loss_weighting",
        "lora_targets",
        "gradient_checkpointing",
        "lora_dtype",
        "optimizer",
        "adapter",
        "loss",
        "validate_every_steps",
        "init_lora_choice",
        also=("lora_name",),
        cross=trainer_problems,
    )

    @classmethod
    def execute(
        cls,
        model,
        conditioning,
        latents,
        vae,
        lora_name,
        steps,
        learning_rate,
        rank,
        batch_size,
        grad_accum,
        warmup_steps,
        guidance,
        checkpoint_every,
        validate_every_epochs,
        formulation,
        seed,
        resume,
        alpha=0.0,
        lr_schedule=DEFAULTS.lr_schedule,
        timestep_sampling=DEFAULTS.timestep_sampling,
        loss_weighting=DEFAULTS.loss_weighting,
        bridge_noise=DEFAULTS.bridge_noise,
        lora_targets=DEFAULTS.lora_targets,
        gradient_checkpointing=DEFAULTS.gradient_checkpointing,
        lora_dtype=DEFAULTS.lora_dtype,
        validation_steps=DEFAULTS.validation_steps,
        optimizer=DEFAULTS.optimizer,
        adapter=DEFAULTS.adapter,
        loss=DEFAULTS.loss,
        validate_every_steps=DEFAULTS.validate_every_steps,
        checkpoint_loras=DEFAULTS.checkpoint_loras,
        init_lora=NO_LORA,
    ) -> io.NodeOutput:
        comfyui.require_flux(model)
        config = TrainConfig.from_inputs(locals())  # inputs are named like its fields
        name, lora_path, run_dir = run_paths(lora_name)
        init_path = comfyui.find_lora_file(init_lora) if init_lora not in ("", NO_LORA) else None
        hidden = cls.hidden or io.HiddenHolder.from_dict(None)  # None when called outside ComfyUI
        progress = comfyui.NodeProgress(config.steps, hidden.unique_id)
        metadata = {"trained_with": "ComfyUI node KontextRestoreTrainLoRA"}
        prompt = prompt_from_graph(hidden.prompt, hidden.unique_id)
        if prompt is not None:  # unknown when the conditioning is not a text encoder's widget
            metadata[PROMPT_KEY] = prompt

        # Step, speed, time left and the run's events (resumed, checkpoints, validation) on the node.
        status = TrainingStatus(config.steps)

        def on_step(info):
            progress.update(info.step, status.on_step(info))

        def on_checkpoint(step, path):
            log.info("Kontext Restore: checkpoint saved at step %d (%s)", step, path)
            progress.update(step, status.on_checkpoint(step, path))

        def on_resumed(step, path):
            log.info("Kontext Restore: resumed from step %d (%s)", step, path)
            progress.update(step, status.on_resumed(step, path))

        def on_validation(row, images):
            log.info("Kontext Restore validation: %s", format_validation_row(row))
            # The held-out images (degraded | restored | clean) as the node's preview.
            progress.update(
                row["step"], status.on_validation(row), validation_preview(images) if images else None
            )

        result = train_lora(
            latents,
            model,
            conditioning,
            config,
            RunOutputs(lora_path, run_dir),
            vae=vae,
            resume=resume,
            hooks=RunHooks(
                on_step=on_step,
                on_validation=on_validation,
                on_checkpoint=on_checkpoint,
                on_resumed=on_resumed,
                on_message=lambda text: log.info("Kontext Restore: %s", text),
                check_cancel=comfyui.check_interrupted,
            ),
            metadata=metadata,
            init_lora=init_path,
        )
        progress.update(result.step, status.on_done(lora_path, result.step, result.already_complete))
        trained = comfyui.apply_lora(model, result.lora_state)
        report = format_validation_report(result.validation)
        if result.already_complete:
            report = (
                f"{name} was already trained to step {result.step}: nothing was trained or written. "
                "Raise steps to continue it, or choose another lora_name.\n" + report
            )
        loss = {"loss": result.losses, "validation": result.validation, "lora": name}
        report = shown_text(report)
        return io.NodeOutput(trained, name, loss, report, dict(result.lora_state), ui=ui.PreviewText(report))


NODES: list[type[io.ComfyNode]] = [KontextRestoreTrainLoRA]
