"""Renders the template browser's thumbnails (workflows/<title>.jpg).

With ``--before B --after A`` (or ``--samples samples.png``, a grid written by the demo or
``kontext-train evaluate``: its first row's degraded and restored images) each thumbnail is a
before/after picture of a restoration under the template's title, which a person tells apart at a
glance (``before_after_thumbnail``). Without them, each template is drawn by the real web UI:

it starts a headless ComfyUI with this pack (tests/server_host.py), puts placeholder model files
and sample photos where the templates' loaders look, opens the page in headless Chromium, loads
each template, draws it at full size on a canvas large enough for the whole graph, and saves a
square JPEG of the graph. The rendered nodes' sizes are checked against the frontend's own
minimum (LiteGraph's computeSize) on the way, so a template whose sizes the frontend would
enlarge is refused rather than pictured.

    COMFYUI_PATH=.host/0.33.0/ComfyUI .host/0.33.0/venv/bin/python scripts/template_thumbnails.py
    .host/0.33.0/venv/bin/python scripts/template_thumbnails.py --samples kontext-restore-demo/samples.png

Needs Chromium and Playwright's Python package (scripts/setup_test_env.sh with WITH_BROWSER=1).
tests/test_web_ui.py uses the same page helpers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "tests", ROOT / "workflows"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import build_workflows  # noqa: E402

THUMBNAIL_PX = 640  # square, like the core templates' thumbnails
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UI_READY_S = 90
MARGIN = 60  # canvas units around the graph in the picture
CHROME_PX = 240  # room for the page's menus and panels around the drawn graph


def write_placeholder_models(models_dir: Path) -> list[Path]:
    """Tiny valid safetensors files under the names and folders the templates' loaders use, so
    the frontend lists them as a user's install would (no missing-model markers). Returns the
    files it created (existing ones are left alone), for the caller to remove."""
    import torch
    from safetensors.torch import save_file

    files = [(folder, name) for name, (_, folder) in build_workflows.MODEL_URLS.items()]
    files.append(("loras", f"{build_workflows.LORA_NAME}.safetensors"))
    created = []
    for folder, name in files:
        path = models_dir / folder / name
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"placeholder": torch.zeros(1)}, str(path))
        created.append(path)
    return created


def write_sample_photos(input_dir: Path) -> None:
    """The images the templates' Load Image nodes name: a photo bundled with scikit-image when it
    is installed (the demo's), else a smooth generated picture."""
    from PIL import Image, ImageFilter

    try:
        from skimage import data

        clean = Image.fromarray(data.astronaut())
    except ImportError:
        from server_host import write_png

        clean = Image.open(write_png(input_dir / "_generated.png", 512, 512, seed=3)).convert("RGB")
    input_dir.mkdir(parents=True, exist_ok=True)
    clean.save(input_dir / "clean_photo.png")
    degraded = clean.resize((clean.width // 3, clean.height // 3)).filter(ImageFilter.GaussianBlur(1.2))
    degraded.resize(clean.size).save(input_dir / "degraded_photo.jpg", quality=20)
    Image.open(input_dir / "degraded_photo.jpg").save(input_dir / "degraded_photo.png")


@contextmanager
def open_ui(url: str, viewport=(1600, 1000), on_page=None) -> Iterator:
    """A headless Chromium page on the ComfyUI at ``url``, once the frontend has registered this
    pack's nodes. ``on_page(page)`` runs before the page loads (to attach listeners)."""
    from playwright.sync_api import sync_playwright
    from server_host import chromium_path

    chromium = chromium_path()
    if chromium is None:
        raise SystemExit("Chromium is not installed: scripts/setup_test_env.sh with WITH_BROWSER=1")
    with sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="kontext_restore_chromium_") as profile:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": viewport[0], "height": viewport[1]},
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(20_000)
            if on_page:
                on_page(page)
            page.goto(url, timeout=UI_READY_S * 1000)
            page.wait_for_function(
                "() => window.app && window.app.graph && window.LiteGraph"
                " && LiteGraph.registered_node_types['KontextRestoreTrainLoRA']",
                timeout=UI_READY_S * 1000,
            )
            yield page
        finally:
            context.close()


DIALOGS = ".p-dialog:visible, [role=dialog]:visible"


def close_dialogs(page) -> None:
    """Closes open dialogs: Escape, and where a dialog ignores it (1.32's template browser) its
    close button, the rightmost visible button in its top corner."""
    for attempt in range(25):
        if not page.locator(DIALOGS).count():
            return
        if attempt % 2:
            page.evaluate(
                """() => { for (const d of document.querySelectorAll('.p-dialog, [role=dialog]')) {
                    const r = d.getBoundingClientRect();
                    const near = [...d.querySelectorAll('button')].filter(b => {
                        const e = b.getBoundingClientRect();
                        return e.width > 0 && getComputedStyle(b).opacity !== '0'
                            && e.top - r.top < 80 && r.right - e.right < 80;
                    });
                    near.sort((a, b) => b.getBoundingClientRect().right - a.getBoundingClientRect().right);
                    if (near.length) near[0].click();
                } }"""
            )
        else:
            page.keyboard.press("Escape")
        page.wait_for_timeout(300)
    raise AssertionError(f"a dialog does not close: {page.locator(DIALOGS).first.inner_text()[:300]}")


def load_workflow(page, workflow: dict, settle_ms: int = 1500) -> None:
    close_dialogs(page)
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf) }", workflow)
    # Dialogs and overlays (missing nodes / models, errors) open asynchronously after the load.
    page.wait_for_timeout(settle_ms)


