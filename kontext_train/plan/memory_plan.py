"""Peak memory of one training step, counted from the step itself rather than a hand formula.

``LiveBytes`` is a ``TorchDispatchMode`` that sees every tensor an op returns while it is active. A
storage is counted once (by identity: views share their base's storage), only when no input of the
op already had it (so a weight's transpose or a no-op ``.to`` is not a new allocation), and leaves
the count when its last reference dies (a ``weakref.finalize`` on the untyped storage, whose Python
object torch keeps alive exactly as long as the storage). ``peak`` is the largest live total seen.
Run on the meta device the same counting needs no memory at all, so a full-size Flux step can be
planned on a CPU.

Two things a meta run would get wrong for a CUDA training step are modelled here:
- attention: on meta (and CPU) torch takes the math path, which keeps the full attention matrices;
  CUDA's flash kernel keeps only q, k, v, the output and a float32 logsumexp. ``FlashAttention``
  is an autograd function with exactly that footprint (and no arithmetic);
- autocast: the trainer runs CUDA steps under ``torch.autocast(bfloat16)``, which casts the inputs
  of matrix products to bfloat16 and of norms/softmax/pow to float32 (torch's CUDA autocast lists);
  autocast ignores meta tensors, so ``AutocastEmulation`` makes the same casts above autograd, where
  autocast makes them, so the cast copies are saved for backward as they would be.

``MemoryPlan`` adds what lives outside the step (resident weights, LoRA parameters and their AdamW
state, a CUDA context and allocator overhead) to the step's peak.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 1024**3
# CUDA context (kernels of torch, cuBLAS, cuDNN loaded on the device) plus caching-allocator
# fragmentation and cuBLAS workspaces. An estimate: typically 0.5-1 GiB on recent GPUs for the
# context alone; not yet compared with torch.cuda.max_memory_allocated on a GPU.
DEFAULT_OVERHEAD_BYTES = int(1.5 * GIB)


def gib(n: float) -> str:
    """Bytes as GiB with one decimal, e.g. ``'11.1 GiB'``."""
    return f"{n / GIB:.1f} GiB"


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages created while active that are still alive, and their peak.

    ``device`` restricts counting to one device type (``"meta"``, ``"cpu"``, ``"cuda"``); None
    counts every device. Storages that existed before the mode (weights, inputs made outside it)
    are never counted, even when an op returns a view of them.
    """

    def __init__(self, device: str | None = None) -> None:
        super().__init__()
        self.device = device
        self.live = 0
        self.peak = 0
        self.allocations = 0
        self._sizes: dict[int, int] = {}

    def _forget(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def track(self, storage: torch.UntypedStorage) -> None:
        """Counts ``storage`` as allocated now (once; later calls with it do nothing)."""
        key = id(storage)
        if key in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.live += size
        self.allocations += 1
        self.peak = max(self.peak, self.live)
        # The Python storage object lives exactly as long as the C++ storage (torch preserves it),
        # so its finalizer runs when the last tensor or view of it dies.
        weakref.finalize(storage, self._forget, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            id(t.untyped_storage())
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and _has_storage(t)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or not _has_storage(t):
                continue
            if self.device is not None and t.device.type != self.device:
                continue
            storage = t.untyped_storage()
            if id(storage) not in inputs:
                self.track(storage)
        return out


def _has_storage(t: torch.Tensor) -> bool:
    # Sparse and some wrapper tensors have no storage; they never occur in a Flux step.
    try:
        t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return False
    return True


class FlashAttention(torch.autograd.Function):
    """The memory footprint of a flash-attention call, without its arithmetic (for planning).

    q, k, v: (batch, heads, tokens, head_dim). Forward returns an empty output of q's shape and
    saves q, k, v, the output and a float32 logsumexp (batch, heads, tokens), which is what
    ``torch.nn.functional.scaled_dot_product_attention``'s flash kernel keeps for backward.
    Backward returns empty gradients, plus a transient float32 accumulator of q's size (the
    kernel's dq accumulator). Only meaningful for counting memory: the values are garbage.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, _out, _lse = ctx.saved_tensors
        accumulator = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        del accumulator
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype | None
) -> torch.Tensor:
    """``FlashAttention`` on inputs cast to ``dtype`` first, as autocast casts them for SDPA."""
    if dtype is not None:
        q, k, v = (t.to(dtype) for t in (q, k, v))
    return FlashAttention.apply(q, k, v)


# torch's CUDA autocast policy (aten/src/ATen/autocast_mode.h, torch 2.x) for the ops a Flux step
# uses, by the name the Python-level function has.
_LOWER_PRECISION = frozenset(
    {"linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "einsum",
     "scaled_dot_product_attention", "conv1d", "conv2d", "conv3d"}
)  # fmt: skip
_FLOAT32 = frozenset(
    {"layer_norm", "group_norm", "softmax", "log_softmax", "pow", "__pow__", "rsqrt", "exp", "log",
     "sum", "cumsum", "mse_loss", "logsumexp", "norm", "reciprocal"}
)  # fmt: skip


class AutocastEmulation(TorchFunctionMode):
    """The casts ``torch.autocast("cuda", dtype)`` would make, applied to tensors of any device.

    Eligible inputs are floating tensors other than float64 (as in autocast). Casting above
    autograd is what autocast does too, so the cast copies take part in the graph the same way.
    """

    def __init__(self, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = self.dtype if name in _LOWER_PRECISION else torch.float32 if name in _FLOAT32 else None
        if target is not None:
            args, kwargs = _cast_tree(args, target), _cast_tree(kwargs, target)
        return func(*args, **kwargs)


def _cast_tree(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        eligible = value.is_floating_point() and value.dtype != torch.float64
        return value.to(dtype) if eligible and value.dtype != dtype else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_tree(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast_tree(v, dtype) for k, v in value.items()}
    return value


def allocator_peak(fn: Callable[[], object]) -> int:
    """Peak bytes the CPU allocator held beyond the start while ``fn`` ran, from torch.profiler's
    memory events (``profile_memory``): an independent measure of what ``LiveBytes`` counts, which
    also sees workspaces allocated and freed inside one op."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a weight and its views count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[id(storage)] = storage.nbytes()
    return sum(seen.values())


@dataclass
class MemoryPlan:
    """Predicted peak memory of training, in bytes.

    ``step_peak`` is the counted peak of one forward + backward: activations, cast copies,
    temporaries and the LoRA gradients. ``lora`` is the LoRA parameters and AdamW's two state
    tensors per parameter (same dtype as the parameter).
    """

    settings: dict
    weights: int
    lora: int
    step_peak: int
    overhead: int = DEFAULT_OVERHEAD_BYTES
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.step_peak + self.overhead

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("resident weights", gib(self.weights)),
            ("LoRA + AdamW state", gib(self.lora)),
            ("step peak (activations, casts, grads)", gib(self.step_peak)),
            ("CUDA context + allocator (estimate)", gib(self.overhead)),
            ("total", gib(self.total)),
        ]

    def describe(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        width = max(len(k) for k, _ in self.rows())
        lines = [f"Predicted peak GPU memory of one training step ({settings}):"]
        lines += [f"  {k.ljust(width)}  {v:>10}" for k, v in self.rows()]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def format_table(plans: Sequence[MemoryPlan], columns: Sequence[str]) -> str:
    """A Markdown table: one row per plan, the chosen ``columns`` of its settings, then the memory."""
    head = [*columns, "weights", "LoRA+AdamW", "step peak", "total"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for p in plans:
        cells = [str(p.settings.get(c, "")) for c in columns]
        cells += [gib(p.weights), gib(p.lora), gib(p.step_peak), f"**{gib(p.total)}**"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fits(plan: MemoryPlan, free_bytes: int, margin: float = 0.0) -> bool:
    """Whether ``plan`` fits in ``free_bytes`` with ``margin`` (a fraction) to spare."""
    return plan.total <= free_bytes * (1.0 - margin) and math.isfinite(plan.total)


def advise(
    plan: MemoryPlan,
    free_bytes: int,
    alternatives: Iterable[tuple[str, Callable[[], MemoryPlan]]] = (),
    margin: float = 0.05,
) -> str | None:
    """A warning when ``plan`` does not fit ``free_bytes`` (keeping ``margin`` spare), else None.

    ``alternatives`` are (what to change, a function planning it), tried in order only when the
    plan does not fit; the warning names those that would fit (or says none of them does).
    """
    if fits(plan, free_bytes, margin):
        return None
    settings = ", ".join(f"{k}={v}" for k, v in plan.settings.items())
    text = (
        f"Memory plan: this run needs about {gib(plan.total)} of GPU memory ({settings}) but "
        f"{gib(free_bytes)} is free; it will probably run out of memory."
    )
    fitting = []
    for change, make in alternatives:
        other = make()
        if fits(other, free_bytes, margin):
            fitting.append(f"{change} ({gib(other.total)})")
    if fitting:
        return text + " These would fit: " + "; ".join(fitting) + "."
    return (
        text
        + " None of the usual savings (fp8 weights, checkpointing, smaller buckets, rank) is enough alone."
    )
