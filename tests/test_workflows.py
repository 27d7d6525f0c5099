"""The example workflows in workflows/: in sync with their generator, structurally valid against a
real server's /object_info, and runnable end to end on tiny models in a real headless server."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
from server_host import server_fixture, write_png

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
sys.path.insert(0, str(WORKFLOWS))
import build_workflows  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]

comfy_server = server_fixture()

NAMES = sorted(build_workflows.WORKFLOWS)
# Loader swaps for the tiny test-only models in tests/host_nodes.
TINY_LOADERS = {
    "UNETLoader": "KontextRestoreTestTinyFlux",
    "DualCLIPLoader": "KontextRestoreTestTinyClip",
    "VAELoader": "KontextRestoreTestTinyVAE",
}


def load_ui(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def load_api(name: str) -> dict:
    return json.loads((build_workflows.API_DIR / f"{name}.api.json").read_text())


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.object_info()


def test_every_workflow_is_committed_in_both_formats():
    ui = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    api = sorted(p.name.removesuffix(".api.json") for p in build_workflows.API_DIR.glob("*.api.json"))
    assert ui == api == NAMES == ["restore_with_lora", "train_restoration_lora", "train_then_evaluate"]


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
    return out_type == in_type or "*" in (out_type, in_type)


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_nodes_links_and_widgets_are_valid(name, object_info):
    ui = load_ui(name)
    assert ui["version"] == 0.4
    nodes = {n["id"]: n for n in ui["nodes"]}
    unknown = sorted({n["type"] for n in ui["nodes"]} - set(object_info))
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
            if isinstance(spec[0], list) and spec[0]:  # combos with a fixed option list
                if node["class_type"] not in ("LoadImage", "LoraLoaderModelOnly", *TINY_LOADERS):
                    assert value in spec[0], f"{node_id}.{key}={value!r}"
            elif spec[0] in ("INT", "FLOAT"):
                assert options.get("min", value) <= value <= options.get("max", value), f"{node_id}.{key}"


def test_loader_files_are_the_documented_ones():
    api = load_api("train_restoration_lora")
    by_type = {n["class_type"]: n["inputs"] for n in api.values()}
    assert by_type["UNETLoader"]["unet_name"] == "flux1-kontext-dev.safetensors"
    assert (by_type["DualCLIPLoader"]["clip_name1"], by_type["DualCLIPLoader"]["clip_name2"]) == (
        "clip_l.safetensors",
        "t5xxl_fp16.safetensors",
    )
    assert by_type["DualCLIPLoader"]["type"] == "flux"
    assert by_type["VAELoader"]["vae_name"] == "ae.safetensors"
    assert "restore" in by_type["CLIPTextEncode"]["text"].lower()


# --------------------------------------------------------------------------------------------
# End to end in the real server, tiny models
# --------------------------------------------------------------------------------------------


def shrink_for_cpu(api: dict, dataset: str, images: dict[str, str], run: str) -> dict:
    """The workflow with tiny test loaders, small buckets and few steps."""
    api = copy.deepcopy(api)
    for node in api.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind in TINY_LOADERS:
            node["class_type"], node["inputs"] = TINY_LOADERS[kind], {"seed": 0}
            continue
        if "bucket_scale" in inputs:
            inputs["bucket_scale"] = 0.25
        if kind == "KontextRestoreDataset":
            inputs.update(hq_folder=dataset, val_count=1)
        elif kind == "KontextRestoreCacheLatents":
            inputs.update(pool_size=1, cache_folder=f"kontext_restore_cache/{run}")
        elif kind == "KontextRestoreTrainLoRA":
            inputs.update(
                lora_name=run,
                steps=4,
                rank=4,
                batch_size=2,
                warmup_steps=1,
                checkpoint_every=2,
                validate_every_epochs=1,
                validation_steps=2,
                learning_rate=1e-3,
            )
        elif kind == "KontextRestoreRestore":
            inputs["steps"] = 2
        elif kind == "LoadImage":
            inputs["image"] = images[inputs["image"]]
        elif kind == "SaveImage":
            inputs["filename_prefix"] = f"{run}/{inputs['filename_prefix'].split('/')[-1]}"
    return api


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
    api = shrink_for_cpu(load_api("train_then_evaluate"), dataset, images, "wf_evaluate")
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
    assert "PSNR" in "".join(outputs["11"]["text"])  # validation report of the trainer


def test_restore_with_lora_runs_with_the_trained_lora(comfy_server, trained):
    _, lora_file, images = trained
    api = shrink_for_cpu(load_api("restore_with_lora"), "unused", images, "wf_restore")
    for node in api.values():
        if node["class_type"] in ("LoraLoaderModelOnly", "KontextRestoreRestore"):
            node["inputs"]["lora_name"] = lora_file
    entry = comfy_server.run_prompt(api, timeout=300)
    saved = _saved_files(comfy_server, entry, "8")
    from PIL import Image

    with Image.open(saved[0]) as img:
        assert img.size == (176, 128)  # restored at the input's size
