"""What the Train LoRA node shows on itself while it trains: the step, loss and learning rate, the
speed and the time left, and the last things that happened to the run (resumed, checkpoint saved,
validated, where the LoRA went). The node only forwards the trainer's hooks here and draws the
text this returns; ComfyUI replaces the node's text with each update, so every update carries all
of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .step_losses import StepInfo
from .validation import format_validation_row

__all__ = ["TrainingStatus", "format_duration"]

EVENTS_SHOWN = 3  # latest events kept under the step line


def format_duration(seconds: float) -> str:
    """``1h 02m``, ``3m 05s``, ``12s``: the two largest units, as a person reads a time left."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def format_rate(seconds_per_step: float) -> str:
    """Seconds per step with two significant digits at least (0.012 s/step, 1.4 s/step, 12 s/step)."""
    if seconds_per_step >= 10:
        return f"{seconds_per_step:.0f} s/step"
    if seconds_per_step >= 0.1:
        return f"{seconds_per_step:.2f} s/step"
    return f"{seconds_per_step:.3f} s/step"


class TrainingStatus:
    """The node's status text, rebuilt on every hook.

    Speed is the wall time per step since the first step this session showed, so checkpoints and
    validations count in the time left; before a second step it is the first step's own time.
    """

    def __init__(self, total: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = int(total)
        self.clock = clock
        self._first: tuple[int, float] | None = None  # (step, time) of the first step seen
        self.step_line = f"starting: {self.total} steps"
        self.events: list[str] = []
        self.result = ""  # where the LoRA went, last: a long path wraps over several lines

    # -- hooks ----------------------------------------------------------------------------
    def on_step(self, info: StepInfo) -> str:
        now = self.clock()
        if self._first is None:
            self._first = (info.step, now - info.seconds_per_step)
            first_step = info.step - 1
        else:
            first_step = self._first[0] - 1
        done = info.step - first_step
        rate = (now - self._first[1]) / done if done > 0 else info.seconds_per_step
        left = max(0, info.total - info.step)
        timing = f"{format_rate(rate)}, ETA {format_duration(rate * left)}" if left else format_rate(rate)
        self.step_line = f"step {info.step}/{info.total}  loss {info.loss:.4f}  lr {info.lr:.2e}\n{timing}"
        return self.text()

    def on_resumed(self, step: int, checkpoint: Path | None = None) -> str:
        return self.event(f"resumed from step {step}")

    def on_checkpoint(self, step: int, checkpoint: Path | None = None) -> str:
        return self.event(f"checkpoint saved at step {step}")

    def on_validation(self, row: dict) -> str:
        """The scores in short (the node's report output has them all)."""
        if "psnr_restored" in row:
            scores = f"PSNR {row['psnr_restored']:.2f} dB (degraded {row['psnr_degraded']:.2f})"
        elif "latent_mse_restored" in row:
            scores = (
                f"latent MSE {row['latent_mse_restored']:.5f} (degraded {row['latent_mse_degraded']:.5f})"
            )
        else:
            return self.event(f"validation at {format_validation_row(row)}")
        return self.event(f"validation at step {row.get('step')}: {scores}")

    def on_done(self, lora_path: Path, step: int, already_complete: bool = False) -> str:
        if already_complete:
            self.step_line = f"already trained to step {step}: nothing trained or written"
        else:
            self.step_line = f"done: step {step}/{self.total}"
        self.result = f"LoRA: {lora_path}"
        return self.text()

    # -- text -----------------------------------------------------------------------------
    def event(self, text: str) -> str:
        self.events = [*self.events, text][-EVENTS_SHOWN:]
        return self.text()

    def text(self) -> str:
        return "\n".join([self.step_line, *reversed(self.events), *([self.result] if self.result else [])])
