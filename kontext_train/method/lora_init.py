"""Adapters built from an existing LoRA file, to continue training it (``init_lora``).

The file is kohya-format (``lora_unet_<path>.<suffix>``), as this pack writes and as other Flux
trainers (kohya's sd-scripts, and LyCORIS for LoKr/LoHa) write for the Flux transformer. Its
layers, per-layer rank and alpha and its adapter kind are read from the file; the new run trains
exactly those layers. Anything the pack could not train with the same meaning is refused with a
message naming the file and the reason: another key layout (diffusers/PEFT ``lora_A``), text
encoder layers, DoRA scales, LoKr/LoHa layouts other than the pack's, layers the model lacks, or
shapes that do not fit the model's layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .lora import KOHYA_PREFIX, adapter_class, kohya_layers, kohya_name, load_kohya_into

# The tensors of each adapter kind as this pack saves them (and ComfyUI loads them).
LAYOUTS = {
    frozenset({"lora_down.weight", "lora_up.weight"}): "lora",
    frozenset({"lokr_w1", "lokr_w2_a", "lokr_w2_b"}): "lokr",
    frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}): "loha",
}
# Which tensor holds the rank in its first dimension.
_RANK_KEY = {"lora": "lora_down.weight", "lokr": "lokr_w2_b", "loha": "hada_w1_b"}


@dataclass(frozen=True)
class InitInfo:
    kind: str
    layers: int
    ranks: tuple[int, ...]  # distinct ranks, ascending
    alphas: tuple[float, ...]

    def describe(self) -> str:
        rank = "/".join(map(str, self.ranks))
        alpha = "/".join(f"{a:g}" for a in self.alphas)
        return f"{self.kind}, {self.layers} layers, rank {rank}, alpha {alpha}"


def read_init_state(
    state: Mapping[str, torch.Tensor], source: str
) -> tuple[str, dict[str, str], dict[str, int], dict[str, float]]:
    """(kind, {kohya name: kind}, {name: rank}, {name: alpha}) of a LoRA state dict, or a
    ValueError naming ``source`` and why it cannot be continued."""
    if not state:
        raise ValueError(f"init_lora {source}: the file holds no tensors.")
    foreign = sorted(k for k in state if not k.startswith(KOHYA_PREFIX))
    if foreign:
        hint = (
            "it holds text encoder layers, which this trainer does not train"
            if any(k.startswith("lora_te") for k in foreign)
            else "it is not in kohya format (keys like lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight)"
        )
        raise ValueError(f"init_lora {source}: {hint}; first such key: {foreign[0]}.")
    kinds, ranks, alphas = {}, {}, {}
    for name, tensors in kohya_layers(state).items():
        layout = frozenset(tensors) - {"alpha"}
        kind = LAYOUTS.get(layout)
        if kind is None:
            raise ValueError(
                f"init_lora {source}: layer {name} holds {', '.join(sorted(layout))}; this trainer continues "
                "LoRA (lora_down/lora_up), LoKr (lokr_w1, lokr_w2_a, lokr_w2_b) and LoHa (hada_w1/w2 a/b) "
                "layers only (no DoRA, Tucker or other layouts)."
            )
        kinds[name] = kind
        ranks[name] = int(tensors[_RANK_KEY[kind]].shape[0])
        alpha = tensors.get("alpha")
        alphas[name] = float(alpha) if alpha is not None else float(ranks[name])
    found = sorted(set(kinds.values()))
    if len(found) > 1:
        raise ValueError(
            f"init_lora {source}: it mixes adapter kinds ({', '.join(found)}); one kind per file."
        )
    return found[0], kinds, ranks, alphas


def adapters_from_state(
    state: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    expected_kind: str,
    source: str,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.nn.Module], InitInfo]:
    """Adapters holding the file's weights, on the layers it names.

    ``shapes``: (out, in) of every Linear layer of the model by its path (the file may name any of
    them). ``expected_kind`` is the run's ``adapter`` setting; a file of another kind is refused.
    """
    kind, kinds, ranks, alphas = read_init_state(state, source)
    if kind != expected_kind:
        raise ValueError(
            f"init_lora {source} is a {kind} file but adapter is {expected_kind}: set adapter to {kind} "
            "to continue it."
        )
    by_name = {kohya_name(p): p for p in shapes}
    unknown = sorted(set(kinds) - set(by_name))
    if unknown:
        raise ValueError(
            f"init_lora {source}: {len(unknown)} layer(s) are not Linear layers of this model (first: "
            f"{unknown[0]}); it was trained for another base model."
        )
    cls = adapter_class(kind)
    adapters = {}
    for name in sorted(kinds, key=lambda n: by_name[n]):
        path = by_name[name]
        out_f, in_f = shapes[path]
        adapters[path] = cls(out_f, in_f, ranks[name], alphas[name], dtype=dtype)
    try:
        load_kohya_into(adapters, state)
    except ValueError as e:
        raise ValueError(f"init_lora {source}: {e}") from None
    info = InitInfo(
        kind, len(adapters), tuple(sorted(set(ranks.values()))), tuple(sorted(set(alphas.values())))
    )
    return adapters, info
