"""The VRAM planner: the live-bytes counter, the attention and autocast models, the planner against
the same training step run for real on the CPU, and the warning before a run."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kontext_train.plan.memory_plan import (
    GIB,
    AutocastEmulation,
    FlashAttention,
    LiveBytes,
    MemoryPlan,
    advise,
    allocator_peak,
    format_table,
    gib,
    tensor_bytes,
)


# -- the counter --------------------------------------------------------------------------------
def test_views_count_once_and_preexisting_storages_not_at_all():
    weight = torch.empty(64, 32)  # made before counting: like a model weight
    with LiveBytes() as counter:
        a = torch.empty(1000)
        views = [a.view(10, 100), a[::2], a.reshape(100, 10), a.unsqueeze(0)]
        wt = weight.t()  # a view of a weight: not new memory
        same = weight.to(torch.float32)  # a no-op cast returns the weight itself
        assert counter.live == 4000 and counter.allocations == 1
        b = a + 1  # a new storage
        assert counter.live == 8000 and counter.allocations == 2
    assert views and wt.data_ptr() == weight.data_ptr() and same is weight
    del b


def test_a_freed_tensor_leaves_the_live_count_but_not_the_peak():
    with LiveBytes() as counter:
        a = torch.empty(256, dtype=torch.float64)
        v = a.view(16, 16)
        del a
        assert counter.live == 2048  # the view still holds the storage
        del v
        assert counter.live == 0
        c = torch.empty(100, dtype=torch.uint8)
        assert counter.live == 100 and counter.peak == 2048
    del c


def test_counter_can_be_restricted_to_one_device():
    with LiveBytes("meta") as counter:
        cpu = torch.empty(1000)
        meta = torch.empty(1000, device="meta")
        assert counter.live == 4000
    assert cpu.numel() == meta.numel()


def test_tensor_bytes_counts_shared_storage_once():
    w = torch.empty(10, 10)
    assert tensor_bytes([w, w.t(), w[0]]) == 400
    assert tensor_bytes([w, torch.empty(5, dtype=torch.float16)]) == 410


# -- attention and autocast models ----------------------------------------------------------------
def test_flash_attention_keeps_qkv_output_and_float32_logsumexp():
    q, k, v = (
        torch.empty(2, 3, 40, 8, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    with LiveBytes("meta") as counter:
        out = FlashAttention.apply(q, k, v)
        # The output (B, H, L, D) bf16 and a float32 logsumexp (B, H, L) are new; q, k, v existed.
        assert counter.live == 2 * 3 * 40 * 8 * 2 + 2 * 3 * 40 * 4
        out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.dtype == torch.bfloat16


def test_autocast_emulation_casts_like_cuda_autocast():
    x = torch.randn(4, 8, device="meta")
    w = torch.randn(6, 8, device="meta")
    with AutocastEmulation(torch.bfloat16):
        assert torch.nn.functional.linear(x, w).dtype == torch.bfloat16
        assert (x @ w.t()).dtype == torch.bfloat16
        assert torch.nn.functional.layer_norm(x.bfloat16(), (8,)).dtype == torch.float32
        assert torch.softmax(x.bfloat16(), -1).dtype == torch.float32
        assert (x.bfloat16() * 2).dtype == torch.bfloat16  # not on either list: unchanged
        assert x.double().sum().dtype == torch.float64  # float64 is never cast


# -- the plan and the warning -----------------------------------------------------------------------
def _plan(total_gib: float, **settings) -> MemoryPlan:
    return MemoryPlan(settings or {"bucket": "1024x1024"}, int(total_gib * GIB), 0, 0, overhead=0)


def test_advise_is_silent_when_the_plan_fits_and_names_what_would_fit_otherwise():
    tried = []

    def option(name, total):
        def make():
            tried.append(name)
            return _plan(total)

        return name, make

    assert advise(_plan(10), free_bytes=16 * GIB, alternatives=[option("fp8", 8)]) is None
    assert tried == []  # alternatives are only planned when needed
    text = advise(_plan(30), 16 * GIB, [option("fp8", 20), option("smaller bucket", 12)])
    assert "30.0 GiB" in text and "16.0 GiB" in text
    assert "smaller bucket (12.0 GiB)" in text and "fp8" not in text.split("would fit")[1]
    assert "None of the usual" in advise(_plan(30), 16 * GIB, [option("fp8", 20)])


def test_format_table_and_gib():
    table = format_table([_plan(17.84, bucket="1024x1024", weights="fp8_e4m3fn")], ["bucket", "weights"])
    assert "| 1024x1024 | fp8_e4m3fn |" in table and "**17.8 GiB**" in table
    assert gib(1.5 * GIB) == "1.5 GiB"


# -- against the real step ------------------------------------------------------------------------
TINY = dict(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1, context_in_dim=64)


def _tiny_settings(**changes):
    from kontext_train.comfyui.memory_probe import PlanSettings

    base = dict(weight_dtype="fp32", width=256, height=256, reference=True, rank=8, text_tokens=64, **TINY)
    return PlanSettings(**{**base, **changes})


def _measured_peak(settings, attention: str) -> tuple[int, int]:
    """The step run for real on the CPU (tiny random weights): the peak the CPU allocator saw
    (torch.profiler's memory events, independent of the planner's counter) and ``LiveBytes``'s."""
    import comfy.ldm.flux.math as flux_math
    import comfy.ldm.modules.attention as comfy_attention

    from kontext_train import comfyui
    from kontext_train.comfyui.memory_probe import measure_step

    patcher = comfyui.build_tiny_flux(**{k: v for k, v in TINY.items()})
    model = comfyui.FluxLoraModel(
        patcher, rank=settings.rank, alpha=float(settings.rank),
        gradient_checkpointing=settings.gradient_checkpointing,
    )  # fmt: skip
    model.load()
    original = flux_math.optimized_attention
    if attention == "flash":
        # torch's own SDPA: on the CPU it takes its flash kernel (output + logsumexp kept).
        flux_math.optimized_attention = comfy_attention.attention_pytorch
    counter = LiveBytes("cpu")
    try:
        measure_step(model, settings, counter)
        for p in model.parameters():
            p.grad = None
        allocated = allocator_peak(lambda: measure_step(model, settings, LiveBytes("cpu")))
    finally:
        flux_math.optimized_attention = original
        model.release()
    return allocated, counter.peak


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointed", "full-graph"])
@pytest.mark.parametrize("attention", ["native", "flash"])
def test_planned_peak_matches_the_real_cpu_step(comfy_root, checkpointing, attention):
    """The planner (meta device) against the same step for real on the CPU, with the same
    attention: ComfyUI's CPU attention ("native") or torch's SDPA kernel, whose footprint is what
    ``FlashAttention`` models. The reference tokens make the attention the larger part."""
    from kontext_train.comfyui.memory_probe import plan_memory

    settings = _tiny_settings(gradient_checkpointing=checkpointing)
    planned = plan_memory(settings, attention=attention, autocast=False)
    allocated, counted = _measured_peak(settings, attention)
    assert allocated > 1_000_000
    assert abs(planned.step_peak - allocated) <= 0.10 * allocated, (planned.step_peak, allocated)
    assert abs(planned.step_peak - counted) <= 0.10 * counted, (planned.step_peak, counted)
    # The LoRA state and the resident weights are what the model holds.
    assert planned.weights == 4 * sum(p.numel() for p in _tiny_weights(TINY))


