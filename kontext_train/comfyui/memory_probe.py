"""The VRAM planner's probe: the real training step of a Flux model, run once with counted memory.

``plan_memory`` builds the transformer for the chosen settings on the meta device through
ComfyUI's own classes (``comfy.supported_models.Flux``), wraps it in the trainer's own
``FluxLoraModel`` and runs ``Trainer.batch_loss`` plus ``backward`` on meta tensors shaped like the
bucket, under ``memory_plan.LiveBytes``. Meta tensors have shapes and dtypes but no memory, so the
full 11.9 B-parameter model is planned on a CPU in seconds. ``measure_step`` runs the same step for
real on a built model (the tests compare the two on the CPU).

While planning (and only then) three things of ComfyUI are patched and restored afterwards:
``get_free_memory`` answers for the meta device (it raises otherwise); with ``attention="flash"``
Flux's attention call is replaced by ``memory_plan.FlashAttention`` (the footprint of CUDA's
kernel; ``"native"`` keeps ComfyUI's function, which on meta takes torch's math path); with
``autocast=True`` the blocks run under ``memory_plan.AutocastEmulation`` (the trainer uses
``torch.autocast`` on CUDA, which does nothing to meta tensors).
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from ..data.batches import LatentBatch
from ..data.buckets import KONTEXT_RESOLUTIONS, bucket_resolutions
from ..method.train_config import LORA_DTYPES, TrainConfig
from ..plan.memory_plan import (
    DEFAULT_OVERHEAD_BYTES,
    AutocastEmulation,
    LiveBytes,
    MemoryPlan,
    flash_attention,
    tensor_bytes,
)
from ..plan.optimizer_state import adapter_state_bytes
from ..train.trainer import Trainer
from .tiny_models import flux_unet_config
from .training_model import FluxLoraModel, PreparedConditioning

WEIGHT_DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
ATTENTION = ("flash", "native")


@dataclass(frozen=True)
class PlanSettings:
    """What decides the memory of a training step. Defaults: the full FLUX.1 Kontext model."""

    weight_dtype: str = "bf16"  # how the base weights are stored (WEIGHT_DTYPES)
    width: int = 1024
    height: int = 1024
    reference: bool = True  # Kontext reference tokens (formulations kontext and shortened)
    rank: int = 16
    lora_targets: str = "blocks"
    batch_size: int = 1
    gradient_checkpointing: bool | int = True  # all blocks, none, or how many (the first ones)
    lora_dtype: str = "float32"
    text_tokens: int = 512
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    context_in_dim: int = 4096
    # Issue 24: what the adapters and their optimizer state hold (plan/optimizer_state.py).
    adapter: str = "lora"
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(
                f"weight dtype must be one of {', '.join(WEIGHT_DTYPES)}; got {self.weight_dtype!r}"
            )
        if self.width % 16 or self.height % 16 or min(self.width, self.height) < 16:
            raise ValueError(
                f"bucket {self.width}x{self.height}: sides must be multiples of 16 (at least 16)"
            )
        for name in ("rank", "batch_size", "text_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def blocks(self) -> int:
        return self.depth + self.depth_single_blocks

    @property
    def bucket(self) -> str:
        return f"{self.width}x{self.height}"

    def label(self) -> dict:
        """The settings a user chooses, for tables and messages."""
        return {
            "bucket": self.bucket,
            "reference": "on" if self.reference else "off",
            "weights": self.weight_dtype,
            "rank": self.rank,
            "targets": self.lora_targets,
            "batch": self.batch_size,
            "checkpointing": checkpointing_label(self.gradient_checkpointing, self.blocks),
            # named only when not the default, so tables of default runs keep their columns
            **({"adapter": self.adapter} if self.adapter != "lora" else {}),
            **({"optimizer": self.optimizer} if self.optimizer != "adamw" else {}),
        }


def checkpointing_label(value: bool | int, blocks: int) -> str:
    """ "on", "off", or "N/M blocks" for a partial count."""
    if value is True or (not isinstance(value, bool) and value == blocks):
        return "on"
    if value is False or value == 0:
        return "off"
    return f"{value}/{blocks} blocks"


# The largest side training can use: Kontext's longest side at the largest bucket_scale (4.0).
MAX_SIDE = 4 * max(max(r) for r in KONTEXT_RESOLUTIONS)


def parse_bucket(text: str | int, scale: float = 1.0) -> tuple[int, int]:
    """``"1024"`` (a square side), ``"1184x880"`` (width x height) or the index 0-16 of a Kontext
    bucket; ``scale`` then scales it like the training's bucket scale (sides rounded to 16).

    Raises ``ValueError`` with a one-line message for anything else: negative numbers, sides
    that are not multiples of 16 or are larger than training can use (``MAX_SIDE``)."""
    raw = str(text).strip().lower()
    usage = f"give a side (1024), WIDTHxHEIGHT (1184x880) or a Kontext bucket index 0-{len(KONTEXT_RESOLUTIONS) - 1}"
    try:
        if "x" in raw:
            w, h = (int(v) for v in raw.split("x", 1))
        elif 0 <= int(raw) < len(KONTEXT_RESOLUTIONS):
            w, h = KONTEXT_RESOLUTIONS[int(raw)]
        else:
            w = h = int(raw)
    except ValueError:
        raise ValueError(f"bucket {text!r}: {usage}") from None
    for side in (w, h):
        if not 16 <= side <= MAX_SIDE or side % 16:
            raise ValueError(
                f"bucket {text!r}: sides must be multiples of 16 from 16 to {MAX_SIDE} px "
                f"(Kontext's longest side at bucket_scale 4.0); {usage}"
            )
    if scale != 1.0:
        index = KONTEXT_RESOLUTIONS.index((w, h)) if (w, h) in KONTEXT_RESOLUTIONS else None
        scaled = bucket_resolutions(scale)
        if index is not None and len(scaled) == len(KONTEXT_RESOLUTIONS):
            return scaled[index]
        w, h = (min(MAX_SIDE, max(16, round(v * scale / 16) * 16)) for v in (w, h))
    return w, h


# -- planning patches ---------------------------------------------------------------------------
@contextlib.contextmanager
def _meta_free_memory() -> Iterator[None]:
    import comfy.model_management as mm

    original = mm.get_free_memory

    def get_free_memory(dev=None, torch_free_too=False):
        if getattr(dev, "type", None) == "meta":
            big = 1 << 50  # meta tensors use no memory: every model "fits"
            return (big, big) if torch_free_too else big
        return original(dev, torch_free_too)

    mm.get_free_memory = get_free_memory
    try:
        yield
    finally:
        mm.get_free_memory = original


@contextlib.contextmanager
def _flash_attention(dtype: torch.dtype | None) -> Iterator[None]:
    """Flux's ``attention`` calls ``optimized_attention`` as imported into comfy.ldm.flux.math."""
    import comfy.ldm.flux.math as flux_math

    original = flux_math.optimized_attention

    def optimized_attention(q, k, v, heads, skip_reshape=False, mask=None, **kwargs):
        if not skip_reshape or mask is not None:
            raise NotImplementedError("the planner models Flux's attention call (skip_reshape, no mask)")
        b, h, length, d = q.shape
        # ComfyUI's pytorch attention returns (batch, tokens, heads * head_dim): a copy of the
        # kernel's (batch, heads, tokens, head_dim) output.
        return flash_attention(q, k, v, dtype).transpose(1, 2).reshape(b, length, h * d)

    flux_math.optimized_attention = optimized_attention
    try:
        yield
    finally:
        flux_math.optimized_attention = original


