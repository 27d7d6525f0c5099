"""Dataset nodes: image folders, degradations, buckets, latent cache."""

from __future__ import annotations

import logging

import torch

from ..kontext_train import comfyui
from ..kontext_train.comfyui.host import check_writable
from ..kontext_train.comfyui.node_api import io, ui
from ..kontext_train.data.buckets import bucket_resolutions, fit_to_bucket, nearest_bucket
from ..kontext_train.data.dataset import build_dataset, resolve_dataset_path, same_folder_problem
from ..kontext_train.data.degradations import DegradationConfig, degrade, describe
from ..kontext_train.data.images import (
    comfy_image_to_tensors,
    folder_signature,
    pil_to_tensor,
    tensor_to_pil,
    tensors_to_comfy_image,
)
from ..kontext_train.train.run_latents import prepare_latents
from .common import (
    CATEGORY,
    DATASET,
    DEGRADATION,
    LATENTS,
    folder_input,
    input_validator,
    output,
    seed_input,
    setting_inputs,
    shown_text,
)

log = logging.getLogger("kontext_restore")


class KontextRestoreDegradation(io.ComfyNode):
    """Degradation settings: the original fixed pipeline, or randomised Real-ESRGAN-style."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KontextRestoreDegradation",
            display_name="Kontext Restore: Synthetic Degradation",
            category=CATEGORY + "/dataset",
            description="Fixed: blur -> down/up -> noise -> JPEG with these values. realesrgan: random ranges, "
            "order and second pass.",
            inputs=[
                *setting_inputs("degradation", "noise_sigma", "blur_radius", "jpeg_quality", "downscale"),
                *setting_inputs("second_order_prob", "shuffle_prob", optional=True),
            ],
            outputs=[
                output(
                    DEGRADATION, "degradation", "These settings, for Image Folder Dataset and Degrade Image."
                ),
                output(io.String, "description", "The settings in words."),
            ],
        )

    validate_inputs = input_validator(
        "degradation", "noise_sigma", "blur_radius", "downscale", "second_order_prob", "shuffle_prob"
    )

    @classmethod
    def execute(
        cls, kind, noise_sigma, blur_radius, jpeg_quality, downscale, second_order_prob=0.5, shuffle_prob=0.3
    ) -> io.NodeOutput:
        config = DegradationConfig(
            kind=kind,
            noise_sigma=noise_sigma,
            blur_radius=blur_radius,
            jpeg_quality=jpeg_quality,
            downscale=downscale,
            second_order_prob=second_order_prob,
            shuffle_prob=shuffle_prob,
        )
        return io.NodeOutput(config, describe(config))


class KontextRestoreDegradeImage(io.ComfyNode):
    """Degrades an IMAGE batch: previews, and test inputs made inside a graph."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KontextRestoreDegradeImage",
            display_name="Kontext Restore: Degrade Image",
            category=CATEGORY + "/dataset",
            description="Degrades images the way training does (noise, blur, JPEG from Synthetic "
            "Degradation): test inputs and previews inside a graph.",
            inputs=[
                io.Image.Input("images", tooltip="The clean images to degrade."),
                seed_input(
                    "Seed of the random noise (image i of a batch uses seed + i); the same seed "
                    "gives the same degraded image."
                ),
                DEGRADATION.Input(
                    "degradation",
                    tooltip="From Synthetic Degradation; not connected: the fixed pipeline's defaults.",
                    optional=True,
                ),
            ],
            outputs=[output(io.Image, "IMAGE", "The degraded images, same size as the input.")],
        )

    @classmethod
    def execute(cls, images, seed, degradation=None) -> io.NodeOutput:
        config = degradation or DegradationConfig()
        batch = comfy_image_to_tensors(images)
        out = torch.stack([degrade(img, config, seed + i) for i, img in enumerate(batch)])
        return io.NodeOutput(tensors_to_comfy_image(out))


