"""The two workflow formats and the conversions between them, driven by a running ComfyUI's
``/object_info``: a description (``kontext_templates.Node``) to the UI format (what the web UI
loads: nodes with widgets_values, a links array, version 0.4) and to the API format (what
``POST /prompt`` takes), a UI file back to API format the way the web UI does it, and what of
each format is the same on every supported ComfyUI (``api_essence``, ``ui_essence``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from kontext_templates import MODEL_URLS, NOTE_TYPE, Node
from workflow_layout import layout, node_size, view_on

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Widgets the frontend adds after an INT named like this: how the value changes after each run.
SEED_NAMES = {"seed", "noise_seed"}
SEED_CONTROL = "fixed"


@dataclass
class InputSpec:
    name: str
    type: str  # "COMBO" for lists of options; several types joined by commas ("COMBO,STRING")
    options: dict
    choices: list | None
    optional: bool

    @property
    def widget_type(self) -> str:
        """The widget the frontend draws: an input of several types names it in ``widgetType``
        (V3 ``MultiType``, e.g. a LoRA combo that also takes a STRING link)."""
        return self.options.get("widgetType") or self.type

    @property
    def is_widget(self) -> bool:
        return self.widget_type in WIDGET_TYPES and not self.options.get("forceInput", False)

    def default(self):
        if "default" in self.options:
            return self.options["default"]
        if self.widget_type == "COMBO":
            if not self.choices:
                raise ValueError(f"combo input {self.name!r} has no options and no value was given")
            return self.choices[0]
        return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[self.widget_type]

    def extra_widget_values(self) -> list:
        """Values of the helper widgets the frontend adds after this one (seed control, upload)."""
        extra = []
        if self.options.get("control_after_generate") or (self.type == "INT" and self.name in SEED_NAMES):
            extra.append(SEED_CONTROL)
        if self.options.get("image_upload"):
            extra.append("image")
        return extra


def node_inputs(info: dict) -> list[InputSpec]:
    """The inputs of one /object_info entry in the order the frontend creates them."""
    specs = []
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            choices = None
            if isinstance(kind, list):
                kind, choices = "COMBO", kind
            elif "COMBO" in (kind, options.get("widgetType")):
                choices = options.get("options", [])
            specs.append(InputSpec(name, kind, options, choices, section == "optional"))
    return specs


def display_title(node: Node, info: dict) -> str:
    return node.title or info.get("display_name") or node.type


def to_api(nodes: list[Node], object_info: dict) -> dict:
    """API format straight from the description (widget defaults filled from /object_info)."""
    api = {}
    for node in sorted(nodes, key=lambda n: n.id):
        if node.type == NOTE_TYPE:  # drawn by the frontend only, never sent to the server
            continue
        info = object_info[node.type]
        inputs = {}
        specs = node_inputs(info)
        unknown = set(node.widgets) | set(node.links)
        unknown -= {s.name for s in specs}
        if unknown:
            raise ValueError(f"{node.type} has no inputs named {sorted(unknown)}")
        for spec in specs:
            if spec.name in node.links:
                src, slot = node.links[spec.name]
                inputs[spec.name] = [str(src), slot]
            elif spec.is_widget:
                inputs[spec.name] = node.widgets[spec.name] if spec.name in node.widgets else spec.default()
        api[str(node.id)] = {
            "inputs": inputs,
            "class_type": node.type,
            "_meta": {"title": display_title(node, info)},
        }
    return api


def _execution_order(nodes: list[Node]) -> dict[int, int]:
    deps = {n.id: {src for src, _ in n.links.values()} for n in nodes}
    order, done = {}, set()
    while len(done) < len(nodes):
        ready = sorted(i for i, d in deps.items() if i not in done and d <= done)
        if not ready:
            raise ValueError("the workflow has a cycle")
        for i in ready:
            order[i] = len(order)
            done.add(i)
    return order


def _note_entry(node: Node) -> dict:
    """The frontend's own note node (a MarkdownNote: its text drawn as Markdown on both 1.32
    and 1.49) as the frontend saves one, in the yellow of a Note so that it stands out."""
    entry = {
        "id": node.id,
        "type": NOTE_TYPE,
        "pos": [0, 0],
        "size": list(node.size or (400, 300)),
        "flags": {},
        "order": 0,
        "mode": 0,
        "inputs": [],
        "outputs": [],
        "properties": {},
        "widgets_values": [node.widgets["text"]],
        "color": "#432",
        "bgcolor": "#653",
    }
    if node.title:
        entry["title"] = node.title
    return entry


def to_ui(nodes: list[Node], object_info: dict) -> dict:
    """UI format (frontend workflow JSON, version 0.4) from the description."""
    order = _execution_order(nodes)
    by_id = {n.id: n for n in nodes}
    links = []
    link_of: dict[tuple[int, str], int] = {}
    outgoing: dict[tuple[int, int], list[int]] = {}
    for node in sorted(nodes, key=lambda n: n.id):
        if node.type == NOTE_TYPE:
            continue
        names = {s.name for s in node_inputs(object_info[node.type])}
        for name in node.links:
            if name not in names:
                raise ValueError(f"{node.type} has no input {name!r}")
        for spec in node_inputs(object_info[node.type]):
            if spec.name not in node.links:
                continue
            src, slot = node.links[spec.name]
            src_type = object_info[by_id[src].type]["output"][slot]
            link_id = len(links) + 1
            slots = [
                s.name for s in node_inputs(object_info[node.type]) if s.name in node.links or not s.is_widget
            ]
            target_slot = slots.index(spec.name)
            links.append([link_id, src, slot, node.id, target_slot, src_type])
            link_of[(node.id, spec.name)] = link_id
            outgoing.setdefault((src, slot), []).append(link_id)
    ui_nodes = []
    for node in sorted(nodes, key=lambda n: n.id):
        if node.type == NOTE_TYPE:
            ui_nodes.append(_note_entry(node) | {"order": order[node.id]})
            continue
        info = object_info[node.type]
        inputs, widgets_values = [], []
        for spec in node_inputs(info):
            linked = spec.name in node.links
            if spec.is_widget:
                widgets_values.append(
                    node.widgets[spec.name] if spec.name in node.widgets else spec.default()
                )
                widgets_values.extend(spec.extra_widget_values())
                if linked:
                    inputs.append(
                        {
                            "name": spec.name,
                            "type": spec.type,
                            "widget": {"name": spec.name},
                            "link": link_of[(node.id, spec.name)],
                        }
                    )
            else:
                entry = {"name": spec.name, "type": spec.type, "link": link_of.get((node.id, spec.name))}
                if spec.optional:
                    entry["shape"] = 7  # the frontend's hollow dot for optional inputs
                inputs.append(entry)
        outputs = []
        for slot, (kind, name) in enumerate(zip(info["output"], info["output_name"])):
            targets = outgoing.get((node.id, slot))
            outputs.append({"name": name, "type": kind, "slot_index": slot, "links": targets or []})
        properties: dict = {"Node name for S&R": node.type}
        models = [v for v in node.widgets.values() if isinstance(v, str) and v in MODEL_URLS]
        if models:
            properties["models"] = [
                {"name": m, "url": MODEL_URLS[m][0], "directory": MODEL_URLS[m][1]} for m in models
            ]
        entry = {
            "id": node.id,
            "type": node.type,
            "pos": [0, 0],
            "size": node_size(node, len(inputs), len(outputs), len(widgets_values)),
            "flags": {},
            "order": order[node.id],
            "mode": 0,
            "inputs": inputs,
            "outputs": outputs,
            "properties": properties,
            "widgets_values": widgets_values,
        }
        if node.title:
            entry["title"] = node.title
        ui_nodes.append(entry)
    positions = layout(nodes, {n["id"]: n["size"] for n in ui_nodes})
    for entry in ui_nodes:
        entry["pos"] = positions[entry["id"]]
    return {
        "id": "00000000-0000-4000-8000-000000000000",
        "revision": 0,
        "last_node_id": max(n.id for n in nodes),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": view_on(ui_nodes, NOTE_TYPE),
        "version": 0.4,
    }


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Converts a UI-format workflow to API format the way the web UI does (widget values are
    matched to inputs in /object_info order; helper widgets such as the seed control skipped)."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) != 0 or node["type"] == NOTE_TYPE:
            continue
        info = object_info[node["type"]]
        values = list(node.get("widgets_values") or [])
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        inputs = {}
        for spec in node_inputs(info):
            if spec.is_widget:
                if not values:
                    raise ValueError(f"node {node['id']} ({node['type']}): too few widget values")
                value = values.pop(0)
                for _ in spec.extra_widget_values():
                    values.pop(0)
                inputs[spec.name] = value
            if spec.name in linked:
                link = linked[spec.name]
                inputs[spec.name] = [str(link[1]), link[2]]
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values left over")
        api[str(node["id"])] = {
            "inputs": inputs,
            "class_type": node["type"],
            "_meta": {"title": node.get("title") or info.get("display_name") or node["type"]},
        }
    return api


def api_essence(api: dict) -> dict:
    """What an API-format workflow asks the server to do: each node's type and inputs (values and
    links). The ``_meta`` titles are display names, which differ between ComfyUI versions ("Load
    LoRA" for LoraLoaderModelOnly since 0.33) and change nothing."""
    return {str(i): {"class_type": n["class_type"], "inputs": n["inputs"]} for i, n in api.items()}


def ui_essence(ui: dict) -> dict:
    """A UI-format workflow without what the running ComfyUI adds on its own: node outputs that
    carry no link (newer versions declare outputs on output nodes such as SaveImage and
    PreviewAny) and output names. Nodes, links, widget values and the layout remain."""
    out = json.loads(json.dumps(ui))
    for node in out["nodes"]:
        node["outputs"] = [
            {"slot_index": o.get("slot_index", k), "type": o["type"], "links": sorted(o["links"])}
            for k, o in enumerate(node.get("outputs") or [])
            if o.get("links")
        ]
    return out
