"""The example workflows in workflows/: in sync with their generator, structurally valid against a
real server's /object_info, and runnable end to end on tiny models in a real headless server."""

from __future__ import annotations

import copy
import json
import re
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from server_host import PACK_LINK_NAME, server_fixture, write_png
from tiny_templates import CPU_BUCKET_SCALE, shrink_api

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
sys.path.insert(0, str(WORKFLOWS))
import build_workflows  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]

comfy_server = server_fixture()

NAMES = sorted(build_workflows.WORKFLOWS)
TRAINING = ["train_restoration_lora", "train_then_evaluate"]
NOTE = build_workflows.NOTE_TYPE
# Combo inputs whose choices are the files of a folder: the templates name the documented files,
# which a test server does not have.
FILE_INPUTS = {
    ("UNETLoader", "unet_name"),
    ("DualCLIPLoader", "clip_name1"),
    ("DualCLIPLoader", "clip_name2"),
    ("VAELoader", "vae_name"),
    ("LoadImage", "image"),
    ("LoraLoaderModelOnly", "lora_name"),
    ("KontextRestoreRestore", "lora_name"),
}


def load_ui(name: str) -> dict:
    return json.loads(build_workflows.ui_path(name).read_text())


def load_api(name: str) -> dict:
    return json.loads(build_workflows.api_path(name).read_text())


def note_text(name: str) -> str:
    notes = [n for n in load_ui(name)["nodes"] if n["type"] == NOTE]
    assert len(notes) == 1, f"{name}: {len(notes)} Note nodes"
    return notes[0]["widgets_values"][0]


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.object_info()


def test_every_workflow_is_committed_in_both_formats_with_a_thumbnail():
    assert NAMES == ["restore_with_lora", "train_restoration_lora", "train_then_evaluate"]
    titles = sorted(build_workflows.TEMPLATES[n].title for n in NAMES)
    assert sorted(p.stem for p in WORKFLOWS.glob("*.json")) == titles
    api = sorted(p.name.removesuffix(".api.json") for p in build_workflows.API_DIR.glob("*.api.json"))
    assert api == NAMES
    assert build_workflows.unexpected_files() == []
    from PIL import Image

    for name in NAMES:
        thumb = build_workflows.thumbnail_path(name)
        assert thumb.stem == build_workflows.ui_path(name).stem, "the browser looks for <file name>.jpg"
        with Image.open(thumb) as img:
            assert img.format == "JPEG" and img.size == (640, 640), (thumb, img.format, img.size)
            # A rendered graph, not a blank picture: many distinct colours.
            assert len(img.convert("RGB").getcolors(1 << 20) or []) > 500, f"{thumb} looks blank"


def test_titles_are_readable_file_names():
    """The template browser (frontends 1.32 and 1.49) shows a custom-node template's file name
    as its title and, with '-' and '_' turned into spaces, as its description: titles use
    neither, and no character a URL path would need escaped beyond spaces."""
    for name in NAMES:
        title = build_workflows.TEMPLATES[name].title
        assert re.fullmatch(r"[A-Za-z0-9 ]+", title), title
        assert "Kontext" in title and len(title) <= 60, title
        description = build_workflows.TEMPLATES[name].description
        assert "\n" not in description and 40 < len(description) < 200, description


def test_committed_files_equal_generator_output(object_info):
    """Equal in nodes, links, widget values and layout; display titles and outputs declared
    without links vary with the ComfyUI version (build_workflows.ui_essence/api_essence)."""
    stale = build_workflows.stale_files(build_workflows.build_all(object_info))
    stale = [str(path.relative_to(ROOT)) for path in stale]
    assert not stale, f"regenerate with: .venv/bin/python workflows/build_workflows.py  (stale: {stale})"


def test_staleness_ignores_version_details_only(tmp_path):
    """The version-independent comparison still sees a changed widget value or link."""
    name = "restore_with_lora"
    ui, api = load_ui(name), load_api(name)
    ui_path, api_path = tmp_path / f"{name}.json", tmp_path / f"{name}.api.json"
    titled = copy.deepcopy(api)
    for node in titled.values():
        node["_meta"]["title"] = "Some display name"
    declared = copy.deepcopy(ui)
    for node in declared["nodes"]:
        if not node["outputs"]:
            node["outputs"] = [{"name": "images", "type": "IMAGE", "slot_index": 0, "links": []}]
    ui_path.write_text(build_workflows.dump(ui))
    api_path.write_text(build_workflows.dump(api))
    assert build_workflows.stale_files({ui_path: declared, api_path: titled}) == []
    changed_value, changed_link = copy.deepcopy(api), copy.deepcopy(ui)
    changed_value["7"]["inputs"]["seed"] = 1
    changed_link["links"][0][3] = 99
    assert build_workflows.stale_files({ui_path: changed_link, api_path: changed_value}) == [
        ui_path,
        api_path,
    ]


