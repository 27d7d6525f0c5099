"""The example workflows in ComfyUI's real web UI: headless Chromium (Debian's, driven by
Playwright's Python package) opens the test server's page and loads each UI-format workflow.

Checks what a user sees, in a way that holds for every frontend version (1.32 with ComfyUI
0.3.75, 1.49 with 0.33): every node type is registered, no node drawn red (``has_errors``), no
error text on the page (missing-nodes dialog, errors overlay), no console or page error, and the
frontend's own UI -> API conversion (app.graphToPrompt) gives the committed API file's nodes and
inputs, no node is smaller than the frontend computes for it and no two nodes overlap as drawn.
The same detector is shown to fire on a workflow with an unknown node type. The template browser
lists each template by its title with its thumbnail. A template queued from the page (on the
tiny test models) shows the dataset summary and the validation report on the page. The server's
model folders hold placeholder files named like the workflows' models, as a user's install would,
so the loaders are not flagged for missing files. Screenshots go to test-artifacts/.

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
from server_host import PACK_LINK_NAME, chromium_path, server_fixture, write_png
from tiny_templates import shrink_nodes

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
ARTIFACTS = ROOT / "test-artifacts"
sys.path.insert(0, str(WORKFLOWS))
sys.path.insert(0, str(ROOT / "scripts"))
import build_workflows  # noqa: E402
from template_thumbnails import (  # noqa: E402
    close_dialogs,
    load_workflow,
    node_boxes,
    undersized,
    write_placeholder_models,
)

pytestmark = [pytest.mark.server, pytest.mark.browser, pytest.mark.timeout(600)]

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
# What marks an error as the pack's: its script (web/kontext_restore.js is served under
# /extensions/<pack folder>/), a URL of the pack's templates, or the pack's names in the text.
PACK_MARKS = re.compile(
    rf"/extensions/{re.escape(PACK_LINK_NAME)}/|workflow_templates/{re.escape(PACK_LINK_NAME)}"
    r"|KontextRestore|kontext[ _-]?restore",
    re.I,
)

comfy_server = server_fixture()


class Console:
    """Errors the page reports: console errors (with the script they come from), uncaught page
    errors (with their stack) and failed HTTP responses. Only the pack's count: a host without
    ComfyUI's core workflow templates logs a 404 for them, and the test machine has no internet
    (blocked registry calls, model size probes); neither is the pack's doing."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str, str]] = []  # (kind, text, where: script URL or stack)

    def mark(self) -> int:
        return len(self.messages)

    def record(self, kind: str, text: str, where: str = "") -> None:
        self.messages.append((kind, text, where))

    def errors_since(self, mark: int) -> list[str]:
        return [
            f"{kind}: {text} ({where})" if where else f"{kind}: {text}"
            for kind, text, where in self.messages[mark:]
            if kind in ("error", "pageerror", "http")
            and not NETWORK_NOISE.search(text)
            and PACK_MARKS.search(f"{text} {where}")
        ]


def test_console_counts_only_the_packs_errors():
    console = Console()
    console.record("http", "HTTP 404 http://127.0.0.1:8188/templates/index.json")  # core templates absent
    console.record("error", "Failed to load resource: 404", "http://127.0.0.1:8188/templates/index.json")
    console.record("warning", "KontextRestore: not an error")
    assert console.errors_since(0) == []
    console.record(
        "pageerror",
        "TypeError: x is undefined",
        f"at http://h/extensions/{PACK_LINK_NAME}/kontext_restore.js:3",
    )
    console.record("error", "Error loading KontextRestoreTrainLoRA")
    console.record("http", f"HTTP 500 http://h/api/workflow_templates/{PACK_LINK_NAME}/x.json")
    assert len(console.errors_since(0)) == 3


