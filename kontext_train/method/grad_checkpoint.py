"""Running transformer blocks so that backward through them is correct.

Flux blocks in ComfyUI add their residuals in place (``img += ...``). With LoRA on every Linear
layer, autograd then either refuses ("modified by an inplace operation") or, under activation
checkpointing, silently recomputes from overwritten tensors and returns wrong gradients.
``OutOfPlaceAdds`` maps the in-place adds to ``torch.add`` while a block runs, which keeps the
block's numbers identical and its graph correct; ``run_block`` optionally wraps that in
non-reentrant activation checkpointing. The block modules themselves are never modified.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint
from torch.overrides import TorchFunctionMode

# ``a += b`` on a tensor reaches torch-function modes as ``Tensor.add_``; Python then rebinds
# ``a`` to whatever came back, so returning ``a + b`` is semantically identical for that
# statement. A bare ``t.add_(x)`` whose result is ignored would lose its effect, so the mode is
# only active inside Flux blocks, whose code uses ``+=`` for residuals (checked against ComfyUI's
# flux/layers.py); the RoPE's ``addcmul_`` with an ignored result is a different op and is left
# alone. Attention masks (``sim.add_(mask)``) are not used by the trainer.
_INPLACE_TO_OUT_OF_PLACE = {
    torch.Tensor.add_: torch.add,
    torch.Tensor.__iadd__: torch.add,
}


class OutOfPlaceAdds(TorchFunctionMode):
    """Turns ``a += b`` on tensors into ``a = a + b`` while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        replacement = _INPLACE_TO_OUT_OF_PLACE.get(func)
        if replacement is not None:
            return replacement(*args, **kwargs)
        return func(*args, **kwargs)


def _run_out_of_place(block: Callable[..., Any], *args: Any) -> Any:
    with OutOfPlaceAdds():
        return block(*args)


def run_block(block: Callable[..., Any], *args: Any, checkpoint: bool = False) -> Any:
    """Calls ``block(*args)`` with safe adds; recomputes activations in backward if ``checkpoint``.

    Checkpointing only pays off when gradients are being recorded; in no-grad code (sampling,
    validation) the block simply runs.
    """
    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(_run_out_of_place, block, *args, use_reentrant=False)
    return _run_out_of_place(block, *args)
