"""What the trained adapters hold besides the step: their parameters and the optimizer's state.

Kept apart from the step planner (``memory_plan``/``comfyui/memory_probe``), which calls
``adapter_state_bytes`` for the run's adapter kind and optimizer. The per-optimizer counts are
``train/optimizers.state_bytes_per_number``, checked against each optimizer's real state in
tests/test_train_options.py; ``adapter_parameter_bytes`` sizes an adapter set without building it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..method.lycoris import adapter_parameter_count
from ..train.optimizers import state_bytes_per_number


def adapter_state_bytes(adapters: Mapping[str, torch.nn.Module], optimizer: str = "adamw") -> int:
    """Bytes of fresh ``adapters``' parameters plus the state ``optimizer`` keeps for them (each
    in its own dtype). A factor in the adapter's ``ZERO_INIT`` starts at zero (Prodigy then keeps
    one number for its initial value). Works on meta tensors: only shapes and dtypes are read."""
    total = 0
    for adapter in adapters.values():
        zero = getattr(adapter, "ZERO_INIT", ())
        for name, p in adapter.named_parameters():
            size = p.element_size()
            total += p.numel() * size + state_bytes_per_number(optimizer, tuple(p.shape), size, name in zero)
    return total


def adapter_parameter_bytes(
    shapes: Mapping[str, tuple[int, int]], kind: str, rank: int, element_size: int = 4
) -> int:
    """Bytes of the trainable numbers of ``kind`` adapters of ``rank`` on layers of ``shapes``."""
    return element_size * sum(adapter_parameter_count(kind, o, i, rank) for o, i in shapes.values())
