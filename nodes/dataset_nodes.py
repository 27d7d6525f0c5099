"""Dataset nodes: image folders, degradations, buckets, latent cache."""

from __future__ import annotations

import logging

import torch

from ..kontext_train import comfyui
from ..kontext_train.buckets import bucket_resolutions, fit_to_bucket, nearest_bucket
from ..kontext_train.comfyui.host import check_writable
from ..kontext_train.dataset import build_dataset, resolve_dataset_path
from ..kontext_train.degradations import DegradationConfig, degrade, describe
from ..kontext_train.images import (
    comfy_image_to_tensors,
    folder_signature,
    pil_to_tensor,
    tensor_to_pil,
    tensors_to_comfy_image,
)
from ..kontext_train.run import prepare_latents
from .common import (
    CATEGORY,
    DATASET,
    DEGRADATION,
    LATENTS,
    SEED,
    number_validator,
    setting_inputs,
    socket,
)

log = logging.getLogger("kontext_restore")


class KontextRestoreDegradation:
    """Degradation settings: the original fixed pipeline, or randomised Real-ESRGAN-style."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": setting_inputs(
                "degradation", "noise_sigma", "blur_radius", "jpeg_quality", "downscale"
            ),
            "optional": setting_inputs("second_order_prob", "shuffle_prob"),
        }

    VALIDATE_INPUTS = number_validator(
        "noise_sigma", "blur_radius", "downscale", "second_order_prob", "shuffle_prob"
    )

    RETURN_TYPES = (DEGRADATION, "STRING")
    RETURN_NAMES = ("degradation", "description")
    FUNCTION = "make"
    CATEGORY = CATEGORY + "/dataset"
    DESCRIPTION = "Fixed: blur -> down/up -> noise -> JPEG with these values. realesrgan: random ranges, order and second pass."

    def make(
        self, kind, noise_sigma, blur_radius, jpeg_quality, downscale, second_order_prob=0.5, shuffle_prob=0.3
    ):
        config = DegradationConfig(
            kind=kind,
            noise_sigma=noise_sigma,
            blur_radius=blur_radius,
            jpeg_quality=jpeg_quality,
            downscale=downscale,
            second_order_prob=second_order_prob,
            shuffle_prob=shuffle_prob,
        )
        return (config, describe(config))


class KontextRestoreDegradeImage:
    """Degrades an IMAGE batch: previews, and test inputs made inside a graph."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"images": socket("IMAGE", "The clean images to degrade."), "seed": SEED},
            "optional": {
                "degradation": socket(
                    DEGRADATION, "From Degradation Settings; not connected: the fixed pipeline's defaults."
                )
            },
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY + "/dataset"

    def apply(self, images, seed, degradation=None):
        config = degradation or DegradationConfig()
        batch = comfy_image_to_tensors(images)
        out = torch.stack([degrade(img, config, seed + i) for i, img in enumerate(batch)])
        return (tensors_to_comfy_image(out),)


