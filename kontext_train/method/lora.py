"""LoRA adapters for Flux Linear layers, and the file format they are saved in.

An adapter holds ``down`` and ``up`` and applies ``scale * up @ down`` in one of two ways: to a
layer's input (``on_activations``, what the trainer uses by default, see
``comfyui/lora_forward.py``) or as a callable ``weight -> weight + scale * up @ down``, the shape of
function ComfyUI accepts as a *weight wrapper* (``ModelPatcher.add_weight_wrapper``). Either way the
base weights are never modified, any dtype ComfyUI stores them in (fp8 included) is cast first,
and only the low-rank delta is trained. The file format is kohya's (``lora_unet_<path>.lora_down.weight``),
which both ComfyUI's ``LoraLoader`` and diffusers' ``load_lora_weights`` read; fused ``qkv`` and
``linear1`` are kept fused because both loaders expect them that way for Flux. diffusers loads
the ``blocks`` and ``blocks+modulation`` sets whole and skips the outer layers of ``all_linear``
(see ``diffusers_dropped_layers``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..files.atomic import atomic_path

# Linear layers of the Flux transformer blocks that get an adapter. Modulation layers are optional:
# they are large (6 x width^2 per double block) and rarely worth training for restoration.
BLOCK_TARGETS = (
    r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)",
    r"double_blocks\.\d+\.(img|txt)_mlp\.(0|2)",
    r"single_blocks\.\d+\.(linear1|linear2)",
)
MODULATION_TARGETS = (
    r"double_blocks\.\d+\.(img|txt)_mod\.lin",
    r"single_blocks\.\d+\.modulation\.lin",
)
# Every other Linear layer of Flux: input/output projections and the time/guidance/vector
# embedders. Rarely useful on the real model; it lets a tiny random test model express a map.
OUTER_TARGETS = (
    r"img_in",
    r"txt_in",
    r"(time_in|guidance_in|vector_in)\.(in_layer|out_layer)",
    r"final_layer\.(linear|adaLN_modulation\.1)",
)
TARGET_SETS = {
    "blocks": BLOCK_TARGETS,
    "blocks+modulation": BLOCK_TARGETS + MODULATION_TARGETS,
    "all_linear": BLOCK_TARGETS + MODULATION_TARGETS + OUTER_TARGETS,
}
KOHYA_PREFIX = "lora_unet_"
# diffusers' kohya converter for Flux (FluxLoraLoaderMixin.lora_state_dict, diffusers 0.42.1) names
# every outer layer without the ``transformer.`` prefix, and ``load_lora_weights`` keeps only
# prefixed keys: these layers are skipped without a warning. Block and modulation layers convert
# with the delta the trainer trained (tests/test_lora.py rebuilds them at full Flux size).
DIFFUSERS_DROPPED = re.compile("^(" + "|".join(OUTER_TARGETS) + ")$")


def select_targets(module_paths: Iterable[str], targets: str = "blocks") -> list[str]:
    """The module paths (relative to the diffusion model) that receive a LoRA adapter."""
    if targets not in TARGET_SETS:
        raise ValueError(f"LoRA targets must be one of {', '.join(TARGET_SETS)}; got {targets!r}")
    regex = re.compile("^(" + "|".join(TARGET_SETS[targets]) + ")$")
    return [p for p in module_paths if regex.match(p)]


class LoraAdapter(torch.nn.Module):
    """Low-rank delta for one Linear weight of shape (out_features, in_features).

    ``up`` starts at zero so a fresh adapter leaves the model unchanged; ``down`` gets Kaiming
    uniform initialisation like PEFT and kohya do.
    """

    KIND = "lora"
    ZERO_INIT = ("up",)  # the factors a fresh adapter starts at zero

    def __init__(
        self,
        out_features: int,
        in_features: int,
        rank: int,
        alpha: float,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        down = torch.empty(rank, in_features, dtype=torch.float32)
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on a Linear weight
        down.uniform_(-bound, bound, generator=generator)
        self.down = torch.nn.Parameter(down.to(dtype))
        self.up = torch.nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))
        self.rank = rank
        self.alpha = float(alpha)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        return (self.up @ self.down) * self.scale

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:  # ComfyUI weight-wrapper protocol
        delta = self.up.to(weight.dtype) @ self.down.to(weight.dtype)
        return weight + delta * self.scale

    def on_activations(self, x: torch.Tensor) -> torch.Tensor:
        """The low-rank term ``scale * (x @ down.T) @ up.T`` of an input ``x`` (..., in_features),
        in ``x``'s dtype: the same delta as ``__call__`` adds to the weight, applied to the input,
        so backward never forms a full (out, in) weight gradient."""
        hidden = torch.nn.functional.linear(x, self.down.to(x.dtype))
        return torch.nn.functional.linear(hidden * self.scale, self.up.to(x.dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The saved tensors by key suffix (kohya's ``lora_down.weight``/``lora_up.weight``)."""
        return {"lora_down.weight": self.down, "lora_up.weight": self.up}

    # ComfyUI's memory manager asks weight functions how much memory they hold and moves them
    # together with the module they wrap.
    def passive_memory_usage(self) -> int:
        return sum(p.nelement() * p.element_size() for p in self.parameters())

    def move_to(self, device: torch.device | str) -> int:
        self.to(device=device)
        return self.passive_memory_usage()


