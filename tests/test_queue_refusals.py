"""Refusals a real ComfyUI server gives at queue time (HTTP 400, nothing queued), issue 22.

Each case once answered HTTP 200: ComfyUI validates output by output and ran the valid outputs
(the trainer then silently did not run), converted wrong JSON types (``str(None)``), or passed a
text where a socket wants a MODEL or VAE. The pack's check (``kontext_train.comfyui.prompt_check``)
and its nodes' ``validate_inputs`` refuse them when the prompt is queued.
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import uuid

import pytest
import torch
from server_host import ServerError, server_fixture, write_png
from test_server import _train_graph

comfy_server = server_fixture()


def _post(server, graph: dict) -> tuple[int, dict]:
    """(HTTP status, answer) of POST /prompt."""
    try:
        return 200, server.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


def _node(graph: dict, class_type: str) -> str:
    return next(k for k, n in graph.items() if n["class_type"] == class_type)


def _refused(server, graph: dict, node_class: str, *needles: str) -> dict:
    status, answer = _post(server, graph)
    assert status == 400, answer
    node = _node(graph, node_class)
    assert node in answer["node_errors"], answer
    text = json.dumps(answer["node_errors"][node])
    for needle in needles:
        assert needle in text, text
    return answer


def _summary_shown(graph: dict) -> dict:
    """The dataset's summary straight to Preview as Text: an output that is valid on its own."""
    graph["30"] = {
        "class_type": "PreviewAny",
        "inputs": {"source": [_node(graph, "KontextRestoreDataset"), 1]},
    }
    return graph


def _queue_is_empty(server) -> bool:
    queue = server.get("/queue")
    return not queue["queue_running"] and not queue["queue_pending"]


def test_invalid_trainer_beside_a_valid_summary_output_refuses_the_whole_prompt(comfy_server):
    # Was HTTP 200 "success": the summary ran and the trainer was dropped with a log line.
    graph = _summary_shown(_train_graph())
    graph[_node(graph, "KontextRestoreTrainLoRA")]["inputs"]["rank"] = 0
    history_before = set(comfy_server.get("/history"))
    answer = _refused(comfy_server, graph, "KontextRestoreTrainLoRA", "rank")
    assert answer["error"]["type"] == "prompt_outputs_failed_validation"
    assert "Nothing was queued" in answer["error"]["details"]
    time.sleep(0.5)
    assert _queue_is_empty(comfy_server) and set(comfy_server.get("/history")) == history_before


def test_missing_model_file_feeding_the_trainer_refuses_the_whole_prompt(comfy_server):
    # The stock loader fails, so the pack's trainer would be dropped while the summary ran.
    graph = _summary_shown(_train_graph())
    graph["1"] = {
        "class_type": "UNETLoader",
        "inputs": {"unet_name": "absent.safetensors", "weight_dtype": "default"},
    }
    graph[_node(graph, "KontextRestoreTrainLoRA")]["inputs"]["model"] = ["1", 0]
    status, answer = _post(comfy_server, graph)
    assert status == 400 and "1" in answer["node_errors"], answer


def test_loss_plot_nan_smoothing_is_refused(comfy_server):
    # Was HTTP 200 with node_errors: the trainer and the text preview ran without the plot.
    graph = _train_graph()
    graph[_node(graph, "KontextRestoreLossPlot")]["inputs"]["smoothing"] = math.nan
    _refused(comfy_server, graph, "KontextRestoreLossPlot", "smoothing")


def test_bridge_ref_without_bridge_noise_is_refused_at_queue_time(comfy_server):
    # Was refused only after the dataset and the cache had run.
    graph = _summary_shown(_train_graph())
    graph[_node(graph, "KontextRestoreTrainLoRA")]["inputs"].update(
        formulation="bridge_ref", bridge_noise=0.0
    )
    _refused(comfy_server, graph, "KontextRestoreTrainLoRA", "bridge_ref", "bridge_noise")
    graph[_node(graph, "KontextRestoreTrainLoRA")]["inputs"].pop("bridge_noise")  # its default is 0
    _refused(comfy_server, graph, "KontextRestoreTrainLoRA", "bridge_ref")