class KontextRestoreBucketImage(io.ComfyNode):
    """Scales images to their nearest preferred Kontext resolution (like FluxKontextImageScale,
    with a scale for smaller GPUs)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KontextRestoreBucketImage",
            display_name="Kontext Restore: Scale to Kontext Bucket",
            category=CATEGORY + "/dataset",
            description="Scales and centre-crops each image to the nearest of Kontext's preferred "
            "resolutions (times bucket_scale), as training does.",
            inputs=[
                io.Image.Input("images", tooltip="The images to scale."),
                *setting_inputs("bucket_scale"),
            ],
            outputs=[output(io.Image, "IMAGE", "The images at their bucket's size (no distortion).")],
        )

    validate_inputs = input_validator("bucket_scale")

    @classmethod
    def execute(cls, images, bucket_scale) -> io.NodeOutput:
        buckets = bucket_resolutions(bucket_scale)
        h, w = images.shape[1], images.shape[2]
        bucket = nearest_bucket(w, h, buckets)
        out = [pil_to_tensor(fit_to_bucket(tensor_to_pil(t), bucket)) for t in comfy_image_to_tensors(images)]
        return io.NodeOutput(tensors_to_comfy_image(torch.stack(out)))


def _folder_problems(values: dict) -> list[str]:
    """Queue-time check that the LQ folder is not the HQ folder (``same_folder_problem``)."""
    hq, lq = values.get("hq_folder"), values.get("lq_folder")
    if not (isinstance(hq, str) and hq.strip() and isinstance(lq, str) and lq.strip()):
        return []
    base = str(comfyui.input_folder())
    problem = same_folder_problem(resolve_dataset_path(hq, base), resolve_dataset_path(lq, base))
    return [f"lq_folder: {problem}"] if problem else []


class KontextRestoreDataset(io.ComfyNode):
    """A folder of high-quality images (and optionally their real degraded counterparts)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KontextRestoreDataset",
            display_name="Kontext Restore: Image Folder Dataset",
            category=CATEGORY + "/dataset",
            description="Reads a folder of clean photos (and optionally their real degraded "
            "versions), skips unusable files, holds some out for validation and buckets the rest.",
            inputs=[
                # Listed each time ComfyUI asks for the node's inputs, like core's folder loaders.
                folder_input("hq_folder", comfyui.input_subfolders()),
                *setting_inputs("bucket_scale", "val_count", "seed"),
                *setting_inputs("lq_folder", optional=True),
                DEGRADATION.Input(
                    "degradation",
                    tooltip="How the degraded half of each pair is made, from Synthetic Degradation; not "
                    "connected: the fixed pipeline's defaults.",
                    optional=True,
                ),
                *setting_inputs("min_size", optional=True),
            ],
            outputs=[
                output(DATASET, "dataset", "The image pairs, for Cache Latents."),
                output(io.String, "summary", "Images used and skipped (and why), the split and the buckets."),
            ],
            # Not an output node: ComfyUI would run it even when the trainer fails validation, drop
            # the trainer with only a log line and report success. Its summary is an output, and
            # drawn on the node as soon as it has run, long before a training run ends.
            is_output_node=False,
            hidden=[io.Hidden.unique_id],
        )

    validate_inputs = input_validator("bucket_scale", also=("hq_folder", "lq_folder"), cross=_folder_problems)

    @classmethod
    def fingerprint_inputs(
        cls, hq_folder, bucket_scale, val_count, seed, lq_folder="", degradation=None, min_size=64
    ):
        # ComfyUI re-runs a node only when this changes: follow the folders' contents, not just their names.
        base = str(comfyui.input_folder())
        parts = [folder_signature(resolve_dataset_path(hq_folder, base))]
        if lq_folder and lq_folder.strip():
            parts.append(folder_signature(resolve_dataset_path(lq_folder, base)))
        return "|".join(parts)

    @classmethod
    def execute(
        cls, hq_folder, bucket_scale, val_count, seed, lq_folder="", degradation=None, min_size=64
    ) -> io.NodeOutput:
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
        # The counts and warnings on the node now; the whole summary is the output.
        comfyui.show_on_node(dataset.summary(brief=True), cls.hidden.unique_id if cls.hidden else None)
        shown = shown_text(summary)
        return io.NodeOutput(dataset, shown, ui=ui.PreviewText(shown))


class KontextRestoreCacheLatents(io.ComfyNode):
    """Encodes every training and validation pair with the loaded VAE into an on-disk cache."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KontextRestoreCacheLatents",
            display_name="Kontext Restore: Cache Latents",
            category=CATEGORY + "/dataset",
            description="Encodes every pair with the VAE once and keeps the latents on disk, so "
            "training never waits for the VAE.",
            inputs=[
                DATASET.Input("dataset", tooltip="The dataset from Image Folder Dataset."),
                io.Vae.Input(
                    "vae", tooltip="The Flux VAE (ae.safetensors) that encodes the images to latents."
                ),
                *setting_inputs("control_mode", "pool_size", "seed"),
                *setting_inputs("cache_folder", optional=True),
            ],
            outputs=[
                output(LATENTS, "latents", "The cached dataset, for Train LoRA."),
                output(io.String, "cache_stats", "Entries found, encoded and re-encoded."),
            ],
        )

    validate_inputs = input_validator("control_mode")

    @classmethod
    def execute(
        cls, dataset, vae, control_mode, pool_size, seed, cache_folder="kontext_restore_cache"
    ) -> io.NodeOutput:
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
        return io.NodeOutput(latents, shown_text(summary))


NODES: list[type[io.ComfyNode]] = [
    KontextRestoreDegradation,
    KontextRestoreDegradeImage,
    KontextRestoreBucketImage,
    KontextRestoreDataset,
    KontextRestoreCacheLatents,
]