ADAPTER_KINDS = ("lora", "lokr", "loha")


def adapter_class(kind: str) -> type:
    """The adapter class of ``kind``: LoRA here, LoKr and LoHa in ``method/lycoris.py``."""
    from .lycoris import LohaAdapter, LokrAdapter

    classes = {"lora": LoraAdapter, "lokr": LokrAdapter, "loha": LohaAdapter}
    if kind not in classes:
        raise ValueError(f"adapter must be one of {', '.join(ADAPTER_KINDS)}; got {kind!r}")
    return classes[kind]


def create_adapters(
    shapes: Mapping[str, tuple[int, int]],
    rank: int,
    alpha: float,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    kind: str = "lora",
) -> dict[str, torch.nn.Module]:
    """One adapter of ``kind`` per module path, initialised deterministically from ``seed`` in
    path order. Each rank may also be a mapping path -> rank (a file's layers differ)."""
    cls = adapter_class(kind)
    generator = torch.Generator().manual_seed(seed)
    ranks = rank if isinstance(rank, Mapping) else dict.fromkeys(shapes, rank)
    alphas = alpha if isinstance(alpha, Mapping) else dict.fromkeys(shapes, alpha)
    return {
        path: cls(out_f, in_f, ranks[path], alphas[path], dtype=dtype, generator=generator)
        for path, (out_f, in_f) in sorted(shapes.items())
    }


def adapter_kind(adapters: Mapping[str, torch.nn.Module]) -> str:
    """``lora``, ``lokr`` or ``loha``: the kind of the adapters (one kind per file)."""
    kinds = {getattr(a, "KIND", "lora") for a in adapters.values()}
    if len(kinds) != 1:
        raise ValueError(f"adapters of several kinds ({', '.join(sorted(kinds))}); one kind per LoRA file")
    return kinds.pop()


def diffusers_dropped_layers(module_paths: Iterable[str]) -> list[str]:
    """The adapted layers that diffusers' ``FluxKontextPipeline.load_lora_weights`` silently skips.

    Empty for the ``blocks`` and ``blocks+modulation`` sets; for ``all_linear`` the input/output
    projections and the time/guidance/vector embedders. Were they loaded anyway (by adding the
    prefix by hand), final_layer's two layers would also lose their alpha: diffusers takes their
    delta as ``up @ down``, not ``alpha / rank * up @ down``.
    """
    return sorted(p for p in module_paths if DIFFUSERS_DROPPED.match(p))


def diffusers_support(module_paths: Iterable[str]) -> str:
    """``"full"`` when diffusers loads every adapted layer, otherwise which layers it drops.

    Meant for the LoRA file's metadata (``kontext_restore.diffusers``) and a training-time warning.
    """
    dropped = diffusers_dropped_layers(module_paths)
    if not dropped:
        return "full"
    return f"drops {len(dropped)} layer{'s' if len(dropped) > 1 else ''}: " + ", ".join(dropped)


