"""The pack inside a real headless ComfyUI server (tests/server_host.py), loaded from outside
ComfyUI's tree the way a user's extra custom-nodes folder is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from server_host import PACK_LINK_NAME, ServerError, pack_import_failures, server_fixture, write_png

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]

comfy_server = server_fixture()


def test_object_info_lists_every_pack_node(comfy_server, pack_nodes):
    # The pack as ComfyUI imports it in-process, compared with what the server serves.
    pack = sorted(k for k in pack_nodes.NODE_CLASS_MAPPINGS if k.startswith("KontextRestore"))
    pack = [k for k in pack if not k.startswith("KontextRestoreTest")]
    assert "KontextRestoreTrainLoRA" in pack
    info = comfy_server.object_info()
    missing = [k for k in pack if k not in info]
    assert not missing, f"not in /object_info: {missing}\n{comfy_server.log_tail()}"
    for name in pack:
        assert info[name]["python_module"] == f"custom_nodes.{PACK_LINK_NAME}"
        assert info[name]["category"].startswith("Kontext Restore")
        assert info[name]["display_name"].startswith("Kontext Restore")
    # The test-only nodes come from their own folder, never from the pack.
    assert info["KontextRestoreTestTinyFlux"]["python_module"] != f"custom_nodes.{PACK_LINK_NAME}"


def test_log_shows_no_pack_import_failure(comfy_server):
    log = comfy_server.log_text()
    assert PACK_LINK_NAME in log, "the server log never mentions the pack's folder"
    assert not pack_import_failures(log), "\n".join(pack_import_failures(log))
    # ComfyUI prints one line per custom-node folder with its import time.
    timing = [
        line for line in log.splitlines() if "seconds" in line and line.rstrip().endswith(PACK_LINK_NAME)
    ]
    assert len(timing) == 1 and "IMPORT FAILED" not in timing[0], timing


def test_pack_workflows_are_listed_as_templates(comfy_server):
    templates = comfy_server.get("/workflow_templates")
    names = sorted(templates.get(PACK_LINK_NAME, []))
    expected = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
    assert expected, "no example workflows in workflows/"
    assert names == expected
    assert not any(n.endswith(".api") for n in names), "API-format files must not show up as templates"


def _image_graph(clean: str) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": clean}},
        "2": {
            "class_type": "KontextRestoreDegradation",
            "inputs": {
                "kind": "fixed",
                "noise_sigma": 0.05,
                "blur_radius": 1.5,
                "jpeg_quality": 60,
                "downscale": 2.0,
            },
        },
        "3": {
            "class_type": "KontextRestoreDegradeImage",
            "inputs": {"images": ["1", 0], "seed": 7, "degradation": ["2", 0]},
        },
        "4": {
            "class_type": "KontextRestoreBucketImage",
            "inputs": {"images": ["3", 0], "bucket_scale": 0.25},
        },
        "5": {
            "class_type": "KontextRestoreBucketImage",
            "inputs": {"images": ["1", 0], "bucket_scale": 0.25},
        },
        "6": {
            "class_type": "SaveImage",
            "inputs": {"images": ["4", 0], "filename_prefix": "server_test/degraded"},
        },
        "7": {"class_type": "KontextRestoreMetrics", "inputs": {"restored": ["4", 0], "reference": ["5", 0]}},
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["7", 0]}},
    }


def test_image_graph_runs_through_prompt_and_history(comfy_server):
    write_png(comfy_server.input_dir / "server_test_clean.png", 200, 136, seed=3)
    entry = comfy_server.run_prompt(_image_graph("server_test_clean.png"), timeout=180)
    assert entry["status"]["status_str"] == "success"
    images = entry["outputs"]["6"]["images"]
    assert len(images) == 1
    saved = comfy_server.output_dir / images[0]["subfolder"] / images[0]["filename"]
    assert saved.is_file()
    with Image.open(saved) as img:
        # Scaled to a Kontext bucket at a quarter of the size (multiples of 16 px).
        assert img.width % 16 == 0 and img.height % 16 == 0
        assert 150 <= img.width <= 500 and img.width > img.height
        pixels = np.asarray(img.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 1.0, "the saved image is flat"
    table = "".join(entry["outputs"]["8"]["text"])
    assert "PSNR" in table.upper()


def test_invalid_graph_is_refused_with_node_errors(comfy_server):
    graph = _image_graph("server_test_missing_file.png")
    graph["4"]["inputs"]["bucket_scale"] = 99.0  # above the node's maximum
    from server_host import ServerError

    with pytest.raises(ServerError) as err:
        comfy_server.queue_prompt(graph)
    assert "bucket_scale" in str(err.value)


def test_every_input_of_every_pack_node_has_a_tooltip(comfy_server):
    info = comfy_server.object_info()
    pack = [k for k, v in info.items() if v["python_module"] == f"custom_nodes.{PACK_LINK_NAME}"]
    assert "KontextRestoreTrainLoRA" in pack and "KontextRestoreRestore" in pack
    missing = []
    for name in pack:
        for group in ("required", "optional"):
            for input_name, spec in info[name]["input"].get(group, {}).items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not str(options.get("tooltip", "")).strip():
                    missing.append(f"{name}.{input_name}")
    assert not missing, f"inputs without a tooltip: {missing}"


def test_nan_setting_is_refused_with_node_errors(comfy_server):
    from server_host import ServerError

    write_png(comfy_server.input_dir / "server_test_clean.png", 200, 136, seed=3)
    graph = _image_graph("server_test_clean.png")
    graph["2"]["inputs"]["noise_sigma"] = float("nan")  # once gave black images and "success"
    with pytest.raises(ServerError) as err:
        comfy_server.queue_prompt(graph)
    assert "HTTP 400" in str(err.value) and "noise_sigma" in str(err.value) and "0..0.5" in str(err.value)


def _train_graph() -> dict:
    """The training template's API graph with the tiny test loaders (validation needs no files)."""
    api = json.loads(
        (Path(__file__).resolve().parents[1] / "workflows/api/train_restoration_lora.api.json").read_text()
    )
    tiny = {
        "UNETLoader": "KontextRestoreTestTinyFlux",
        "DualCLIPLoader": "KontextRestoreTestTinyClip",
        "VAELoader": "KontextRestoreTestTinyVAE",
    }
    for node in api.values():
        if node["class_type"] in tiny:
            node["class_type"], node["inputs"] = tiny[node["class_type"]], {"seed": 0}
    return api


