"""The example workflows in ComfyUI's real web UI: headless Chromium (Debian's, driven by
Playwright's Python package) opens the test server's page and loads each UI-format workflow.

Checks what a user sees, in a way that holds for every frontend version (1.32 with ComfyUI
0.3.75, 1.49 with 0.33): every node type is registered, no node drawn red (``has_errors``), no
error text on the page (missing-nodes dialog, errors overlay), no console or page error, and the
frontend's own UI -> API conversion (app.graphToPrompt) gives the committed API file's nodes and
inputs. The same detector is shown to fire on a workflow with an unknown node type. The server's
model folders hold placeholder files named like the workflows' models, as a user's install would,
so the loaders are not flagged for missing files. A screenshot per workflow goes to
test-artifacts/.

Skipped only when Chromium is absent and $CI is unset; in CI a missing browser is a failure
(scripts/setup_test_env.sh installs it with WITH_BROWSER=1).
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import pytest
from server_host import chromium_path, server_fixture, write_png

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
ARTIFACTS = ROOT / "test-artifacts"
sys.path.insert(0, str(WORKFLOWS))
import build_workflows  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.browser, pytest.mark.timeout(300)]

CHROMIUM = chromium_path()
if CHROMIUM is None:
    if os.environ.get("CI"):
        pytest.fail(
            "Chromium is missing in CI: run scripts/setup_test_env.sh with WITH_BROWSER=1", pytrace=False
        )
    pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UI_READY_S = 90  # first load of the frontend bundle on a slow CPU
STEP_S = 20
# Visible text of the frontends' problem reports: the missing-nodes dialog (1.32: "This workflow
# has missing nodes"), the errors overlay (1.49: "Missing node: X", "3 errors found"), the
# missing-models dialog.
PROBLEM_TEXT = re.compile(
    r"missing nodes?\b|unsupported nodes|missing node types|\d+ errors? found|errors? detected|missing models",
    re.I,
)
# The test machine has no internet: the frontend's calls to the node registry and the model
# size probes of the missing-models dialog are blocked. Not caused by the workflows.
NETWORK_NOISE = re.compile(
    r"Content Security Policy|Failed to fetch|fetching file size|api\.comfy\.org|huggingface\.co", re.I
)
# 404s the frontend produces on a fresh user folder, whatever is loaded.
BENIGN_404 = re.compile(r"/user\.css|/api/userdata")

comfy_server = server_fixture()


class Console:
    def __init__(self) -> None:
        self.messages: list[tuple[str, str]] = []

    def mark(self) -> int:
        return len(self.messages)

    def errors_since(self, mark: int) -> list[str]:
        return [
            f"{kind}: {text}"
            for kind, text in self.messages[mark:]
            if kind in ("error", "pageerror", "http") and not NETWORK_NOISE.search(text)
        ]


@pytest.fixture(scope="module")
def ui(comfy_server):
    from playwright.sync_api import sync_playwright

    # Images the workflows' LoadImage nodes name, so their previews load.
    for name in ("clean_photo.png", "degraded_photo.png"):
        write_png(comfy_server.input_dir / name, 176, 128, seed=len(name))
    write_placeholder_models(comfy_server.base / "models")
    ARTIFACTS.mkdir(exist_ok=True)
    console = Console()
    with sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="kontext_restore_chromium_") as profile:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1600, "height": 1000},
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(STEP_S * 1000)
            page.on("console", lambda m: console.messages.append((m.type, m.text)))
            page.on("pageerror", lambda e: console.messages.append(("pageerror", str(e))))
            page.on(
                "response",
                lambda r: (
                    console.messages.append(("http", f"HTTP {r.status} {r.url}"))
                    if r.status >= 400 and not BENIGN_404.search(r.url)
                    else None
                ),
            )
            page.goto(comfy_server.url, timeout=UI_READY_S * 1000)
            page.wait_for_function(
                "() => window.app && window.app.graph && window.LiteGraph"
                " && LiteGraph.registered_node_types['KontextRestoreTrainLoRA']",
                timeout=UI_READY_S * 1000,
            )
            yield page, console
        finally:
            context.close()


def write_placeholder_models(models_dir: Path) -> None:
    """Tiny valid safetensors files under the names and folders the workflows' loaders use."""
    import torch
    from safetensors.torch import save_file

    files = [(folder, name) for name, (_, folder) in build_workflows.MODEL_URLS.items()]
    files.append(("loras", f"{build_workflows.LORA_NAME}.safetensors"))
    for folder, name in files:
        path = models_dir / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"placeholder": torch.zeros(1)}, str(path))


def close_dialogs(page) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and page.locator(".p-dialog").count():
        page.keyboard.press("Escape")
        page.wait_for_timeout(200)


