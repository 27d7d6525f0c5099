"""Thin ComfyUI nodes over the ``kontext_train`` library: one node family per module."""

from . import dataset_nodes, metrics_nodes, restore_nodes, train_nodes

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _module in (dataset_nodes, train_nodes, restore_nodes, metrics_nodes):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

assert all(name.startswith("KontextRestore") for name in NODE_CLASS_MAPPINGS)
