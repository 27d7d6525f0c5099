"""Restoration with a trained LoRA: one all-in-one node, and the pieces for SamplerCustomAdvanced."""

from __future__ import annotations

import logging

import torch

from ..kontext_train import comfyui
from ..kontext_train.buckets import bucket_resolutions
from ..kontext_train.images import comfy_image_to_tensors, tensors_to_comfy_image
from ..kontext_train.restore import (
    AS_TRAINED,
    MAX_MEGAPIXELS,
    MODES,
    TILE_BELOW_SCALE,
    as_trained_sigmas,
    plan_restoration,
    read_lora_settings,
    resolve_formulation,
    resolve_steps,
    restore_image,
    tile_seed,
)
from .common import CATEGORY, SEED

log = logging.getLogger("kontext_restore")


def find_lora_file(name: str):
    """A LoRA given as the trainer outputs it (a name inside ComfyUI's loras folder, the
    ``.safetensors`` suffix optional)."""
    import folder_paths

    raw = (name or "").strip()
    candidates = [raw] if raw.lower().endswith(".safetensors") else [raw + ".safetensors", raw]
    for candidate in candidates:
        found = folder_paths.get_full_path("loras", candidate)
        if found:
            return found
    folders = ", ".join(folder_paths.get_folder_paths("loras"))
    raise FileNotFoundError(
        f"LoRA {raw!r} was not found in the loras folder(s) ({folders}). Give the file name the "
        "trainer's lora_name output shows (e.g. 'kontext_restore.safetensors'), or leave lora_name empty."
    )


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
                "model": (
                    "MODEL",
                    {
                        "tooltip": "Kontext with the restoration LoRA applied (LoraLoaderModelOnly or the trainer's MODEL)"
                    },
                ),
                "vae": ("VAE",),
                "conditioning": ("CONDITIONING", {"tooltip": "The restoration prompt used in training"}),
                "images": ("IMAGE", {"tooltip": "Degraded images"}),
                "mode": (
                    list(MODES),
                    {
                        "default": "auto",
                        "tooltip": "auto: the formulation recorded in the LoRA file (lora_name), else bridge_ref",
                    },
                ),
                "steps": (
                    "INT",
                    {"default": 0, "min": 0, "max": 200, "tooltip": "0: 8 for bridge modes, 28 for kontext"},
                ),
                "guidance": ("FLOAT", {"default": 1.5, "min": 0.0, "max": 100.0, "step": 0.1}),
                "sampler_name": (comfyui.sampler_names(), {"default": "euler"}),
                "scheduler": (
                    [AS_TRAINED] + comfyui.scheduler_names(),
                    {
                        "default": AS_TRAINED,
                        "tooltip": "as_trained: 1 -> 0 with the time shift training used",
                    },
                ),
                "seed": SEED,
                "bucket_scale": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.05,
                        "max": 2.0,
                        "step": 0.05,
                        "tooltip": "Use the dataset's bucket_scale",
                    },
                ),
            },
            "optional": {
                "lora_name": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "LoRA file in the loras folder; its metadata sets mode 'auto' and bridge noise",
                    },
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

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
        f"the overlaps. Images above {MAX_MEGAPIXELS:g} MP are refused. With lora_name, the LoRA's training "
        "settings (formulation for mode auto, bridge noise) are used; guidance comes from this node."
    )

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
        lora = read_lora_settings(find_lora_file(lora_name)) if lora_name and lora_name.strip() else None
        formulation = resolve_formulation(mode, lora)
        if lora is not None and lora.formulation and lora.formulation != formulation:
            log.warning(
                "Kontext Restore: sampling as %s, but %s was trained as %s.",
                formulation,
                lora.path,
                lora.formulation,
            )
        if lora is not None and lora.guidance is not None and abs(lora.guidance - guidance) > 1e-6:
            log.warning(
                "Kontext Restore: guidance %.2f differs from the %.2f %s was trained with.",
                guidance,
                lora.guidance,
                lora.path,
            )
        n_steps = resolve_steps(steps, formulation)
        bridge_noise = lora.bridge_noise if lora is not None else 0.0
        buckets = bucket_resolutions(bucket_scale)
        pixels = comfy_image_to_tensors(images)
        batch, _, h, w = pixels.shape
        plan = plan_restoration(w, h, buckets)  # every image of an IMAGE batch has the same size
        total = batch * len(plan.tiles) * n_steps
        progress = comfyui.NodeProgress(total, unique_id)
        log.info(
            "Kontext Restore: %d image(s) %dx%d, %s, %d steps, %d region(s) of %dx%d each",
            batch,
            w,
            h,
            formulation,
            n_steps,
            len(plan.tiles),
            *plan.bucket,
        )
        outputs = []
        for i in range(batch):
            # Between images (and tiles): a cancel stops here rather than after the whole batch.
            comfyui.check_interrupted()
            done_before = i * len(plan.tiles) * n_steps

            def restore_bucket(region, tile, i=i, done_before=done_before):
                comfyui.check_interrupted()
                done = done_before + tile * n_steps

                def callback(step, x0, x, total_steps):
                    progress.update(
                        min(total, done + step + 1),
                        f"image {i + 1}/{batch}"
                        + (f", tile {tile + 1}/{len(plan.tiles)}" if plan.tiled else "")
                        + f", step {step + 1}/{total_steps}",
                    )

                return comfyui.restore_pixels(
                    model,
                    vae,
                    conditioning,
                    region,
                    formulation=formulation,
                    steps=n_steps,
                    scheduler=scheduler,
                    sampler_name=sampler_name,
                    seed=tile_seed(seed, i, tile),
                    guidance=guidance,
                    bridge_noise=bridge_noise,
                    callback=callback,
                )

            outputs.append(restore_image(pixels[i], plan, restore_bucket))
            progress.update((i + 1) * len(plan.tiles) * n_steps)
        return (tensors_to_comfy_image(torch.stack(outputs)),)


class KontextRestoreDegradedNoise:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model the sampler uses (for its latent space)"}),
                "latent": (
                    "LATENT",
                    {"tooltip": "VAE Encode of the degraded image; also connect it as latent_image"},
                ),
                "bridge_noise": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "The LoRA's training bridge_noise",
                    },
                ),
                "seed": SEED,
            }
        }

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
                "steps": ("INT", {"default": 8, "min": 1, "max": 200}),
                "latent": ("LATENT", {"tooltip": "The latent being restored: its size sets the time shift"}),
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
