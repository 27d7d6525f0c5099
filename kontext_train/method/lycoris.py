"""LoKr and LoHa adapters (the LyCORIS kinds), in the key layout ComfyUI's stock loaders read.

Both have the interface of ``lora.LoraAdapter``: ``delta()``, the weight-wrapper ``__call__``,
``on_activations`` and ``tensors()`` (the saved tensors by key suffix). ComfyUI's
``comfy/weight_adapter/lokr.py`` and ``loha.py`` (0.3.75 and 0.33.0 alike) rebuild the same delta
from those keys, with ``alpha / rank`` as the scale; tests/test_adapters.py checks it through the
stock loader.

- **LoKr**: ``kron(w1, w2_a @ w2_b) * alpha / rank``. ``w1`` is a small full matrix (out1, in1) and
  ``w2`` a rank-``rank`` product (out2, in2), with out = out1 * out2 and in = in1 * in2 split near
  their square roots. On activations it never builds the (out, in) weight: the input is viewed as
  an (in1, in2) matrix ``X`` and the term is ``w1 @ X @ w2.T``. Very few parameters for its rank.
- **LoHa**: ``(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank`` (element-wise product of two rank-r
  products: up to rank r^2 for the parameters of a rank-2r LoRA). The element-wise product has no
  low-rank form, so ``on_activations`` builds the (out, in) delta and applies it; backward then
  needs a full-size gradient per adapted layer, as the weights form does.
"""

from __future__ import annotations

import math

import torch


def split_dimension(n: int) -> tuple[int, int]:
    """(a, b) with a * b == n, a <= b and a the largest divisor of n not above sqrt(n)."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


class _LycorisAdapter(torch.nn.Module):
    KIND = ""

    def __init__(self, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"{self.KIND} rank must be at least 1, got {rank}")
        self.rank = rank
        self.alpha = float(alpha)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:  # (out, in) in the parameters' dtype
        raise NotImplementedError

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:  # ComfyUI weight-wrapper protocol
        return weight + self.delta().to(weight.dtype)

    def passive_memory_usage(self) -> int:
        return sum(p.nelement() * p.element_size() for p in self.parameters())

    def move_to(self, device: torch.device | str) -> int:
        self.to(device=device)
        return self.passive_memory_usage()


class LokrAdapter(_LycorisAdapter):
    """Kronecker-product delta for one Linear weight (out_features, in_features); starts at zero
    (``w2_b`` is zero), ``w1`` and ``w2_a`` get Kaiming-uniform-like bounds."""

    KIND = "lokr"
    ZERO_INIT = ("w2_b",)

    def __init__(
        self,
        out_features: int,
        in_features: int,
        rank: int,
        alpha: float,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(rank, alpha)
        out1, out2 = split_dimension(out_features)
        in1, in2 = split_dimension(in_features)
        w1 = torch.empty(out1, in1).uniform_(-1 / math.sqrt(in1), 1 / math.sqrt(in1), generator=generator)
        w2_a = torch.empty(out2, rank).uniform_(
            -1 / math.sqrt(rank), 1 / math.sqrt(rank), generator=generator
        )
        self.w1 = torch.nn.Parameter(w1.to(dtype))
        self.w2_a = torch.nn.Parameter(w2_a.to(dtype))
        self.w2_b = torch.nn.Parameter(torch.zeros(rank, in2, dtype=dtype))

    def delta(self) -> torch.Tensor:
        return torch.kron(self.w1, self.w2_a @ self.w2_b) * self.scale

    def on_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ delta().T`` without the (out, in) matrix: ``kron(A, B) @ vec(X) = vec(A X B^T)``
        for the row-major view ``X`` (in1, in2) of each input row."""
        in1, in2 = self.w1.shape[1], self.w2_b.shape[1]
        rows = x.reshape(*x.shape[:-1], in1, in2)
        t = torch.nn.functional.linear(rows, self.w2_b.to(x.dtype))  # (..., in1, rank)
        t = torch.nn.functional.linear(t * self.scale, self.w2_a.to(x.dtype))  # (..., in1, out2)
        out = torch.matmul(self.w1.to(x.dtype), t)  # (..., out1, out2)
        return out.reshape(*x.shape[:-1], -1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"lokr_w1": self.w1, "lokr_w2_a": self.w2_a, "lokr_w2_b": self.w2_b}


class LohaAdapter(_LycorisAdapter):
    """Hadamard-product delta; starts at zero (``w2_a`` is zero), initialised as LyCORIS does."""

    KIND = "loha"
    ZERO_INIT = ("w2_a",)

    def __init__(
        self,
        out_features: int,
        in_features: int,
        rank: int,
        alpha: float,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(rank, alpha)
        # LyCORIS' initialisation: w1_a ~ N(0, 0.1), both b factors ~ N(0, 1), w2_a zero.
        w1_a = torch.empty(out_features, rank).normal_(0.0, 0.1, generator=generator)
        w1_b = torch.empty(rank, in_features).normal_(0.0, 1.0, generator=generator)
        w2_b = torch.empty(rank, in_features).normal_(0.0, 1.0, generator=generator)
        self.w1_a = torch.nn.Parameter(w1_a.to(dtype))
        self.w1_b = torch.nn.Parameter(w1_b.to(dtype))
        self.w2_a = torch.nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))
        self.w2_b = torch.nn.Parameter(w2_b.to(dtype))

    def delta(self) -> torch.Tensor:
        return (self.w1_a @ self.w1_b) * (self.w2_a @ self.w2_b) * self.scale

    def on_activations(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.delta().to(x.dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "hada_w1_a": self.w1_a,
            "hada_w1_b": self.w1_b,
            "hada_w2_a": self.w2_a,
            "hada_w2_b": self.w2_b,
        }


def adapter_parameter_count(kind: str, out_features: int, in_features: int, rank: int) -> int:
    """Trainable numbers of one adapter of ``kind`` on an (out, in) layer, without building it."""
    if kind == "lora":
        return rank * (out_features + in_features)
    if kind == "loha":
        return 2 * rank * (out_features + in_features)
    if kind == "lokr":
        (out1, out2), (in1, in2) = split_dimension(out_features), split_dimension(in_features)
        return out1 * in1 + rank * (out2 + in2)
    raise ValueError(f"adapter must be one of lora, lokr, loha; got {kind!r}")
