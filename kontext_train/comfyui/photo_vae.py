"""A small deterministic VAE stand-in that round-trips photographs: a linear patch autoencoder.

Each ``patch`` x ``patch`` RGB patch (48 numbers at patch 4) is projected onto its 16 leading
principal components, fitted by PCA to photos (``fit_patch_pca``, float64, a fixed sign per
component, so the same photos always give the same weights). Encoding is that projection,
decoding its transpose: a 4x downscale with Flux's 16 latent channels. Because the components
are orthonormal, decoding a latent gives the photo nearest to it in the patch subspace, and the
round trip of a clean photo is the best any latent can decode to (unlike a learned VAE, where the
round trip is only a reference). One global gain puts the latents at about unit variance in the
Flux model's space (after ``latent_format.process_in``).

``build_photo_vae`` loads it through ComfyUI's own VAE class, the way the tiny random VAE is
loaded (a TAESD-format state dict through ``comfy.sd.VAE``), then puts the patch encoder and
decoder in place of TAESD's networks and sets the 4x ratio, so VAE Encode/Decode, tiling, devices
and dtypes are ComfyUI's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PATCH = 4
LATENT_CHANNELS = 16
# Flux's latent format (comfy.latent_formats.Flux): model space = (raw - shift) * scale.
FLUX_SHIFT = 0.1159
FLUX_SCALE = 0.3611


def image_patches(image: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """(B, 3, H, W) -> (B * H/p * W/p, 3 * p * p) non-overlapping patches (H, W cropped to p)."""
    h, w = image.shape[-2] // patch * patch, image.shape[-1] // patch * patch
    cols = F.unfold(image[..., :h, :w].float(), patch, stride=patch)  # (B, 3p^2, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def fit_patch_pca(images: list[torch.Tensor], patch: int = PATCH, channels: int = LATENT_CHANNELS) -> dict:
    """PCA of the patches of ``images`` ((3, H, W) in [0, 1]): mean, components (channels, 3p^2),
    and the gain that gives unit-variance model-space latents."""
    x = torch.cat([image_patches(im.unsqueeze(0), patch) for im in images]).double()
    mean = x.mean(0)
    centred = x - mean
    values, vectors = torch.linalg.eigh(centred.T @ centred / len(x))
    components = vectors[:, -channels:].flip(1).T.contiguous()  # largest first
    # Sign: the largest-magnitude entry of each component is positive (eigh's sign is arbitrary).
    idx = components.abs().argmax(1)
    components *= torch.sign(components[torch.arange(channels), idx]).unsqueeze(1)
    rms = (values[-channels:].sum() / channels).sqrt()
    return {
        "mean": mean.float(),
        "components": components.float(),
        "gain": torch.tensor(1.0 / (FLUX_SCALE * rms.item())),
    }


class PatchEncoder(torch.nn.Module):
    """[0, 1] pixels (B, 3, H, W) -> raw latents (B, 16, H/p, W/p)."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, gain: torch.Tensor, patch: int) -> None:
        super().__init__()
        self.patch = patch
        c = components.shape[0]
        self.proj = torch.nn.Conv2d(3, c, patch, stride=patch)
        with torch.no_grad():
            self.proj.weight.copy_(components.reshape(c, 3, patch, patch) * gain)
            self.proj.bias.copy_(-(components @ mean) * gain + FLUX_SHIFT)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels.to(self.proj.weight.dtype))


class PatchDecoder(torch.nn.Module):
    """Raw latents -> [0, 1] pixels (unclamped; ComfyUI clamps)."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, gain: torch.Tensor, patch: int) -> None:
        super().__init__()
        c = components.shape[0]
        self.unproj = torch.nn.ConvTranspose2d(c, 3, patch, stride=patch)
        self.register_buffer("shift", torch.full((1, c, 1, 1), FLUX_SHIFT))
        with torch.no_grad():
            self.unproj.weight.copy_(components.reshape(c, 3, patch, patch) / gain)
            self.unproj.bias.zero_()
        # The mean patch, tiled over the image in forward (a bias per pixel of the patch).
        self.register_buffer("mean_patch", mean.reshape(1, 3, patch, patch).clone())

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.unproj.weight.dtype)
        out = self.unproj(latents - self.shift)
        rows, cols = latents.shape[-2], latents.shape[-1]
        return out + self.mean_patch.repeat(1, 1, rows, cols)


def encode(pca: dict, pixels: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """Plain-torch encode (no ComfyUI): (B, 3, H, W) in [0, 1] -> raw latents."""
    return PatchEncoder(pca["mean"], pca["components"], pca["gain"], patch)(pixels)


def decode(pca: dict, latents: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """Plain-torch decode: raw latents -> (B, 3, H, W) pixels, clamped to [0, 1]."""
    return PatchDecoder(pca["mean"], pca["components"], pca["gain"], patch)(latents).clamp(0, 1)


def build_photo_vae(pca: dict, patch: int = PATCH):
    """The patch autoencoder as a ComfyUI VAE (``comfy.sd.VAE``): what VAE Encode/Decode and the
    pack's ``vae_encode``/``vae_decode`` use."""
    import comfy.sd
    import comfy.taesd.taesd

    channels = pca["components"].shape[0]
    with torch.inference_mode(False):
        taesd = comfy.taesd.taesd.TAESD(latent_channels=channels)
        state = {k: torch.zeros_like(v) for k, v in taesd.state_dict().items()}
        state["vae_scale"] = torch.tensor(1.0)
        vae = comfy.sd.VAE(sd=state)
        model = vae.first_stage_model
        # TAESD maps [-1, 1] to [0, 1] before its encoder and back after its decoder; the patch
        # networks take and give [0, 1] pixels, so they drop in.
        model.taesd_encoder = PatchEncoder(pca["mean"], pca["components"], pca["gain"], patch)
        model.taesd_decoder = PatchDecoder(pca["mean"], pca["components"], pca["gain"], patch)
        model.to(vae.vae_dtype)
    vae.downscale_ratio = vae.upscale_ratio = patch
    if hasattr(vae, "downscale_index_formula"):
        vae.downscale_index_formula = vae.upscale_index_formula = None
    return vae
