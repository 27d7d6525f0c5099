"""The LoRA trainer node: parse inputs, hand everything to the library, report progress."""

from __future__ import annotations

import logging

import torch

from ..kontext_train import comfyui
from ..kontext_train.batches import LatentBatches
from ..kontext_train.checkpoints import list_checkpoints
from ..kontext_train.flow import FORMULATIONS, LOSS_WEIGHTING, TIMESTEP_SAMPLING
from ..kontext_train.images import tensor_to_pil
from ..kontext_train.lora import TARGET_SETS, sanitize_lora_name, to_kohya_state_dict
from ..kontext_train.plots import image_grid
from ..kontext_train.trainer import LORA_DTYPES, LR_SCHEDULES, TrainConfig, Trainer, TrainerHooks
from ..kontext_train.validation import Validator, items_from_dataset
from .common import CATEGORY, LATENTS, LOSS, SEED

log = logging.getLogger("kontext_restore")
DEFAULTS = TrainConfig()


def run_paths(lora_name: str):
    """(file name inside loras, path of the LoRA file, run folder for checkpoints)."""
    name = sanitize_lora_name(lora_name)
    lora_path = comfyui.lora_folder() / name
    run_dir = comfyui.output_folder() / "kontext_restore" / name[: -len(".safetensors")]
    return name, lora_path, run_dir


def format_validation(rows: list[dict]) -> str:
    if not rows:
        return "No validation ran (no held-out images, or validation off)."
    lines = ["step  epoch  latent MSE restored/degraded   PSNR restored/degraded   SSIM restored/degraded"]
    for r in rows:
        psnr = f"{r['psnr_restored']:.2f}/{r['psnr_degraded']:.2f}" if "psnr_restored" in r else "n/a"
        ssim = f"{r['ssim_restored']:.4f}/{r['ssim_degraded']:.4f}" if "ssim_restored" in r else "n/a"
        lines.append(
            f"{r['step']:>5} {r['epoch']:>5}   {r['latent_mse_restored']:.5f}/{r['latent_mse_degraded']:.5f}"
            f"              {psnr:>13}            {ssim:>15}"
        )
    return "\n".join(lines)


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
        if not resume and list_checkpoints(run_dir):
            raise ValueError(
                f"A run named {name!r} already has checkpoints in {run_dir}. Turn 'resume' on to continue it, "
                "or choose another lora_name (nothing was overwritten)."
            )
        dataset, cache = latents.dataset, latents.cache
        progress = comfyui.NodeProgress(config.steps, unique_id)
        running = {}

        def on_step(info):
            progress.update(
                info.step, f"step {info.step}/{info.total}  loss {info.loss:.4f}  lr {info.lr:.2e}"
            )

        def on_validation(row):
            log.info("Kontext Restore validation: %s", row)
            # The held-out images (degraded | restored | clean) as the node's preview.
            images = running["trainer"].last_restored
            text = f"validation at step {row['step']}: " + format_validation([row]).splitlines()[-1].strip()
            progress.update(row["step"], text, validation_preview(images) if images else None)

        hooks = TrainerHooks(
            on_step=on_step,
            check_cancel=comfyui.check_interrupted,
            cancel_exceptions=comfyui.interrupt_exception_types(),
            oom_exceptions=comfyui.oom_exception_types(),
            on_validation=on_validation,
        )
        with torch.inference_mode(False):
            lora_model = comfyui.FluxLoraModel(
                model,
                rank=config.rank,
                alpha=config.lora_alpha,
                lora_dtype=LORA_DTYPES[config.lora_dtype],
                targets=config.lora_targets,
                gradient_checkpointing=config.gradient_checkpointing,
                seed=seed,
            )
            try:
                validator = None
                if dataset.val and config.validate_every_epochs:
                    validator = Validator(
                        items_from_dataset(dataset, cache, latents.seed),
                        decode=lambda z: comfyui.vae_decode(vae, z),
                        seed=seed,
                    )
                trainer = Trainer(
                    config,
                    lora_model,
                    LatentBatches(dataset, cache, config.batch_size, latents.seed),
                    lora_model.prepare_conditioning(conditioning),
                    run_dir,
                    lora_path,
                    metadata={
                        "base_model": comfyui.model_name(model),
                        "dataset_size": len(dataset.train),
                        "validation_size": len(dataset.val),
                        "degradation": dataset.degradation.to_dict(),
                        "bucket_scale": dataset.bucket_scale,
                    },
                    validator=validator,
                    hooks=hooks,
                )
                running["trainer"] = trainer
                result = trainer.run(resume=resume)
                lora_state = to_kohya_state_dict(lora_model.adapters)
            finally:
                lora_model.release()
        trained = comfyui.apply_lora(model, lora_state)
        report = format_validation(result.validation)
        loss = {"loss": result.losses, "validation": result.validation, "lora": name}
        return {"ui": {"text": [report]}, "result": (trained, name, loss, report)}


NODE_CLASS_MAPPINGS = {"KontextRestoreTrainLoRA": KontextRestoreTrainLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"KontextRestoreTrainLoRA": "Kontext Restore: Train LoRA"}
