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
from pathlib import Path

HERE = Path(__file__).resolve().parent
API_DIR = HERE / "api"
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from kontext_templates import (  # noqa: E402  (this folder is on sys.path: a script, or the tests)
    LORA_NAME,
    MODEL_FILES,
    MODEL_URLS,
    NOTE_TYPE,
    TEMPLATES,
    Node,
    Template,
)
from workflow_format import (  # noqa: E402
    InputSpec,
    api_essence,
    display_title,
    node_inputs,
    to_api,
    to_ui,
    ui_essence,
    ui_to_api,
)
from workflow_layout import (  # noqa: E402
    TITLE_H,
    layout,
    link_curves,
    links_through_nodes,
    node_boxes,
    overlapping,
    untangle,
    view_on,
)

__all__ = [
    "LORA_NAME",
    "MODEL_FILES",
    "MODEL_URLS",
    "NOTE_TYPE",
    "TEMPLATES",
    "TITLE_H",
    "InputSpec",
    "Node",
    "Template",
    "api_essence",
    "display_title",
    "layout",
    "link_curves",
    "links_through_nodes",
    "node_boxes",
    "node_inputs",
    "overlapping",
    "untangle",
    "to_api",
    "to_ui",
    "ui_essence",
    "ui_to_api",
    "view_on",
]

# name -> the function describing its nodes (the API file's name; see kontext_templates.Template).
WORKFLOWS = {name: t.placed_nodes for name, t in TEMPLATES.items()}


def ui_path(name: str) -> Path:
    """The UI file: named after the title, which is all the template browser shows."""
    return HERE / f"{TEMPLATES[name].title}.json"


def api_path(name: str) -> Path:
    return API_DIR / f"{name}.api.json"


def thumbnail_path(name: str) -> Path:
    """The template browser's thumbnail: <file name>.jpg beside the UI file."""
    return HERE / f"{TEMPLATES[name].title}.jpg"


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


def print_untangled(files: dict[Path, dict]) -> int:
    """For each template whose links pass over nodes: node heights that avoid it, to copy into
    the template's ``places`` in kontext_templates.py. Exit 1 if one could not be untangled."""
    failed = 0
    for name in TEMPLATES:
        ui = files[ui_path(name)]
        if not links_through_nodes(ui) and not overlapping(node_boxes(ui)):
            print(f"{name}: no link over a node")
            continue
        note = frozenset(n["id"] for n in ui["nodes"] if n["type"] == NOTE_TYPE)
        start = [list(n["pos"]) for n in ui["nodes"]]
        for seed in range(8):  # a search that got stuck is tried again with another seed
            for node, pos in zip(ui["nodes"], start, strict=True):
                node["pos"] = list(pos)
            left = untangle(ui, seed=seed, keep=note)
            if not left:
                break
        failed += left > 0
        print(f"{name}: {left} crossing(s) or overlap(s) left with")
        for node in sorted(ui["nodes"], key=lambda n: (n["pos"][0], n["pos"][1])):
            print(f"  node {node['id']} {node['type']}: y={node['pos'][1]}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running ComfyUI with this pack (default: start a headless one)")
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1)")
    parser.add_argument(
        "--untangle",
        action="store_true",
        help="print node heights (a template's places) that leave no link over a node (writes nothing)",
    )
    args = parser.parse_args(argv)
    files = build_all(_object_info(args.url))
    if args.untangle:
        return print_untangled(files)
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