@pytest.mark.parametrize(
    ("value", "needle"), [("", "empty"), ("..", ".."), ("  ", "empty"), ("a/../../b", "..")]
)
def test_bad_lora_name_is_refused_at_queue_time(comfy_server, value, needle):
    graph = _summary_shown(_train_graph())
    graph[_node(graph, "KontextRestoreTrainLoRA")]["inputs"]["lora_name"] = value
    _refused(comfy_server, graph, "KontextRestoreTrainLoRA", "lora_name", needle)


@pytest.mark.parametrize(("value", "shown"), [(None, "null"), (True, "true"), (-1, "the number -1")])
def test_lora_name_of_another_json_type_is_refused(comfy_server, value, shown):
    # Was trained as None.safetensors / True.safetensors / -1.safetensors (ComfyUI's str()).
    graph = _train_graph()
    graph[_node(graph, "KontextRestoreTrainLoRA")]["inputs"]["lora_name"] = value
    _refused(comfy_server, graph, "KontextRestoreTrainLoRA", "lora_name must be text", shown)


@pytest.mark.parametrize(
    ("node_class", "name", "value", "needle"),
    [
        ("KontextRestoreCacheLatents", "vae", "ae.safetensors", "vae takes a VAE"),
        ("KontextRestoreTrainLoRA", "model", "flux", "model takes a MODEL"),
        ("KontextRestoreTrainLoRA", "resume", "false", "resume must be true or false"),
        ("KontextRestoreTrainLoRA", "steps", None, "steps must be a number"),
    ],
)
def test_wrong_json_type_for_an_input_is_refused_naming_it(comfy_server, node_class, name, value, needle):
    # Once "'str' object has no attribute 'train'" / "encode() argument 'encoding' must be str" at
    # run time; "false" as resume was read as True.
    graph = _summary_shown(_train_graph())
    graph[_node(graph, node_class)]["inputs"][name] = value
    _refused(comfy_server, graph, node_class, needle)


def test_lq_folder_equal_to_hq_folder_is_refused(comfy_server):
    folder = comfy_server.input_dir / "same_pairs"
    for i in range(3):
        write_png(folder / f"photo_{i}.png", 176, 128, seed=80 + i)
    graph = _summary_shown(_train_graph())
    dataset = graph[_node(graph, "KontextRestoreDataset")]["inputs"]
    for lq in ("same_pairs", str(folder), "same_pairs/."):
        dataset.update(hq_folder="same_pairs", lq_folder=lq)
        _refused(comfy_server, graph, "KontextRestoreDataset", "lq_folder", "is the HQ folder")


def test_a_valid_graph_with_the_summary_shown_is_still_queued(comfy_server):
    # The check leaves valid prompts to ComfyUI: this one is queued and runs (its dataset folder is
    # missing, so it ends with that error, after the check let it through).
    graph = _summary_shown(_train_graph())
    graph[_node(graph, "KontextRestoreDataset")]["inputs"]["hq_folder"] = "no_such_folder_h5"
    status, answer = _post(comfy_server, graph)
    assert status == 200 and answer["node_errors"] == {}, answer
    entry = comfy_server.wait_history(answer["prompt_id"], timeout=120)
    assert "no_such_folder_h5" in json.dumps(entry["status"]["messages"])


def test_hq_folder_is_a_picker_of_input_subfolders_that_still_takes_any_path(comfy_server):
    """Issue 23: hq_folder lists the input folder's sub-folders (the default first, even while it
    does not exist), a new folder shows up when the frontend asks again (R), and a path typed
    before the picker existed, here an absolute one that is no option, still queues and runs."""

    def hq_folder_spec() -> dict:
        info = comfy_server.get("/object_info/KontextRestoreDataset")["KontextRestoreDataset"]
        kind, spec = info["input"]["required"]["hq_folder"]
        assert "COMBO" in kind and "STRING" in kind, kind  # a picker whose socket takes a path
        return spec

    assert hq_folder_spec()["options"][0] == "restore_hq" and hq_folder_spec()["default"] == "restore_hq"
    assert not (comfy_server.input_dir / "restore_hq").exists()
    _photos(comfy_server, "picked_set/inner", seed=70)
    assert {"picked_set", "picked_set/inner"} <= set(hq_folder_spec()["options"])
    graph = {
        "1": {
            "class_type": "KontextRestoreDataset",
            "inputs": {
                "hq_folder": str(comfy_server.input_dir / "picked_set" / "inner"),
                "bucket_scale": 0.25,
                "val_count": 1,
                "seed": 0,
            },
        },
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}},
    }
    entry = comfy_server.run_prompt(graph, timeout=120)
    assert "used 3 image(s)" in "".join(entry["outputs"]["2"]["text"])


