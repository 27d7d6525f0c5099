"""The training loss of each step: kept on the device, read to the host only when needed.

Reading a GPU tensor waits for the GPU, so the trainer keeps each step's micro-step losses on the
device and reads them together: when one is shown (``StepInfo.loss``), at a checkpoint, at the end,
and at least every ``LOSS_READ_EVERY`` steps. A non-finite loss raises ``NonFiniteLossError``
naming its step when it is read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["LOSS_READ_EVERY", "NonFiniteLossError", "StepInfo", "read_step_losses"]


@dataclass
class StepInfo:
    """What ``on_step`` gets after each optimizer step.

    The loss stays on the device until ``loss`` is first read (that read waits for the GPU), so a
    hook that shows it only every N steps costs one wait per N steps, not one per step.
    """

    step: int
    total: int
    read_loss: Callable[[], float]
    lr: float
    epoch: int
    seconds_per_step: float

    @property
    def loss(self) -> float:
        return self.read_loss()


class NonFiniteLossError(RuntimeError):
    pass


# Losses stay on the device until something needs them (a display, a checkpoint, the end); they
# are read at least this often anyway, so a non-finite loss nobody displays stops the run within
# this many steps. A checkpoint reads them first, so no state after a non-finite loss is saved.
LOSS_READ_EVERY = 10


def read_step_losses(
    pending: list[list[torch.Tensor]],
    first_step: int,
    grad_accum: int,
    losses: list[float],
    last_checkpoint: Path | None,
) -> None:
    """Appends to ``losses`` the loss of each step in ``pending`` (its micro-steps' losses, still on
    the device), after bringing them all to the host in one read.

    A step's loss is the mean of its micro-steps' losses, summed in Python floats in the same
    order as always, so the history is the same to the last bit. Raises NonFiniteLossError
    naming the first step (``first_step`` is the step of ``pending[0]``) whose loss is not finite.
    """
    values = iter(torch.stack([t for step in pending for t in step]).tolist())
    for offset, micro in enumerate(pending):
        step_loss = 0.0
        for _ in micro:
            step_loss += next(values) / grad_accum
        if not math.isfinite(step_loss):
            where = last_checkpoint or "none was written yet"
            raise NonFiniteLossError(
                f"The loss became {step_loss} at step {first_step + offset}; training stopped. The last "
                f"good checkpoint is kept ({where}). Lower the learning rate or check the data."
            )
        losses.append(step_loss)