@contextlib.contextmanager
def _autocast_blocks(dtype: torch.dtype) -> Iterator[None]:
    """Autocast's casts in every block run, checkpoint recomputation included (function modes do
    not reach the recomputation in backward, so the block function itself enters the mode)."""
    from ..method import grad_checkpoint

    original = grad_checkpoint._run_out_of_place

    def run(block, *args):
        with AutocastEmulation(dtype):
            return original(block, *args)

    grad_checkpoint._run_out_of_place = run
    try:
        with AutocastEmulation(dtype):
            yield
    finally:
        grad_checkpoint._run_out_of_place = original


@contextlib.contextmanager
def meta_default_device() -> Iterator[None]:
    """Tensors created without a device go to meta while active (torch's default-device mode)."""
    with torch.device("meta"):
        yield


# -- the step -----------------------------------------------------------------------------------
def _train_config(s: PlanSettings) -> TrainConfig:
    # Reference tokens: "kontext" costs what every referencing formulation costs (same token count).
    formulation = "kontext" if s.reference else "bridge"
    return TrainConfig(
        rank=s.rank,
        batch_size=s.batch_size,
        lora_targets=s.lora_targets,
        lora_dtype=s.lora_dtype,
        formulation=formulation,
        bridge_noise=0.1,
    )


