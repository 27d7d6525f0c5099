"""Generates the example workflows in this folder from one Python description.

Each workflow is written twice:

- ``<name>.json``: UI format (what people drag into ComfyUI or open from the template browser:
  nodes with id/type/pos/size/inputs/outputs/widgets_values, a "links" array, version 0.4).
- ``api/<name>.api.json``: API format (what ``POST /prompt`` takes; for scripts and headless
  runs). It lives in a subfolder because ComfyUI lists every ``workflows/*.json`` of a pack as a
  template, and an API-format file is not a loadable template.

Node inputs, their order, which of them are widgets, the output types and the defaults of
widgets not set below all come from a running ComfyUI's ``/object_info``, so the files match
what the server and the web UI expect. Regenerate after changing a node's inputs:

    .venv/bin/python workflows/build_workflows.py            # starts a headless test server
    .venv/bin/python workflows/build_workflows.py --url http://127.0.0.1:8188   # a running one
    .venv/bin/python workflows/build_workflows.py --check    # exit 1 if the files are stale

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
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
API_DIR = HERE / "api"

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Widgets the frontend adds after an INT named like this: how the value changes after each run.
SEED_NAMES = {"seed", "noise_seed"}
SEED_CONTROL = "fixed"

MODEL_FILES = {
    "unet": "flux1-kontext-dev.safetensors",
    "clip_l": "clip_l.safetensors",
    "t5": "t5xxl_fp16.safetensors",
    "vae": "ae.safetensors",
}
# Shown by the web UI's missing-models dialog as download links.
MODEL_URLS = {
    "flux1-kontext-dev.safetensors": (
        "https://huggingface.co/black-forest-labs/FLUX.1-Kontext-dev/resolve/main/flux1-kontext-dev.safetensors",
        "diffusion_models",
    ),
    "clip_l.safetensors": (
        "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
        "text_encoders",
    ),
    "t5xxl_fp16.safetensors": (
        "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors",
        "text_encoders",
    ),
    "ae.safetensors": (
        "https://huggingface.co/black-forest-labs/FLUX.1-schnell/resolve/main/ae.safetensors",
        "vae",
    ),
}
RESTORE_PROMPT = (
    "Restore this photo: remove the noise, blur and compression artifacts and recover fine detail, "
    "keeping the content, colors and composition exactly the same."
)
LORA_NAME = "kontext_restore"


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    widgets: dict = field(default_factory=dict)
    # input name -> (source node id, source output slot)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)
    title: str | None = None
    size: tuple[int, int] | None = None


# --------------------------------------------------------------------------------------------
# The workflows
# --------------------------------------------------------------------------------------------


def _loaders(x: int = 0) -> list[Node]:
    return [
        Node(1, "UNETLoader", (x, 0), {"unet_name": MODEL_FILES["unet"], "weight_dtype": "default"}),
        Node(
            2,
            "DualCLIPLoader",
            (x, 140),
            {"clip_name1": MODEL_FILES["clip_l"], "clip_name2": MODEL_FILES["t5"], "type": "flux"},
        ),
        Node(3, "VAELoader", (x, 340), {"vae_name": MODEL_FILES["vae"]}),
        Node(
            4,
            "CLIPTextEncode",
            (x + 380, 140),
            {"text": RESTORE_PROMPT},
            {"clip": (2, 0)},
            title="Restoration prompt",
            size=(400, 180),
        ),
    ]


def _training(x: int = 0) -> list[Node]:
    """Degradation -> folder dataset -> latent cache -> LoRA trainer -> loss plot (ids 5-11)."""
    return [
        Node(5, "KontextRestoreDegradation", (x, 460), {"kind": "realesrgan"}),
        Node(
            6,
            "KontextRestoreDataset",
            (x + 380, 400),
            {"hq_folder": "restore_hq", "bucket_scale": 1.0, "val_count": 4, "seed": 0},
            {"degradation": (5, 0)},
        ),
        Node(
            7,
            "KontextRestoreCacheLatents",
            (x + 800, 400),
            {"control_mode": "pool", "pool_size": 4, "seed": 0},
            {"dataset": (6, 0), "vae": (3, 0)},
        ),
        Node(
            8,
            "KontextRestoreTrainLoRA",
            (x + 1220, 0),
            {"lora_name": LORA_NAME, "seed": 0},
            {"model": (1, 0), "conditioning": (4, 0), "latents": (7, 0), "vae": (3, 0)},
        ),
        Node(9, "KontextRestoreLossPlot", (x + 1640, 0), {}, {"loss": (8, 2)}),
        Node(
            10, "PreviewImage", (x + 1640, 160), {}, {"images": (9, 0)}, title="Loss curve", size=(420, 360)
        ),
        Node(
            11,
            "PreviewAny",
            (x + 1640, 560),
            {},
            {"source": (8, 3)},
            title="Validation report",
            size=(560, 220),
        ),
    ]


def _restore_settings() -> dict:
    return {
        "mode": "auto",
        "steps": 0,
        "sampler_name": "euler",
        "scheduler": "as_trained",
        "seed": 0,
        "bucket_scale": 1.0,
    }


def train_restoration_lora() -> list[Node]:
    return _loaders() + _training()


def restore_with_lora() -> list[Node]:
    restore = _restore_settings() | {"lora_name": f"{LORA_NAME}.safetensors"}
    return _loaders() + [
        Node(
            5,
            "LoraLoaderModelOnly",
            (380, 0),
            {"lora_name": f"{LORA_NAME}.safetensors", "strength_model": 1.0},
            {"model": (1, 0)},
        ),
        Node(
            6, "LoadImage", (0, 460), {"image": "degraded_photo.png"}, title="Degraded photo", size=(320, 360)
        ),
        Node(
            7,
            "KontextRestoreRestore",
            (820, 0),
            restore,
            {"model": (5, 0), "vae": (3, 0), "conditioning": (4, 0), "images": (6, 0)},
        ),
        Node(
            8,
            "SaveImage",
            (1240, 0),
            {"filename_prefix": "kontext_restore/restored"},
            {"images": (7, 0)},
            size=(420, 420),
        ),
    ]


def train_then_evaluate() -> list[Node]:
    y = 860
    return (
        _loaders()
        + _training()
        + [
            Node(
                12,
                "LoadImage",
                (0, y),
                {"image": "clean_photo.png"},
                title="Clean reference",
                size=(320, 360),
            ),
            Node(13, "KontextRestoreBucketImage", (380, y), {"bucket_scale": 1.0}, {"images": (12, 0)}),
            Node(
                14,
                "KontextRestoreDegradeImage",
                (800, y),
                {"seed": 1},
                {"images": (13, 0), "degradation": (5, 0)},
                title="Degraded input",
            ),
            Node(
                15,
                "KontextRestoreRestore",
                (1220, 620),
                _restore_settings(),
                {
                    "model": (8, 0),
                    "vae": (3, 0),
                    "conditioning": (4, 0),
                    "images": (14, 0),
                    "lora_name": (8, 1),
                },
            ),
            Node(
                16,
                "SaveImage",
                (2240, 0),
                {"filename_prefix": "kontext_restore/evaluated"},
                {"images": (15, 0)},
                size=(420, 420),
            ),
            Node(
                17,
                "PreviewImage",
                (1220, y + 200),
                {},
                {"images": (14, 0)},
                title="Degraded preview",
                size=(320, 320),
            ),
            Node(
                18,
                "KontextRestoreMetrics",
                (2240, 480),
                {},
                {"restored": (15, 0), "reference": (13, 0), "degraded": (14, 0)},
            ),
            Node(19, "PreviewAny", (2240, 680), {}, {"source": (18, 0)}, title="Metrics", size=(560, 200)),
        ]
    )


WORKFLOWS = {
    "train_restoration_lora": train_restoration_lora,
    "restore_with_lora": restore_with_lora,
    "train_then_evaluate": train_then_evaluate,
}


# --------------------------------------------------------------------------------------------
# Conversion, driven by /object_info
# --------------------------------------------------------------------------------------------


@dataclass
class InputSpec:
    name: str
    type: str  # "COMBO" for lists of options
    options: dict
    choices: list | None
    optional: bool

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False)

    def default(self):
        if "default" in self.options:
            return self.options["default"]
        if self.type == "COMBO":
            if not self.choices:
                raise ValueError(f"combo input {self.name!r} has no options and no value was given")
            return self.choices[0]
        return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[self.type]

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
            elif kind == "COMBO":
                choices = options.get("options", [])
            specs.append(InputSpec(name, kind, options, choices, section == "optional"))
    return specs


def display_title(node: Node, info: dict) -> str:
    return node.title or info.get("display_name") or node.type


def to_api(nodes: list[Node], object_info: dict) -> dict:
    """API format straight from the description (widget defaults filled from /object_info)."""
    api = {}
    for node in nodes:
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
    if node.size:
        return list(node.size)
    return [340, 30 + 22 * max(n_inputs, n_outputs) + 26 * n_widgets]


def to_ui(nodes: list[Node], object_info: dict) -> dict:
    """UI format (frontend workflow JSON, version 0.4) from the description."""
    order = _execution_order(nodes)
    by_id = {n.id: n for n in nodes}
    links = []
    link_of: dict[tuple[int, str], int] = {}
    outgoing: dict[tuple[int, int], list[int]] = {}
    for node in sorted(nodes, key=lambda n: n.id):
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
            "pos": list(node.pos),
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
        if node.get("mode", 0) != 0:
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
        files[HERE / f"{name}.json"] = to_ui(nodes, object_info)
        files[API_DIR / f"{name}.api.json"] = to_api(nodes, object_info)
    return files


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
    stale = stale_files(files)
    if args.check:
        for p in stale:
            print(f"stale: {p.relative_to(HERE.parent)}")
        return 1 if stale else 0
    # A workflow's two files are rewritten together, and only when one of them really changed:
    # regenerating on another ComfyUI version leaves them alone.
    rewrite = {p.name.removesuffix(".api.json").removesuffix(".json") for p in stale}
    for path, content in files.items():
        name = path.name.removesuffix(".api.json").removesuffix(".json")
        if name in rewrite:
            path.parent.mkdir(exist_ok=True)
            path.write_text(dump(content))
        print(("wrote " if name in rewrite else "unchanged ") + str(path.relative_to(HERE.parent)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
