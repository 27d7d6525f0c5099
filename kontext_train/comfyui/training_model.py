"""The training model: trainable LoRA adapters on a clone of a ComfyUI Flux MODEL, and direct
velocity calls into the transformer (one forward and one backward a step, no sampler)."""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from ..method.grad_checkpoint import run_block
from ..method.lora import LoraAdapter, create_adapters, select_targets
from ..method.lora_init import InitInfo, adapters_from_state
from . import lora_forward
from .host import require_flux

log = logging.getLogger("kontext_restore")


@dataclass
class PreparedConditioning:
    """Text conditioning on the device once, expanded to a batch on demand (no per-step work).

    One entry per cond of the CONDITIONING. Several conds are combined the way ComfyUI's sampler
    combines full-image conds: the strength-weighted mean of the model's predictions. Each entry
    keeps its own ``reference_latents_method`` (how Kontext places the reference tokens), which
    ComfyUI hands to the transformer as ``ref_latents_method``.
    """

    context: torch.Tensor  # (1, seq, 4096)
    pooled: torch.Tensor | None  # (1, 768)
    strength: float = 1.0
    reference_method: str | None = None
    more: tuple[PreparedConditioning, ...] = ()

    def entries(self) -> tuple[PreparedConditioning, ...]:
        return (self, *self.more)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        pooled = self.pooled.expand(n, -1) if self.pooled is not None else None
        return self.context.expand(n, -1, -1), pooled


# Cond settings that restrict a cond to part of the image or of the schedule, or add a control
# model: ComfyUI's sampler honours them, but training sees the whole image at every sigma, so a
# LoRA trained and sampled with them would not run on the same terms. Refused in both.
UNSUPPORTED_COND_KEYS = {
    "area": "Conditioning (Set Area)",
    "mask": "Conditioning (Set Mask)",
    "control": "Apply ControlNet",
    "gligen": "GLIGEN",
    "hooks": "a hook node",
}