@pytest.mark.parametrize("name", NAMES)
def test_ui_file_converts_to_the_api_file(name, object_info):
    converted = build_workflows.ui_to_api(load_ui(name), object_info)
    assert build_workflows.api_essence(converted) == build_workflows.api_essence(load_api(name))


def _input_spec(info: dict, name: str):
    for section in ("required", "optional"):
        if name in info["input"].get(section, {}):
            return info["input"][section][name]
    return None


def _socket_type(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def _types_match(out_type: str, in_type: str) -> bool:
    """As ComfyUI validates a link: any type, or a type in common ("COMBO,STRING" takes STRING)."""
    outs, ins = set(out_type.split(",")), set(in_type.split(","))
    return "*" in outs | ins or bool(outs & ins)


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_nodes_links_and_widgets_are_valid(name, object_info):
    ui = load_ui(name)
    assert ui["version"] == 0.4
    nodes = {n["id"]: n for n in ui["nodes"]}
    unknown = sorted({n["type"] for n in ui["nodes"]} - set(object_info) - {NOTE})
    assert not unknown, f"node types not in /object_info: {unknown}"
    assert ui["last_node_id"] == max(nodes) and ui["last_link_id"] == max(link[0] for link in ui["links"])
    uses_pack = [n for n in ui["nodes"] if n["type"].startswith("KontextRestore")]
    assert uses_pack and not any(n["type"].startswith("KontextRestoreTest") for n in ui["nodes"])
    for link_id, src, src_slot, dst, dst_slot, link_type in ui["links"]:
        src_info, dst_node = object_info[nodes[src]["type"]], nodes[dst]
        out_type = src_info["output"][src_slot]
        target = dst_node["inputs"][dst_slot]
        spec = _input_spec(object_info[dst_node["type"]], target["name"])
        assert spec is not None, f"{dst_node['type']} has no input {target['name']}"
        in_type = _socket_type(spec)
        assert link_type == out_type, f"link {link_id}: {link_type} != {out_type}"
        assert _types_match(out_type, in_type), (
            f"link {link_id}: {out_type} -> {dst_node['type']}.{target['name']} ({in_type})"
        )
        assert target["link"] == link_id and target["type"] == in_type
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
    for node in ui["nodes"]:
        if node["type"] == NOTE:
            assert node["inputs"] == node["outputs"] == [] and len(node["widgets_values"]) == 1
            continue
        specs = build_workflows.node_inputs(object_info[node["type"]])
        widgets = [s for s in specs if s.is_widget]
        expected = len(widgets) + sum(len(s.extra_widget_values()) for s in widgets)
        assert len(node["widgets_values"]) == expected, f"node {node['id']} {node['type']}"
        # Every required socket (not a widget) is connected.
        linked = {i["name"] for i in node["inputs"] if i.get("link") is not None}
        for s in specs:
            if not s.optional and not s.is_widget:
                assert s.name in linked, f"node {node['id']} {node['type']}: {s.name} not connected"


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_values_are_within_the_node_limits(name, object_info):
    for node_id, node in load_api(name).items():
        info = object_info[node["class_type"]]
        for key, value in node["inputs"].items():
            spec = _input_spec(info, key)
            assert spec is not None, f"{node_id} {node['class_type']}: unknown input {key}"
            if isinstance(value, list):  # a link
                src = load_api(name)[value[0]]
                out_type = object_info[src["class_type"]]["output"][value[1]]
                assert _types_match(out_type, _socket_type(spec)), f"{node_id}.{key}"
                continue
            options = spec[1] if len(spec) > 1 else {}
            choices = spec[0] if isinstance(spec[0], list) else options.get("options")
            if choices:  # combos
                if (node["class_type"], key) not in FILE_INPUTS:
                    assert value in choices, f"{node_id}.{key}={value!r}"
            elif spec[0] in ("INT", "FLOAT"):
                assert options.get("min", value) <= value <= options.get("max", value), f"{node_id}.{key}"


@pytest.mark.parametrize("name", NAMES)
def test_loader_files_are_the_documented_ones(name):
    api = load_api(name)
    by_type = {n["class_type"]: n["inputs"] for n in api.values()}
    assert by_type["UNETLoader"]["unet_name"] == "flux1-kontext-dev.safetensors"
    # Training templates load the base model in fp8 (fits a 24 GB card); restoring keeps the default.
    assert by_type["UNETLoader"]["weight_dtype"] == ("fp8_e4m3fn" if name in TRAINING else "default")
    assert (by_type["DualCLIPLoader"]["clip_name1"], by_type["DualCLIPLoader"]["clip_name2"]) == (
        "clip_l.safetensors",
        "t5xxl_fp16.safetensors",
    )
    assert by_type["DualCLIPLoader"]["type"] == "flux"
    assert by_type["VAELoader"]["vae_name"] == "ae.safetensors"
    assert "restore" in by_type["CLIPTextEncode"]["text"].lower()


@pytest.mark.parametrize("name", NAMES)
def test_note_says_which_models_where_and_what_fits(name):
    text = note_text(name)
    template = build_workflows.TEMPLATES[name]
    assert text.startswith(f"## {template.title}\n{template.description}\n")
    # Short, and says what to put where, what to press, how long and where the result goes.
    assert len(text) < 1600, f"{name}: the Read me has {len(text)} characters"
    for needed in ("**Put**", "**Press Queue**", "How long", "**Result:**"):
        assert needed in text, f"{name}: the Read me does not say {needed!r}"
    for needed in (
        "FLUX.1 Kontext [dev]",
        "models/diffusion_models/flux1-kontext-dev.safetensors",
        "models/vae/ae.safetensors",
        "models/text_encoders/clip_l.safetensors",
        "t5xxl_fp16.safetensors",
        "huggingface.co/black-forest-labs/FLUX.1-Kontext-dev",
        "accept its licence",
        "logged in",
        'README "Will it fit?"',
    ):
        assert needed in text, f"{name}: the Note does not say {needed!r}"
    if name in TRAINING:
        for needed in (
            "24 GB",
            "16 GB",
            "fp8_e4m3fn",
            "gradient_checkpointing auto",
            "rank 16",
            "bucket_scale 0.5",
        ):
            assert needed in text, f"{name}: the Note does not say {needed!r}"


@pytest.mark.parametrize("name", NAMES)
def test_note_names_every_setting_that_differs_from_the_node_default(name, object_info):
    """Widgets a template sets to other than the node's default (besides file names, the prompt
    and output prefixes) are named in its Note with the reason."""
    text = note_text(name)
    for node in build_workflows.WORKFLOWS[name]():
        if node.type == NOTE:
            continue
        specs = {s.name: s for s in build_workflows.node_inputs(object_info[node.type])}
        for key, value in node.widgets.items():
            # Model and image files, the prompt, output prefixes, the text encoders' type (flux)
            # and the blank line joining the two reports are what the template is about, not
            # settings.
            core_file = (node.type, key) in FILE_INPUTS and not node.type.startswith("KontextRestore")
            if core_file or key in ("text", "filename_prefix", "type", "delimiter"):
                continue
            if value != specs[key].default():
                assert key in text and str(value) in text, f"{name}: {node.type}.{key}={value!r}"


def test_overlap_check_sees_a_node_on_top_of_another():
    ui = load_ui("train_then_evaluate")
    trainer = next(n for n in ui["nodes"] if n["type"] == "KontextRestoreTrainLoRA")
    restore = next(n for n in ui["nodes"] if n["type"] == "KontextRestoreRestore")
    # Where Restore Image once sat: on the lower part of Train LoRA, hiding three widgets.
    restore["pos"] = [trainer["pos"][0], trainer["pos"][1] + trainer["size"][1] - 96]
    assert build_workflows.overlapping(build_workflows.node_boxes(ui)) == [
        (f"{trainer['id']} {trainer['type']}", f"{restore['id']} {restore['type']}")
    ]


@pytest.mark.parametrize("name", NAMES)
def test_no_two_nodes_overlap(name):
    assert build_workflows.overlapping(build_workflows.node_boxes(load_ui(name))) == []


@pytest.mark.parametrize("name", NAMES)
def test_no_link_passes_over_a_node(name):
    """Links as the frontends draw them (curves between slots) pass over no node other than their
    ends (test_link_check_sees_a_link_through_a_node is the check's negative control). When a
    template changes: `python workflows/build_workflows.py --untangle` prints node positions."""
    assert build_workflows.links_through_nodes(load_ui(name)) == []


@pytest.mark.parametrize("name", NAMES)
def test_node_sizes_hold_their_slots_and_widgets(name):
    """At least what LiteGraph computes (1.32 and 1.49 alike: 20 px per slot row, 24 per
    widget, 14 of padding); tests/test_web_ui.py compares with the frontend's own computeSize."""
    for node in load_ui(name)["nodes"]:
        slots = max(len(node["inputs"]), len(node["outputs"]))
        minimum = 20 * slots + 24 * len(node["widgets_values"]) + 14
        assert node["size"][1] >= minimum, f"{name}: node {node['id']} {node['type']} {node['size']}"
        assert node["size"][0] >= 200, f"{name}: node {node['id']} {node['type']} {node['size']}"


def test_templates_and_thumbnails_are_served_where_the_frontend_looks(comfy_server):
    """GET /workflow_templates lists the titles under the pack's folder name; the frontend then
    fetches /api/workflow_templates/<pack>/<name>.json and <name>.jpg (no '-1' suffix for a
    custom node's template, unlike the core templates)."""
    listed = comfy_server.get("/workflow_templates").get(PACK_LINK_NAME, [])
    assert sorted(listed) == sorted(build_workflows.TEMPLATES[n].title for n in NAMES)
    for name in NAMES:
        base = f"/api/workflow_templates/{PACK_LINK_NAME}/" + urllib.parse.quote(
            build_workflows.TEMPLATES[name].title
        )
        assert comfy_server.get(base + ".json") == load_ui(name)
        with urllib.request.urlopen(comfy_server.url + base + ".jpg", timeout=30) as resp:
            assert resp.headers["Content-Type"] == "image/jpeg"
            assert resp.read() == build_workflows.thumbnail_path(name).read_bytes()


# --------------------------------------------------------------------------------------------
# End to end in the real server, tiny models
# --------------------------------------------------------------------------------------------


def _saved_files(server, entry: dict, node_id: str) -> list[Path]:
    images = entry["outputs"][node_id]["images"]
    return [server.base / img["type"] / img["subfolder"] / img["filename"] for img in images]


@pytest.fixture(scope="module")
def trained(comfy_server):
    """train_then_evaluate run once in the server; (history entry, LoRA file name, image names)."""
    server = comfy_server
    dataset = "wf_dataset"
    for i in range(3):  # two to train on (one batch), one held out for validation
        write_png(server.input_dir / dataset / f"photo_{i}.png", 176, 128, seed=100 + i)
    images = {
        "clean_photo.png": write_png(server.input_dir / "wf_clean.png", 176, 128, seed=7).name,
        "degraded_photo.png": write_png(server.input_dir / "wf_degraded.png", 176, 128, seed=8).name,
    }
    api = shrink_api(load_api("train_then_evaluate"), dataset, images, "wf_evaluate")
    entry = server.run_prompt(api, timeout=600)
    lora = next(n for n in api.values() if n["class_type"] == "KontextRestoreTrainLoRA")["inputs"][
        "lora_name"
    ]
    return entry, f"{lora}.safetensors", images


def test_train_then_evaluate_runs_end_to_end(comfy_server, trained):
    entry, lora_file, _ = trained
    assert entry["status"]["status_str"] == "success"
    assert (comfy_server.loras_dir / lora_file).is_file()
    outputs = entry["outputs"]
    # Metrics node (18) and its text preview (19).
    table = "".join(outputs["18"]["text"])
    assert "PSNR" in table.upper() and "SSIM" in table.upper()
    assert "".join(outputs["19"]["text"]) == table
    # Restored image saved (16), degraded (17) and loss curve (10) previewed.
    saved = _saved_files(comfy_server, entry, "16")
    assert len(saved) == 1 and saved[0].is_file() and saved[0].stat().st_size > 1000
    assert _saved_files(comfy_server, entry, "17")[0].is_file()
    assert _saved_files(comfy_server, entry, "10")[0].is_file()
    # The dataset's summary, then the trainer's validation report, in one preview (11).
    report = "".join(outputs["11"]["text"])
    assert report.startswith("Dataset ") and "used 3 image(s): 2 train, 1 held out" in report, report
    scale = f"buckets (scale {CPU_BUCKET_SCALE:g})"
    assert scale in report and "PSNR" in report.split(scale)[1], report


def test_restore_with_lora_runs_with_the_trained_lora(comfy_server, trained):
    _, lora_file, images = trained
    api = shrink_api(load_api("restore_with_lora"), "unused", images, "wf_restore")
    for node in api.values():
        if node["class_type"] in ("LoraLoaderModelOnly", "KontextRestoreRestore"):
            node["inputs"]["lora_name"] = lora_file
    entry = comfy_server.run_prompt(api, timeout=300)
    saved = _saved_files(comfy_server, entry, "8")
    from PIL import Image

    with Image.open(saved[0]) as img:
        assert img.size == (176, 128)  # restored at the input's size


@pytest.mark.parametrize("name", NAMES)
def test_template_opens_framed_on_its_read_me(name):
    """The saved view (1.32 opens a template with it) shows the Read me at full size near the
    top-left corner; the web extension frames the node named in extra.kontext_restore on 1.49,
    which fits the whole graph instead (tests/test_web_ui.py checks both as drawn)."""
    ui = load_ui(name)
    (note,) = [n for n in ui["nodes"] if n["type"] == NOTE]
    ds = ui["extra"]["ds"]
    assert ds["scale"] >= 0.8 and ui["extra"]["kontext_restore"]["frame"] == note["id"]
    corner = [
        (note["pos"][0] + ds["offset"][0]) * ds["scale"],
        (note["pos"][1] - 30 + ds["offset"][1]) * ds["scale"],
    ]
    assert 0 <= corner[0] <= 100 and 100 <= corner[1] <= 200, corner  # below the page's menus
    assert note["size"][1] * ds["scale"] < 900, "the Read me fits a 1080 px high window"


def test_link_check_sees_a_link_through_a_node():
    """Negative control for build_workflows.links_through_nodes: a node put on the straight line
    between the VAE and Restore Image of the restore template is found on that link."""
    ui = load_ui("restore_with_lora")
    nodes = {n["id"]: n for n in ui["nodes"]}
    vae = next(n for n in ui["nodes"] if n["type"] == "VAELoader")
    restore = next(n for n in ui["nodes"] if n["type"] == "KontextRestoreRestore")
    save = next(n for n in ui["nodes"] if n["type"] == "SaveImage")
    # Save Image moved to the middle of the VAE -> Restore Image link.
    (points,) = [
        pts
        for _, src, dst, pts in build_workflows.link_curves(ui)
        if (src, dst) == (vae["id"], restore["id"])
    ]
    mid_x, mid_y = points[len(points) // 2]
    save["pos"] = [mid_x - 20, mid_y - 20 + build_workflows.TITLE_H]
    save["size"] = [40, 40]
    found = build_workflows.links_through_nodes({"nodes": list(nodes.values()), "links": ui["links"]})
    assert any("VAELoader -> " in link and "SaveImage" in node for link, node in found), found


def test_restore_template_drops_load_lora_with_one_switch(monkeypatch, object_info):
    """Once Restore Image applies its picker's LoRA itself, RESTORE_APPLIES_LORA = True is the
    one change: no Load LoRA, the model straight from the loader, the Read me without it."""
    import kontext_templates

    monkeypatch.setattr(kontext_templates, "RESTORE_APPLIES_LORA", True)
    nodes = kontext_templates.restore_with_lora()
    assert "LoraLoaderModelOnly" not in {n.type for n in nodes}
    restore = next(n for n in nodes if n.type == "KontextRestoreRestore")
    assert restore.links["model"] == (1, 0) and restore.widgets["lora_name"] == "kontext_restore.safetensors"
    note = next(n for n in nodes if n.type == NOTE).widgets["text"]
    assert "Load LoRA" not in note
    build_workflows.to_ui(nodes, object_info)  # still a valid workflow


def test_before_after_thumbnail_shows_before_on_the_left_and_after_on_the_right(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from PIL import Image
    from template_thumbnails import THUMBNAIL_PX, TITLE_BAND, before_after_thumbnail, samples_first_row

    before, after = Image.new("RGB", (300, 200), (200, 40, 40)), Image.new("RGB", (300, 200), (40, 40, 200))
    path = before_after_thumbnail(
        before, after, "Restore photos with a Kontext LoRA", ("degraded", "restored"), tmp_path / "t.jpg"
    )
    with Image.open(path) as img:
        assert img.format == "JPEG" and img.size == (THUMBNAIL_PX, THUMBNAIL_PX)
        y = TITLE_BAND + 100
        left, right = img.getpixel((100, y)), img.getpixel((THUMBNAIL_PX - 100, y))
        assert left[0] > 150 > left[2] and right[2] > 150 > right[0], (left, right)
    # The first row of a samples grid (degraded | restored | ...) gives the pair.
    from kontext_train.report.sample_grid import image_grid

    grid = image_grid(
        [[before, after, after, before]], ["degraded", "restored", "VAE round trip", "clean"], cell=128
    )
    grid.save(tmp_path / "samples.png")
    b, a = samples_first_row(tmp_path / "samples.png")
    assert b.getpixel((b.width // 2, b.height // 2)) == (200, 40, 40)
    assert a.getpixel((a.width // 2, a.height // 2)) == (40, 40, 200)
