"""Kontext Restore: train and use FLUX.1 Kontext restoration LoRAs inside ComfyUI.

ComfyUI imports this folder as a package under whatever name it was cloned to, so everything
below is imported relatively.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
