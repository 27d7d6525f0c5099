"""Finding ComfyUI and starting it in this process (headless command, tests), and loading the
Kontext weights with ComfyUI's own loaders."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

from ..files.weights_file import check_safetensors


class ComfyUINotFound(RuntimeError):
    pass


def _looks_like_comfyui(path: Path) -> bool:
    return (path / "comfy" / "model_management.py").is_file() and (path / "folder_paths.py").is_file()


def find_comfyui(explicit: str | os.PathLike | None = None) -> Path:
    """The ComfyUI folder to use: ``explicit``, else $COMFYUI_PATH, else the install this pack sits
    in (``ComfyUI/custom_nodes/<pack>``), else the test host the project's setup script builds.

    A folder the user named (argument or $COMFYUI_PATH) must be a ComfyUI: no silent fallback to
    another install.
    """
    named = explicit or os.environ.get("COMFYUI_PATH")
    if named:
        path = Path(named).expanduser().resolve()
        if _looks_like_comfyui(path):
            return path
        source = "given" if explicit else "in COMFYUI_PATH"
        raise ComfyUINotFound(
            f"The ComfyUI folder {source} ({path}) is not a ComfyUI install (no comfy/model_management.py "
            "or folder_paths.py). Point it at the folder that holds ComfyUI's main.py."
        )
    pack = Path(__file__).resolve().parents[2]
    # Inside ComfyUI/custom_nodes/<pack>, else the test hosts of scripts/setup_test_env.sh: the one
    # whose venv runs this Python first (each host's requirements are in its own venv), then newest.
    hosts = [pack / ".host" / v / "ComfyUI" for v in ("0.33.0", "0.3.75")]
    here = Path(sys.prefix).resolve()
    hosts.sort(key=lambda c: (c.parent / "venv").resolve() != here)
    candidates = [pack.parent.parent, *hosts]
    for c in candidates:
        if _looks_like_comfyui(c.resolve()):
            return c.resolve()
    raise ComfyUINotFound(
        "ComfyUI could not be found (looked in: " + ", ".join(str(c) for c in candidates) + "). Set "
        "COMFYUI_PATH to your ComfyUI folder (the one with main.py), pass --comfyui, or run "
        "scripts/setup_test_env.sh to build a local one."
    )


def comfyui_loaded() -> bool:
    return "comfy.model_management" in sys.modules


def bootstrap_comfyui(
    path: str | os.PathLike | None = None, cpu: bool | None = None, how: str | None = None
) -> Path:
    """Imports ComfyUI in this process (no server), once. Returns its folder.

    Inside a running ComfyUI this is a no-op. ``cpu`` None means: CPU when CUDA is unavailable.
    ``how`` says how ``path`` was chosen, for the error when this Python lacks its requirements
    (ComfyUINotFound).
    """
    if comfyui_loaded():
        import folder_paths

        return Path(folder_paths.base_path)
    root = find_comfyui(path)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from comfy.cli_args import args

    if cpu is None:
        cpu = not torch.cuda.is_available()
    args.cpu = bool(cpu)
    args.disable_api_nodes = True
    try:
        import folder_paths  # noqa: F401

        # ComfyUI's nodes.py puts comfy/ first on sys.path; after that comfy/utils.py shadows
        # ComfyUI's own utils/ package, so it has to be imported before nodes.
        with contextlib.suppress(ImportError):
            import utils.install_util  # noqa: F401
        import comfy.model_management  # noqa: F401
        import comfy.sd  # noqa: F401

        # ComfyUI's own top-level ``nodes`` module (its built-in nodes and loaders), NOT this
        # pack's ``nodes/`` package, which shares the name; importing it finishes ComfyUI's start.
        import nodes as comfy_nodes  # noqa: F401
    except ModuleNotFoundError as e:
        raise missing_requirement(e, root, how or _how_found(path)) from None
    return root


def _version(root: Path) -> str:
    try:
        text = (root / "comfyui_version.py").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    found = [
        line.split("=", 1)[1].strip().strip("\"'") for line in text.splitlines() if "__version__" in line
    ]
    return found[0] if found else "unknown"


def _how_found(explicit: str | os.PathLike | None) -> str:
    if explicit:
        return "given"
    if os.environ.get("COMFYUI_PATH"):
        return "from COMFYUI_PATH"
    return "found automatically, as COMFYUI_PATH is unset"


def missing_requirement(error: ModuleNotFoundError, root: Path, how: str) -> ComfyUINotFound:
    """The error for a ComfyUI whose own requirements this Python lacks (another install's venv,
    e.g. a 0.3.75 environment that found a 0.33.0 ComfyUI): which ComfyUI, how it was found, the
    missing package, and the two ways out."""
    return ComfyUINotFound(
        f"The ComfyUI at {root} (version {_version(root)}, {how}) needs the package {error.name!r}, which is "
        f"not installed in this Python ({sys.executable}): its requirements are not installed here. Run "
        f"'{sys.executable} -m pip install -r {root / 'requirements.txt'}', or set COMFYUI_PATH (or "
        "--comfyui) to the ComfyUI this Python was set up for."
    )


def load_models_headless(unet: str, clip_l: str, t5xxl: str, vae: str, weight_dtype: str = "default"):
    """Loads the Kontext transformer, text encoders and VAE with ComfyUI's own loaders."""
    import comfy.sd
    import comfy.utils

    for label, path in (("Kontext model", unet), ("clip_l", clip_l), ("t5xxl", t5xxl), ("VAE", vae)):
        if not path or not Path(path).is_file():
            raise FileNotFoundError(
                f"{label} weights not found: {path!r}. Give the path to the .safetensors file."
            )
        check_safetensors(path, label)  # a truncated download: one line, before any loading
    model_options = {}
    if weight_dtype == "fp8_e4m3fn":
        model_options["dtype"] = torch.float8_e4m3fn
    elif weight_dtype == "fp8_e5m2":
        model_options["dtype"] = torch.float8_e5m2
    model = comfy.sd.load_diffusion_model(unet, model_options=model_options)
    clip = comfy.sd.load_clip(ckpt_paths=[clip_l, t5xxl], clip_type=comfy.sd.CLIPType.FLUX)
    vae_model = comfy.sd.VAE(sd=comfy.utils.load_torch_file(vae))
    return model, clip, vae_model


def encode_prompt(clip, text: str) -> list:
    """CONDITIONING exactly as ComfyUI's CLIPTextEncode makes it."""
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


def resolve_model_file(value: str, folders: tuple[str, ...]) -> Path | None:
    """A weights file given as a path, or as a name inside one of ComfyUI's model folders
    (e.g. ``diffusion_models``, ``text_encoders``, ``vae``). None when neither exists."""
    if not value:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.resolve()
    if not comfyui_loaded():
        return None
    import folder_paths

    for folder in folders:
        try:
            found = folder_paths.get_full_path(folder, value)
        except Exception:  # unknown folder name in this ComfyUI version
            found = None
        if found and Path(found).is_file():
            return Path(found)
    return None