def _tiny_weights(size):
    """The parameters and buffers of a tiny Flux of ``size`` (float32)."""
    from kontext_train import comfyui

    base = comfyui.build_tiny_flux(**size).model.diffusion_model
    return list(base.state_dict().values())


def test_checkpointing_and_flash_attention_plan_less_memory(comfy_root):
    from kontext_train.comfyui.memory_probe import plan_memory

    s = _tiny_settings(width=512, height=512)
    on = plan_memory(s, attention="flash", autocast=False).step_peak
    off = plan_memory(
        _tiny_settings(width=512, height=512, gradient_checkpointing=False), autocast=False
    ).step_peak
    native_off = plan_memory(
        _tiny_settings(width=512, height=512, gradient_checkpointing=False),
        attention="native",
        autocast=False,
    ).step_peak
    assert on < off < native_off


def test_fp8_weights_are_half_of_bf16_and_cast_per_layer(comfy_root):
    from kontext_train.comfyui.memory_probe import plan_memory

    bf16 = plan_memory(_tiny_settings(weight_dtype="bf16"))
    fp8 = plan_memory(_tiny_settings(weight_dtype="fp8_e4m3fn"))
    assert fp8.weights < 0.6 * bf16.weights
    assert fp8.step_peak > bf16.step_peak  # the bf16 copies made as each layer runs
    assert fp8.lora == bf16.lora > 0