@pytest.fixture(scope="module")
def ui(comfy_server):
    from playwright.sync_api import sync_playwright

    # Images the workflows' LoadImage nodes name, so their previews load.
    for name in ("clean_photo.png", "degraded_photo.png"):
        write_png(comfy_server.input_dir / name, 176, 128, seed=len(name))
    # Removed at the end: other modules share this server and test what happens without them.
    placeholders = write_placeholder_models(comfy_server.base / "models")
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
            page.on("console", lambda m: console.record(m.type, m.text, (m.location or {}).get("url", "")))
            page.on("pageerror", lambda e: console.record("pageerror", str(e), e.stack or ""))
            page.on(
                "response",
                lambda r: console.record("http", f"HTTP {r.status} {r.url}") if r.status >= 400 else None,
            )
            # What the server tells the page to draw on nodes (progress_text frames), in order.
            page.on("websocket", lambda ws: ws.on("framereceived", lambda f: _record_frame(console, f)))
            page.goto(comfy_server.url, timeout=UI_READY_S * 1000)
            page.wait_for_function(
                "() => window.app && window.app.graph && window.LiteGraph"
                " && LiteGraph.registered_node_types['KontextRestoreTrainLoRA']",
                timeout=UI_READY_S * 1000,
            )
            yield page, console
        finally:
            context.close()
            for path in placeholders:
                path.unlink(missing_ok=True)


def _record_frame(console: Console, frame) -> None:
    """Keeps the text of ComfyUI's binary progress_text frames (type 3: node id, then the text)."""
    if isinstance(frame, (bytes, bytearray)) and len(frame) > 8 and int.from_bytes(frame[:4], "big") == 3:
        size = int.from_bytes(frame[4:8], "big")
        node = frame[8 : 8 + size].decode("utf-8", "replace")
        console.record("progress_text", frame[8 + size :].decode("utf-8", "replace"), node)


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
    workflow = json.loads(build_workflows.ui_path(name).read_text())
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
    api = json.loads(build_workflows.api_path(name).read_text())
    assert build_workflows.api_essence(strip_frontend_only_inputs(prompt, object_info)) == (
        build_workflows.api_essence(api)
    )

    errors = console.errors_since(mark)
    assert not errors, "\n".join(errors)

    # As the frontend lays the nodes out: each at least its computed minimum, none on another.
    drawn = node_boxes(page)
    assert undersized(drawn) == []
    boxes = [(f"{b['id']} {b['title']}", b["box"]) for b in drawn]
    assert build_workflows.overlapping(boxes) == []

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
    workflow = json.loads(build_workflows.ui_path("restore_with_lora").read_text())
    workflow["nodes"][-1]["type"] = "KontextRestoreNoSuchNode"
    unknown_id = str(workflow["nodes"][-1]["id"])
    load_workflow(page, workflow)
    assert page.evaluate("() => !LiteGraph.registered_node_types['KontextRestoreNoSuchNode']")
    seen = problems(page)
    assert seen["red_nodes"] == [[unknown_id, "KontextRestoreNoSuchNode"]], seen["red_nodes"]
    assert seen["messages"], "no missing-node report on the page"
    assert "KontextRestoreNoSuchNode" in seen["text"], seen["messages"]
    page.screenshot(path=str(ARTIFACTS / "web_ui_missing_node.png"))

    load_workflow(page, json.loads(build_workflows.ui_path("restore_with_lora").read_text()))
    seen = problems(page)
    assert not seen["red_nodes"] and not seen["messages"], (seen["red_nodes"], seen["messages"])


