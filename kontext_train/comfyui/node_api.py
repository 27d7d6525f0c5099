"""ComfyUI's V3 node API (``comfy_api``), for the pack's nodes.

The nodes subclass ``io.ComfyNode`` when their module is imported, so this module imports
ComfyUI at import time; unlike the rest of this package it is imported only by ``nodes/``, which
ComfyUI loads. ``comfy_api.v0_0_2`` is the versioned name of the API that both supported hosts
(0.3.75 and 0.33.0) ship; its ``io``/``ui`` are ComfyUI's current ones, and the nodes use only
what both versions have (no ``raw_link``/``advanced`` input options, for instance).
"""

from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io, ui

__all__ = ["ComfyExtension", "io", "ui"]
