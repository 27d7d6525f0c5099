"""Packaging and host integration: registry metadata, requirements, node naming, real loaders."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_parses_with_comfyuis_own_config_parser(comfy_root):
    from comfy_config import config_parser

    cfg = config_parser.extract_node_configuration(str(ROOT))
    # The Registry asks for node ids without "ComfyUI" in them.
    assert cfg.project.name == "kontext-restore" and "comfyui" not in cfg.project.name.lower()
    assert cfg.project.version and cfg.project.description
    assert cfg.project.urls.repository.startswith("https://")
    # The SPDX string form (setuptools >= 77) reaches the Registry's parser as the license text.
    assert cfg.project.license.text == "GPL-3.0-only"
    assert cfg.tool_comfy.publisher_id and cfg.tool_comfy.display_name
    assert cfg.tool_comfy.icon.startswith("https://")
    assert cfg.project.supported_comfyui_version.startswith(">=")
    requirements = [
        line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
    ]
    requirements = [r for r in requirements if r]
    assert sorted(cfg.project.dependencies) == sorted(requirements)


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_library_package_is_listed_for_the_wheel():
    """setuptools installs only the packages named in pyproject.toml: a stage folder left out would be
    missing from a wheel install while the tests (which import from the checkout) still pass."""
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "kontext_train").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert listed == on_disk


def test_license_is_the_gpl_3_text_the_pyproject_names():
    project = _pyproject()["project"]
    assert project["license"] == "GPL-3.0-only" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "GNU GENERAL PUBLIC LICENSE" in text and "Version 3, 29 June 2007" in text
    requires = _pyproject()["build-system"]["requires"]
    assert any(r.replace(" ", "").startswith("setuptools>=77") for r in requires), requires


def test_package_metadata_builds_without_deprecation_warnings(tmp_path):
    """setuptools builds the metadata offline (this venv's setuptools) with no deprecation warning
    (the license table of old was one) and the license expression and file in it."""
    import setuptools

    major = int(setuptools.__version__.split(".")[0])
    assert major >= 77, f"setuptools {setuptools.__version__}: the build needs >= 77 (pyproject.toml)"
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "LICENSE", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "kontext_train", src / "kontext_train", ignore=shutil.ignore_patterns("__pycache__")
    )
    (tmp_path / "meta").mkdir()
    build = (
        "import sys, setuptools.build_meta as backend; "
        "print(backend.prepare_metadata_for_build_wheel(sys.argv[1]))"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "always", "-c", build, str(tmp_path / "meta")],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Deprecat" not in proc.stdout + proc.stderr, proc.stderr
    metadata = (tmp_path / "meta" / proc.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    assert "Name: kontext-restore\n" in metadata
    assert "License-Expression: GPL-3.0-only\n" in metadata and "License-File: LICENSE\n" in metadata


def test_registry_icon_is_the_committed_square_png():
    from urllib.parse import urlparse

    from PIL import Image

    config = _pyproject()
    icon_url = config["tool"]["comfy"]["Icon"]
    repository = urlparse(config["project"]["urls"]["Repository"]).path.strip("/")  # owner/name
    url = urlparse(icon_url)
    assert url.scheme == "https" and url.netloc == "raw.githubusercontent.com"
    assert url.path.startswith(f"/{repository}/main/"), icon_url
    committed = url.path.removeprefix(f"/{repository}/main/")
    assert committed == "docs/icon.png"
    with Image.open(ROOT / committed) as icon:
        assert icon.format == "PNG" and icon.width == icon.height >= 200
        drawn = np.asarray(icon.convert("RGB")).astype(np.int16)
    # docs/icon.py draws it: the committed picture is what the script makes (small codec leeway).
    spec = importlib.util.spec_from_file_location("icon_script", ROOT / "docs" / "icon.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    again = np.asarray(script.draw_icon(drawn.shape[0])).astype(np.int16)
    assert np.abs(drawn - again).mean() < 2.0


def test_requirements_never_name_torch():
    names = [
        line.split("#")[0].strip().lower() for line in (ROOT / "requirements.txt").read_text().splitlines()
    ]
    for name in names:
        assert not name.startswith(("torch", "torchvision", "torchaudio", "torchsde")), name


@pytest.mark.slow
def test_installing_requirements_leaves_torch_untouched(tmp_path):
    """What ComfyUI-Manager does (pip install -r requirements.txt) must not replace the host's torch."""
    report = tmp_path / "report.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--report",
            str(report),
            "-r",
            str(ROOT / "requirements.txt"),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    planned = [item["metadata"]["name"].lower() for item in json.loads(report.read_text()).get("install", [])]
    assert not [
        n for n in planned if n in {"torch", "torchvision", "torchaudio", "triton"} or n.startswith("nvidia-")
    ], planned


def test_every_node_is_prefixed_and_categorised(pack_nodes):
    ours = {
        k: v
        for k, v in pack_nodes.NODE_CLASS_MAPPINGS.items()
        if getattr(v, "__module__", "").find("nodes.") >= 0 and k.startswith("KontextRestore")
    }
    assert len(ours) >= 6
    for name, cls in ours.items():
        assert cls.CATEGORY.startswith("Kontext Restore"), name
        assert name in pack_nodes.NODE_DISPLAY_NAME_MAPPINGS


def _pack_module():
    """The pack's module as ComfyUI imported it (nodes.load_custom_node names it by its path)."""
    return sys.modules[str(ROOT).replace(".", "_x_")]


def test_the_pack_registers_through_comfy_entrypoint_only(pack_nodes):
    import asyncio

    from comfy_api.latest import ComfyExtension, io

    pack = _pack_module()
    # A pack with NODE_CLASS_MAPPINGS is registered from it alone (load_custom_node never calls
    # comfy_entrypoint then), so the pack must not define it.
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS") and not hasattr(pack, "NODE_DISPLAY_NAME_MAPPINGS")
    extension = asyncio.run(pack.comfy_entrypoint())
    assert isinstance(extension, ComfyExtension)
    listed = asyncio.run(extension.get_node_list())
    assert len(listed) == len(set(listed)) >= 11
    registered = {
        k: v
        for k, v in pack_nodes.NODE_CLASS_MAPPINGS.items()
        if k.startswith("KontextRestore") and not k.startswith("KontextRestoreTest")
    }
    # What ComfyUI registered is exactly the extension's list, each under its class name.
    assert {cls.__name__: cls for cls in listed} == registered
    for cls in listed:
        assert issubclass(cls, io.ComfyNode), cls
        schema = cls.GET_SCHEMA()
        assert schema.node_id == cls.__name__
        assert pack_nodes.NODE_DISPLAY_NAME_MAPPINGS[schema.node_id] == schema.display_name


def test_host_registers_a_pack_with_both_mechanisms_from_node_class_mappings(pack_nodes, tmp_path):
    """Why the pack has comfy_entrypoint alone, pinned on each supported host."""
    import asyncio

    probe = tmp_path / "probe_pack_both"
    probe.mkdir()
    (probe / "__init__.py").write_text(
        "from comfy_api.latest import ComfyExtension, io\n"
        "class ProbeBothV1:\n"
        "    @classmethod\n"
        "    def INPUT_TYPES(cls):\n"
        "        return {'required': {}}\n"
        "    RETURN_TYPES = ()\n"
        "    FUNCTION = 'run'\n"
        "class ProbeBothV3(io.ComfyNode):\n"
        "    @classmethod\n"
        "    def define_schema(cls):\n"
        "        return io.Schema(node_id='ProbeBothV3', inputs=[], outputs=[])\n"
        "    @classmethod\n"
        "    def execute(cls):\n"
        "        return io.NodeOutput()\n"
        "class Extension(ComfyExtension):\n"
        "    async def get_node_list(self):\n"
        "        return [ProbeBothV3]\n"
        "async def comfy_entrypoint():\n"
        "    return Extension()\n"
        "NODE_CLASS_MAPPINGS = {'ProbeBothV1': ProbeBothV1}\n"
    )
    try:
        assert asyncio.run(pack_nodes.load_custom_node(str(probe)))
        assert "ProbeBothV1" in pack_nodes.NODE_CLASS_MAPPINGS
        assert "ProbeBothV3" not in pack_nodes.NODE_CLASS_MAPPINGS
    finally:
        for name in ("ProbeBothV1", "ProbeBothV3"):
            pack_nodes.NODE_CLASS_MAPPINGS.pop(name, None)


HOST_IMPORT = (
    r"^\s*(import|from)\s+(comfy|comfy_extras|comfy_api|comfy_execution|folder_paths|nodes|node_helpers"
    r"|server|execution|latent_preview)\b"
)


def test_comfyui_is_imported_only_in_the_comfyui_package():
    """ComfyUI's modules are imported in kontext_train/comfyui/ alone: not by the rest of the library,
    not by the headless app and not by the nodes (which go through the package too)."""
    import re

    host_modules = re.compile(HOST_IMPORT, re.MULTILINE)
    adapter = ROOT / "kontext_train" / "comfyui"
    checked = [p for p in (ROOT / "kontext_train").rglob("*.py") if adapter not in p.parents]
    checked += list((ROOT / "nodes").rglob("*.py"))
    assert len(checked) > 20
    offenders = [
        f"{path.relative_to(ROOT)}: {m.group(0).strip()}"
        for path in checked
        for m in host_modules.finditer(path.read_text())
    ]
    assert not offenders, offenders
    assert any(host_modules.search(p.read_text()) for p in adapter.glob("*.py"))


def test_library_never_imports_the_headless_app():
    import re

    app_import = re.compile(r"^\s*from\s+(\.+app\b|kontext_train\.app\b)", re.MULTILINE)
    library = [
        p
        for p in (ROOT / "kontext_train").rglob("*.py")
        if (ROOT / "kontext_train" / "app") not in p.parents and p.name != "__main__.py"
    ]
    offenders = [str(p.relative_to(ROOT)) for p in library if app_import.search(p.read_text())]
    assert not offenders, offenders


def test_imports_inside_the_pack_are_relative():
    """ComfyUI imports the pack by its folder path under any name, and its own top-level ``nodes``
    module shares a name with the pack's ``nodes/``: absolute imports of the pack's packages could
    pick up the wrong one whatever the sys.path order."""
    import re

    absolute = re.compile(r"^\s*(import|from)\s+(kontext_train|nodes)\b(?!\s*#)", re.MULTILINE)
    offenders = []
    for path in list((ROOT / "kontext_train").rglob("*.py")) + list((ROOT / "nodes").rglob("*.py")):
        for m in absolute.finditer(path.read_text()):
            offenders.append(f"{path.relative_to(ROOT)}: {m.group(0).strip()}")
    init = (ROOT / "__init__.py").read_text()
    assert not re.search(r"^\s*(import|from)\s+(kontext_train|nodes)\b", init, re.MULTILINE)
    # ComfyUI's own ``import nodes`` inside the adapter is the host's module, on purpose.
    offenders = [o for o in offenders if not o.startswith("kontext_train/comfyui/")]
    assert not offenders, offenders


def _write_flux_checkpoint(path: Path, hidden: int = 3072, depth: int = 1, single: int = 1) -> None:
    """A FLUX-dev-shaped transformer (1 double + 1 single block at real width) with random bf16
    weights, saved the way released checkpoints hold them: norm gains are ``<path>.scale`` (ones)
    whatever this ComfyUI calls them, so newer versions exercise their key conversion on load."""
    import comfy.ops
    from comfy.ldm.flux.model import Flux
    from safetensors.torch import save_file

    from kontext_train.comfyui.tiny_models import flux_unet_config, is_norm_module

    config = flux_unet_config(hidden, hidden // 128, depth, single)
    with torch.device("meta"):
        skeleton = Flux(operations=comfy.ops.disable_weight_init, device="meta", **config)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for module_path, module in skeleton.named_modules():
        for name, t in module.named_parameters(recurse=False):
            key = f"{module_path}.{name}"
            if is_norm_module(module):
                sd[f"{module_path}.scale"] = torch.ones(t.shape, dtype=torch.bfloat16)
                continue
            fan_in = t.shape[1] if t.ndim > 1 else 1
            scale = fan_in**-0.5 * (0.02 if t.ndim == 1 else 1)
            sd[key] = (torch.randn(t.shape, generator=g) * scale).to(torch.bfloat16)
    assert any(k.endswith("key_norm.scale") for k in sd), "no Flux RMSNorm found"
    save_file(sd, str(path))


@pytest.mark.slow
def test_real_width_checkpoint_loads_through_stock_unetloader_and_trains(comfy_root, comfy_dirs, tmp_path):
    import folder_paths

    import nodes
    from kontext_train import comfyui
    from kontext_train.comfyui.tiny_models import is_norm_module

    models = tmp_path / "diffusion_models"
    models.mkdir()
    _write_flux_checkpoint(models / "kontext_tiny_depth.safetensors")
    folder_paths.add_model_folder_path("diffusion_models", str(models))
    (model,) = nodes.UNETLoader().load_unet("kontext_tiny_depth.safetensors", "default")
    comfyui.require_flux(model)
    diffusion = model.model.diffusion_model
    assert diffusion.img_in.weight.shape[0] == 3072
    # The released-format ``.scale`` gains arrive as ones under this version's parameter name.
    norms = [m for m in diffusion.modules() if is_norm_module(m) and list(m.parameters(recurse=False))]
    assert norms and all(torch.all(p == 1) for m in norms for p in m.parameters(recurse=False))
    lora = comfyui.FluxLoraModel(model, rank=2, alpha=2, targets="blocks")
    lora.load()
    cond = comfyui.PreparedConditioning(
        torch.randn(1, 4, 4096, dtype=lora.dtype), torch.randn(1, 768, dtype=lora.dtype)
    )
    x = torch.randn(1, 16, 4, 4)
    with lora.training():
        v = lora.velocity(x, torch.tensor([0.5]), cond, 1.5, reference=x)
        v.pow(2).mean().backward()
    grads = [p.grad for p in lora.parameters() if p.grad is not None]
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert grads and all(torch.isfinite(g).all() for g in grads)
    lora.release()


def _retry_pip(tmp_path: Path, failures: int) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Runs the setup script's ``retry_pip`` with a stand-in Python that fails ``failures`` times."""
    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n[ $(wc -l < {calls}) -gt {failures} ]\n')
    fake.chmod(0o755)
    script = ROOT / "scripts" / "setup_test_env.sh"
    define = f"eval \"$(sed -n '/^retry_pip()/,/^}}/p' {script})\""
    done = subprocess.run(
        ["bash", "-c", f"set -euo pipefail; {define}; retry_pip {fake} install torch==2.9.1"],
        env={"PATH": "/usr/bin:/bin", "PIP_ATTEMPTS": "3", "PIP_RETRY_PAUSE": "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done, calls.read_text().splitlines()


def test_setup_retries_a_failed_pip_step(tmp_path):
    """A download that stops part-way (CI, stop 16) fails one pip run; the next may finish."""
    done, calls = _retry_pip(tmp_path, failures=2)
    assert done.returncode == 0, done.stderr
    assert calls == ["-m pip install torch==2.9.1"] * 3
    assert "attempt 2 of 3" in done.stderr


def test_setup_gives_up_after_its_attempts_naming_the_step(tmp_path):
    done, calls = _retry_pip(tmp_path, failures=5)
    assert done.returncode != 0 and len(calls) == 3
    assert "'pip install torch==2.9.1' failed 3 times" in done.stderr


# -- the import graph of the pack's own modules ------------------------------------------------

COMFY_NODES_ALIAS = "comfy_nodes"


def _module_name(path: Path, root: Path) -> str:
    """The dotted name of a pack file relative to the pack's folder ("" for the pack itself)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _pack_files(root: Path) -> list[Path]:
    files = [root / "__init__.py"] if (root / "__init__.py").is_file() else []
    for package in ("kontext_train", "nodes"):
        files += sorted((root / package).rglob("*.py"))
    return files


def _import_graph(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """Every pack module -> the pack modules it imports, read from the source: imports inside
    functions, classes and ``if`` blocks count as much as those at the top.

    ``from . import x`` is an edge to the module ``x`` where it is one, else to the package.
    A parent package that Python runs on the way to a module is no edge of its own. Inside the
    pack, an absolute import names another distribution: ComfyUI imports the pack under a name
    taken from its folder, so ``import nodes`` there is ComfyUI's top-level ``nodes`` module,
    never the pack's ``nodes/`` (test_imports_inside_the_pack_are_relative). Such an import of
    ``nodes`` must be bound as ``comfy_nodes``; each one that is not is listed as a problem."""
    import ast

    files = _pack_files(root)
    modules = {_module_name(p, root): p for p in files}
    graph: dict[str, set[str]] = {}
    problems: list[str] = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{target}.{alias.name}" if target else alias.name
                    edges.add(sub if sub in modules else target)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "nodes" and alias.asname != COMFY_NODES_ALIAS:
                        problems.append(
                            f"{path.relative_to(root)}:{node.lineno}: import ComfyUI's nodes module as "
                            f"`import nodes as {COMFY_NODES_ALIAS}` (the pack has a nodes/ package too)"
                        )
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "nodes":
                problems.append(
                    f"{path.relative_to(root)}:{node.lineno}: `from nodes import ...` is ambiguous; "
                    f"use `import nodes as {COMFY_NODES_ALIAS}`"
                )
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph, problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _describe(cycle: list[str], graph: dict[str, set[str]]) -> str:
    members = set(cycle)
    arrows = [f"{a} -> {b}" for a in cycle for b in sorted(graph[a] & members)]
    return f"{len(cycle)} modules: " + ", ".join(arrows)


def test_no_import_cycle_among_the_packs_own_modules():
    """The pack's modules import one another one way only, imports inside functions included: a
    module never needs one that needs it back (the settings table and the modules it lists were
    such a circle once)."""
    graph, problems = _import_graph(ROOT)
    assert not problems, "\n".join(problems)
    # The graph is read whole: the pack's modules, the arrows at the top and inside functions.
    arrows = sum(map(len, graph.values()))
    assert len(graph) > 60 and arrows > 150, (len(graph), arrows)
    assert (
        "kontext_train.comfyui.memory_check" in graph["kontext_train.train.run_memory"]
    )  # inside a function
    assert "nodes" in graph[""] and "kontext_train.setting" in graph["kontext_train.options"]
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_describe(c, graph) for c in cycles)


def test_the_settings_table_is_imported_by_the_nodes_and_the_command_alone():
    graph, _ = _import_graph(ROOT)
    users = sorted(name for name, edges in graph.items() if "kontext_train.options" in edges)
    assert users and all(u.startswith(("nodes", "kontext_train.app.")) for u in users), users


def test_the_cycle_check_finds_a_circle_through_a_function_and_reads_comfyuis_nodes_apart(tmp_path):
    """The checker itself: a circle closed by an import inside a function is found, and ComfyUI's
    ``nodes`` imported under its alias is no arrow to the pack's ``nodes/``."""
    (tmp_path / "__init__.py").write_text("from .nodes import entry\n")
    (tmp_path / "nodes").mkdir()
    (tmp_path / "nodes" / "__init__.py").write_text("from ..kontext_train.a import run\nentry = run\n")
    lib = tmp_path / "kontext_train"
    (lib / "comfyui").mkdir(parents=True)
    (lib / "__init__.py").write_text("")
    (lib / "comfyui" / "__init__.py").write_text("def start():\n    import nodes as comfy_nodes\n")
    (lib / "a.py").write_text(
        "from .b import helper\nfrom . import comfyui\n\ndef run():\n    return helper()\n"
    )
    (lib / "b.py").write_text("def helper():\n    from .a import run\n    return run\n")
    graph, problems = _import_graph(tmp_path)
    assert not problems
    assert graph["kontext_train.comfyui"] == set()  # ComfyUI's nodes, not the pack's
    assert graph["kontext_train.a"] == {"kontext_train.b", "kontext_train.comfyui"}
    assert _cycles(graph) == [["kontext_train.a", "kontext_train.b"]]
    (lib / "b.py").write_text("def helper():\n    return 1\n")
    (lib / "comfyui" / "__init__.py").write_text("def start():\n    import nodes\n")
    graph, problems = _import_graph(tmp_path)
    assert _cycles(graph) == [] and len(problems) == 1 and "comfy_nodes" in problems[0]
