"""Restoration with a trained LoRA: one all-in-one node, and the pieces for SamplerCustomAdvanced."""

from __future__ import annotations

import logging

import torch

from ..kontext_train import comfyui
from ..kontext_train.images import comfy_image_to_tensors, tensors_to_comfy_image
from ..kontext_train.restore import MAX_MEGAPIXELS, TILE_BELOW_SCALE, RestoreProgress, restore_images
from ..kontext_train.restore_settings import (
    AS_TRAINED,
    LoraRecord,
    as_trained_sigmas,
    read_lora_record,
    resolve_restore_settings,
)
from .common import CATEGORY, SEED, number_validator, setting_input, setting_inputs, socket

log = logging.getLogger("kontext_restore")


def _latent_samples(latent) -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or samples.is_nested:
        raise ValueError(
            "The LATENT input has no (batch, channels, h, w) 'samples' tensor; connect 'VAE Encode' of the "
            "degraded image."
        )
    return samples


class KontextRestoreRestore:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": socket(
                    "MODEL",
                    "Kontext with the restoration LoRA applied (LoraLoaderModelOnly or the trainer's MODEL).",
                ),
                "vae": socket("VAE", "The Flux VAE: encodes the degraded images and decodes the result."),
                "conditioning": socket("CONDITIONING", "The restoration prompt, the same as in training."),
                "images": socket("IMAGE", "The degraded images to restore."),
                "mode": setting_input("mode"),
                "steps": setting_input("restore_steps"),
                "guidance": setting_input("guidance"),
                "sampler_name": setting_input("sampler", comfyui.sampler_names()),
                "scheduler": setting_input("scheduler", [AS_TRAINED] + comfyui.scheduler_names()),
                "seed": SEED,
                "bucket_scale": setting_input("bucket_scale"),
            },
            "optional": setting_inputs("restore_lora"),
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    VALIDATE_INPUTS = number_validator("guidance", "bucket_scale")

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "restore"
    CATEGORY = CATEGORY + "/restore"
    DESCRIPTION = (
        "Restores degraded images with a Kontext Restore LoRA. Each image is scaled uniformly to fit inside "
        "its nearest Kontext bucket (border reflected into the rest, nothing cropped), VAE-encoded, sampled "
        "from the degraded latent (bridge modes) or from noise (kontext), decoded and scaled back to the input "
        f"size. Images that would shrink below {TILE_BELOW_SCALE:.0%} of their size to fit (a side more than "
        "1.25x the bucket) are restored at their own scale in overlapping bucket-size tiles, blended across "
        f"the overlaps. Images above {MAX_MEGAPIXELS:g} MP are refused. With lora_name, mode auto takes the "
        "LoRA's formulation, and guidance and bucket_scale left at their defaults take the values the LoRA was "
        "trained with (a changed value overrides them, with a warning); bridge noise and the time shift always "
        "come from the LoRA. Every scheduler runs on the training clock (the time shift for the image's size)."
    )

    def _user_value(self, name: str, value, lora: LoraRecord | None):
        """The node's value as an explicit override, or None to let the LoRA's metadata decide.

        The node has no "from the LoRA" choice, so with a LoRA named an input left at its default
        counts as unset; without a LoRA the node's value is simply used.
        """
        if lora is None:
            return value
        spec = type(self).INPUT_TYPES()
        declared = {**spec.get("optional", {}), **spec.get("required", {})}[name]
        default = declared[1].get("default") if len(declared) > 1 else None
        return None if value == default else value

    def restore(
        self,
        model,
        vae,
        conditioning,
        images,
        mode,
        steps,
        guidance,
        sampler_name,
        scheduler,
        seed,
        bucket_scale,
        lora_name="",
        unique_id=None,
    ):
        comfyui.require_flux(model)
        lora = (
            read_lora_record(comfyui.find_lora_file(lora_name)) if lora_name and lora_name.strip() else None
        )
        settings = resolve_restore_settings(
            lora,
            mode=mode,
            steps=steps,
            sampler=sampler_name,
            scheduler=scheduler,
            seed=seed,
            guidance=self._user_value("guidance", guidance, lora),
            bucket_scale=self._user_value("bucket_scale", bucket_scale, lora),
        )
        pixels = comfy_image_to_tensors(images)
        log.info(
            "Kontext Restore: %d image(s) %dx%d, %s, %d steps, guidance %g, bucket scale %g (%s)",
            pixels.shape[0],
            pixels.shape[-1],
            pixels.shape[-2],
            settings.formulation,
            settings.steps,
            settings.guidance,
            settings.bucket_scale,
            ", ".join(f"{k}: {v}" for k, v in settings.sources.items() if v != "user"),
        )
        bar = None

        def on_progress(p: RestoreProgress) -> None:
            nonlocal bar
            if bar is None:
                bar = comfyui.NodeProgress(p.total, unique_id)
            bar.update(p.done, p.text)

        outputs = restore_images(
            pixels,
            settings,
            comfyui.region_restorer(model, vae, conditioning, settings),
            on_progress=on_progress,
            check_cancel=comfyui.check_interrupted,
        )
        return (tensors_to_comfy_image(torch.stack(outputs)),)


class KontextRestoreDegradedNoise:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": socket("MODEL", "The model the sampler uses (for its latent space)."),
                "latent": socket(
                    "LATENT", "VAE Encode of the degraded image; also connect it as latent_image."
                ),
                "bridge_noise": setting_input(
                    "bridge_noise", tooltip="The bridge_noise the LoRA was trained with (0 for most LoRAs)."
                ),
                "seed": SEED,
            }
        }

    VALIDATE_INPUTS = number_validator("bridge_noise")

    RETURN_TYPES = ("NOISE",)
    RETURN_NAMES = ("noise",)
    FUNCTION = "make"
    CATEGORY = CATEGORY + "/restore"
    DESCRIPTION = (
        "A NOISE for SamplerCustomAdvanced that is the degraded latent itself: with sigmas starting at 1 "
        "(Kontext Restore: Bridge Sigmas) sampling starts exactly at the degraded image, as a bridge LoRA "
        "was trained. Add ReferenceLatent of the same latent for bridge_ref LoRAs."
    )

    def make(self, model, latent, bridge_noise, seed):
        return (
            comfyui.degraded_start_noise(
                model, _latent_samples(latent), seed=seed, bridge_noise=bridge_noise
            ),
        )


class KontextRestoreSigmas:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **setting_inputs("sigma_steps"),
                "latent": socket("LATENT", "The latent being restored: its size sets the time shift."),
            }
        }

    RETURN_TYPES = ("SIGMAS",)
    RETURN_NAMES = ("sigmas",)
    FUNCTION = "make"
    CATEGORY = CATEGORY + "/restore"
    DESCRIPTION = "Sigmas from 1 to 0 with the time shift training used for this latent's resolution."

    def make(self, steps, latent):
        samples = _latent_samples(latent)
        return (as_trained_sigmas(steps, samples.shape[-2], samples.shape[-1]),)


NODE_CLASS_MAPPINGS = {
    "KontextRestoreRestore": KontextRestoreRestore,
    "KontextRestoreDegradedNoise": KontextRestoreDegradedNoise,
    "KontextRestoreSigmas": KontextRestoreSigmas,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KontextRestoreRestore": "Kontext Restore: Restore Image",
    "KontextRestoreDegradedNoise": "Kontext Restore: Degraded Image as Start (NOISE)",
    "KontextRestoreSigmas": "Kontext Restore: Bridge Sigmas",
}
