"""The example templates made small enough to run on the CPU in the test server: the test-only
loaders of tests/host_nodes instead of the real model files (the demo's pretrained stand-in Flux
and photo VAE, a tiny random text encoder), small buckets, few steps.
Used on API files (tests/test_workflows.py) and on the templates' descriptions, to build a UI
workflow the web UI queues itself (tests/test_web_ui.py)."""

from __future__ import annotations

import copy

# Loader swaps for the test-only models in tests/host_nodes, with their inputs.
TINY_LOADERS = {
    "UNETLoader": "KontextRestoreTestStandInFlux",
    "DualCLIPLoader": "KontextRestoreTestTinyClip",
    "VAELoader": "KontextRestoreTestStandInVAE",
}
TINY_LOADER_INPUTS = {"KontextRestoreTestTinyClip": {"seed": 0}}
# Per node type: the inputs changed so that a run takes seconds on the CPU.
CPU_SETTINGS = {
    "KontextRestoreDataset": {"val_count": 1},
    "KontextRestoreCacheLatents": {"pool_size": 1},
    "KontextRestoreTrainLoRA": {
        "steps": 4,
        "rank": 4,
        "batch_size": 2,
        "warmup_steps": 1,
        "checkpoint_every": 2,
        "validate_every_epochs": 1,
        "validation_steps": 2,
        "learning_rate": 1e-3,
    },
    "KontextRestoreRestore": {"steps": 2},
}
CPU_BUCKET_SCALE = 0.125  # ~128 px: the stand-in's VAE downsamples 4x (32x32 latents)


def _changes(kind: str, inputs: dict, dataset: str, images: dict[str, str], run: str) -> dict:
    changes = dict(CPU_SETTINGS.get(kind, {}))
    if "bucket_scale" in inputs:
        changes["bucket_scale"] = CPU_BUCKET_SCALE
    if kind == "KontextRestoreDataset":
        changes["hq_folder"] = dataset
    elif kind == "KontextRestoreCacheLatents":
        changes["cache_folder"] = f"kontext_restore_cache/{run}"
    elif kind == "KontextRestoreTrainLoRA":
        changes["lora_name"] = run
    elif kind == "LoadImage":
        changes["image"] = images[inputs["image"]]
    elif kind == "SaveImage":
        changes["filename_prefix"] = f"{run}/{inputs['filename_prefix'].split('/')[-1]}"
    return changes


def shrink_api(
    api: dict, dataset: str, images: dict[str, str], run: str, loaders: dict[str, str] = TINY_LOADERS
) -> dict:
    """An API-format template with tiny loaders (``loaders``: which to swap), small buckets and
    few steps."""
    api = copy.deepcopy(api)
    for node in api.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind in loaders:
            node["class_type"] = loaders[kind]
            node["inputs"] = dict(TINY_LOADER_INPUTS.get(node["class_type"], {}))
            continue
        inputs.update(_changes(kind, inputs, dataset, images, run))
    return api


def shrink_nodes(nodes: list, object_info: dict, dataset: str, images: dict[str, str], run: str) -> list:
    """A template's node descriptions (workflows/kontext_templates.Node) changed the same way;
    widgets a description leaves at the node default are given explicitly where they change."""
    nodes = copy.deepcopy(nodes)
    for node in nodes:
        if node.type in TINY_LOADERS:
            node.type = TINY_LOADERS[node.type]
            node.widgets = dict(TINY_LOADER_INPUTS.get(node.type, {}))
            continue
        if node.type not in object_info:  # the frontend's Note
            continue
        info = object_info[node.type]["input"]
        names = set(info.get("required", {})) | set(info.get("optional", {}))
        current = {n: node.widgets.get(n) for n in names if n not in node.links}
        node.widgets.update(_changes(node.type, current, dataset, images, run))
    return nodes