def node_boxes(page) -> list[dict]:
    """Every node as the frontend has it: id, type, title, pos, size, the frontend's minimum size
    (computeSize) and the box it occupies on the canvas including the title bar."""
    return page.evaluate(
        """() => app.graph.nodes.map(n => {
            const title = (n.constructor.title_mode === LiteGraph.NO_TITLE) ? 0 : LiteGraph.NODE_TITLE_HEIGHT;
            return {id: String(n.id), type: n.type, title: n.title, pos: Array.from(n.pos),
                    size: Array.from(n.size), min: Array.from(n.computeSize()),
                    box: [n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title]};
        })"""
    )


def undersized(boxes: list[dict]) -> list[str]:
    """Nodes whose saved size is below what the frontend computes for their slots and widgets."""
    return [
        f"node {b['id']} {b['type']}: size {b['size']} < frontend minimum {[round(v) for v in b['min']]}"
        for b in boxes
        if b["size"][0] + 0.5 < b["min"][0] or b["size"][1] + 0.5 < b["min"][1]
    ]


def graph_bounds(boxes: list[dict]) -> tuple[float, float, float, float]:
    x0 = min(b["box"][0] for b in boxes)
    y0 = min(b["box"][1] for b in boxes)
    x1 = max(b["box"][0] + b["box"][2] for b in boxes)
    y1 = max(b["box"][1] + b["box"][3] for b in boxes)
    return x0, y0, x1, y1


def render_graph(page, path: Path) -> None:
    """Draws the loaded graph at scale 1 (full detail; LiteGraph drops text when zoomed out) on a
    page sized to hold it, and saves the graph's area as a square JPEG."""
    from PIL import Image

    x0, y0, x1, y1 = graph_bounds(node_boxes(page))
    width, height = int(x1 - x0 + 2 * MARGIN), int(y1 - y0 + 2 * MARGIN)
    page.set_viewport_size({"width": width + 2 * CHROME_PX, "height": height + 2 * CHROME_PX})
    page.wait_for_timeout(500)
    # Screen = (canvas + offset) * scale + the canvas element's corner: the graph's corner (less
    # the margin) lands at (CHROME_PX, CHROME_PX).
    page.evaluate(
        """([x0, y0, m, chrome]) => {
            const c = app.canvas, r = c.canvas.getBoundingClientRect();
            c.ds.scale = 1;
            c.ds.offset[0] = chrome - r.left - x0 + m;
            c.ds.offset[1] = chrome - r.top - y0 + m;
            c.setDirty(true, true);
        }""",
        [x0, y0, MARGIN, CHROME_PX],
    )
    page.wait_for_timeout(800)
    shot = path.with_suffix(".render.png")
    page.screenshot(path=str(shot), clip={"x": CHROME_PX, "y": CHROME_PX, "width": width, "height": height})
    with Image.open(shot) as img:
        img = img.convert("RGB")
        side = max(img.size)
        square = Image.new("RGB", (side, side), img.getpixel((2, 2)))
        square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        square.resize((THUMBNAIL_PX, THUMBNAIL_PX), Image.LANCZOS).save(path, quality=88, optimize=True)
    shot.unlink()


# What each template's picture says under its title: what goes in and what comes out.
CAPTIONS = {
    "train_restoration_lora": ("photos in", "LoRA out"),
    "restore_with_lora": ("degraded", "restored"),
    "train_then_evaluate": ("degraded", "restored + scores"),
}
TITLE_BAND = 132  # px of the 640 px square above the picture