@pytest.mark.parametrize(
    ("name", "value"),
    [("steps", -1), ("rank", 0), ("batch_size", 0), ("steps", 1e30), ("learning_rate", "abc")],
)
def test_invalid_trainer_setting_is_refused_with_node_errors(comfy_server, name, value):
    # Once HTTP 200 and "success": the dataset node was an output node, so ComfyUI ran it and
    # dropped the invalid trainer with only a log line.
    from server_host import ServerError

    graph = _train_graph()
    trainer = next(k for k, n in graph.items() if n["class_type"] == "KontextRestoreTrainLoRA")
    graph[trainer]["inputs"][name] = value
    with pytest.raises(ServerError) as err:
        comfy_server.queue_prompt(graph)
    message = str(err.value)
    assert "HTTP 400" in message, message
    detail = json.loads(message.split(": ", 1)[1])
    assert trainer in detail["node_errors"], detail
    assert name in json.dumps(detail["node_errors"][trainer]), detail


@pytest.mark.parametrize("escape", ["relative", "absolute"])
def test_cache_folder_outside_comfyui_folders_is_refused(comfy_server, tmp_path, escape):
    # The cache node once created folders and wrote latents wherever cache_folder pointed.
    target = tmp_path / f"escaped_cache_{escape}"
    value = str(target) if escape == "absolute" else "../" * 8 + str(target).lstrip("/")
    for i in range(3):
        write_png(comfy_server.input_dir / "server_escape" / f"photo_{i}.png", 176, 128, seed=50 + i)
    graph = _train_graph()
    for node in graph.values():
        if node["class_type"] == "KontextRestoreDataset":
            node["inputs"].update(hq_folder="server_escape", val_count=1, bucket_scale=0.25)
        elif node["class_type"] == "KontextRestoreCacheLatents":
            node["inputs"]["cache_folder"] = value
    with pytest.raises(ServerError) as err:
        comfy_server.run_prompt(graph, timeout=180)
    message = str(err.value)
    assert "cache_folder" in message and "outside the folders" in message, message
    assert str(comfy_server.output_dir.resolve()) in message
    assert not target.exists(), "the refused folder was created"


