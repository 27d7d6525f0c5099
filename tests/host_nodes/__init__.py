"""Test-only ComfyUI nodes: tiny random stand-ins for the Flux Kontext loaders.

Loaded ONLY by the test server (tests/server_host.py links this folder into its custom-nodes
folder); never shipped to users. The workflow tests swap UNETLoader / DualCLIPLoader / VAELoader
for these so the example workflows run end to end on the CPU in seconds:

- KontextRestoreTestTinyFlux: a Flux Kontext MODEL (width 128, 1 double + 1 single block,
  text width 64) built through ComfyUI's own classes with initialised weights.
- KontextRestoreTestTinyVAE: a 16-channel TAESD-format VAE with initialised weights.
- KontextRestoreTestTinyClip: a CLIP-like object whose conditioning has Flux's layout
  ([[context (1, 8, 64), {"pooled_output": (1, 768)}]]), deterministic per prompt text.
- KontextRestoreTestStandInFlux / KontextRestoreTestStandInVAE: the pretrained stand-in the demo
  uses (kontext_train/app/standin.py: a tiny Flux pre-trained on photos, and its linear photo VAE),
  so the shrunk templates restore a photo one can see. No inputs: the weights ship with the pack.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from kontext_train.comfyui.tiny_models import TINY_CONTEXT_DIM  # noqa: E402

TINY_TOKENS = 8
CATEGORY = "Kontext Restore/tests"


def _seed_from(text: str, seed: int) -> int:
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class TinyClip:
    """Enough of comfy.sd.CLIP for CLIPTextEncode: tokenize + encode_from_tokens_scheduled."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def tokenize(self, text: str, **kwargs):
        return {"text": text}

    def encode_from_tokens_scheduled(self, tokens, **kwargs):
        g = torch.Generator().manual_seed(_seed_from(tokens["text"], self.seed))
        context = torch.randn(1, TINY_TOKENS, TINY_CONTEXT_DIM, generator=g)
        pooled = torch.randn(1, 768, generator=g)
        return [[context, {"pooled_output": pooled}]]

    def encode_from_tokens(self, tokens, return_pooled=False, **kwargs):
        cond = self.encode_from_tokens_scheduled(tokens)[0]
        return (cond[0], cond[1]["pooled_output"]) if return_pooled else cond[0]


def tiny_vae(seed: int = 0):
    from kontext_train.comfyui import build_tiny_vae

    return build_tiny_vae(seed)


_SEED = ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF})


class KontextRestoreTestTinyFlux:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": _SEED}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, seed):
        from kontext_train.comfyui import build_tiny_flux

        return (build_tiny_flux(context_in_dim=TINY_CONTEXT_DIM, seed=seed),)


class KontextRestoreTestTinyVAE:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": _SEED}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, seed):
        return (tiny_vae(seed),)


class KontextRestoreTestTinyClip:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": _SEED}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, seed):
        return (TinyClip(seed),)


class KontextRestoreTestStandInFlux:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self):
        from kontext_train.app.standin import load_standin

        return (load_standin()[0],)


class KontextRestoreTestStandInVAE:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self):
        from kontext_train.app.standin import ASSET, read_standin
        from kontext_train.comfyui.photo_vae import build_photo_vae

        return (build_photo_vae(read_standin(ASSET)[0]),)


NODE_CLASS_MAPPINGS = {
    "KontextRestoreTestStandInFlux": KontextRestoreTestStandInFlux,
    "KontextRestoreTestStandInVAE": KontextRestoreTestStandInVAE,
    "KontextRestoreTestTinyFlux": KontextRestoreTestTinyFlux,
    "KontextRestoreTestTinyVAE": KontextRestoreTestTinyVAE,
    "KontextRestoreTestTinyClip": KontextRestoreTestTinyClip,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KontextRestoreTestStandInFlux": "Kontext Restore Test: Stand-in Flux (pretrained)",
    "KontextRestoreTestStandInVAE": "Kontext Restore Test: Stand-in photo VAE",
    "KontextRestoreTestTinyFlux": "Kontext Restore Test: Tiny Flux",
    "KontextRestoreTestTinyVAE": "Kontext Restore Test: Tiny VAE",
    "KontextRestoreTestTinyClip": "Kontext Restore Test: Tiny CLIP",
}
