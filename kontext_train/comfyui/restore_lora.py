"""Restoring with a LoRA file applied the way training applied it: on activations, on a clone.

The stock LoraLoader merges ``W + delta`` into the stored weights (rounded to bf16, or
stochastically to fp8): on fp8 weights most of a restoration LoRA's effect per layer is lost in
the rounding (BENCHMARKS.md, "Merge loss at real width"). Training never merges: each adapted
Linear adds ``scale * up (down x)`` to its own output (``lora_forward.LoraForward``). The Restore
node and ``kontext-train restore`` do the same with the LoRA file they are given:
``lora_for_restore`` returns a clone of the MODEL with the file's adapters installed as object
patches (ComfyUI applies them when it loads the clone for sampling), and undoes them afterwards,
so the MODEL passed in never runs with them.

It also checks what the MODEL already carries (weight patches from a loader):
- the same file applied by a LoRA loader: it is not applied twice (the loader's merged copy is taken
  off the clone and the exact form used instead, with a note);
- another LoRA: both act, with a warning;
- ``use="already applied"`` and no LoRA on the MODEL: a warning that only the settings are used.
A file this cannot rebuild as plain low-rank adapters (LoCon mid weights, DoRA, other key names)
is applied with the stock loader instead, with a note.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..method.lora import LoraAdapter, kohya_name
from . import lora_forward

log = logging.getLogger("kontext_restore")

APPLY = "apply"
ALREADY_APPLIED = "already applied"
LORA_USES = (APPLY, ALREADY_APPLIED)


@dataclass
class RestoreLora:
    """The MODEL to restore with and what was done to it (``notes`` and ``warnings`` are shown
    on the node)."""

    model: Any
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def adapters_from_state(
    state: Mapping[str, torch.Tensor], modules: Mapping[str, torch.nn.Module]
) -> tuple[dict[str, LoraAdapter] | None, str | None]:
    """The file's layers as trainable-form adapters keyed by module path, or (None, why not)."""
    by_name = {
        kohya_name(p): p for p, m in modules.items() if lora_forward.activation_form_problem(m) is None
    }
    names = sorted({k.split(".lora_", 1)[0] for k in state if ".lora_down.weight" in k})
    if not names:
        return None, "it has no kohya lora_down/lora_up layers"
    extra = sorted({k.split(".", 1)[0] for k in state} - set(names))
    if extra:
        return None, f"it holds weights other than plain LoRA layers ({', '.join(extra[:3])})"
    adapters: dict[str, LoraAdapter] = {}
    for name in names:
        path = by_name.get(name)
        down, up = state[f"{name}.lora_down.weight"], state.get(f"{name}.lora_up.weight")
        unknown = [
            k
            for k in state
            if k.startswith(name + ".") and not k.endswith(("lora_down.weight", "lora_up.weight", "alpha"))
        ]
        if path is None or up is None or unknown or down.ndim != 2 or up.ndim != 2:
            return None, f"layer {name} is not a plain LoRA of a Linear layer of this model"
        weight = modules[path].weight
        if (up.shape[0], down.shape[1]) != tuple(weight.shape) or up.shape[1] != down.shape[0]:
            return (
                None,
                f"layer {name} has shapes {tuple(up.shape)} x {tuple(down.shape)}, not {tuple(weight.shape)}",
            )
        rank = int(down.shape[0])
        alpha = state.get(f"{name}.alpha")
        adapter = LoraAdapter(
            int(up.shape[0]), int(down.shape[1]), rank, float(alpha) if alpha is not None else rank
        )
        with torch.no_grad():
            adapter.down.copy_(down.float())
            adapter.up.copy_(up.float())
        adapter.requires_grad_(False)
        adapters[path] = adapter
    return adapters, None


def _tensors(value) -> list[torch.Tensor]:
    """Every tensor in a patch entry (ComfyUI weight adapters keep theirs in ``.weights``)."""
    value = getattr(value, "weights", value)
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and torch.equal(x.detach().float().cpu(), y.detach().float().cpu())
        for x, y in zip(a, b)
    )


def carried_lora(model, state: Mapping[str, torch.Tensor]) -> tuple[str, int]:
    """What the MODEL carries: ("same", n) when a loader applied this file to it (every layer),
    ("other", n) when it has weight patches of something else, ("none", 0) otherwise; n is the
    number of patched weights."""
    import comfy.lora

    patched = getattr(model, "patches", {}) or {}
    count = sum(1 for v in patched.values() if v)
    if not count:
        return "none", 0
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    wanted = comfy.lora.load_lora(dict(state), key_map, log_missing=False)
    if wanted and all(
        any(_same(_tensors(entry[1]), _tensors(adapter)) for entry in patched.get(key, []))
        for key, adapter in wanted.items()
    ):
        return "same", count
    return "other", count


