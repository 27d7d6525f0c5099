"""Queue-time refusal of prompts that would run only in part, or with values of the wrong type.

ComfyUI validates a prompt output by output (``execution.validate_prompt``): when one output fails
(a trainer with rank 0) and another passes (the dataset summary shown by Preview as Text), it
queues the valid ones, answers HTTP 200 and mentions the failure only in ``node_errors``. The
trainer then silently does not run. ComfyUI also converts widget values before any node sees them
(``str(None)`` is "None", ``bool("false")`` is True) and passes a literal where a socket (MODEL,
VAE) expects a link, so wrong JSON types surface at run time as messages nobody can act on.

``install()`` adds an aiohttp middleware (the web framework's own extension point; ComfyUI builds
its app before loading custom nodes and starts it after) in front of ``POST /prompt`` that, for
prompts holding one of this pack's nodes only:

1. checks the raw JSON type of every input of the pack's nodes (text for text and choices, a
   number for numbers, true/false for switches, a link for sockets) and refuses wrong ones;
2. runs ComfyUI's own ``validate_prompt`` on a copy and refuses the whole prompt (HTTP 400, with
   ComfyUI's ``node_errors``) when any failure touches a pack node: the failing node is the pack's,
   or an output of the pack's would be dropped.

Anything else goes on to ComfyUI's handler unchanged, which answers as it always does (its own 400
for prompts that fail entirely). ``on_prompt`` handlers cannot refuse (ComfyUI logs and ignores
their exceptions), which is why this is a middleware.
"""

from __future__ import annotations

import copy
import logging
import math
import uuid
from typing import Any

log = logging.getLogger("kontext_restore")

PACK_PREFIX = "KontextRestore"
_PROMPT_PATHS = ("/prompt", "/api/prompt")
_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
_MARK = "_kontext_restore_prompt_check"


def is_pack_node(class_type: Any) -> bool:
    return isinstance(class_type, str) and class_type.startswith(PACK_PREFIX)


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _json_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the text {value!r}"
    return f"a JSON {type(value).__name__}"


def _type_problem(name: str, declared: Any, value: Any) -> str | None:
    """Why ``value`` (raw JSON, not a link) cannot be input ``name`` of type ``declared``."""
    if isinstance(value, dict) and "__value__" in value:
        value = value["__value__"]
    kind = "COMBO" if isinstance(declared, list) or "COMBO" in str(declared).split(",") else declared
    if kind in ("STRING", "COMBO"):
        if isinstance(value, str):
            return None
        return f"{name} must be text, got {_json_name(value)}."
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name} must be true or false, got {_json_name(value)}."
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
            return f"{name} must be a number, got {_json_name(value)}."
        return None  # text that is not a number is refused by ComfyUI's own conversion
    return (
        f"{name} takes a {kind} and must be linked from a node's {kind} output, got {_json_name(value)} "
        "written in its place."
    )


def input_type_errors(prompt: dict) -> dict[str, dict]:
    """``node_errors`` (ComfyUI's format) for the pack nodes of ``prompt`` whose inputs hold a
    raw value of the wrong JSON type. Needs ComfyUI's node registry (``nodes``)."""
    import nodes as comfy_nodes  # ComfyUI's own nodes module, not the pack's nodes/

    found: dict[str, dict] = {}
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or not is_pack_node(node.get("class_type")):
            continue
        cls = comfy_nodes.NODE_CLASS_MAPPINGS.get(node["class_type"])
        inputs = node.get("inputs")
        if cls is None or not isinstance(inputs, dict):
            continue  # ComfyUI refuses these itself
        declared = {}
        for group in ("required", "optional"):
            declared.update({k: v[0] for k, v in cls.INPUT_TYPES().get(group, {}).items()})
        errors = []
        for name, value in inputs.items():
            if name not in declared or _is_link(value):
                continue
            problem = _type_problem(name, declared[name], value)
            if problem:
                errors.append(
                    {
                        "type": "invalid_input_type",
                        "message": "Wrong type of input value",
                        "details": problem,
                        "extra_info": {"input_name": name, "received_value": _jsonable(value)},
                    }
                )
        if errors:
            found[str(node_id)] = {
                "errors": errors,
                "dependent_outputs": [],
                "class_type": node["class_type"],
            }
    return found


