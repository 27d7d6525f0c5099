"""The trainer node's status text (kontext_train.train.progress_text), on a made-up clock."""

from __future__ import annotations

from kontext_train.train.progress_text import TrainingStatus, format_duration
from kontext_train.train.step_losses import StepInfo


def _info(step: int, total: int = 100, seconds: float = 2.0) -> StepInfo:
    return StepInfo(step, total, lambda: 0.01234, 1e-4, 0, seconds)


def test_durations_read_like_a_time_left():
    assert [format_duration(s) for s in (0, 12.4, 185, 3720, 86399)] == [
        "0s",
        "12s",
        "3m 05s",
        "1h 02m",
        "23h 59m",
    ]


def test_speed_and_time_left_come_from_the_wall_clock_since_the_first_step():
    now = [100.0]
    status = TrainingStatus(100, clock=lambda: now[0])
    first = status.on_step(_info(1, seconds=2.0))  # before a second step: its own time
    assert first.splitlines() == ["step 1/100  loss 0.0123  lr 1.00e-04", "2.00 s/step, ETA 3m 18s"]
    now[0] += 8.0  # step 2 took 8 s (a checkpoint, say): 10 s for 2 steps
    assert status.on_step(_info(2)).splitlines()[1] == "5.00 s/step, ETA 8m 10s"
    now[0] += 0.5
    last = status.on_step(_info(100))
    assert last.splitlines()[1].endswith("s/step")  # no ETA at the last step


def test_events_show_newest_first_under_the_step_and_the_lora_path_when_done():
    status = TrainingStatus(10, clock=lambda: 0.0)
    status.on_resumed(4)
    status.on_step(_info(5, total=10))
    status.on_checkpoint(6)
    text = status.on_validation(
        {"step": 6, "epoch": 1, "latent_mse_restored": 0.1, "latent_mse_degraded": 0.2}
    )
    lines = text.splitlines()
    assert lines[0].startswith("step 5/10") and lines[1] == "2.00 s/step, ETA 10s"
    assert lines[2:] == [
        "validation at step 6: latent MSE 0.10000 (degraded 0.20000)",
        "checkpoint saved at step 6",
        "resumed from step 4",
    ]
    status.on_checkpoint(10)
    done = status.on_done("/models/loras/x.safetensors", 10).splitlines()
    # The LoRA's path last: a long path wraps, and the node's text box shows its first lines.
    assert done == [
        "done: step 10/10",
        "checkpoint saved at step 10",
        "validation at step 6: latent MSE 0.10000 (degraded 0.20000)",
        "checkpoint saved at step 6",
        "LoRA: /models/loras/x.safetensors",
    ]
    psnr = {"step": 8, "psnr_restored": 30.123, "psnr_degraded": 25.0, "latent_mse_restored": 0.1}
    assert (
        status.on_validation(psnr).splitlines()[1] == "validation at step 8: PSNR 30.12 dB (degraded 25.00)"
    )
    again = TrainingStatus(10).on_done("/l.safetensors", 10, already_complete=True)
    assert again == "already trained to step 10: nothing trained or written\nLoRA: /l.safetensors"
