"""Library behind the Kontext Restore node pack.

Small modules, one idea each. Only ``comfy_adapter`` imports ComfyUI; everything else is plain
torch / Pillow / numpy so it can be tested and reused on its own.
"""

__version__ = "0.1.0"