def test_template_browser_shows_each_title_with_its_thumbnail(ui):
    """The Templates dialog, as a user opens it: the pack's category lists every template under
    its title, each card's picture being the .jpg beside the workflow (640 px square)."""
    page, console = ui
    mark = console.mark()
    close_dialogs(page)
    page.evaluate("async () => { await app.extensionManager.command.execute('Comfy.BrowseTemplates') }")
    # The pack's category in the dialog's side bar (its folder name).
    page.get_by_text(PACK_LINK_NAME, exact=True).first.click()
    titles = sorted(t.title for t in build_workflows.TEMPLATES.values())
    for title in titles:
        page.get_by_text(title, exact=True).first.wait_for(state="visible")
    # Both frontends fetch the thumbnail and show it as an <img> (1.49 through a blob: URL); no
    # other template in this category and no core thumbnail is 640 px square.
    page.wait_for_function(
        "(n) => [...document.querySelectorAll('img')].filter(i => i.complete"
        " && i.naturalWidth === 640 && i.naturalHeight === 640).length >= n",
        arg=len(titles),
        timeout=STEP_S * 1000,
    )
    page.screenshot(path=str(ARTIFACTS / "web_ui_template_browser.png"))
    close_dialogs(page)
    errors = console.errors_since(mark)
    assert not errors, "\n".join(errors)


def _text_shown_in_node(page, node_id: str, needle: str, move: bool = True) -> dict:
    """Brings the node to the middle of the page at full size and looks for ``needle`` in what
    is drawn in it: text of elements (a preview's Markdown) and values of text boxes, visible
    (not hidden, inside the viewport, not covered) and inside the node's rectangle on the screen.
    ``line_start`` counts the shown places where the needle begins a line (after a line break, a
    <br>, or at the start of its paragraph, list item or table cell, past any table pipes), so
    that a text whose lines a Markdown preview ran together is caught."""
    return page.evaluate(
        """([id, needle, move]) => {
            const c = app.canvas, n = app.graph.nodes.find(n => String(n.id) === id);
            const r = c.canvas.getBoundingClientRect();
            if (move) {
                c.ds.scale = 1;
                c.ds.offset[0] = innerWidth / 2 - r.left - n.pos[0] - n.size[0] / 2;
                c.ds.offset[1] = innerHeight / 2 - r.top - n.pos[1] - n.size[1] / 2;
            }
            c.setDirty(true, true);
            c.draw(true, true);
            return new Promise(done => setTimeout(() => {
                const s = c.ds.scale;
                const box = {left: r.left + (n.pos[0] + c.ds.offset[0]) * s, top: r.top + (n.pos[1] + c.ds.offset[1]) * s};
                box.right = box.left + n.size[0] * s; box.bottom = box.top + n.size[1] * s;
                const found = [], starts = new Map(), ranges = new Map();
                const startsLine = (text, first) => {
                    const i = text.indexOf(needle), before = text.slice(text.lastIndexOf('\\n', i - 1) + 1, i);
                    return /^[\\s|]*$/.test(before) && (first || text.lastIndexOf('\\n', i - 1) >= 0);
                };
                for (const el of document.querySelectorAll('textarea, input')) {
                    if ((el.value || '').includes(needle)) {
                        found.push(el);
                        starts.set(el, startsLine(el.value, true));
                    }
                }
                const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
                while (walker.nextNode()) {
                    const t = walker.currentNode;
                    if (t.textContent.includes(needle)) {
                        found.push(t.parentElement);
                        // The needle's own box: text clipped by its widget (overflow hidden) is
                        // not under its own first character on the screen.
                        const range = document.createRange(), i = t.textContent.indexOf(needle);
                        range.setStart(t, i);
                        range.setEnd(t, i + needle.length);
                        ranges.set(t.parentElement, range);
                        const prev = t.previousSibling;
                        starts.set(t.parentElement, startsLine(t.textContent, prev === null || prev.nodeName === 'BR'));
                    }
                }
                const shown = found.filter(el => {
                    const range = ranges.get(el);
                    const e = range ? range.getClientRects()[0] || range.getBoundingClientRect() : el.getBoundingClientRect();
                    const visible = el.checkVisibility({checkOpacity: true, checkVisibilityCSS: true});
                    if (!(visible && e.width > 0 && e.height > 0 && e.left < box.right && e.right > box.left
                          && e.top < box.bottom && e.bottom > box.top && e.top < innerHeight && e.bottom > 0)) {
                        return false;
                    }
                    // Not covered by anything (a dialog, another node's widget): the topmost
                    // element at the text's first visible point is it or inside it.
                    const x = range ? e.left + Math.min(4, e.width / 2) : Math.max(e.left, box.left, 0) + 4;
                    const y = range ? e.top + e.height / 2 : Math.max(e.top, box.top, 0) + 4;
                    const top = document.elementFromPoint(x, y);
                    return top !== null && (el === top || el.contains(top));
                });
                done({found: found.length, shown: shown.length, line_start: shown.filter(el => starts.get(el)).length, box});
            }, 600));
        }""",
        [node_id, needle, move],
    )