def test_run_check_warns_on_cuda_when_free_memory_is_short(comfy_root, monkeypatch):
    """The check before a run, with the device and its free memory injected (no GPU here)."""
    from kontext_train import comfyui
    from kontext_train.comfyui import memory_check
    from kontext_train.method.train_config import TrainConfig

    model = comfyui.build_tiny_flux(**TINY)
    config = TrainConfig(rank=8, formulation="bridge", gradient_checkpointing=False)
    buckets = [(128, 128), (256, 256)]
    assert memory_check.check_run_memory(model, config, buckets, 64) is None  # CPU: skipped

    settings = memory_check.settings_for_run(model, config, buckets, 64)
    assert (settings.width, settings.hidden_size, settings.weight_dtype) == (256, 256, "fp32")
    needed = memory_check.cached_plan(settings).total
    with_checkpointing = memory_check.cached_plan(replace(settings, gradient_checkpointing=True)).total
    assert with_checkpointing < needed
    monkeypatch.setattr(memory_check, "run_device", lambda model: torch.device("cuda"))
    monkeypatch.setattr(memory_check, "device_free_bytes", lambda device: int(needed * 1.2))
    assert memory_check.check_run_memory(model, config, buckets, 64) is None
    free = int(with_checkpointing / 0.95) + 1  # checkpointing fits with the 5% margin, the run does not
    assert needed > free * 0.95
    monkeypatch.setattr(memory_check, "device_free_bytes", lambda device: free)
    warning = memory_check.check_run_memory(model, config, buckets, 64)
    assert warning is not None and "gradient_checkpointing on" in warning


