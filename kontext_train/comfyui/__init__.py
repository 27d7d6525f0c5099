"""The one package that talks to ComfyUI.

Everything ComfyUI-specific lives here; the rest of the library sees plain tensors and callables,
and ``nodes/`` and the headless app call ComfyUI only through this package (a test checks it).
ComfyUI's modules are imported inside functions, so ``import kontext_train`` works without it.

- ``bootstrap``: find a ComfyUI install and import it in this process; load weights headless.
- ``host``: model checks, folders, VAE, applying a LoRA, progress, cancel, out-of-memory.
- ``training_model``: LoRA adapters on a clone of the MODEL, velocity calls for training.
- ``restore_lora``: a LoRA file applied for restoring as training applied it (on activations).
- ``sampling``: restoring from the degraded latent with ComfyUI's samplers, on the training clock.
- ``tiny_models``: small random Flux and VAE models for tests and the demo.
"""

from .bootstrap import (
    ComfyUINotFound,
    bootstrap_comfyui,
    comfyui_loaded,
    encode_prompt,
    find_comfyui,
    load_models_headless,
    resolve_model_file,
)
from .host import (
    NodeProgress,
    apply_lora,
    check_interrupted,
    find_lora_file,
    input_folder,
    input_subfolders,
    interrupt_exception_types,
    lora_folder,
    lora_names,
    model_name,
    oom_exception_types,
    output_folder,
    require_flux,
    sampler_names,
    scheduler_names,
    show_on_node,
    soft_empty_cache,
    vae_decode,
    vae_encode,
    vae_identity,
)
from .restore_lora import APPLY as LORA_APPLY
from .restore_lora import LORA_USES, RestoreLora, load_lora_state, lora_for_restore
from .restore_memory_check import restore_memory_guard
from .sampling import (
    UNFIT_SCHEDULERS,
    DegradedStartNoise,
    comfy_sigmas,
    degraded_start_noise,
    finishing_sampler,
    on_trained_clock,
    region_restorer,
    restore_pixels,
    restore_scheduler_names,
    restore_sigmas,
    sample_from,
    with_reference_and_guidance,
)
from .tiny_models import TINY_CONTEXT_DIM, build_tiny_flux, build_tiny_vae, flux_unet_config
from .training_model import FluxLoraModel, PreparedConditioning, prepare_conditioning

__all__ = [
    "ComfyUINotFound",
    "DegradedStartNoise",
    "FluxLoraModel",
    "LORA_APPLY",
    "LORA_USES",
    "NodeProgress",
    "PreparedConditioning",
    "RestoreLora",
    "TINY_CONTEXT_DIM",
    "UNFIT_SCHEDULERS",
    "apply_lora",
    "bootstrap_comfyui",
    "build_tiny_flux",
    "build_tiny_vae",
    "check_interrupted",
    "comfy_sigmas",
    "comfyui_loaded",
    "degraded_start_noise",
    "encode_prompt",
    "find_lora_file",
    "find_comfyui",
    "finishing_sampler",
    "flux_unet_config",
    "input_folder",
    "input_subfolders",
    "load_lora_state",
    "lora_for_restore",
    "interrupt_exception_types",
    "load_models_headless",
    "lora_folder",
    "lora_names",
    "model_name",
    "on_trained_clock",
    "oom_exception_types",
    "output_folder",
    "prepare_conditioning",
    "region_restorer",
    "restore_memory_guard",
    "require_flux",
    "resolve_model_file",
    "restore_pixels",
    "restore_scheduler_names",
    "restore_sigmas",
    "sample_from",
    "sampler_names",
    "scheduler_names",
    "show_on_node",
    "soft_empty_cache",
    "vae_decode",
    "vae_encode",
    "vae_identity",
    "with_reference_and_guidance",
]