def _step(model: FluxLoraModel, s: PlanSettings, counter: LiveBytes, extra=None) -> None:
    """``Trainer.batch_loss`` + backward once, inputs created inside the counter like a data batch
    arriving on the device. Gradients stay on the parameters (they are part of the peak)."""
    device, dtype = model.device, model.dtype
    trainer = Trainer(_train_config(s), model, None, None, tempfile.gettempdir())
    with model.training(), counter, extra or contextlib.nullcontext():
        context = torch.zeros(1, s.text_tokens, s.context_in_dim, device=device, dtype=dtype)
        pooled = torch.zeros(1, 768, device=device, dtype=dtype)
        trainer.cond = PreparedConditioning(context, pooled)
        shape = (s.batch_size, 16, s.height // 8, s.width // 8)
        clean = torch.randn(shape, device=device)
        batch = LatentBatch(0, 0, clean, torch.randn(shape, device=device), ["plan"] * s.batch_size)
        loss = trainer.batch_loss(batch)
        loss.backward()
        del loss, batch, clean, context, pooled
        trainer.cond = None


def lora_state_bytes(model: FluxLoraModel, optimizer: str = "adamw") -> int:
    """The adapters' parameters and ``optimizer``'s state for them (AdamW: exp_avg and
    exp_avg_sq, each the parameter's size and dtype; others: ``plan/optimizer_state.py``)."""
    return adapter_state_bytes(model.adapters, optimizer)


def build_meta_flux(s: PlanSettings):
    """A ComfyUI Flux MODEL of the given size and weight dtype whose tensors are all on meta."""
    import comfy.model_patcher
    import comfy.supported_models

    config = flux_unet_config(s.hidden_size, s.num_heads, s.depth, s.depth_single_blocks, s.context_in_dim)
    cfg = comfy.supported_models.Flux(config)
    dtype = WEIGHT_DTYPES[s.weight_dtype]
    # fp8 weights compute in bf16: ComfyUI's cast ops copy each weight to bf16 as its layer runs.
    manual = torch.bfloat16 if dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else None
    cfg.set_inference_dtype(dtype, manual)
    meta = torch.device("meta")
    with torch.inference_mode(False):
        base = cfg.get_model({}, device=meta)
    return comfy.model_patcher.ModelPatcher(base, load_device=meta, offload_device=meta)


def _forget_loaded(patcher) -> None:
    import comfy.model_management as mm

    mm.current_loaded_models[:] = [
        m for m in mm.current_loaded_models if getattr(m, "model", None) is not patcher
    ]


def plan_memory(
    settings: PlanSettings,
    attention: str = "flash",
    autocast: bool = True,
    overhead: int = DEFAULT_OVERHEAD_BYTES,
) -> MemoryPlan:
    """The predicted peak memory of one training step with ``settings`` (see the module docstring).

    ``attention="flash"`` and ``autocast=True`` plan a CUDA step; ``"native"`` without autocast
    is a CPU float32 step (what the tests measure for real).
    """
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION)}; got {attention!r}")
    s = settings
    patcher = build_meta_flux(s)
    compute = torch.bfloat16 if autocast else None
    with contextlib.ExitStack() as stack:
        stack.enter_context(_meta_free_memory())
        if attention == "flash":
            stack.enter_context(_flash_attention(compute))
        # Everything made while building and loading goes to meta, on the host nothing: the LoRA
        # adapters (up to gigabytes for all_linear at a high rank) and, on ComfyUI 0.33, the zeros
        # ``ModelPatcher.load`` puts in place of meta weights (``_zero_init_parameter`` makes
        # them on the default device: the size of the model in host memory).
        with meta_default_device():
            model = FluxLoraModel(
                patcher,
                rank=s.rank,
                alpha=float(s.rank),
                lora_dtype=LORA_DTYPES[s.lora_dtype],
                targets=s.lora_targets,
                gradient_checkpointing=s.gradient_checkpointing,
                adapter=s.adapter,
            )
        try:
            with meta_default_device():
                model.load()
            counter = LiveBytes("meta")
            _step(model, s, counter, _autocast_blocks(compute) if autocast else None)
            weights = tensor_bytes(t for t in patcher.model.diffusion_model.state_dict().values())
            lora = lora_state_bytes(model, s.optimizer)
        finally:
            model.release()
            _forget_loaded(patcher)
    notes = [f"attention {attention}" + (", CUDA autocast bf16" if autocast else ", no autocast")]
    return MemoryPlan(s.label(), weights, lora, counter.peak, overhead, notes)


