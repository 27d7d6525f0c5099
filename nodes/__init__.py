"""Thin ComfyUI V3 nodes over the ``kontext_train`` library: one node family per module.

ComfyUI registers them through the pack's ``comfy_entrypoint`` (the repository's __init__.py).
"""

from ..kontext_train.comfyui import prompt_check
from ..kontext_train.comfyui.node_api import ComfyExtension, io
from . import dataset_nodes, metrics_nodes, preview_nodes, restore_nodes, train_nodes

NODES: list[type[io.ComfyNode]] = [
    *dataset_nodes.NODES,
    *preview_nodes.NODES,
    *train_nodes.NODES,
    *restore_nodes.NODES,
    *metrics_nodes.NODES,
]


class KontextRestoreExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> KontextRestoreExtension:
    """What ComfyUI calls to register the pack's nodes (nodes.load_custom_node); also puts the
    pack's queue-time check in front of ``POST /prompt`` (``comfyui.prompt_check``)."""
    prompt_check.install()
    return KontextRestoreExtension()
