"""How the training clone applies its LoRA adapters: on activations (default) or on weights.

``activations``: each adapted layer computes ``base(x) + scale * (x @ down.T) @ up.T``. The base
layer runs its own ComfyUI forward (``comfy.ops`` casts, fp8-stored weights with manual cast,
offloaded weights, quantized layers), and backward never builds the full-size weight gradient the
weight form needs; the low-rank term is computed in the input's dtype.

``weights``: each adapter is a ComfyUI weight wrapper (``ModelPatcher.add_weight_wrapper``), so the
layer's weight is rebuilt as ``W + scale * up @ down`` on every forward.

Both are installed on the training clone only, through mechanisms its ModelPatcher undoes when the
clone is unloaded, so the shared MODEL never runs with them. ComfyUI 0.33 has a forward-replacing
"bypass" mode of its own (``comfy/weight_adapter/bypass.py``); 0.3.75 does not, so the activations
form uses an object patch on each layer's ``forward``, which both hosts apply in
``ModelPatcher.patch_model`` and restore in ``unpatch_model``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from ..method.lora import LoraAdapter

log = logging.getLogger("kontext_restore")

ACTIVATIONS = "activations"
WEIGHTS = "weights"
LORA_FORMS = (ACTIVATIONS, WEIGHTS)


class LoraForward:
    """The ``forward`` an adapted layer has while the training clone is loaded.

    It calls the layer's class-level forward (whatever ComfyUI's ops make of it), then adds the
    adapter's low-rank term of the same input.
    """

    def __init__(self, module: torch.nn.Module, adapter: LoraAdapter) -> None:
        self.module = module
        self.adapter = adapter

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = type(self.module).forward(self.module, x, *args, **kwargs)
        return out + self.adapter.on_activations(x).to(out.dtype)


def activation_form_problem(module: torch.nn.Module) -> str | None:
    """Why ``module`` cannot take the activations form, or None when it can.

    It needs a Linear-like layer (``torch.nn.Linear`` or ComfyUI's quantized Linear, which has
    ``in_features``/``out_features``) whose forward is its class's: a forward already replaced on
    the instance (another custom node, ComfyUI 0.33's bypass LoRA) would be skipped by ours.
    """
    linear_like = isinstance(module, torch.nn.Linear) or (
        isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int)
    )
    if not linear_like:
        return f"{type(module).__name__} is not a Linear layer"
    if "forward" in vars(module):
        return f"{type(module).__name__} already has its forward replaced on the instance"
    return None


def choose_form(
    requested: str, modules: Mapping[str, torch.nn.Module], object_patches: Mapping | None = None
) -> str:
    """The form to use: ``requested``, or ``weights`` when any target cannot take activations
    (see ``activation_form_problem``, or the MODEL already object-patches its forward)."""
    if requested not in LORA_FORMS:
        raise ValueError(f"lora_form must be one of {', '.join(LORA_FORMS)}; got {requested!r}")
    if requested == WEIGHTS:
        return WEIGHTS
    for path, module in modules.items():
        problem = activation_form_problem(module)
        if f"diffusion_model.{path}.forward" in (object_patches or {}):
            problem = "the MODEL already replaces its forward (an object patch from another node)"
        if problem is not None:
            log.warning(
                "Kontext Restore: LoRA applied as weight wrappers instead of on activations: layer %s: %s.",
                path,
                problem,
            )
            return WEIGHTS
    return ACTIVATIONS


def install(patcher, form: str, modules: Mapping[str, torch.nn.Module], adapters: Mapping[str, LoraAdapter]):
    """Registers the adapters on ``patcher`` in ``form``; ComfyUI applies them when it loads it."""
    for path, adapter in adapters.items():
        if form == ACTIVATIONS:
            patcher.add_object_patch(f"diffusion_model.{path}.forward", LoraForward(modules[path], adapter))
        else:
            patcher.add_weight_wrapper(f"diffusion_model.{path}.weight", adapter)


def forwards_in_place(modules: Mapping[str, torch.nn.Module], adapters: Mapping[str, LoraAdapter]) -> bool:
    """Whether the activations form's forwards are on the model right now. ComfyUI restores them
    when it unloads the clone (e.g. to make room for the VAE during validation); it applies and
    restores a patcher's object patches all together, so the first and last layer tell."""
    paths = list(adapters)
    for path in {paths[0], paths[-1]}:
        wrapper = vars(modules[path]).get("forward")
        if not (isinstance(wrapper, LoraForward) and wrapper.adapter is adapters[path]):
            return False
    return True


def remove_restored_forwards(modules: Mapping[str, torch.nn.Module]) -> None:
    """Deletes the instance ``forward`` ComfyUI leaves when it restores an object patch.

    ``unpatch_model`` restores the value it read before patching, the layer's own bound class
    forward, as an instance attribute: it behaves the same, but the shared model should be left as
    it was. Only that exact value is removed; anything else on the instance is someone else's.
    """
    for module in modules.values():
        current = vars(module).get("forward")
        if (
            getattr(current, "__self__", None) is module
            and getattr(current, "__func__", None) is type(module).forward
        ):
            del module.forward