@functools.lru_cache(maxsize=64)
def plan_forward(settings: PlanSettings, attention: str = "flash", autocast: bool = True) -> int:
    """Peak bytes one sampling call (a forward without gradients, batch 1) creates beyond the
    weights, counted on meta like ``plan_memory``: what restoring needs per step on the model's
    device. ``settings.reference`` adds the Kontext reference tokens; LoRA settings do not matter.
    """
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION)}; got {attention!r}")
    s = settings
    patcher = build_meta_flux(s)
    diffusion = patcher.model.diffusion_model
    dtype = patcher.model.manual_cast_dtype or patcher.model.get_dtype()
    compute = torch.bfloat16 if autocast else None
    meta = torch.device("meta")
    with contextlib.ExitStack() as stack:
        stack.enter_context(_meta_free_memory())
        if attention == "flash":
            stack.enter_context(_flash_attention(compute))
        stack.enter_context(torch.no_grad())
        counter = stack.enter_context(LiveBytes("meta"))
        x = torch.zeros(1, 16, s.height // 8, s.width // 8, device=meta, dtype=dtype)
        refs = [torch.zeros_like(x)] if s.reference else None
        context = torch.zeros(1, s.text_tokens, s.context_in_dim, device=meta, dtype=dtype)
        pooled = torch.zeros(1, 768, device=meta, dtype=dtype)
        t = torch.ones(1, device=meta)
        guidance = torch.ones(1, device=meta, dtype=dtype)
        diffusion(x, t, context, y=pooled, guidance=guidance, ref_latents=refs, transformer_options={})
    return counter.peak


def measure_step(model: FluxLoraModel, settings: PlanSettings, counter: LiveBytes) -> None:
    """Runs the same step as ``plan_memory`` for real on a loaded ``model`` under ``counter``."""
    _step(model, settings, counter)


def full_size(**changes) -> PlanSettings:
    """``PlanSettings`` of the full model with ``changes``."""
    return replace(PlanSettings(), **changes)


__all__ = [
    "ATTENTION",
    "MAX_SIDE",
    "WEIGHT_DTYPES",
    "PlanSettings",
    "build_meta_flux",
    "full_size",
    "lora_state_bytes",
    "measure_step",
    "parse_bucket",
    "plan_forward",
    "plan_memory",
]