def kohya_name(module_path: str) -> str:
    return KOHYA_PREFIX + module_path.replace(".", "_")


def to_kohya_state_dict(adapters: Mapping[str, torch.nn.Module], dtype: torch.dtype | None = None) -> dict:
    """Flattens adapters into kohya keys (``<name>.<suffix>`` per ``adapter.tensors()``, and
    ``<name>.alpha``); ``dtype`` None keeps the training dtype."""
    out: dict[str, torch.Tensor] = {}
    for path, adapter in adapters.items():
        name = kohya_name(path)
        for suffix, tensor in adapter.tensors().items():
            tensor = tensor.detach()
            out[f"{name}.{suffix}"] = (tensor if dtype is None else tensor.to(dtype)).contiguous().cpu()
        out[f"{name}.alpha"] = torch.tensor(adapter.alpha, dtype=torch.float32)
    return out


def kohya_layers(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A kohya state dict grouped by layer name: ``{name: {suffix: tensor}}`` (names have no dots)."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name, _, suffix = key.partition(".")
        layers.setdefault(name, {})[suffix] = tensor
    return layers


def load_kohya_into(adapters: Mapping[str, torch.nn.Module], state: Mapping[str, torch.Tensor]) -> None:
    """Copies saved weights into existing adapters; the layers, the adapter kind and the shapes
    must match."""
    expected = {kohya_name(p): p for p in adapters}
    layers = kohya_layers(state)
    missing = sorted(set(expected) - set(layers))
    extra = sorted(set(layers) - set(expected))
    if missing or extra:
        raise ValueError(
            "LoRA does not match this model's layers "
            f"(missing {len(missing)}: {missing[:3]}, unexpected {len(extra)}: {extra[:3]}). "
            "Use the same rank, targets and base model it was trained with."
        )
    with torch.no_grad():
        for name, path in expected.items():
            adapter, saved = adapters[path], layers[name]
            params = adapter.tensors()
            if set(saved) - {"alpha"} != set(params):
                raise ValueError(
                    f"LoRA layer {name} holds {', '.join(sorted(saved))}, not a {adapter.KIND} adapter's "
                    f"{', '.join(sorted(params))}; the adapter type differs."
                )
            for suffix, param in params.items():
                if saved[suffix].shape != param.shape:
                    raise ValueError(
                        f"LoRA layer {name}: saved {suffix} has shape {tuple(saved[suffix].shape)}, this "
                        f"adapter {tuple(param.shape)}; the rank or base model differs."
                    )
                param.copy_(saved[suffix])
            if "alpha" in saved:
                adapter.alpha = float(saved["alpha"])


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping) -> Path:
    """Saves under a temporary name, then renames: a crash never leaves half a file."""
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    with atomic_path(path, suffix=".safetensors.tmp") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return Path(path)


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def sanitize_lora_name(name: str) -> str:
    """A file name for the loras folder: no absolute paths, no ``..``, a ``.safetensors`` suffix.

    Sub-folders are allowed (``restore/faces``) because ComfyUI lists them in its LoRA pickers.
    """
    raw = (name or "").strip()
    if not raw:
        raise ValueError("The LoRA name is empty: give a file name such as 'kontext_restore'.")
    candidate = raw.replace("\\", "/")
    if candidate.startswith("/") or re.match(r"^[A-Za-z]:", candidate) or candidate.startswith("~"):
        raise ValueError(f"LoRA name {name!r} is an absolute path; give a name relative to the loras folder.")
    parts = [p for p in candidate.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ValueError(f"LoRA name {name!r} contains '..'; give a name inside the loras folder.")
    if not parts:
        raise ValueError(f"LoRA name {name!r} has no file name.")
    bad = [p for p in parts if re.search(r'[\x00-\x1f<>:"|?*]', p)]
    if bad:
        raise ValueError(f"LoRA name {name!r} contains characters not allowed in file names: {bad[0]!r}.")
    if not parts[-1].lower().endswith(".safetensors"):
        parts[-1] += ".safetensors"
    return "/".join(parts)