def test_training_template_without_model_files_is_refused_with_node_errors(comfy_server):
    # Once HTTP 200 and "success" too: the loaders' missing files were only logged while the
    # dataset node, an output node then, ran on its own.
    from server_host import ServerError

    api = json.loads(
        (Path(__file__).resolve().parents[1] / "workflows/api/train_restoration_lora.api.json").read_text()
    )
    loaders = {k for k, n in api.items() if n["class_type"] in ("UNETLoader", "DualCLIPLoader", "VAELoader")}
    assert loaders
    with pytest.raises(ServerError) as err:
        comfy_server.queue_prompt(api)
    message = str(err.value)
    assert "HTTP 400" in message, message
    detail = json.loads(message.split(": ", 1)[1])
    assert loaders & set(detail["node_errors"]), detail


def test_same_lora_name_on_other_data_is_refused_and_the_lora_kept(comfy_server):
    # Once "success" within seconds: the second folder's run "resumed" the first one's finished
    # checkpoint and rewrote the LoRA's metadata with the new dataset's size.
    for folder, seed in (("dup_first", 60), ("dup_second", 70)):
        for i in range(3):
            write_png(comfy_server.input_dir / folder / f"photo_{i}.png", 176, 128, seed=seed + i)

    def graph(folder: str) -> dict:
        g = _train_graph()
        for node in g.values():
            if node["class_type"] == "KontextRestoreDataset":
                node["inputs"].update(hq_folder=folder, val_count=1, bucket_scale=0.25)
            elif node["class_type"] == "KontextRestoreTrainLoRA":
                node["inputs"].update(
                    lora_name="dup_server",
                    steps=2,
                    warmup_steps=0,
                    checkpoint_every=1,
                    validate_every_epochs=0,
                )
        return g

    comfy_server.run_prompt(graph("dup_first"), timeout=300)
    lora = comfy_server.loras_dir / "dup_server.safetensors"
    first = lora.read_bytes()
    with pytest.raises(ServerError) as err:
        comfy_server.run_prompt(graph("dup_second"), timeout=300)
    message = str(err.value)
    assert "Cannot resume" in message and "dup_first" in message and "dup_second" in message, message
    assert lora.read_bytes() == first


# ------------------------------------------------------------------ V3 nodes as the V1 nodes were

V1_NODES = json.loads((Path(__file__).resolve().parent / "node_inputs_v1.json").read_text())["nodes"]
# What the V3 conversion changed on purpose (issue 13): the Restore node's guidance and
# bucket_scale gained 0 = "from the LoRA", and its lora_name became a picker of the loras folder
# whose socket also takes a STRING (the trainer's lora_name output, linked in train_then_evaluate).
INTENDED_CHANGES = {
    ("KontextRestoreRestore", "guidance"): {"default": 0.0, "tooltip": "0: the guidance the LoRA"},
    ("KontextRestoreRestore", "bucket_scale"): {
        "default": 0.0,
        "min": 0.0,
        "tooltip": "0: the scale the LoRA",
    },
    # Issue 25: the node applies lora_name itself, so its MODEL is the plain model by default.
    ("KontextRestoreRestore", "model"): {"tooltip": "With lora_use 'apply' (default) the plain model"},
    ("KontextRestoreRestore", "lora_name"): {
        "type": "COMBO,STRING",
        "widgetType": "COMBO",
        "default": "none",
        "options": None,
    },
    # Issue 23: a picker of the input folder's sub-folders that still takes a typed path.
    ("KontextRestoreDataset", "hq_folder"): {
        "type": "COMBO,STRING",
        "widgetType": "COMBO",
        "options": None,
        "tooltip": "Lists the input folder's sub-folders",
    },
    # The seed says what it seeds on each node (issue 23; the table's tooltip is about training).
    ("KontextRestoreRestore", "seed"): {"tooltip": "Seed of the sampling noise"},
    ("KontextRestoreDegradeImage", "seed"): {"tooltip": "Seed of the random noise"},
    ("KontextRestoreDegradedNoise", "seed"): {"tooltip": "Seed of the noise added to the degraded start"},
    # Degradation Settings is now Synthetic Degradation (V1_DISPLAY_NAME_CHANGED).
    ("KontextRestoreDataset", "degradation"): {"tooltip": "from Synthetic Degradation"},
    ("KontextRestoreDegradeImage", "degradation"): {"tooltip": "From Synthetic Degradation"},
    # Small learning rates survive the frontends' float rounding (issue 23: 0.000005 became 1e-05).
    ("KontextRestoreTrainLoRA", "learning_rate"): {"step": 1e-07},
    # Issue 19: auto / on / off (auto: the memory plan chooses the blocks); saved true/false
    # values still load as on/off (tests/test_checkpoint_choice.py).
    ("KontextRestoreTrainLoRA", "gradient_checkpointing"): {
        "type": "COMBO",
        "default": "auto",
        "options": ["auto", "on", "off"],
        "tooltip": "Recompute blocks' activations",
    },
}
V1_DESCRIPTION_CHANGED = {  # Restore explains the 0 = "from the LoRA" inputs; four had none (issue 23)
    "KontextRestoreRestore",
    "KontextRestoreBucketImage",
    "KontextRestoreCacheLatents",
    "KontextRestoreDataset",
    "KontextRestoreDegradeImage",
}
# Display names that the node library showed as the same truncated text (issue 23).
V1_DISPLAY_NAME_CHANGED = {"KontextRestoreDegradation": "Kontext Restore: Synthetic Degradation"}
# Added since V1, after the V1 inputs and outputs (saved workflows keep their widget values):
# optional inputs and outputs by node, and new nodes.
ADDED_SINCE_V1 = {
    "KontextRestoreTrainLoRA": {  # issue 24
        "inputs": ["optimizer", "adapter", "loss", "validate_every_steps", "checkpoint_loras", "init_lora"],
        "output": ["LORA_MODEL"],
        "output_name": ["lora"],
    },
    # issue 25: the Restore node applies the LoRA itself (lora_use apply / already applied)
    "KontextRestoreRestore": {"inputs": ["lora_use"]},
}
NEW_NODES = {"KontextRestorePreviewPairs"}  # issue 24


