"""Restoration with a trained LoRA: one all-in-one node, and the pieces for SamplerCustomAdvanced."""

from __future__ import annotations

import logging

import torch

from ..kontext_train import comfyui
from ..kontext_train.comfyui.node_api import io, ui
from ..kontext_train.data.images import comfy_image_to_tensors, tensors_to_comfy_image
from ..kontext_train.method.training_prompt import prompt_from_graph
from ..kontext_train.options import NO_LORA
from ..kontext_train.restore.restore import MAX_MEGAPIXELS, TILE_BELOW_SCALE, RestoreProgress, restore_images
from ..kontext_train.restore.restore_settings import (
    AS_TRAINED,
    RestoreSettings,
    as_trained_sigmas,
    read_lora_record,
    resolve_restore_settings,
)
from .common import CATEGORY, input_validator, output, seed_input, setting_input, setting_inputs, shown_text

log = logging.getLogger("kontext_restore")


def _latent_samples(latent) -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or samples.is_nested:
        raise ValueError(
            "The LATENT input has no (batch, channels, h, w) 'samples' tensor; connect 'VAE Encode' of the "
            "degraded image."
        )
    return samples


def _from_lora(value: float) -> float | None:
    """guidance and bucket_scale: 0 means "what the LoRA was trained with" (None for the settings)."""
    return None if value == 0 else value


def settings_report(settings: RestoreSettings, lora: comfyui.RestoreLora | None = None) -> str:
    """What the node restores with and where each value came from, how the LoRA is applied, then
    every warning."""
    src = settings.sources
    lines = [
        f"{settings.formulation} ({src.get('formulation')}), {settings.steps} steps ({src.get('steps')}), "
        f"guidance {settings.guidance:g} ({src.get('guidance')}), bucket scale {settings.bucket_scale:g} "
        f"({src.get('bucket_scale')}), bridge noise {settings.bridge_noise:g} ({src.get('bridge_noise')})"
    ]
    lines += lora.notes if lora is not None else []
    lines += [f"Warning: {w}" for w in (*settings.warnings, *(lora.warnings if lora is not None else ()))]
    return "\n".join(lines)


class KontextRestoreRestore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KontextRestoreRestore",
            display_name="Kontext Restore: Restore Image",
            category=CATEGORY + "/restore",
            description=(
                "Restores degraded images with a Kontext Restore LoRA. Each image is scaled uniformly to fit "
                "inside its nearest Kontext bucket (border reflected into the rest, nothing cropped), "
                "VAE-encoded, sampled from the degraded latent (bridge modes) or from noise (kontext), decoded "
                f"and scaled back to the input size. Images that would shrink below {TILE_BELOW_SCALE:.0%} of "
                "their size to fit (a side more than 1.25x the bucket) are restored at their own scale in "
                "overlapping bucket-size tiles, blended across the overlaps. Images above "
                f"{MAX_MEGAPIXELS:g} MP are refused. With lora_name, mode auto takes the LoRA's formulation, "
                "and guidance and bucket_scale at 0 take the values the LoRA was trained with (any other "
                "value overrides them, with a warning on the node); bridge noise and the time shift always "
                "come from the LoRA. Every scheduler runs on the training clock (the time shift for the "
                "image's size)."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The Kontext model. With lora_use 'apply' (default) the plain model: the node applies "
                    "lora_name itself; with 'already applied' the model with the LoRA (a loader or the trainer's MODEL).",
                ),
                io.Vae.Input(
                    "vae", tooltip="The Flux VAE: encodes the degraded images and decodes the result."
                ),
                io.Conditioning.Input(
                    "conditioning", tooltip="The restoration prompt, the same as in training."
                ),
                io.Image.Input("images", tooltip="The degraded images to restore."),
                setting_input("mode"),
                setting_input("restore_steps"),
                setting_input("restore_guidance"),
                setting_input("sampler", comfyui.sampler_names()),
                setting_input("scheduler", [AS_TRAINED] + comfyui.restore_scheduler_names()),
                seed_input(
                    "Seed of the sampling noise: mode kontext's starting noise, the bridge noise of a LoRA "
                    "trained with some, and noise of ancestral samplers; image i of a batch uses seed + i."
                ),
                setting_input("restore_bucket_scale"),
                # The loras folder is listed each time ComfyUI asks for the node's inputs.
                # A picker of the loras folder that also takes the trainer's lora_name output.
                setting_input(
                    "restore_lora", [NO_LORA] + comfyui.lora_names(), optional=True, links=(io.String,)
                ),
                setting_input("lora_use", optional=True),
            ],
            outputs=[output(io.Image, "images", "The restored images, at the input size.")],
            # PROMPT: the queued workflow, to compare its prompt text with the LoRA's training prompt.
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    validate_inputs = input_validator(
        "mode",
        "restore_guidance",
        "sampler",
        "scheduler",
        "restore_bucket_scale",
        "restore_lora",
        "lora_use",
        zero_or={"restore_guidance": "guidance", "restore_bucket_scale": "bucket_scale"},
    )

    @classmethod
    def execute(
        cls,
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
        lora_name=NO_LORA,
        lora_use=comfyui.LORA_APPLY,
    ) -> io.NodeOutput:
        comfyui.require_flux(model)
        hidden = cls.hidden or io.HiddenHolder.from_dict(None)  # None when called outside ComfyUI
        named = (lora_name or "").strip()
        lora_path = comfyui.find_lora_file(named) if named not in ("", NO_LORA) else None
        lora = read_lora_record(lora_path) if lora_path is not None else None
        settings = resolve_restore_settings(
            lora,
            mode=mode,
            steps=steps,
            sampler=sampler_name,
            scheduler=scheduler,
            seed=seed,
            guidance=_from_lora(guidance),
            bucket_scale=_from_lora(bucket_scale),
            prompt=prompt_from_graph(hidden.prompt, hidden.unique_id),
        )
        pixels = comfy_image_to_tensors(images)
        state = comfyui.load_lora_state(lora_path) if lora_path is not None else None
        with comfyui.lora_for_restore(model, state, name=named, use=lora_use) as applied:
            report = settings_report(settings, applied)
            for warning in applied.warnings:  # resolve_restore_settings logged its own
                log.warning("Kontext Restore: %s", warning)
            log.info(
                "Kontext Restore: %d image(s) %dx%d: %s",
                pixels.shape[0],
                pixels.shape[-1],
                pixels.shape[-2],
                report,
            )
            bar = None
            unique_id = hidden.unique_id

            def on_progress(p: RestoreProgress) -> None:
                nonlocal bar
                if bar is None:
                    bar = comfyui.NodeProgress(p.total, unique_id)
                # The settings and warnings stay on the node under the progress, after the run too.
                bar.update(p.done, f"{p.text}\n{report}")

            outputs = restore_images(
                pixels,
                settings,
                comfyui.region_restorer(applied.model, vae, conditioning, settings),
                on_progress=on_progress,
                check_cancel=comfyui.check_interrupted,
                check_memory=comfyui.restore_memory_guard(applied.model, vae, conditioning, settings),
            )
        return io.NodeOutput(
            tensors_to_comfy_image(torch.stack(outputs)), ui=ui.PreviewText(shown_text(report))
        )


class KontextRestoreDegradedNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KontextRestoreDegradedNoise",
            display_name="Kontext Restore: Degraded Image as Start (NOISE)",
            category=CATEGORY + "/restore",
            description=(
                "A NOISE for SamplerCustomAdvanced that is the degraded latent itself: with sigmas starting at "
                "1 (Kontext Restore: Bridge Sigmas) sampling starts exactly at the degraded image, as a bridge "
                "LoRA was trained. Add ReferenceLatent of the same latent for bridge_ref LoRAs."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model the sampler uses (for its latent space)."),
                io.Latent.Input(
                    "latent", tooltip="VAE Encode of the degraded image; also connect it as latent_image."
                ),
                setting_input(
                    "bridge_noise", tooltip="The bridge_noise the LoRA was trained with (0 for most LoRAs)."
                ),
                seed_input("Seed of the noise added to the degraded start (only with bridge_noise above 0)."),
            ],
            outputs=[output(io.Noise, "noise", "For SamplerCustomAdvanced's noise input.")],
        )

    validate_inputs = input_validator("bridge_noise")

    @classmethod
    def execute(cls, model, latent, bridge_noise, seed) -> io.NodeOutput:
        return io.NodeOutput(
            comfyui.degraded_start_noise(model, _latent_samples(latent), seed=seed, bridge_noise=bridge_noise)
        )


class KontextRestoreSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KontextRestoreSigmas",
            display_name="Kontext Restore: Bridge Sigmas",
            category=CATEGORY + "/restore",
            description="Sigmas from 1 to 0 with the time shift training used for this latent's resolution.",
            inputs=[
                *setting_inputs("sigma_steps"),
                io.Latent.Input("latent", tooltip="The latent being restored: its size sets the time shift."),
            ],
            outputs=[output(io.Sigmas, "sigmas", "For SamplerCustomAdvanced's sigmas input.")],
        )

    @classmethod
    def execute(cls, steps, latent) -> io.NodeOutput:
        samples = _latent_samples(latent)
        return io.NodeOutput(as_trained_sigmas(steps, samples.shape[-2], samples.shape[-1]))


NODES: list[type[io.ComfyNode]] = [KontextRestoreRestore, KontextRestoreDegradedNoise, KontextRestoreSigmas]