def _jsonable(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _refusal(node_errors: dict, details: str) -> dict:
    return {
        "error": {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": details,
            "extra_info": {},
        },
        "node_errors": node_errors,
    }


async def check_prompt(prompt: dict, partial_execution_targets: list | None = None) -> dict | None:
    """The HTTP 400 body refusing ``prompt``, or None to leave it to ComfyUI (see the module)."""
    import execution
    import server

    type_errors = input_type_errors(prompt)
    if type_errors:
        details = "\n".join(e["details"] for entry in type_errors.values() for e in entry["errors"])
        return _refusal(type_errors, details)
    trial = copy.deepcopy(prompt)  # validation converts values in place
    replacements = getattr(getattr(server.PromptServer, "instance", None), "node_replace_manager", None)
    if replacements is not None:  # 0.33.0 applies these before validating
        replacements.apply_replacements(trial)
    valid, _, _, node_errors = await execution.validate_prompt(
        str(uuid.uuid4()), trial, partial_execution_targets
    )
    if not valid or not node_errors:
        return None  # fully valid, or refused by ComfyUI's own answer

    def touches_pack(node_id: str, entry: dict) -> bool:
        ids = [node_id, *entry.get("dependent_outputs", [])]
        return any(is_pack_node(trial.get(i, {}).get("class_type")) for i in ids)

    if not any(touches_pack(k, v) for k, v in node_errors.items()):
        return None
    lines = [
        f"{entry.get('class_type')} {node_id}: {error.get('message')}: {error.get('details')}"
        for node_id, entry in node_errors.items()
        for error in entry.get("errors", [])
    ]
    lines.append(
        "Nothing was queued: a Kontext Restore node would not run, so the rest of the workflow is not run "
        "without it."
    )
    return _refusal(node_errors, "\n".join(lines))


def _middleware():
    from aiohttp import web

    @web.middleware
    async def kontext_restore_prompt_check(request, handler):
        if request.method != "POST" or request.path not in _PROMPT_PATHS:
            return await handler(request)
        try:
            data = await request.json()  # aiohttp keeps the body: the handler reads it again
        except Exception:  # noqa: BLE001 - ComfyUI's handler answers malformed requests
            return await handler(request)
        prompt = data.get("prompt") if isinstance(data, dict) else None
        if not isinstance(prompt, dict) or not any(
            isinstance(n, dict) and is_pack_node(n.get("class_type")) for n in prompt.values()
        ):
            return await handler(request)
        try:
            refusal = await check_prompt(prompt, data.get("partial_execution_targets"))
        except Exception as e:  # noqa: BLE001 - never block a prompt on a fault of this check
            log.warning("Kontext Restore: the queue-time check failed (%s); ComfyUI validates alone.", e)
            refusal = None
        if refusal is None:
            return await handler(request)
        log.warning("Kontext Restore refused a prompt:\n%s", refusal["error"]["details"])
        return web.json_response(refusal, status=400)

    setattr(kontext_restore_prompt_check, _MARK, True)
    return kontext_restore_prompt_check


def install() -> bool:
    """Adds the check to ComfyUI's running server, once. False (with a log line) when there is no
    server (the pack imported by a script or a test) or its app has already started."""
    try:
        import server
    except ImportError:
        return False
    instance = getattr(server.PromptServer, "instance", None)
    app = getattr(instance, "app", None)
    if app is None:
        return False
    if any(getattr(m, _MARK, False) for m in app.middlewares):
        return True
    if app.frozen:
        log.warning(
            "Kontext Restore: ComfyUI's web app had already started, so prompts with an invalid Kontext "
            "Restore node may run in part (HTTP 200 with node_errors) instead of being refused."
        )
        return False
    app.middlewares.append(_middleware())
    return True