def _served_inputs(node_info: dict) -> list[dict]:
    """A node's inputs in widget order as /object_info serves them, combos as V3 writes them."""
    inputs = []
    for group in ("required", "optional"):
        for name in node_info["input_order"].get(group, []):
            kind, *rest = node_info["input"][group][name]
            extra = dict(rest[0]) if rest else {}
            if isinstance(kind, list):  # the V1 way of writing a combo
                extra["options"], kind = kind, "COMBO"
            inputs.append({"group": group, "name": name, "type": kind, **extra})
    return inputs


def _table_values(input_name: str, key: str) -> list:
    """What the settings table now says for ``key`` of the node input ``input_name`` (one entry
    per row of that name): rows edited since the V1 table was pinned are followed, not frozen."""
    from kontext_train.options import NODE, on_surface

    values = []
    for s in on_surface(NODE):
        if s.input_name != input_name:
            continue
        if key == "default":
            values.append(s.node_default if s.default is None else s.default)
        elif key == "options":
            values.append(list(s.choices) if s.choices else None)
        elif key in ("tooltip", "min", "max", "step"):
            values.append(getattr(s, key))
    return values


def test_object_info_shows_every_node_with_its_v1_inputs_outputs_and_tooltips(comfy_server):
    info = comfy_server.object_info()
    served = {k: v for k, v in info.items() if v["python_module"] == f"custom_nodes.{PACK_LINK_NAME}"}
    assert sorted(served) == sorted([*V1_NODES, *NEW_NODES])
    for name, before in V1_NODES.items():
        now = served[name]
        added = ADDED_SINCE_V1.get(name, {})
        for key in ("category", "output_node"):
            assert now[key] == before[key], (name, key)
        for key in ("output", "output_name"):
            assert now[key] == before[key] + added.get(key, []), (name, key)
        assert now["display_name"] == V1_DISPLAY_NAME_CHANGED.get(name, before["display_name"]), name
        if name not in V1_DESCRIPTION_CHANGED:
            assert now["description"] == before["description"], name
        # Every node says what it does, and every output what it gives (the frontend's tooltips).
        assert now["description"].strip(), name
        tips = now.get("output_tooltips") or []
        assert len(tips) == len(now["output"]) and all(t and t.strip() for t in tips), (name, tips)
        inputs = _served_inputs(now)
        extra, inputs = inputs[len(before["inputs"]) :], inputs[: len(before["inputs"])]
        assert [(i["group"], i["name"]) for i in extra] == [("optional", n) for n in added.get("inputs", [])]
        # Names, groups and order: the workflows' widgets_values depend on them.
        assert [(i["group"], i["name"]) for i in inputs] == [
            (i["group"], i["name"]) for i in before["inputs"]
        ]
        for old, new in zip(before["inputs"], inputs, strict=True):
            changed = INTENDED_CHANGES.get((name, old["name"]), {})
            assert new["type"] == changed.get("type", old["type"]), (name, old["name"])
            for key in sorted((set(old) | set(new)) - {"group", "name", "type"}):
                got = new.get(key)
                if key in ("multiline", "multiselect"):  # V3 spells out these widget defaults
                    assert not got, (name, old["name"], key)
                    continue
                expected = changed.get(key, old.get(key))
                if key == "tooltip" and key in changed:
                    assert expected in got, (name, old["name"])
                elif key == "options" and expected is None:  # the host's own list
                    assert isinstance(got, list) and got, (name, old["name"])
                elif key in changed:
                    assert got == expected, (name, old["name"], key, got, expected)
                else:
                    assert got == expected or got in _table_values(old["name"], key), (
                        name,
                        old["name"],
                        key,
                        got,
                        expected,
                    )
    # The table of the V1 definitions pins exactly the widget order of the shipped workflows.
    restore = [i["name"] for i in V1_NODES["KontextRestoreRestore"]["inputs"]][4:]
    assert restore == [
        "mode",
        "steps",
        "guidance",
        "sampler_name",
        "scheduler",
        "seed",
        "bucket_scale",
        "lora_name",
    ]