def load_workflow(page, workflow: dict) -> None:
    close_dialogs(page)
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf) }", workflow)
    # Dialogs and overlays (missing nodes / models, errors) open asynchronously after the load.
    page.wait_for_timeout(1500)


def problems(page) -> dict:
    """What a user would see as wrong with the loaded workflow, on any frontend version: nodes
    drawn red (``has_errors``, set for unknown node types and, on newer frontends, for loaders
    whose model file is missing) and lines of problem text anywhere on the page."""
    red = page.evaluate("() => app.graph.nodes.filter(n => n.has_errors).map(n => [String(n.id), n.type])")
    text = page.evaluate("() => document.body.innerText")
    lines = [line.strip() for line in text.splitlines() if PROBLEM_TEXT.search(line)]
    return {"red_nodes": red, "messages": lines, "text": text}


def strip_frontend_only_inputs(prompt: dict, object_info: dict) -> dict:
    """Drops inputs the frontend adds for display only (e.g. PreviewAny's 'preview' box)."""
    out = {}
    for node_id, node in prompt.items():
        info = object_info[node["class_type"]]["input"]
        known = set(info.get("required", {})) | set(info.get("optional", {}))
        out[node_id] = dict(node, inputs={k: v for k, v in node["inputs"].items() if k in known})
    return out


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.object_info()


@pytest.mark.parametrize("name", sorted(build_workflows.WORKFLOWS))
def test_example_workflow_loads_in_the_web_ui(ui, object_info, name):
    page, console = ui
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
    types = sorted({n["type"] for n in workflow["nodes"]})
    mark = console.mark()
    load_workflow(page, workflow)

    unregistered = page.evaluate("(types) => types.filter(t => !LiteGraph.registered_node_types[t])", types)
    assert unregistered == []
    # Node ids are numbers in 1.32 and strings in 1.49.
    loaded = page.evaluate(
        "() => ({nodes: app.graph.nodes.map(n => [String(n.id), n.type]),"
        " links: Object.keys(app.graph.links ?? {}).length || app.graph.links?.size || 0})"
    )
    assert sorted(loaded["nodes"]) == sorted([str(n["id"]), n["type"]] for n in workflow["nodes"])
    assert loaded["links"] == len(workflow["links"])
    seen = problems(page)
    assert not seen["red_nodes"] and not seen["messages"], (seen["red_nodes"], seen["messages"])

    # The frontend's own conversion to what it would queue: the committed API file's nodes and
    # inputs (titles are display names, which differ between versions).
    prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    api = json.loads((build_workflows.API_DIR / f"{name}.api.json").read_text())
    assert build_workflows.api_essence(strip_frontend_only_inputs(prompt, object_info)) == (
        build_workflows.api_essence(api)
    )

    errors = console.errors_since(mark)
    assert not errors, "\n".join(errors)

    page.evaluate(
        "async () => { try { await app.extensionManager.command.execute('Comfy.Canvas.FitView') }"
        " catch (e) { app.canvas.setDirty(true, true) } }"
    )
    page.wait_for_timeout(500)
    shot = ARTIFACTS / f"web_ui_{name}.png"
    page.screenshot(path=str(shot))
    # A rendered graph is far larger than an empty canvas (a few KB).
    assert shot.stat().st_size > 40_000, f"{shot} looks empty ({shot.stat().st_size} bytes)"


def test_missing_node_is_detected_and_a_template_after_it_is_clean(ui):
    """Negative control for the checks above, on every frontend: an unknown node type is drawn
    red and reported on the page (1.32: a dialog, 1.49: an overlay); the pack's template loaded
    next shows neither."""
    page, _ = ui
    workflow = json.loads((WORKFLOWS / "restore_with_lora.json").read_text())
    workflow["nodes"][-1]["type"] = "KontextRestoreNoSuchNode"
    unknown_id = str(workflow["nodes"][-1]["id"])
    load_workflow(page, workflow)
    assert page.evaluate("() => !LiteGraph.registered_node_types['KontextRestoreNoSuchNode']")
    seen = problems(page)
    assert seen["red_nodes"] == [[unknown_id, "KontextRestoreNoSuchNode"]], seen["red_nodes"]
    assert seen["messages"], "no missing-node report on the page"
    assert "KontextRestoreNoSuchNode" in seen["text"], seen["messages"]
    page.screenshot(path=str(ARTIFACTS / "web_ui_missing_node.png"))

    load_workflow(page, json.loads((WORKFLOWS / "restore_with_lora.json").read_text()))
    seen = problems(page)
    assert not seen["red_nodes"] and not seen["messages"], (seen["red_nodes"], seen["messages"])
