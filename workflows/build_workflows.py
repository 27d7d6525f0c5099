"""Generates the example workflows in this folder from their descriptions (kontext_templates.py).

Each workflow is written twice:

- ``<title>.json``: UI format (what people drag into ComfyUI or open from the template browser:
  nodes with id/type/pos/size/inputs/outputs/widgets_values, a "links" array, version 0.4). Named
  after the template's title because the browser shows custom-node templates by file name.
- ``api/<name>.api.json``: API format (what ``POST /prompt`` takes; for scripts and headless
  runs). It lives in a subfolder because ComfyUI lists every ``workflows/*.json`` of a pack as a
  template, and an API-format file is not a loadable template.

Node inputs, their order, which of them are widgets, the output types and the defaults of
widgets a description does not set all come from a running ComfyUI's ``/object_info``, so the files match
what the server and the web UI expect. Regenerate after changing a node's inputs:

    export COMFYUI_PATH=$PWD/.host/0.33.0/ComfyUI       # a test host (scripts/setup_test_env.sh)
    .host/0.33.0/venv/bin/python workflows/build_workflows.py           # starts a headless server
    .host/0.33.0/venv/bin/python workflows/build_workflows.py --url http://127.0.0.1:8188
    .host/0.33.0/venv/bin/python workflows/build_workflows.py --check   # exit 1 if stale

"Stale" and "equal" leave out what differs between ComfyUI versions on its own (display titles,
outputs declared without links; see ``api_essence``/``ui_essence``), so the committed files are
checked against every supported version. tests/test_workflows.py checks that the committed files
equal this script's output, that converting the UI files to API format gives the API files, and
runs them on a tiny model.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
API_DIR = HERE / "api"
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Widgets the frontend adds after an INT named like this: how the value changes after each run.
SEED_NAMES = {"seed", "noise_seed"}
SEED_CONTROL = "fixed"

from kontext_templates import (  # noqa: E402  (this folder is on sys.path: a script, or the tests)
    LORA_NAME,
    MODEL_FILES,
    MODEL_URLS,
    NOTE_TYPE,
    TEMPLATES,
    Node,
    Template,
)

__all__ = ["LORA_NAME", "MODEL_FILES", "MODEL_URLS", "NOTE_TYPE", "TEMPLATES", "Node", "Template"]

# name -> the function describing its nodes (the API file's name; see kontext_templates.Template).
WORKFLOWS = {name: t.nodes for name, t in TEMPLATES.items()}

# Layout, in canvas units. LiteGraph draws a node's title bar above its position.
TITLE_H = 30
GAP_X = 60
GAP_Y = 40
DEFAULT_WIDTH = 340


def ui_path(name: str) -> Path:
    """The UI file: named after the title, which is all the template browser shows."""
    return HERE / f"{TEMPLATES[name].title}.json"


def api_path(name: str) -> Path:
    return API_DIR / f"{name}.api.json"


def thumbnail_path(name: str) -> Path:
    """The template browser's thumbnail: <file name>.jpg beside the UI file."""
    return HERE / f"{TEMPLATES[name].title}.jpg"


# --------------------------------------------------------------------------------------------
# Conversion, driven by /object_info
# --------------------------------------------------------------------------------------------


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


def _size(node: Node, n_inputs: int, n_outputs: int, n_widgets: int) -> list[int]:
    """The node's size below its title bar. The default is above what both supported frontends
    compute as the minimum (LiteGraph's computeSize: 20 px per slot row and 24 per widget,
    measured in 1.32 and 1.49; tests/test_web_ui.py checks every template node against it)."""
    if node.size:
        return list(node.size)
    return [DEFAULT_WIDTH, 30 + 22 * max(n_inputs, n_outputs) + 26 * n_widgets + node.room]


def layout(nodes: list[Node], sizes: dict[int, list[int]]) -> dict[int, list[int]]:
    """Positions: columns left to right, each as wide as its widest node, nodes stacked in the
    order listed with room for the title bar between them, so no two nodes overlap."""
    columns: dict[int, list[Node]] = {}
    for node in nodes:
        columns.setdefault(node.col, []).append(node)
    pos, x = {}, 0
    for col in sorted(columns):
        y = 0
        for node in columns[col]:
            pos[node.id] = [x, y]
            y += sizes[node.id][1] + TITLE_H + GAP_Y
        x += max(sizes[n.id][0] for n in columns[col]) + GAP_X
    return pos