class KontextRestoreBucketImage:
    """Scales images to their nearest preferred Kontext resolution (like FluxKontextImageScale,
    with a scale for smaller GPUs)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"images": socket("IMAGE", "The images to scale."), **setting_inputs("bucket_scale")}
        }

    VALIDATE_INPUTS = number_validator("bucket_scale")

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "scale"
    CATEGORY = CATEGORY + "/dataset"

    def scale(self, images, bucket_scale):
        buckets = bucket_resolutions(bucket_scale)
        h, w = images.shape[1], images.shape[2]
        bucket = nearest_bucket(w, h, buckets)
        out = [pil_to_tensor(fit_to_bucket(tensor_to_pil(t), bucket)) for t in comfy_image_to_tensors(images)]
        return (tensors_to_comfy_image(torch.stack(out)),)


class KontextRestoreDataset:
    """A folder of high-quality images (and optionally their real degraded counterparts)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": setting_inputs("hq_folder", "bucket_scale", "val_count", "seed"),
            "optional": {
                **setting_inputs("lq_folder"),
                "degradation": socket(
                    DEGRADATION,
                    "How the degraded half of each pair is made, from Degradation Settings; not connected: "
                    "the fixed pipeline's defaults.",
                ),
                **setting_inputs("min_size"),
            },
        }

    VALIDATE_INPUTS = number_validator("bucket_scale")

    RETURN_TYPES = (DATASET, "STRING")
    RETURN_NAMES = ("dataset", "summary")
    FUNCTION = "load"
    CATEGORY = CATEGORY + "/dataset"
    # Not an output node: ComfyUI would run it even when the trainer fails validation, drop the
    # trainer with only a log line and report success. Its summary is an output (and shown on the
    # node when it runs as part of a graph).

    @classmethod
    def IS_CHANGED(
        cls, hq_folder, bucket_scale, val_count, seed, lq_folder="", degradation=None, min_size=64
    ):
        # ComfyUI re-runs a node only when this changes: follow the folders' contents, not just their names.
        base = str(comfyui.input_folder())
        parts = [folder_signature(resolve_dataset_path(hq_folder, base))]
        if lq_folder and lq_folder.strip():
            parts.append(folder_signature(resolve_dataset_path(lq_folder, base)))
        return "|".join(parts)

    def load(self, hq_folder, bucket_scale, val_count, seed, lq_folder="", degradation=None, min_size=64):
        base = str(comfyui.input_folder())
        hq = resolve_dataset_path(hq_folder, base)
        lq = resolve_dataset_path(lq_folder, base) if lq_folder and lq_folder.strip() else None
        dataset = build_dataset(
            hq,
            lq,
            val_count=val_count,
            seed=seed,
            bucket_scale=bucket_scale,
            min_size=min_size,
            degradation=degradation or DegradationConfig(),
            logger=log,
        )
        summary = dataset.summary()
        log.info("Kontext Restore dataset:\n%s", summary)
        return {"ui": {"text": [summary]}, "result": (dataset, summary)}


class KontextRestoreCacheLatents:
    """Encodes every training and validation pair with the loaded VAE into an on-disk cache."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dataset": socket(DATASET, "The dataset from Image Folder Dataset."),
                "vae": socket("VAE", "The Flux VAE (ae.safetensors) that encodes the images to latents."),
                **setting_inputs("control_mode", "pool_size", "seed"),
            },
            "optional": setting_inputs("cache_folder"),
        }

    RETURN_TYPES = (LATENTS, "STRING")
    RETURN_NAMES = ("latents", "cache_stats")
    FUNCTION = "cache"
    CATEGORY = CATEGORY + "/dataset"

    def cache(self, dataset, vae, control_mode, pool_size, seed, cache_folder="kontext_restore_cache"):
        value = cache_folder or "kontext_restore_cache"
        folder = resolve_dataset_path(value, str(comfyui.output_folder()))
        # Refused before anything is created: a node writes only inside ComfyUI's own folders.
        folder = check_writable(folder, "cache_folder", value)
        progress = comfyui.NodeProgress(len(dataset.train) + len(dataset.val))
        latents, summary = prepare_latents(
            dataset,
            vae,
            folder,
            control_mode,
            pool_size,
            seed,
            on_progress=lambda done, total: progress.update(done),
            check_cancel=comfyui.check_interrupted,
        )
        return (latents, summary)


NODE_CLASS_MAPPINGS = {
    "KontextRestoreDegradation": KontextRestoreDegradation,
    "KontextRestoreDegradeImage": KontextRestoreDegradeImage,
    "KontextRestoreBucketImage": KontextRestoreBucketImage,
    "KontextRestoreDataset": KontextRestoreDataset,
    "KontextRestoreCacheLatents": KontextRestoreCacheLatents,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KontextRestoreDegradation": "Kontext Restore: Degradation Settings",
    "KontextRestoreDegradeImage": "Kontext Restore: Degrade Image",
    "KontextRestoreBucketImage": "Kontext Restore: Scale to Kontext Bucket",
    "KontextRestoreDataset": "Kontext Restore: Image Folder Dataset",
    "KontextRestoreCacheLatents": "Kontext Restore: Cache Latents",
}