def test_queued_template_shows_the_dataset_summary_and_validation_report(ui, comfy_server, object_info):
    """The train-and-evaluate template, on the tiny test models and CPU-sized settings, queued
    from the page with the frontend's own Queue command: when it has run, the dataset summary
    (images used and skipped, split), the trainer's validation report and the metrics are
    readable on the page in their Preview as Text nodes, and the nodes, grown by what they
    show after a run, still do not overlap."""
    page, console = ui
    dataset = "web_ui_dataset"
    for i in range(3):
        write_png(comfy_server.input_dir / dataset / f"photo_{i}.png", 176, 128, seed=40 + i)
    write_png(comfy_server.input_dir / dataset / "too_small.png", 40, 40, seed=49)
    clean = write_png(comfy_server.input_dir / "web_ui_clean.png", 176, 128, seed=48).name
    template = build_workflows.TEMPLATES["train_then_evaluate"]
    nodes = shrink_nodes(template.nodes(), object_info, dataset, {"clean_photo.png": clean}, "web_ui_run")
    workflow = build_workflows.to_ui(nodes, object_info)
    previews = {n.title: str(n.id) for n in nodes if n.type == "PreviewAny"}
    assert set(previews) == {"Dataset summary and validation report", "Metrics"}
    # The Dataset and Restore Image nodes draw their own text: the summary as soon as the
    # dataset is read, the restore settings with the progress.
    (dataset_node,) = [str(n.id) for n in nodes if n.type == "KontextRestoreDataset"]
    (restore_node,) = [str(n.id) for n in nodes if n.type == "KontextRestoreRestore"]
    (trainer_node,) = [str(n.id) for n in nodes if n.type == "KontextRestoreTrainLoRA"]

    before = set(comfy_server.get("/history"))
    load_workflow(page, workflow)
    mark = console.mark()
    page.evaluate("async () => { await app.extensionManager.command.execute('Comfy.QueuePrompt') }")
    deadline = time.monotonic() + 420
    new = []
    drawn_lines: set[str] = set()  # the trainer's text as the page drew it while it ran
    while time.monotonic() < deadline and not new:
        text = page.evaluate("() => document.body.innerText")
        drawn_lines |= {line for line in text.splitlines() if "s/step" in line or "checkpoint saved" in line}
        history = comfy_server.get("/history")
        new = [
            k
            for k in history
            if k not in before and history[k].get("status", {}).get("completed") is not None
        ]
        time.sleep(0.5)
    assert new, f"nothing queued from the page ran\n{comfy_server.log_tail()}"
    status = history[new[0]]["status"]
    assert status["status_str"] == "success", json.dumps(status.get("messages"))[-3000:]
    # While it trained, the trainer's text on the node had the speed and the time left, and said
    # when a checkpoint was saved (checkpoint_every 2 of 4 steps).
    frames = [
        t for kind, t, node in console.messages[mark:] if kind == "progress_text" and node == trainer_node
    ]
    shown = frames + sorted(drawn_lines)
    assert any(re.search(r"s/step, ETA \d+s", t) for t in shown), shown
    assert any("checkpoint saved at step 2" in t for t in shown), shown
    # When done, where the LoRA went (last on the node: a long path wraps).
    lora_file = str(comfy_server.base / "models" / "loras" / "web_ui_run.safetensors")
    assert any(
        lora_file in t.replace("\n", "") for t in frames + [page.evaluate("() => document.body.innerText")]
    )

    # The detector sees the text, and sees it covered when a dialog lies over it.
    needle = "used 3 image(s)"
    page.wait_for_function(
        "(n) => document.body.innerText.includes(n) || [...document.querySelectorAll('textarea')]"
        ".some(t => t.value.includes(n))",
        arg=needle,
        timeout=STEP_S * 1000,
    )
    page.evaluate("async () => { await app.extensionManager.command.execute('Comfy.BrowseTemplates') }")
    page.wait_for_timeout(1500)
    covered = _text_shown_in_node(page, previews["Dataset summary and validation report"], needle)
    assert covered["found"] and not covered["shown"], covered
    close_dialogs(page)

    # (text, whether it must begin a line): lines stay lines whether the frontend draws the
    # preview as Markdown (1.32) or as plain text.
    expected = {
        "Dataset summary and validation report": [
            ("used 3 image(s): 2 train, 1 held out for validation", True),
            ("skipped 1", True),
            ("step 2, latent MSE", True),
            ("PSNR", False),
        ],
        "Metrics": [("mean", True), ("SSIM", False)],
        "Dataset node": [("used 3 image(s): 2 train, 1 held out for validation", True), ("skipped 1", True)],
        "Restore node": [("image 1/1, step 2/2", True), ("bucket scale", False)],
        "Trainer node": [("done: step 4/4", True), ("checkpoint saved at step 4", True)],
    }
    node_ids = {
        **previews,
        "Dataset node": dataset_node,
        "Restore node": restore_node,
        "Trainer node": trainer_node,
    }
    for title, needles in expected.items():
        for needle, at_line_start in needles:
            deadline = time.monotonic() + STEP_S
            seen = _text_shown_in_node(page, node_ids[title], needle)
            while not seen["shown"] and time.monotonic() < deadline:
                page.wait_for_timeout(500)
                seen = _text_shown_in_node(page, node_ids[title], needle)
            if not seen["shown"] or (at_line_start and not seen["line_start"]):
                page.screenshot(path=str(ARTIFACTS / "web_ui_text_not_shown.png"))
            assert seen["shown"], f"{title}: {needle!r} is not shown in the node ({seen})"
            if at_line_start:
                assert seen["line_start"], f"{title}: {needle!r} does not begin a line ({seen})"
        page.screenshot(path=str(ARTIFACTS / f"web_ui_{title.lower().replace(' ', '_')}.png"))
    # Text drawn on the nodes wraps between words ("th e LoRA" was the frontend's break-all).
    breaks = page.evaluate(
        """(needle) => {
            const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT), found = [];
            while (walker.nextNode()) if (walker.currentNode.textContent.includes(needle))
                found.push(getComputedStyle(walker.currentNode.parentElement).wordBreak);
            return found;
        }""",
        "the LoRA learns from these alone",
    )
    assert breaks and "break-all" not in breaks, breaks
    drawn = node_boxes(page)
    assert build_workflows.overlapping([(f"{b['id']} {b['title']}", b["box"]) for b in drawn]) == []
    errors = console.errors_since(mark)
    assert not errors, "\n".join(errors)


