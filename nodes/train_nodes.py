"""The LoRA trainer node: parse inputs, hand everything to the library, report progress."""

from __future__ import annotations

import logging

from ..kontext_train import comfyui
from ..kontext_train.flow import FORMULATIONS, LOSS_WEIGHTING, TIMESTEP_SAMPLING
from ..kontext_train.images import tensor_to_pil
from ..kontext_train.lora import TARGET_SETS, sanitize_lora_name
from ..kontext_train.plots import image_grid
from ..kontext_train.run import RunHooks, RunOutputs, train_lora
from ..kontext_train.trainer import LORA_DTYPES, LR_SCHEDULES, TrainConfig
from ..kontext_train.validation import format_validation_report, format_validation_row
from .common import CATEGORY, LATENTS, LOSS, SEED

log = logging.getLogger("kontext_restore")
DEFAULTS = TrainConfig()


def run_paths(lora_name: str):
    """(file name inside loras, path of the LoRA file, run folder for checkpoints)."""
    name = sanitize_lora_name(lora_name)
    lora_path = comfyui.lora_folder() / name
    run_dir = comfyui.output_folder() / "kontext_restore" / name[: -len(".safetensors")]
    return name, lora_path, run_dir


def validation_preview(triples: list, max_rows: int = 4):
    """Up to ``max_rows`` held-out images as a grid: degraded | restored | clean."""
    rows = [[tensor_to_pil(t) for t in triple] for triple in triples[:max_rows]]
    return image_grid(rows, ["degraded", "restored", "clean"], cell=192)


class KontextRestoreTrainLoRA:
    @classmethod
    def INPUT_TYPES(cls):
        d = DEFAULTS
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "FLUX.1 Kontext [dev] from any loader (fp8 weights work)"}),
                "conditioning": ("CONDITIONING", {"tooltip": "The restoration prompt, from CLIPTextEncode"}),
                "latents": (LATENTS,),
                "vae": ("VAE", {"tooltip": "Decodes validation restorations for PSNR/SSIM"}),
                "lora_name": ("STRING", {"default": "kontext_restore"}),
                "steps": ("INT", {"default": d.steps, "min": 1, "max": 1_000_000}),
                "learning_rate": (
                    "FLOAT",
                    {"default": d.learning_rate, "min": 1e-7, "max": 1.0, "step": 1e-5},
                ),
                "rank": ("INT", {"default": d.rank, "min": 1, "max": 256}),
                "batch_size": ("INT", {"default": d.batch_size, "min": 1, "max": 64}),
                "grad_accum": ("INT", {"default": d.grad_accum, "min": 1, "max": 256}),
                "warmup_steps": ("INT", {"default": d.warmup_steps, "min": 0, "max": 100_000}),
                "guidance": ("FLOAT", {"default": d.guidance, "min": 0.0, "max": 10.0, "step": 0.1}),
                "checkpoint_every": ("INT", {"default": d.checkpoint_every, "min": 0, "max": 100_000}),
                "validate_every_epochs": (
                    "INT",
                    {"default": d.validate_every_epochs, "min": 0, "max": 10_000},
                ),
                "formulation": (list(FORMULATIONS), {"default": d.formulation}),
                "seed": SEED,
                "resume": (
                    "BOOLEAN",
                    {"default": True, "tooltip": "Continue from the latest checkpoint of this LoRA name"},
                ),
            },
            "optional": {
                "alpha": (
                    "FLOAT",
                    {"default": 0.0, "min": 0.0, "max": 1024.0, "tooltip": "0 means alpha = rank"},
                ),
                "lr_schedule": (list(LR_SCHEDULES), {"default": d.lr_schedule}),
                "timestep_sampling": (list(TIMESTEP_SAMPLING), {"default": d.timestep_sampling}),
                "loss_weighting": (list(LOSS_WEIGHTING), {"default": d.loss_weighting}),
                "bridge_noise": ("FLOAT", {"default": d.bridge_noise, "min": 0.0, "max": 1.0, "step": 0.01}),
                "lora_targets": (list(TARGET_SETS), {"default": d.lora_targets}),
                "gradient_checkpointing": ("BOOLEAN", {"default": d.gradient_checkpointing}),
                "lora_dtype": (list(LORA_DTYPES), {"default": d.lora_dtype}),
                "validation_steps": ("INT", {"default": d.validation_steps, "min": 1, "max": 100}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("MODEL", "STRING", LOSS, "STRING")
    RETURN_NAMES = ("model", "lora_name", "loss", "validation_report")
    FUNCTION = "train"
    CATEGORY = CATEGORY + "/training"
    OUTPUT_NODE = True
    DESCRIPTION = "Trains a restoration LoRA by flow matching between degraded and clean latents."

    def train(
        self,
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
        unique_id=None,
    ):
        comfyui.require_flux(model)
        config = TrainConfig(
            steps=steps,
            learning_rate=learning_rate,
            rank=rank,
            alpha=alpha or None,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lr_schedule=lr_schedule,
            warmup_steps=warmup_steps,
            guidance=guidance,
            checkpoint_every=checkpoint_every,
            validate_every_epochs=validate_every_epochs,
            validation_steps=validation_steps,
            seed=seed,
            formulation=formulation,
            bridge_noise=bridge_noise,
            timestep_sampling=timestep_sampling,
            loss_weighting=loss_weighting,
            lora_targets=lora_targets,
            gradient_checkpointing=gradient_checkpointing,
            lora_dtype=lora_dtype,
        )
        name, lora_path, run_dir = run_paths(lora_name)
        progress = comfyui.NodeProgress(config.steps, unique_id)

        def on_step(info):
            progress.update(
                info.step, f"step {info.step}/{info.total}  loss {info.loss:.4f}  lr {info.lr:.2e}"
            )

        def on_validation(row, images):
            log.info("Kontext Restore validation: %s", row)
            # The held-out images (degraded | restored | clean) as the node's preview.
            text = f"validation at {format_validation_row(row)}"
            progress.update(row["step"], text, validation_preview(images) if images else None)

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
                on_message=lambda text: log.info("Kontext Restore: %s", text),
                check_cancel=comfyui.check_interrupted,
            ),
            metadata={"trained_with": "ComfyUI node KontextRestoreTrainLoRA"},
        )
        trained = comfyui.apply_lora(model, result.lora_state)
        report = format_validation_report(result.validation)
        if result.already_complete:
            report = (
                f"{name} was already trained to step {result.step}: nothing was trained or written. "
                "Raise steps to continue it, or choose another lora_name.\n" + report
            )
        loss = {"loss": result.losses, "validation": result.validation, "lora": name}
        return {"ui": {"text": [report]}, "result": (trained, name, loss, report)}


NODE_CLASS_MAPPINGS = {"KontextRestoreTrainLoRA": KontextRestoreTrainLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"KontextRestoreTrainLoRA": "Kontext Restore: Train LoRA"}