# ------------------------------------------------------------ run-time messages a user can act on


def _photos(server, folder: str, seed: int) -> str:
    for i in range(3):
        write_png(server.input_dir / folder / f"photo_{i}.png", 176, 128, seed=seed + i)
    return folder


def _failure(server, graph: dict) -> str:
    with pytest.raises(ServerError) as err:
        server.run_prompt(graph, timeout=180)
    return str(err.value)


def test_a_fifo_in_the_dataset_is_reported_as_not_a_regular_file(comfy_server):
    # Once "missing file" for a pipe that is right there.
    folder = _photos(comfy_server, "fifo_set", seed=90)
    os.mkfifo(comfy_server.input_dir / folder / "pipe.png")
    graph = {
        "1": {
            "class_type": "KontextRestoreDataset",
            "inputs": {"hq_folder": folder, "bucket_scale": 0.25, "val_count": 1, "seed": 0},
        },
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}},
    }
    entry = comfy_server.run_prompt(graph, timeout=120)
    summary = "".join(entry["outputs"]["2"]["text"])
    assert "pipe.png" in summary and "not a regular file" in summary and "missing file" not in summary


@pytest.mark.parametrize("what", ["file", "fifo"])
def test_a_cache_folder_that_is_a_file_or_fifo_is_a_clear_error(comfy_server, what):
    # Once FileExistsError.
    folder = _photos(comfy_server, "cache_kind_set", seed=95)
    name = f"cache_is_a_{what}"
    target = comfy_server.output_dir / name
    if what == "file":
        target.write_text("not a folder")
    else:
        os.mkfifo(target)
    graph = {
        "1": {
            "class_type": "KontextRestoreDataset",
            "inputs": {"hq_folder": folder, "bucket_scale": 0.25, "val_count": 1, "seed": 0},
        },
        "2": {"class_type": "KontextRestoreTestTinyVAE", "inputs": {"seed": 0}},
        "3": {
            "class_type": "KontextRestoreCacheLatents",
            "inputs": {
                "dataset": ["1", 0],
                "vae": ["2", 0],
                "control_mode": "pool",
                "pool_size": 2,
                "seed": 0,
                "cache_folder": name,
            },
        },
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
    }
    message = _failure(comfy_server, graph)
    assert str(target) in message and "cache_folder" in message, message
    assert ("is a file" if what == "file" else "not a folder (a pipe") in message
    assert "FileExistsError" not in message


def test_a_run_lock_that_is_a_folder_is_a_clear_error(comfy_server):
    # Once IsADirectoryError.
    folder = _photos(comfy_server, "lock_dir_set", seed=99)
    lock = comfy_server.output_dir / "kontext_restore" / "lock_dir_h5" / "run.lock"
    lock.mkdir(parents=True)
    graph = _train_graph()
    graph[_node(graph, "KontextRestoreDataset")]["inputs"].update(
        hq_folder=folder, val_count=1, bucket_scale=0.25
    )
    graph[_node(graph, "KontextRestoreTrainLoRA")]["inputs"].update(lora_name="lock_dir_h5", steps=2)
    message = _failure(comfy_server, graph)
    assert str(lock) in message and "is a folder" in message and "lock file" in message, message
    assert "IsADirectoryError" not in message
    assert not (comfy_server.loras_dir / "lock_dir_h5.safetensors").exists()


@pytest.mark.parametrize("value", ["ae.safetensors", 3, None])
def test_a_vae_that_is_not_one_is_named_when_the_node_runs(value):
    # Where the queue-time check cannot run (a script calling the nodes): the VAE is checked first.
    from kontext_train.comfyui import host

    for use in (host.vae_identity, lambda v: host.vae_encode(v, torch.zeros(1, 3, 8, 8))):
        with pytest.raises(ValueError, match=rf"vae: expected a ComfyUI VAE, got {type(value).__name__}"):
            use(value)
