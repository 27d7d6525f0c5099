"""The prompt a LoRA was trained with: recorded in its metadata, compared when restoring.

A restoration LoRA learns to restore under one prompt's conditioning; restoring with another
prompt gives the model conditioning it was never trained with. The trainer's callers record the
prompt text as ``kontext_restore.prompt`` (``PROMPT_KEY`` in ``metadata=``), ``restore_settings``
reads it back, and ``prompt_mismatch`` words the warning that the Restore node and
``kontext-train restore`` show when the prompt differs. LoRAs trained before the key existed
carry no prompt and get no warning.

The nodes receive CONDITIONING, not text: ``prompt_from_graph`` finds the text in the queued
workflow (ComfyUI's hidden ``PROMPT`` input) when it comes from a text encoder's widget, and
returns None (nothing recorded, nothing compared) when it cannot be known.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PROMPT_KEY = "prompt"  # metadata key, written as kontext_restore.prompt
EXCERPT_CHARS = 60  # of each prompt shown in the warning, around the first difference

# Inputs through which a node passes a prompt's conditioning on unchanged in meaning
# (FluxGuidance, ReferenceLatent, ConditioningSetTimestepRange...): followed to the encoder.
_PASS_THROUGH = ("conditioning",)
# Inputs that hold the prompt text on a text encoder (CLIPTextEncode: "text") or on the node
# that feeds its text input (a primitive string node: "value").
_TEXT_INPUTS = ("text", "value", "string")
_MAX_HOPS = 32


def _normal(text: str) -> str:
    # Runs of spaces and line breaks do not change what a prompt asks for.
    return " ".join(text.split())


def _excerpt(text: str, at: int) -> str:
    """About ``EXCERPT_CHARS`` of ``text`` from a little before index ``at`` (where two prompts
    start to differ), cut at spaces, with "..." where cut."""
    start = max(0, min(at - 20, len(text) - EXCERPT_CHARS))
    if start <= 15:  # eliding so little only hides a word or two
        start = 0
    else:
        space = text.find(" ", start, at)
        start = space + 1 if space != -1 else start
    end = start + EXCERPT_CHARS
    if end < len(text):
        space = text.rfind(" ", at + 1, end)
        end = space if space != -1 else end
    return ("..." if start > 0 else "") + text[start:end] + ("..." if end < len(text) else "")


def same_prompt(a: str, b: str) -> bool:
    """Whether two prompts ask for the same thing (runs of whitespace aside)."""
    return _normal(a) == _normal(b)


def prompt_mismatch(given: str | None, trained: str | None, lora_path: str) -> str | None:
    """The warning when ``given`` (the prompt restored with) differs from ``trained`` (the one
    the LoRA records), naming both shortened around their first difference; None when they
    agree (whitespace aside) or either is unknown."""
    if not given or not trained:
        return None
    a, b = _normal(given), _normal(trained)
    if a == b:
        return None
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (
        f'The prompt "{_excerpt(a, at)}" differs from the prompt {lora_path} was trained with, '
        f'"{_excerpt(b, at)}": the LoRA learned to restore under its training prompt; use that one.'
    )


def _linked_node(graph: Mapping[str, Any], value: Any) -> Mapping[str, Any] | None:
    """The node an API-format link ``[node id, output index]`` points to, or None."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and not isinstance(value[0], (list, dict)):
        node = graph.get(str(value[0]))
        return node if isinstance(node, Mapping) else None
    return None


def _text_of(graph: Mapping[str, Any], node: Mapping[str, Any]) -> str | None:
    inputs = node.get("inputs")
    if not isinstance(inputs, Mapping):
        return None
    for name in _TEXT_INPUTS:
        value = inputs.get(name)
        if isinstance(value, str):
            return value
        source = _linked_node(graph, value)  # the text itself comes from another node's widget
        if source is not None:
            source_inputs = source.get("inputs")
            if isinstance(source_inputs, Mapping):
                texts = [source_inputs.get(n) for n in _TEXT_INPUTS if isinstance(source_inputs.get(n), str)]
                if len(texts) == 1:
                    return texts[0]
            return None
    return None


def prompt_from_graph(
    graph: Mapping[str, Any] | None, node_id: Any, input_name: str = "conditioning"
) -> str | None:
    """The prompt text behind input ``input_name`` of node ``node_id`` in an API-format workflow
    (ComfyUI's hidden ``PROMPT``), or None when it cannot be known: not connected to a text
    encoder's widget, or computed by other nodes (combined conditioning, text built at run time)."""
    if not isinstance(graph, Mapping) or node_id is None:
        return None
    node = graph.get(str(node_id))
    seen: set[int] = set()
    for _ in range(_MAX_HOPS):
        if not isinstance(node, Mapping) or id(node) in seen:
            return None
        seen.add(id(node))
        inputs = node.get("inputs")
        if not isinstance(inputs, Mapping):
            return None
        source = _linked_node(graph, inputs.get(input_name))
        if source is None:
            return None
        text = _text_of(graph, source)
        if text is not None:
            return text
        source_inputs = source.get("inputs")
        names = [n for n in _PASS_THROUGH if isinstance(source_inputs, Mapping) and n in source_inputs]
        if not names:
            return None
        node, input_name = source, names[0]
    return None