def node_boxes(ui: dict) -> list[tuple[str, list[float]]]:
    """Each node of a UI workflow as (label, [x, y, width, height]) on the canvas, title bar
    included (LiteGraph draws it above ``pos``)."""
    return [
        (f"{n['id']} {n.get('title') or n['type']}", [n["pos"][0], n["pos"][1] - TITLE_H, *n["size"]])
        for n in ui["nodes"]
    ]


def overlapping(boxes: list[tuple[str, list[float]]]) -> list[tuple[str, str]]:
    """The pairs of boxes that overlap (touching edges do not count)."""
    pairs = []
    for i, (a, (ax, ay, aw, ah)) in enumerate(boxes):
        for b, (bx, by, bw, bh) in boxes[i + 1 :]:
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                pairs.append((a, b))
    return pairs


def _note_entry(node: Node) -> dict:
    """A core Note node as the frontend saves one (its colours are the frontend's defaults)."""
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
            "size": _size(node, len(inputs), len(outputs), len(widgets_values)),
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
        "extra": {"ds": {"scale": 0.6, "offset": [140, 200]}},
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


def essence(path: Path, content: dict) -> dict:
    return api_essence(content) if path.name.endswith(".api.json") else ui_essence(content)


def stale_files(files: dict[Path, dict]) -> list[Path]:
    """Files whose committed content differs from ``files`` in more than the version-specific
    details above, so one set of committed files serves every supported ComfyUI."""
    stale = []
    for path, content in files.items():
        try:
            current = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            stale.append(path)
            continue
        if essence(path, current) != essence(path, content):
            stale.append(path)
    return stale


def build_all(object_info: dict) -> dict[Path, dict]:
    """{path: JSON content} for every workflow file."""
    files = {}
    for name, describe in WORKFLOWS.items():
        nodes = describe()
        files[ui_path(name)] = to_ui(nodes, object_info)
        files[api_path(name)] = to_api(nodes, object_info)
    return files


def unexpected_files() -> list[Path]:
    """JSON files in this folder or api/ that no template produces (e.g. left by a rename):
    ComfyUI would list a stray UI file as a template."""
    expected = {ui_path(n) for n in TEMPLATES} | {api_path(n) for n in TEMPLATES}
    found = set(HERE.glob("*.json")) | set(API_DIR.glob("*.json"))
    return sorted(found - expected)


def dump(content: dict) -> str:
    return json.dumps(content, indent=2, ensure_ascii=False) + "\n"


def _object_info(url: str | None) -> dict:
    if url:
        import urllib.request

        with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=60) as resp:
            return json.loads(resp.read())
    sys.path.insert(0, str(HERE.parent / "tests"))
    import tempfile

    from server_host import start_server

    with tempfile.TemporaryDirectory(prefix="kontext_restore_build_") as tmp:
        with start_server(tmp, with_test_nodes=False) as server:
            return server.object_info()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running ComfyUI with this pack (default: start a headless one)")
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1)")
    args = parser.parse_args(argv)
    files = build_all(_object_info(args.url))
    stale, extra = stale_files(files), unexpected_files()
    if args.check:
        for p in stale:
            print(f"stale: {p.relative_to(HERE.parent)}")
        for p in extra:
            print(f"not a template of build_workflows.py (remove it): {p.relative_to(HERE.parent)}")
        return 1 if stale or extra else 0
    # A workflow's two files are rewritten together, and only when one of them really changed:
    # regenerating on another ComfyUI version leaves them alone.
    for name in TEMPLATES:
        pair = (ui_path(name), api_path(name))
        rewrite = any(p in stale for p in pair)
        for path in pair:
            if rewrite:
                path.parent.mkdir(exist_ok=True)
                path.write_text(dump(files[path]))
            print(("wrote " if rewrite else "unchanged ") + str(path.relative_to(HERE.parent)))
    for p in extra:
        print(f"warning: not a template of build_workflows.py (remove it): {p.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