def samples_first_row(samples: Path, columns: int = 4, gap: int = 4) -> tuple:
    """(degraded, restored) of the first row of a samples grid (kontext_train.report.sample_grid:
    ``columns`` square cells ``gap`` px apart under a label band), each cropped to its image."""
    from PIL import Image, ImageChops

    grid = Image.open(samples).convert("RGB")
    cell = (grid.width - (columns - 1) * gap) // columns
    rows = (grid.height + gap) // (cell + gap)
    band = grid.height - rows * cell - (rows - 1) * gap
    cells = []
    for col in range(2):
        box = grid.crop((col * (cell + gap), band, col * (cell + gap) + cell, band + cell))
        background = Image.new("RGB", box.size, box.getpixel((0, 0)))
        cells.append(box.crop(ImageChops.difference(box, background).getbbox() or (0, 0, *box.size)))
    return cells[0], cells[1]


def before_after_thumbnail(before, after, title: str, captions: tuple[str, str], path: Path) -> Path:
    """A 640 px square JPEG: ``title`` on a band at the top, below it the photo split down the
    middle, left half ``before`` and right half ``after`` (the same crop of both, so the eye sees
    the change across the line), each half labelled with its caption."""
    from PIL import Image, ImageDraw

    from kontext_train.report.sample_grid import font, text_size

    side = THUMBNAIL_PX
    area = (side, side - TITLE_BAND)
    before, after = (
        Image.open(p).convert("RGB") if isinstance(p, (str, Path)) else p for p in (before, after)
    )
    after = after.resize(before.size, Image.LANCZOS)
    scale = max(area[0] / before.width, area[1] / before.height)
    size = (round(before.width * scale), round(before.height * scale))
    left, top = (size[0] - area[0]) // 2, (size[1] - area[1]) // 2
    crop = (left, top, left + area[0], top + area[1])
    b = before.resize(size, Image.LANCZOS).crop(crop)
    a = after.resize(size, Image.LANCZOS).crop(crop)
    picture = b.copy()
    picture.paste(a.crop((area[0] // 2, 0, *area)), (area[0] // 2, 0))
    out = Image.new("RGB", (side, side), (24, 26, 32))
    out.paste(picture, (0, TITLE_BAND))
    draw = ImageDraw.Draw(out)
    draw.line([(side // 2, TITLE_BAND), (side // 2, side)], fill=(255, 255, 255), width=4)
    words, lines, size_px = title.split(), [""], 40
    title_font = font(size_px)
    for word in words:  # wrap the title into lines that fit
        trial = f"{lines[-1]} {word}".strip()
        if text_size(draw, trial, title_font)[0] > side - 40 and lines[-1]:
            lines.append(word)
        else:
            lines[-1] = trial
    for i, line in enumerate(lines[:2]):
        draw.text((20, 16 + i * (size_px + 8)), line, fill=(255, 255, 255), font=title_font)
    label_font = font(28)
    for text, x in ((captions[0], 16), (captions[1], side // 2 + 16)):
        w, h = text_size(draw, text, label_font)
        draw.rectangle([x - 6, side - h - 30, x + w + 6, side - 12], fill=(0, 0, 0))
        draw.text((x, side - h - 26), text, fill=(255, 255, 255), font=label_font)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path, quality=88, optimize=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=build_workflows.HERE, help="folder for the .jpg files")
    parser.add_argument(
        "--before", type=Path, help="a degraded photo (with --after: before/after thumbnails)"
    )
    parser.add_argument("--after", type=Path, help="the same photo restored")
    parser.add_argument(
        "--samples", type=Path, help="a samples.png grid: its first degraded and restored image"
    )
    args = parser.parse_args(argv)
    if args.samples or args.before:
        if args.samples:
            before, after = samples_first_row(args.samples)
        elif args.after:
            before, after = args.before, args.after
        else:
            parser.error("--before needs --after")
        for name, template in build_workflows.TEMPLATES.items():
            target = args.out / build_workflows.thumbnail_path(name).name
            before_after_thumbnail(before, after, template.title, CAPTIONS[name], target)
            print(f"wrote {target}")
        return 0
    from server_host import start_server

    problems = []
    with tempfile.TemporaryDirectory(prefix="kontext_restore_thumbs_") as tmp:
        with start_server(tmp, with_test_nodes=False) as server:
            write_placeholder_models(server.base / "models")
            write_sample_photos(server.input_dir)
            with open_ui(server.url) as page:
                # The minimap would cover part of a large graph.
                page.evaluate(
                    "async () => { try { await app.extensionManager.setting.set('Comfy.Minimap.Visible', false) }"
                    " catch (e) {} }"
                )
                for name in build_workflows.TEMPLATES:
                    workflow = json.loads(build_workflows.ui_path(name).read_text())
                    load_workflow(page, workflow)
                    close_dialogs(page)
                    problems += [f"{name}: {p}" for p in undersized(node_boxes(page))]
                    target = args.out / build_workflows.thumbnail_path(name).name
                    render_graph(page, target)
                    print(f"wrote {target}")
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