def _restore_graph(lora_name, guidance: float = 0.0, bucket_scale: float = 0.0) -> dict:
    return {
        "1": {"class_type": "KontextRestoreTestTinyFlux", "inputs": {"seed": 0}},
        "2": {"class_type": "KontextRestoreTestTinyVAE", "inputs": {"seed": 0}},
        "3": {"class_type": "KontextRestoreTestTinyClip", "inputs": {"seed": 0}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0], "text": "restore"}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "server_test_clean.png"}},
        "6": {
            "class_type": "KontextRestoreRestore",
            "inputs": {
                "model": ["1", 0],
                "vae": ["2", 0],
                "conditioning": ["4", 0],
                "images": ["5", 0],
                "mode": "auto",
                "steps": 1,
                "guidance": guidance,
                "sampler_name": "euler",
                "scheduler": "as_trained",
                "seed": 0,
                "bucket_scale": bucket_scale,
                "lora_name": lora_name,
            },
        },
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


def _write_lora_with_settings(
    path: Path, guidance: float, bucket_scale: float, prompt: str = "restore"
) -> None:
    from kontext_train.method.lora import atomic_save_safetensors, create_adapters, to_kohya_state_dict
    from kontext_train.method.training_prompt import PROMPT_KEY
    from kontext_train.train.trainer import TrainConfig, lora_metadata

    adapters = create_adapters({"double_blocks.0.img_attn.qkv": (384, 128)}, rank=2, alpha=2)
    extra = {"bucket_scale": bucket_scale, PROMPT_KEY: prompt}  # _restore_graph's prompt is "restore"
    meta = lora_metadata(TrainConfig(formulation="bridge", guidance=guidance), step=1, extra=extra)
    atomic_save_safetensors(to_kohya_state_dict(adapters), path, meta)


def test_restore_lora_name_picks_from_the_loras_folder_and_the_lora_sets_guidance(comfy_server):
    lora = comfy_server.loras_dir / "server_pick" / "picked.safetensors"
    lora.parent.mkdir(parents=True, exist_ok=True)
    _write_lora_with_settings(lora, guidance=2.5, bucket_scale=0.125)
    info = comfy_server.get("/object_info/KontextRestoreRestore")["KontextRestoreRestore"]
    kind, extra = info["input"]["optional"]["lora_name"]
    assert kind == "COMBO,STRING" and extra["widgetType"] == "COMBO" and extra["default"] == "none"
    assert extra["options"][0] == "none" and "server_pick/picked.safetensors" in extra["options"]

    write_png(comfy_server.input_dir / "server_test_clean.png", 200, 136, seed=3)
    entry = comfy_server.run_prompt(_restore_graph("server_pick/picked.safetensors"), timeout=300)
    shown = "".join(entry["outputs"]["6"]["text"])  # the settings, shown on the node
    assert "guidance 2.5 (LoRA metadata)" in shown and "bucket scale 0.125 (LoRA metadata)" in shown
    assert "Warning" not in shown
    # An explicit value overrides the LoRA; the node shows the difference as a warning.
    entry = comfy_server.run_prompt(
        _restore_graph("server_pick/picked.safetensors", guidance=1.5), timeout=300
    )
    shown = "".join(entry["outputs"]["6"]["text"])
    assert "guidance 1.5 (user)" in shown and "Warning: guidance 1.5 differs from the 2.5" in shown


