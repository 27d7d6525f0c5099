"""Kontext Restore: train and use FLUX.1 Kontext restoration LoRAs inside ComfyUI.

ComfyUI imports this folder as a package under whatever name it was cloned to, so everything
below is imported relatively. The nodes are V3 nodes registered through ``comfy_entrypoint``
only: a pack that also defines NODE_CLASS_MAPPINGS is registered from that alone, and
comfy_entrypoint is never called (ComfyUI 0.3.75 and 0.33.0, ``nodes.load_custom_node``).
"""

from .nodes import comfy_entrypoint

# The pack's web extension (web/kontext_restore.js): pickers that refresh with R, text on the
# nodes that wraps between words, templates that open on their Read me.
WEB_DIRECTORY = "./web"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