def test_parse_bucket():
    from kontext_train.comfyui.memory_probe import MAX_SIDE, parse_bucket

    assert parse_bucket("1024") == (1024, 1024)
    assert parse_bucket("1184x880") == (1184, 880)
    assert parse_bucket(0) == (672, 1568)
    assert parse_bucket("1024", 0.5) == (512, 512)
    assert parse_bucket(f"{MAX_SIDE}x16") == (MAX_SIDE, 16) and MAX_SIDE == 6272
    for bad in ("big", "-5", "100000", "1000", "1024x-16", f"{MAX_SIDE + 16}x1024"):
        with pytest.raises(ValueError, match=f"bucket '{bad}'"):
            parse_bucket(bad)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--bucket", "100000"], "bucket '100000': sides must be multiples of 16 from 16 to 6272"),
        (["--bucket", "-5"], "bucket '-5': sides must be"),
        (["--free-gib", "nan"], "--free-gib must be a number of GiB from 0"),
        (["--free-gib", "-1"], "--free-gib must be"),
        (["--overhead-gib", "inf"], "--overhead-gib must be"),
        (["--text-tokens", "0"], "--text-tokens must be from 1 to 4096"),
        (["--bucket-scale", "nan"], "bucket_scale must be a finite number"),
    ],
)
def test_plan_command_bad_values_get_one_line_errors(capsys, flags, message):
    from kontext_train.app.cli import main

    assert main(["plan", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and "Traceback" not in err, err


def test_plan_command_says_what_bucket_scale_made_of_the_bucket():
    from kontext_train.app.plan_command import build_parser, scaled_bucket_note, settings_from

    ns = build_parser().parse_args(["--bucket", "1024", "--bucket-scale", "0.5"])
    note = scaled_bucket_note(ns, settings_from(ns))
    assert note == (
        "note: --bucket 1024 at --bucket-scale 0.5 plans 512x512 (scaled as training scales its "
        "buckets; --bucket 512x512 alone plans the same)"
    )
    ns = build_parser().parse_args(["--bucket", "1024"])
    assert scaled_bucket_note(ns, settings_from(ns)) is None


_CAPPED_PLAN = """
import resource, sys
from kontext_train import comfyui
from kontext_train.app.cli import main

comfyui.bootstrap_comfyui(cpu=True)
import kontext_train.comfyui.memory_probe  # noqa: F401  (everything imported before the cap)

def data_bytes():
    status = open("/proc/self/status").read()
    return int(status.split("VmData:")[1].split()[0]) * 1024

cap = data_bytes() + (1 << 30)
resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
for flags in sys.argv[1:]:
    code = main(["plan", *flags.split()])
    print("exit", code, flush=True)
    if code:
        sys.exit(code)
print("grew at most", (data_bytes() - cap + (1 << 30)) >> 20, "MiB")
"""


@pytest.mark.slow
def test_the_full_size_plan_needs_less_than_1_gib_of_host_memory(comfy_root, tmp_path):
    """The full model planned on meta in a child process whose private memory (RLIMIT_DATA: heap
    and anonymous mappings, which every tensor allocation goes through) is capped at what it held
    after importing ComfyUI plus 1 GiB. On ComfyUI 0.33 loading a meta model used to fill it with
    real zeros on the host (22 GiB for bf16); all_linear adapters at rank 256 are 1.6 GiB."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "capped_plan.py"
    script.write_text(_CAPPED_PLAN)
    env = {**os.environ, "COMFYUI_PATH": str(comfy_root), "PYTHONPATH": str(Path(__file__).parents[1])}
    settings = ["--bucket 1024", "--bucket 6272x2688 --lora-targets all_linear --rank 256 --reference"]
    done = subprocess.run(
        [sys.executable, str(script), *settings], env=env, capture_output=True, text=True, timeout=900
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert out.count("exit 0") == 2 and "bucket=6272x2688" in out and "total" in out
    assert "can't allocate" not in out


def test_plan_command_refuses_a_bad_bucket_and_plans_the_table_combinations(capsys):
    from kontext_train.app.cli import main
    from kontext_train.app.plan_command import build_parser, pivot, settings_from, table_settings

    assert main(["plan", "--bucket", "huge"]) == 2
    assert "bucket 'huge'" in capsys.readouterr().err
    ns = build_parser().parse_args(
        ["--bucket", "1024", "--bucket-scale", "0.5", "--rank", "32", "--reference"]
    )
    s = settings_from(ns)
    assert (s.width, s.height, s.rank, s.reference) == (512, 512, 32, True)
    combos = table_settings(s)
    assert len({c.label().values().__str__() for c in combos}) == len(combos) == 48
    plans = [MemoryPlan(c.label(), GIB, 0, 0, overhead=0) for c in combos]
    table = pivot(plans)
    assert table.count("\n") == 2 + 6 - 1 and "| 1024x1024 | on | 1.0 GiB |" in table


def test_a_training_run_shows_the_memory_warning_and_still_trains(
    comfy_root, tiny_vae, tmp_path, monkeypatch
):
    """run.py plans before training (the node and the command share it) and says the warning
    through on_message; the device and its free memory are injected (no GPU here)."""
    from _bad_images import write_good
    from conftest import make_conditioning, make_tiny_flux

    from kontext_train.comfyui import memory_check
    from kontext_train.data.dataset import build_dataset
    from kontext_train.method.train_config import TrainConfig
    from kontext_train.train.run import RunHooks, RunOutputs, train_lora
    from kontext_train.train.run_latents import latents_from_vae

    for i in range(2):
        write_good(tmp_path / "hq" / f"p{i}.png", 96, 64, seed=i)
    dataset = build_dataset(tmp_path / "hq", val_count=0, seed=0, bucket_scale=0.0625, min_size=8)
    latents = latents_from_vae(dataset, tiny_vae, tmp_path / "cache", "pool", 1, 0)
    config = TrainConfig(
        steps=1, rank=2, warmup_steps=0, validate_every_epochs=0, gradient_checkpointing=False
    )
    outputs = RunOutputs(tmp_path / "loras" / "r.safetensors", tmp_path / "run")
    planned = []
    monkeypatch.setattr(memory_check, "run_device", lambda model: torch.device("cuda"))
    monkeypatch.setattr(memory_check, "device_free_bytes", lambda device: planned.append(device) or 1024)
    messages = []
    hooks = RunHooks(on_message=messages.append)
    result = train_lora(latents, make_tiny_flux(), make_conditioning(), config, outputs, hooks=hooks)
    warnings = [m for m in messages if m.startswith("Memory plan:")]
    assert len(warnings) == 1 and "0.0 GiB is free" in warnings[0] and "None of the usual" in warnings[0]
    assert planned == [torch.device("cuda")] and result.step == 1 and outputs.lora_path.exists()


def test_plan_command_takes_the_adapter_and_the_optimizer():
    from kontext_train.app.plan_command import build_parser, settings_from

    ns = build_parser().parse_args(["--adapter", "lokr", "--optimizer", "adafactor"])
    settings = settings_from(ns)
    assert (settings.adapter, settings.optimizer) == ("lokr", "adafactor")
    assert settings_from(build_parser().parse_args([])).optimizer == "adamw"