def without_lora(model, state: Mapping[str, torch.Tensor]):
    """A clone of ``model`` without the weight patches a loader added for this LoRA file."""
    import comfy.lora

    clone = model.clone()
    wanted = comfy.lora.load_lora(
        dict(state), comfy.lora.model_lora_keys_unet(model.model, {}), log_missing=False
    )
    for key, adapter in wanted.items():
        kept = [e for e in clone.patches.get(key, []) if not _same(_tensors(e[1]), _tensors(adapter))]
        if kept:
            clone.patches[key] = kept
        else:
            clone.patches.pop(key, None)
    clone.patches_uuid = uuid.uuid4()  # ComfyUI re-patches the weights of a clone with new patches
    return clone


def on_activations(model, adapters: Mapping[str, LoraAdapter]):
    """A clone of ``model`` whose adapted layers add their LoRA term to their output."""
    clone = model.clone()
    modules = dict(clone.model.diffusion_model.named_modules())
    device = torch.device(clone.load_device)
    for adapter in adapters.values():
        adapter.to(device)
    lora_forward.install(clone, lora_forward.ACTIVATIONS, {p: modules[p] for p in adapters}, adapters)
    return clone


def release(clone, paths) -> None:
    """Unloads ``clone`` if ComfyUI holds it loaded (which restores the layers' own forwards) and
    removes what restoring leaves on the layers; the MODEL it was cloned from is as before."""
    import comfy.model_management as mm

    for i in reversed(range(len(mm.current_loaded_models))):
        loaded = mm.current_loaded_models[i]
        if loaded.model is clone:
            with contextlib.suppress(Exception):
                loaded.model_unload()
            mm.current_loaded_models.pop(i)
    modules = dict(clone.model.diffusion_model.named_modules())
    lora_forward.remove_restored_forwards({p: modules[p] for p in paths})


@contextlib.contextmanager
def lora_for_restore(
    model, state: Mapping[str, torch.Tensor] | None, name: str = "the LoRA", use: str = APPLY
) -> Iterator[RestoreLora]:
    """The MODEL to restore with for LoRA weights ``state`` (None: no LoRA named), released on exit."""
    if use not in LORA_USES:
        raise ValueError(f"lora use must be one of {', '.join(LORA_USES)}; got {use!r}")
    if state is None:
        _, count = carried_lora(model, {})
        notes = [f"no LoRA named; the MODEL carries {count} patched weight(s) from a loader"] if count else []
        yield RestoreLora(model, notes=notes)
        return
    carried, count = carried_lora(model, state)
    if use == ALREADY_APPLIED:
        result = RestoreLora(model, notes=[f"{name}: already applied to the MODEL (by a loader)"])
        if carried == "none":
            result.warnings.append(
                f"lora use is 'already applied' but the MODEL carries no LoRA: restoring the base model with "
                f"{name}'s settings. Choose 'apply', or connect a MODEL with {name} applied."
            )
        elif carried == "other":
            result.warnings.append(
                f"lora use is 'already applied' but the MODEL carries another LoRA ({count} patched weights), "
                f"not {name}."
            )
        yield result
        return
    result = RestoreLora(model)
    if carried == "same":
        # Applied once: the loader's merged copy is taken off a clone and the exact form used instead.
        model = without_lora(model, state)
        result.notes.append(
            f"{name} was also applied by a loader: that merged copy is not used (not applied twice); "
            "Load LoRA can be removed"
        )
    if carried == "other":
        result.warnings.append(
            f"The MODEL already carries another LoRA ({count} patched weights); {name} is applied on top, "
            "and both act. Connect the plain model to restore with this LoRA alone."
        )
    adapters, why_not = adapters_from_state(state, dict(model.model.diffusion_model.named_modules()))
    if adapters is None:
        from .host import apply_lora

        result.model = apply_lora(model, state)
        result.notes.append(f"{name}: merged into the weights by ComfyUI's LoRA loader ({why_not})")
        yield result
        return
    result.model = on_activations(model, adapters)
    result.notes.append(f"{name}: applied on activations to {len(adapters)} layers, as in training")
    try:
        yield result
    finally:
        release(result.model, list(adapters))


def load_lora_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors (a clear error for a file that is not a readable safetensors)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types
        raise ValueError(f"Cannot read LoRA {path} ({e}). Is it a complete .safetensors file?") from None
