"""What diffusers makes of the pack's LoRA files, at full FLUX.1 size (19 double and 38 single
blocks, width 3072, MLP 12288): which layers it loads, and whether it rebuilds the trainer's deltas.

Rank 1 keeps the factors small and no model weights are needed: the adapters are built from the
known Flux layout and diffusers' transformer lives on the meta device. Building every full delta
(up to 21504 x 3072, ~500 layers) costs minutes on a CPU, so the deltas are compared on a random
probe, ``delta @ P``; ``test_probe_form_is_the_adapter_delta`` ties that form to ``delta()``.
"""

from __future__ import annotations

import pytest
import torch

from kontext_train.method.lora import (
    TARGET_SETS,
    LoraAdapter,
    atomic_save_safetensors,
    create_adapters,
    diffusers_dropped_layers,
    diffusers_support,
    sanitize_lora_name,
    select_targets,
    to_kohya_state_dict,
)

WIDTH, MLP, DOUBLE, SINGLE, HEAD_DIM = 3072, 12288, 19, 38, 128
RANK, ALPHA = 1, 0.5  # alpha / rank = 0.5, so a lost alpha shows up as a factor of 2


def flux_linear_shapes() -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every Linear of FLUX.1 Kontext dev, by its ComfyUI path."""
    w = WIDTH
    shapes = {"img_in": (w, 64), "txt_in": (w, 4096), "final_layer.linear": (64, w)}
    shapes["final_layer.adaLN_modulation.1"] = (2 * w, w)
    for embedder, in_features in (("time_in", 256), ("guidance_in", 256), ("vector_in", 768)):
        shapes[f"{embedder}.in_layer"] = (w, in_features)
        shapes[f"{embedder}.out_layer"] = (w, w)
    for i in range(DOUBLE):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}"
            shapes |= {f"{p}_mod.lin": (6 * w, w), f"{p}_attn.qkv": (3 * w, w), f"{p}_attn.proj": (w, w)}
            shapes |= {f"{p}_mlp.0": (MLP, w), f"{p}_mlp.2": (w, MLP)}
    for i in range(SINGLE):
        p = f"single_blocks.{i}"
        shapes |= {f"{p}.linear1": (3 * w + MLP, w), f"{p}.linear2": (w, w + MLP)}
        shapes[f"{p}.modulation.lin"] = (3 * w, w)
    return shapes


@pytest.fixture(scope="module")
def adapters() -> dict[str, LoraAdapter]:
    """Adapters on every Linear, with a random ``up`` (a fresh one is zero and would prove nothing)."""
    made = create_adapters(flux_linear_shapes(), rank=RANK, alpha=ALPHA, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in made.values():
            adapter.up.normal_(generator=g)
    return made


@pytest.fixture(scope="module")
def diffusers_rows() -> dict[str, tuple[str, torch.Tensor]]:
    """For each diffusers Linear: the Flux layer and the rows of it that it holds.

    Found with diffusers' own converter of Flux checkpoints on a fake checkpoint whose weights
    are (row index, layer id) pairs, so the splits, chunk orders and the final layer's scale/shift
    swap are diffusers', not this test's.
    """
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    shapes = flux_linear_shapes()
    layers = list(shapes)
    checkpoint = {}
    for layer_id, (path, (out_features, _)) in enumerate(shapes.items()):
        rows = torch.arange(out_features, dtype=torch.float64)
        checkpoint[f"{path}.weight"] = torch.stack([rows, torch.full_like(rows, layer_id)], dim=1)
        checkpoint[f"{path}.bias"] = rows.clone()
    norms = [f"double_blocks.{i}.{s}_attn.norm" for i in range(DOUBLE) for s in ("img", "txt")]
    norms += [f"single_blocks.{i}.norm" for i in range(SINGLE)]
    for norm in norms:
        for which in ("query_norm", "key_norm"):
            checkpoint[f"{norm}.{which}.scale"] = torch.zeros(HEAD_DIM)
    found = {}
    for key, weight in convert_flux_transformer_checkpoint_to_diffusers(checkpoint).items():
        if key.endswith(".weight") and weight.ndim == 2:
            assert weight[:, 1].unique().numel() == 1, key  # one diffusers Linear never mixes Flux layers
            found[key.removesuffix(".weight")] = (layers[int(weight[0, 1])], weight[:, 0].long())
    return found


def _probe(in_features: int, seed: int) -> torch.Tensor:
    return torch.randn(in_features, 2, generator=torch.Generator().manual_seed(seed))


def _probe_delta(adapter: LoraAdapter, probe: torch.Tensor) -> torch.Tensor:
    """``adapter.delta() @ probe`` without building the full delta."""
    with torch.no_grad():
        return adapter.scale * (adapter.up @ (adapter.down @ probe))


def _meta_pipeline():
    """A FluxKontextPipeline whose transformer has Flux dev's full layout on the meta device."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True)
    no = dict.fromkeys(("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    return FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), transformer=transformer, **no)


def _module(key: str) -> str:
    return key.rsplit(".lora_", 1)[0]


def test_probe_form_is_the_adapter_delta(adapters):
    adapter = adapters["double_blocks.0.img_attn.proj"]
    probe = _probe(WIDTH, 0)
    torch.testing.assert_close(_probe_delta(adapter, probe), adapter.delta() @ probe)


@pytest.mark.parametrize("targets", list(TARGET_SETS))
def test_diffusers_loads_the_trainers_deltas_or_names_what_it_drops(
    targets, adapters, diffusers_rows, tmp_path
):
    from diffusers import FluxKontextPipeline
    from peft.tuners.lora import LoraLayer

    chosen = {p: adapters[p] for p in select_targets(adapters, targets)}
    support = diffusers_support(chosen)
    path = atomic_save_safetensors(
        to_kohya_state_dict(chosen), tmp_path / "lora.safetensors", {"kontext_restore.diffusers": support}
    )
    converted = FluxKontextPipeline.lora_state_dict(str(tmp_path), weight_name=path.name)

    # Fused qkv becomes q, k, v and linear1 q, k, v and the MLP input; each part has lora_A and lora_B.
    parts = sum(3 if p.endswith(".qkv") else 4 if p.endswith(".linear1") else 1 for p in chosen)
    assert len(converted) == 2 * parts
    modules = {_module(k) for k in converted}
    loaded = {m.removeprefix("transformer.") for m in modules if m.startswith("transformer.")}
    unprefixed = {m for m in modules if not m.startswith("transformer.")}
    assert loaded | unprefixed <= set(diffusers_rows)  # every key names a real diffusers Linear
    dropped = sorted({diffusers_rows[m][0] for m in unprefixed})
    assert dropped == diffusers_dropped_layers(chosen)
    assert (support == "full") == (not unprefixed)
    if targets != "all_linear":
        assert support == "full"

    # The real loader, into Flux dev's layout: exactly the prefixed modules get a LoRA.
    pipe = _meta_pipeline()
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="x", low_cpu_mem_usage=True)
    lora_layers = {n: m for n, m in pipe.transformer.named_modules() if isinstance(m, LoraLayer)}
    assert set(lora_layers) == loaded

    probes = {layer: _probe(chosen[layer].down.shape[1], i) for i, layer in enumerate(chosen)}
    rebuilt: dict[str, torch.Tensor] = {}
    for module in sorted(loaded):
        layer, rows = diffusers_rows[module]
        lora_a = converted[f"transformer.{module}.lora_A.weight"]
        lora_b = converted[f"transformer.{module}.lora_B.weight"]
        assert lora_layers[module].r["x"] == lora_a.shape[0]
        out = rebuilt.setdefault(layer, torch.zeros(chosen[layer].up.shape[0], 2))
        out[rows] += lora_layers[module].scaling["x"] * (lora_b @ (lora_a @ probes[layer]))
    assert set(rebuilt) == set(chosen) - set(dropped)
    for layer, got in rebuilt.items():
        torch.testing.assert_close(got, _probe_delta(chosen[layer], probes[layer]), msg=layer)


def test_dropped_layers_convert_right_except_final_layer_alpha(adapters, diffusers_rows):
    """Had diffusers kept them, the embedders would be right and final_layer x rank/alpha."""
    from diffusers import FluxKontextPipeline

    chosen = {p: adapters[p] for p in select_targets(adapters, "all_linear")}
    converted = FluxKontextPipeline.lora_state_dict(to_kohya_state_dict(chosen))
    unprefixed = sorted({_module(k) for k in converted if not k.startswith("transformer.")})
    assert len(unprefixed) == 10 and len(diffusers_dropped_layers(chosen)) == 10
    for module in unprefixed:
        layer, rows = diffusers_rows[module]
        adapter = chosen[layer]
        lora_a, lora_b = converted[f"{module}.lora_A.weight"], converted[f"{module}.lora_B.weight"]
        lost_alpha = RANK / ALPHA if layer.startswith("final_layer.") else 1.0
        if layer.startswith("final_layer."):  # small enough to build whole; holds the scale/shift swap
            expected = adapter.delta()
            got = torch.zeros_like(expected)
            got[rows] = lora_b @ lora_a
            torch.testing.assert_close(got, expected * lost_alpha, msg=layer)
        else:
            probe = _probe(adapter.down.shape[1], 0)
            got = torch.zeros(adapter.up.shape[0], 2)
            got[rows] = lora_b @ (lora_a @ probe)
            torch.testing.assert_close(got, _probe_delta(adapter, probe), msg=layer)


def test_diffusers_support_names_the_dropped_layers():
    assert diffusers_support(["double_blocks.0.img_attn.qkv", "single_blocks.3.modulation.lin"]) == "full"
    assert diffusers_support(["single_blocks.0.linear1", "img_in", "final_layer.linear"]) == (
        "drops 2 layers: final_layer.linear, img_in"
    )
    assert diffusers_support(["txt_in"]) == "drops 1 layer: txt_in"


@pytest.mark.parametrize(
    "name", ["", "/etc/passwd", "../escape", "a/../../b", "C:\\\\x", "~/.bashrc", "bad|name", "  "]
)
def test_bad_lora_names_are_refused(name):
    with pytest.raises(ValueError):
        sanitize_lora_name(name)


def test_good_lora_names_are_normalised():
    assert sanitize_lora_name("restore") == "restore.safetensors"
    assert sanitize_lora_name("sub/dir/x.safetensors") == "sub/dir/x.safetensors"


def test_on_activations_adds_to_an_input_what_the_weight_wrapper_adds_to_the_weight():
    """The two forms of one adapter agree: ``x @ wrapper(W).T == x @ W.T + on_activations(x)``, in
    the input's dtype (float64 stays float64, bfloat16 inputs give bfloat16)."""
    g = torch.Generator().manual_seed(2)
    adapter = LoraAdapter(24, 40, rank=3, alpha=5.0, generator=g)
    with torch.no_grad():
        adapter.up.normal_(generator=g)
    weight = torch.randn(24, 40, generator=g, dtype=torch.float64)
    x = torch.randn(2, 7, 40, generator=g, dtype=torch.float64)
    term = adapter.on_activations(x)
    assert term.dtype == torch.float64 and term.abs().max() > 0.1
    torch.testing.assert_close(x @ weight.T + term, x @ adapter(weight).T, rtol=1e-12, atol=1e-12)
    assert adapter.on_activations(x.bfloat16()).dtype == torch.bfloat16
