"""Library behind the Kontext Restore node pack.

Small modules, one idea each, plain torch / Pillow / numpy so they can be tested and reused on
their own, grouped by stage: ``data`` (the dataset), ``method`` (flow matching, LoRA, the
training configuration), ``train``, ``restore``, ``report`` and ``plan``, on ``files`` (files
written whole) and ``setting`` (what a setting is and its check; ``options`` is the table of them
all). ComfyUI is imported only in the ``comfyui`` package; the headless command lives in ``app``
above the library, which never imports it.
"""

__version__ = "0.1.0"