def test_restore_picker_lists_a_freshly_trained_lora_after_refresh(ui, comfy_server):
    """Train, press R, pick: the LoRA the queued template above trained (web_ui_run) is listed in
    Restore Image's lora_name after the frontend's refresh (R), without reloading the page, as
    in core Load LoRA's list. Written here if that test did not run."""
    page, console = ui
    loras = comfy_server.base / "models" / "loras"
    fresh = "web_ui_run.safetensors"
    if not (loras / fresh).is_file():
        import torch
        from safetensors.torch import save_file

        save_file({"lora_unet_x.alpha": torch.ones(())}, str(loras / fresh))
    workflow = json.loads(build_workflows.ui_path("restore_with_lora").read_text())
    load_workflow(page, workflow)
    # Core Load LoRA beside it, to compare with (the template has none: Restore applies its LoRA).
    page.evaluate("() => { const n = LiteGraph.createNode('LoraLoaderModelOnly'); app.graph.add(n); }")
    (restore,) = [str(n["id"]) for n in workflow["nodes"] if n["type"] == "KontextRestoreRestore"]
    lists = """(id) => { const n = app.graph.nodes.find(n => String(n.id) === id);
        const core = app.graph.nodes.find(n => n.type === 'LoraLoaderModelOnly');
        const values = (node) => [...(node?.widgets?.find(w => w.name === 'lora_name')?.options.values ?? [])];
        return {restore: values(n), core: values(core)}; }"""
    before = page.evaluate(lists, restore)
    # The page was loaded before the LoRA existed: both lists lack it until the refresh.
    assert before["core"] and fresh not in before["restore"] and fresh not in before["core"], before
    mark = console.mark()
    page.mouse.click(800, 500)  # the canvas has the keyboard focus, as after a click on it
    page.keyboard.press("r")
    page.wait_for_function(
        "([id, f]) => app.graph.nodes.find(n => String(n.id) === id).widgets"
        ".find(w => w.name === 'lora_name').options.values.includes(f)",
        arg=[restore, fresh],
        timeout=STEP_S * 1000,
    )
    after = page.evaluate(lists, restore)
    assert fresh in after["restore"] and fresh in after["core"], after
    # Picked in the widget, it is what the page would queue.
    page.evaluate(
        "([id, f]) => { const w = app.graph.nodes.find(n => String(n.id) === id).widgets"
        ".find(w => w.name === 'lora_name'); w.value = f; w.callback?.(f); }",
        [restore, fresh],
    )
    prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    assert prompt[restore]["inputs"]["lora_name"] == fresh
    errors = console.errors_since(mark)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", sorted(build_workflows.WORKFLOWS))