def test_restore_lora_name_takes_a_linked_file_name(comfy_server):
    # The trainer's lora_name output (STRING) is linked into lora_name in train_then_evaluate.
    lora = comfy_server.loras_dir / "server_link.safetensors"
    _write_lora_with_settings(lora, guidance=3.5, bucket_scale=0.125, prompt="Restore the old photo.")
    write_png(comfy_server.input_dir / "server_test_clean.png", 200, 136, seed=3)
    graph = _restore_graph(["8", 0])
    graph["8"] = {"class_type": "PrimitiveString", "inputs": {"value": "server_link.safetensors"}}
    entry = comfy_server.run_prompt(graph, timeout=300)
    shown = "".join(entry["outputs"]["6"]["text"])
    assert "guidance 3.5 (LoRA metadata)" in shown
    # The prompt of the queued workflow (ComfyUI's hidden PROMPT) differs from the training prompt.
    assert 'Warning: The prompt "restore" differs' in shown and "Restore the old photo." in shown
    # A linked name that is not a LoRA file fails when the node runs, naming it.
    graph["8"]["inputs"]["value"] = "server_missing.safetensors"
    with pytest.raises(ServerError) as err:
        comfy_server.run_prompt(graph, timeout=300)
    assert "server_missing.safetensors" in str(err.value) and "loras folder" in str(err.value)


@pytest.mark.parametrize(
    ("node", "name", "value", "named"),
    [
        ("6", "lora_name", "no_such_lora.safetensors", "loras folder"),
        ("6", "scheduler", "no_such_scheduler", "scheduler 'no_such_scheduler'"),
        ("6", "bucket_scale", 0.03, "0.0625..4"),
    ],
)
def test_bad_restore_choices_are_refused_with_node_errors(comfy_server, node, name, value, named):
    # ComfyUI 0.3.75 does not check a V3 combo's value itself; the node's validate_inputs does.
    graph = _restore_graph("none")
    graph[node]["inputs"][name] = value
    with pytest.raises(ServerError) as err:
        comfy_server.queue_prompt(graph)
    message = str(err.value)
    assert "HTTP 400" in message, message
    detail = json.loads(message.split(": ", 1)[1])
    assert named in json.dumps(detail["node_errors"][node]), detail


def test_bad_degradation_kind_is_refused_with_node_errors(comfy_server):
    graph = _image_graph("server_test_clean.png")
    graph["2"]["inputs"]["kind"] = "sideways"
    with pytest.raises(ServerError) as err:
        comfy_server.queue_prompt(graph)
    assert "HTTP 400" in str(err.value) and "kind 'sideways'" in str(err.value)


# Pickers that list what exists but take any value: a folder typed before the picker, or absolute.
OPEN_PICKERS = {("KontextRestoreDataset", "hq_folder")}


def test_every_combo_of_every_pack_node_is_checked_by_its_validator(pack_nodes):
    # ComfyUI 0.3.75 checks no V3 combo's value itself (0.33.0 does): each pack node's
    # validate_inputs must name every combo input, or a bad value would run on 0.3.75.
    import inspect

    from comfy_api.internal import first_real_override

    checked = 0
    for name, cls in pack_nodes.NODE_CLASS_MAPPINGS.items():
        if not name.startswith("KontextRestore") or name.startswith("KontextRestoreTest"):
            continue
        spec = cls.INPUT_TYPES()
        combos = [
            input_name
            for group in ("required", "optional")
            for input_name, (kind, *_) in spec.get(group, {}).items()
            if "COMBO" in str(kind).split(",")
        ]
        if not combos:
            continue
        validator = first_real_override(cls, "validate_inputs")
        assert validator is not None, name
        named = set(inspect.getfullargspec(validator).args)
        assert set(combos) <= named, (name, set(combos) - named)
        for input_name in combos:
            if (name, input_name) in OPEN_PICKERS:  # lists folders, takes any path (issue 23)
                assert cls.validate_inputs(**{input_name: "/no/such/listed/folder"}) is True, name
                continue
            message = cls.validate_inputs(**{input_name: "no_such_choice"})
            assert isinstance(message, str) and f"{input_name} 'no_such_choice'" in message, (name, message)
            checked += 1
    assert checked >= 12  # Degradation, Cache Latents, Train LoRA (6), Restore (4)