def check_conditioning(conditioning) -> None:
    """A clear error for conditioning the pack cannot train or restore with the same meaning."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError("CONDITIONING is empty: connect a CLIPTextEncode with the restoration prompt.")
    for i, entry in enumerate(conditioning):
        if not isinstance(entry, (list, tuple)) or not entry or not isinstance(entry[0], torch.Tensor):
            raise ValueError(f"CONDITIONING entry {i} is not text conditioning: connect a CLIPTextEncode.")
        context, extras = entry[0], (entry[1] if len(entry) > 1 else {})
        if context.ndim != 3:
            raise ValueError(
                "CONDITIONING is not text conditioning (expected a (batch, tokens, width) tensor)."
            )
        for key, node in UNSUPPORTED_COND_KEYS.items():
            if extras.get(key) is not None:
                raise ValueError(
                    f"CONDITIONING entry {i} sets {key!r} (from {node}); Kontext Restore trains and restores "
                    "on the whole image at every step, so it cannot give it the same meaning in both. "
                    "Connect the plain text conditioning instead."
                )
        start, end = extras.get("start_percent", 0.0), extras.get("end_percent", 1.0)
        if start > 0.0 or end < 1.0:
            raise ValueError(
                f"CONDITIONING entry {i} applies only from {start:.0%} to {end:.0%} of the schedule "
                "(ConditioningSetTimestepRange or prompt scheduling); training sees every sigma with the "
                "same prompt. Connect conditioning that covers the whole schedule."
            )
        strength = extras.get("strength", 1.0)
        if not (isinstance(strength, (int, float)) and math.isfinite(strength) and strength > 0):
            raise ValueError(
                f"CONDITIONING entry {i} has strength {strength!r}; it must be a positive number."
            )


def prepare_conditioning(conditioning, device: torch.device, dtype: torch.dtype) -> PreparedConditioning:
    check_conditioning(conditioning)
    if any(len(c) > 1 and c[1].get("reference_latents") for c in conditioning):
        log.warning(
            "Kontext Restore: reference latents already on the conditioning are not used for training; "
            "the formulation decides the reference (the degraded latent, or none)."
        )
    entries = []
    for context, *rest in conditioning:
        extras = rest[0] if rest else {}
        pooled = extras.get("pooled_output")
        # Clone so tensors made under inference mode can take part in autograd graphs.
        context = context[:1].detach().clone().to(device=device, dtype=dtype)
        if pooled is not None:
            pooled = pooled[:1].detach().clone().to(device=device, dtype=dtype)
        method = extras.get("reference_latents_method")
        entries.append(PreparedConditioning(context, pooled, float(extras.get("strength", 1.0)), method))
    first = entries[0]
    return PreparedConditioning(
        first.context, first.pooled, first.strength, first.reference_method, tuple(entries[1:])
    )


def _fix_inference_tensors(module: torch.nn.Module) -> None:
    """Parameters created under ``torch.inference_mode`` (everything a node loads) cannot be saved
    for backward. ComfyUI's cast ops copy their weights anyway, but a few plain parameters (Flux's
    RMSNorm scales) are used directly; replace those by ordinary tensors with the same values.
    The values do not change, so the shared model behaves exactly as before."""
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()


def training_clone(model):
    """A clone of ``model`` for training, always a plain (non-dynamic) ModelPatcher.

    ComfyUI 0.33+ on CUDA loads models as ``ModelPatcherDynamic`` (dynamic VRAM: comfy-aimdo streams
    each weight to the GPU when a layer casts it). Training turns that off for its clone, because
    that loader is built for ``apply_model`` inference and the trainer does not go through it:
    - ``velocity`` calls the transformer directly, so ``BaseModel._apply_model``'s dynamic set-up
      (``prefetch_dynamic_vbars``) never happens;
    - the dynamic loader attaches weight wrappers (the LoRA adapters) only to the layers it
      streams: layers of 16 KB or less are force-loaded without them, so they would not train;
    - autograd through streamed weights, with blocks re-run during backward (checkpointing), could
      not be checked here (it needs a GPU); the plain loader is what the exactness tests cover.
    ComfyUI's sampler makes the same switch when a dynamic patcher cannot do something (hooks):
    ``get_non_dynamic_delegate()`` loads the weights again from the model's file (a second copy in
    RAM, which ComfyUI keeps on the input MODEL for later runs) into a plain ModelPatcher with the
    same patches. The native TrainLoraNode also trains on a freshly loaded copy
    (``clone(force_deepcopy=True)``).
    """
    is_dynamic = getattr(model, "is_dynamic", None)
    if not (callable(is_dynamic) and is_dynamic()):
        return model.clone()
    if getattr(model, "cached_patcher_init", None) is None:
        raise ValueError(
            "This MODEL uses ComfyUI's dynamic VRAM, and its loader cannot reload it as an ordinary "
            "model for training. Load it with 'Load Diffusion Model' (UNETLoader) or 'Load Checkpoint', "
            "or start ComfyUI with --disable-dynamic-vram."
        )
    return model.get_non_dynamic_delegate()


def checkpoint_count(value: bool | int | str, blocks: int) -> int:
    """The number of blocks to checkpoint for a ``gradient_checkpointing`` value."""
    if isinstance(value, bool) or value in ("on", "off", "auto"):
        return blocks if value in (True, "on", "auto") else 0
    if isinstance(value, int) and 0 <= value <= blocks:
        return value
    raise ValueError(f"gradient_checkpointing must be on, off, auto or 0-{blocks} blocks; got {value!r}")


class _BlockPatch:
    """A ComfyUI "dit" block replacement that runs one block with safe adds, optionally checkpointed.

    It calls the block module it was made for rather than ``extra["original_block"]``: ComfyUI's
    wrapper closes over the loop variable, so when checkpointing recomputes a block during backward
    that closure already points at the *last* block of the model.
    """

    def __init__(self, block: torch.nn.Module, double: bool, owner: FluxLoraModel, index: int = 0) -> None:
        self.block = block
        self.double = double
        self.owner = owner
        self.index = index  # in the model's order: double blocks, then single blocks
        # Older ComfyUI blocks take no transformer_options; pass it only where the block has it.
        self.takes_options = "transformer_options" in inspect.signature(block.forward).parameters

    def _call(self, args: dict) -> dict:
        kwargs = {"vec": args["vec"], "pe": args["pe"], "attn_mask": args.get("attn_mask")}
        if self.takes_options:
            kwargs["transformer_options"] = args.get("transformer_options")
        if self.double:
            img, txt = self.block(img=args["img"], txt=args["txt"], **kwargs)
            return {"img": img, "txt": txt}
        return {"img": self.block(args["img"], **kwargs)}

    def __call__(self, args: dict, extra: dict) -> dict:
        # A snapshot of the options: ComfyUI mutates the dict (block_index) as the loop goes on.
        args = dict(args)
        if isinstance(args.get("transformer_options"), dict):
            args["transformer_options"] = dict(args["transformer_options"])
        return run_block(self._call, args, checkpoint=self.index < self.owner.checkpoint_blocks)


class FluxLoraModel:
    """A clone of a ComfyUI Flux MODEL with trainable LoRA adapters.

    The input MODEL is untouched: adapters and block patches live on the clone, and ComfyUI applies
    them only while the clone is the loaded copy. ``velocity`` calls the transformer directly, so
    a step costs one forward and one backward, without the sampler machinery.

    ``lora_form`` says how the adapters act (``comfyui/lora_forward.py``):
    - ``"activations"`` (default): each adapted layer runs its own ComfyUI forward and adds
      ``scale * (x @ down.T) @ up.T``; backward needs no full-size weight gradient.
    - ``"weights"``: each adapter is a ComfyUI weight wrapper (``W + scale * up @ down`` rebuilt on
      every forward), the form used before.
    ``"activations"`` falls back to ``"weights"`` for the whole model, with a warning in the log,
    when a target layer is not Linear-like or already has its forward replaced (on the instance, by
    another custom node or ComfyUI 0.33's bypass LoRA, or as an object patch of the input MODEL).
    ``self.lora_form`` is the form in use.
    Adapters, their initialisation and the saved file are the same in both forms.

    ``adapter`` is the kind (``lora``, ``lokr``, ``loha``: ``method/lycoris.py``). ``init_state``
    (a kohya state dict, from ``init_source``) gives the adapters instead: its layers, ranks,
    alphas and weights (``method/lora_init.py``); ``self.init_info`` then describes them.
    """

    def __init__(
        self,
        model,
        rank: int,
        alpha: float,
        lora_dtype: torch.dtype = torch.float32,
        targets: str = "blocks",
        gradient_checkpointing: bool | int | str = True,
        seed: int = 0,
        adapters: Mapping[str, LoraAdapter] | None = None,
        lora_form: str = lora_forward.ACTIVATIONS,
        adapter: str = "lora",
        init_state: Mapping[str, torch.Tensor] | None = None,
        init_source: str = "the LoRA file",
    ) -> None:
        require_flux(model)
        self.patcher = training_clone(model)
        self.base = self.patcher.model
        diffusion = self.base.diffusion_model
        modules = dict(diffusion.named_modules())
        self.init_info: InitInfo | None = None
        if adapters is None and init_state is not None:
            shapes = {
                p: tuple(m.weight.shape)
                for p, m in modules.items()
                if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim == 2
            }
            adapters, self.init_info = adapters_from_state(
                init_state, shapes, adapter, init_source, lora_dtype
            )
        if adapters is None:
            targets = select_targets(modules, targets=targets)
            if not targets:
                raise ValueError("No LoRA target layers found in the Flux model.")
            shapes = {p: tuple(modules[p].weight.shape) for p in targets}
            adapters = create_adapters(
                shapes, rank=rank, alpha=alpha, dtype=lora_dtype, seed=seed, kind=adapter
            )
        self.adapters: dict[str, LoraAdapter] = dict(adapters)
        self._modules = {p: modules[p] for p in self.adapters}
        self.lora_form = lora_forward.choose_form(lora_form, self._modules, self.patcher.object_patches)
        lora_forward.install(self.patcher, self.lora_form, self._modules, self.adapters)
        self.block_count = len(diffusion.double_blocks) + len(diffusion.single_blocks)
        self.gradient_checkpointing = gradient_checkpointing
        doubles = len(diffusion.double_blocks)
        for i, block in enumerate(diffusion.double_blocks):
            self.patcher.set_model_patch_replace(_BlockPatch(block, True, self, i), "dit", "double_block", i)
        for i, block in enumerate(diffusion.single_blocks):
            patch = _BlockPatch(block, False, self, doubles + i)
            self.patcher.set_model_patch_replace(patch, "dit", "single_block", i)
        self.device = torch.device(self.patcher.load_device)
        self.dtype = self.base.manual_cast_dtype or self.base.get_dtype()

    @property
    def gradient_checkpointing(self) -> bool | int:
        """How many blocks recompute their activations in backward (``checkpoint_blocks``; the
        first ones in the model's order); set as True/"on"/"auto" (all), False/"off" (none) or a
        number of blocks."""
        return self.checkpoint_blocks

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool | int | str) -> None:
        self.checkpoint_blocks = checkpoint_count(value, self.block_count)

    def prepare_conditioning(self, conditioning) -> PreparedConditioning:
        return prepare_conditioning(conditioning, self.device, self.dtype)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for a in self.adapters.values() for p in a.parameters()]

    def load(self) -> torch.device:
        """Loads the clone under ComfyUI's memory manager (which also moves the adapters)."""
        import comfy.model_management as mm

        _fix_inference_tensors(self.base.diffusion_model)
        # Only the adapters train. A model loaded outside inference mode (headless command, tests)
        # has base weights with requires_grad=True: backward would then build a full-size gradient
        # for every base weight (and fail on fp8 weights). ComfyUI's own trainer does the same.
        self.base.diffusion_model.requires_grad_(False)
        mm.load_models_gpu([self.patcher], memory_required=0, force_full_load=True)
        self.device = self.patcher.load_device
        self.dtype = self.base.manual_cast_dtype or self.base.get_dtype()
        for a in self.adapters.values():
            a.to(self.device)
            a.requires_grad_(True)
        return self.device

    def to_model_space(self, raw_latent: torch.Tensor) -> torch.Tensor:
        return self.base.process_latent_in(raw_latent)

    def from_model_space(self, latent: torch.Tensor) -> torch.Tensor:
        return self.base.process_latent_out(latent)

    def velocity(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: PreparedConditioning,
        guidance: float,
        reference: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The model's velocity at (x, sigma), latents in model space."""
        self._ensure_applied()
        n = x.shape[0]
        g = torch.full((n,), float(guidance), device=x.device, dtype=self.dtype)
        refs = [reference.to(self.dtype)] if reference is not None else None
        transformer_options = self.patcher.model_options.get("transformer_options", {}).copy()
        entries = cond.entries()
        total, weight = None, 0.0
        for entry in entries:
            context, pooled = entry.batch(n)
            extra = {"ref_latents_method": entry.reference_method} if entry.reference_method and refs else {}
            out = self.base.diffusion_model(
                x.to(self.dtype),
                # float32 like ComfyUI's sampler (BaseModel._apply_model): in bf16 the timestep would be
                # rounded before the x1000 embedding, so training would see other times than sampling.
                sigma.to(torch.float32),
                context,
                y=pooled,
                guidance=g,
                ref_latents=refs,
                transformer_options=transformer_options,
                **extra,
            )
            # At least fp32 for the loss; float64 stays float64 (gradient checks need it).
            out = out.to(torch.promote_types(out.dtype, torch.float32))
            if len(entries) == 1:
                return out
            total = out * entry.strength if total is None else total + out * entry.strength
            weight += entry.strength
        return total / weight

    def _ensure_applied(self) -> None:
        """Loads the clone (again) unless it is ComfyUI's loaded copy with the adapters in place:
        ComfyUI may have unloaded it since ``load`` (to make room for the VAE during validation, or
        to run another clone of the model), and the adapters act only while it is loaded."""
        import comfy.model_management as mm

        loaded = any(m.model is self.patcher for m in mm.current_loaded_models)
        if loaded and (
            self.lora_form != lora_forward.ACTIVATIONS
            or lora_forward.forwards_in_place(self._modules, self.adapters)
        ):
            return
        self.load()

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Autograd on inside ComfyUI's inference mode, and the version-specific training flag."""
        import comfy.model_management as mm

        had_flag = hasattr(mm, "in_training")
        previous = getattr(mm, "in_training", None)
        with torch.inference_mode(False), torch.enable_grad():
            if had_flag:
                mm.in_training = True
            try:
                yield
            finally:
                if had_flag:
                    mm.in_training = previous

    def release(self) -> None:
        """Unloads the clone so ComfyUI can reload the plain model; adapters stay as trained."""
        import comfy.model_management as mm

        for a in self.adapters.values():
            a.requires_grad_(False)
        with contextlib.suppress(Exception):
            self.patcher.detach()
        lora_forward.remove_restored_forwards(self._modules)
        with contextlib.suppress(Exception):
            mm.soft_empty_cache()