def test_template_opens_on_its_read_me_at_a_zoom_where_text_is_drawn(ui, name):
    """Opened the way the template browser opens it (both frontends call loadGraphData with the
    template's JSON and title; 1.49 marks it openSource 'template' and then fits the whole graph,
    at a zoom where it draws blank boxes; 1.32 takes the saved view): the first screenshot shows
    the Read me, drawn, at a zoom of at least 0.8, with its steps readable where they are.
    (Clicking through the browser itself is test_template_browser_shows_each_title_with_its_thumbnail.)"""
    page, console = ui
    mark = console.mark()
    close_dialogs(page)
    title = build_workflows.TEMPLATES[name].title
    workflow = json.loads(build_workflows.ui_path(name).read_text())
    page.evaluate(
        "async ([wf, title]) => { await app.loadGraphData(wf, true, true, title, {openSource: 'template'}) }",
        [workflow, title],
    )
    page.wait_for_timeout(1500)
    close_dialogs(page)
    shot = ARTIFACTS / f"web_ui_opened_{name}.png"
    page.screenshot(path=str(shot))
    (note,) = page.evaluate(
        "() => app.graph.nodes.filter(n => n.type === 'MarkdownNote').map(n => String(n.id))"
    )
    scale = page.evaluate("() => app.canvas.ds.scale")
    assert scale >= 0.8, f"{name} opened at zoom {scale:.2f}"
    for needle in ("Press Queue", "Models"):
        seen = _text_shown_in_node(page, note, needle, move=False)
        assert seen["shown"], f"{name}: {needle!r} is not readable in the Read me as opened ({seen}); {shot}"
    # The framing is not kept in the workflow: a saved copy opens where the user left it.
    assert page.evaluate("() => app.graph.extra?.kontext_restore") is None
    errors = console.errors_since(mark)
    assert not errors, "\n".join(errors)
