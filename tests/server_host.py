"""A real headless ComfyUI server for tests, with this pack loaded from outside ComfyUI's tree.

``start_server()`` lays out a throw-away base directory (``custom_nodes/``, ``input/``,
``output/``, ``models/``, ``user/default/comfy.settings.json``), links this repository into a
separate folder under a distinctive name (the checkout itself may be called anything, e.g.
``main``) and points ComfyUI at that folder through ``--extra-model-paths-config``. The server
runs on the CPU on a free loopback port; its log goes to ``<base>/server.log``. ``stop()``
always terminates it (the fixtures call it in ``finally``/teardown).

``server_fixture()`` makes a pytest fixture. Servers are cached per configuration for the whole
test process, so every test module that asks for the same configuration shares one server (one
start, ~5-10 s), and the last teardown stops it.

Also usable from scripts: ``with start_server(tmp) as server: server.object_info()``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_NODES = Path(__file__).resolve().parent / "host_nodes"
# The folder names ComfyUI sees. The pack's name is what the template browser shows.
PACK_LINK_NAME = "ComfyUI-Kontext-Restore"
TEST_NODES_LINK_NAME = "kontext_restore_test_host_nodes"
START_TIMEOUT_S = float(os.environ.get("KONTEXT_RESTORE_SERVER_START_TIMEOUT", "180"))


def comfyui_path() -> Path:
    """ComfyUI to run: $COMFYUI_PATH, the install this pack sits in, or the setup script's tree."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from kontext_train.comfyui import find_comfyui

    return find_comfyui()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


@dataclass
class ComfyServer:
    """Handle on a running server: HTTP helpers and the paths of its folders."""

    base: Path
    port: int
    process: subprocess.Popen
    log_path: Path
    packs: dict[str, Path] = field(default_factory=dict)

    # ---- folders ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def loras_dir(self) -> Path:
        return self.base / "models" / "loras"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    # ---- HTTP ------------------------------------------------------------------------------
    def request(self, method: str, path: str, body=None, timeout: float = 30.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def get(self, path: str, timeout: float = 30.0):
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body, timeout: float = 30.0):
        return self.request("POST", path, body, timeout=timeout)

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=60)

    def queue_prompt(self, graph: dict) -> str:
        """POST /prompt; raises ServerError with the node errors on HTTP 400."""
        try:
            answer = self.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise ServerError(f"/prompt refused the graph (HTTP {e.code}): {detail}") from e
        return answer["prompt_id"]

    def wait_history(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Polls GET /history/<id> until the prompt finished; returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.25)
        with contextlib.suppress(Exception):
            self.post("/interrupt", {})
        raise ServerError(f"prompt {prompt_id} did not finish in {timeout:.0f} s\n{self.log_tail()}")

    def run_prompt(self, graph: dict, timeout: float = 300.0) -> dict:
        """Queues a graph, waits, and returns the history entry; raises unless it succeeded."""
        prompt_id = self.queue_prompt(graph)
        entry = self.wait_history(prompt_id, timeout)
        if entry["status"].get("status_str") != "success":
            messages = json.dumps(entry["status"].get("messages", []), indent=1)[-6000:]
            raise ServerError(
                f"prompt {prompt_id} failed:\n{messages}\n--- server log ---\n{self.log_tail()}"
            )
        return entry

    # ---- lifetime ---------------------------------------------------------------------------
    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise ServerError(f"ComfyUI exited with code {self.process.returncode}\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """Terminates the server (its whole process group), killing it if it does not stop."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    def __enter__(self) -> ComfyServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def prepare_base(base: Path, with_test_nodes: bool = True) -> tuple[Path, dict[str, Path]]:
    """Lays out the base directory; returns (extra_model_paths.yaml, {link name: real folder})."""
    for sub in ("custom_nodes", "input", "output", "temp", "models/loras", "user/default"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    # Skips the first-run template browser in the web UI.
    (base / "user" / "default" / "comfy.settings.json").write_text(
        json.dumps({"Comfy.TutorialCompleted": True}, indent=1)
    )
    packs_dir = base / "packs"
    packs_dir.mkdir(exist_ok=True)
    packs = {PACK_LINK_NAME: ROOT}
    if with_test_nodes:
        packs[TEST_NODES_LINK_NAME] = TEST_NODES
    for name, target in packs.items():
        link = packs_dir / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    config = base / "extra_model_paths.yaml"
    # JSON is valid YAML: no yaml dependency and no quoting surprises in paths.
    config.write_text(json.dumps({"kontext_restore_tests": {"custom_nodes": str(packs_dir)}}))
    return config, packs


def start_server(
    base: Path | str | None = None,
    *,
    with_test_nodes: bool = True,
    comfyui: Path | None = None,
    timeout: float = START_TIMEOUT_S,
    extra_args: tuple[str, ...] = (),
) -> ComfyServer:
    """Starts ComfyUI and waits until GET /system_stats answers. Raises ServerError (with the
    log) if it exits or does not come up in ``timeout`` seconds; never leaves a process behind."""
    base = Path(base) if base is not None else Path(tempfile.mkdtemp(prefix="kontext_restore_server_"))
    comfyui = Path(comfyui) if comfyui else comfyui_path()
    config, packs = prepare_base(base, with_test_nodes)
    port = free_port()
    log_path = base / "server.log"
    cmd = [
        sys.executable,
        str(comfyui / "main.py"),
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-auto-launch",
        "--base-directory",
        str(base),
        "--extra-model-paths-config",
        str(config),
        "--database-url",
        "sqlite:///:memory:",
        "--disable-api-nodes",
        *extra_args,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    log_file = open(log_path, "wb")  # noqa: SIM115 - owned by the process
    try:
        process = subprocess.Popen(
            cmd,
            cwd=str(comfyui),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    finally:
        log_file.close()
    server = ComfyServer(base=base, port=port, process=process, log_path=log_path, packs=packs)
    atexit.register(server.stop)  # also when a test run is interrupted
    try:
        deadline = time.monotonic() + timeout
        while True:
            server.check_alive()
            try:
                server.get("/system_stats", timeout=5)
                return server
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"ComfyUI did not answer within {timeout:.0f} s\n{server.log_tail()}")
            time.sleep(0.25)
    except BaseException:
        server.stop()
        raise


# --------------------------------------------------------------------------------------------
# pytest fixtures
# --------------------------------------------------------------------------------------------

_SHARED: dict[tuple, list] = {}  # configuration -> [server, users]


def server_fixture(scope: str = "session", with_test_nodes: bool = True, name: str | None = None):
    """A pytest fixture yielding a running ComfyServer, shared across modules per configuration.

    Usage in a test module: ``comfy_server = server_fixture()``.
    """
    import pytest

    key = (with_test_nodes,)

    @pytest.fixture(scope=scope, name=name)
    def _fixture(tmp_path_factory):
        slot = _SHARED.get(key)
        if slot is None or slot[0].process.poll() is not None:
            base = tmp_path_factory.mktemp("comfy_server")
            slot = _SHARED[key] = [start_server(base, with_test_nodes=with_test_nodes), 0]
        slot[1] += 1
        try:
            yield slot[0]
        finally:
            slot[1] -= 1
            if slot[1] <= 0:
                slot[0].stop()
                _SHARED.pop(key, None)

    return _fixture


def pack_import_failures(log: str) -> list[str]:
    """Log lines where ComfyUI reports that this pack (or the test nodes) failed to import."""
    names = (PACK_LINK_NAME, TEST_NODES_LINK_NAME)
    bad = []
    for line in log.splitlines():
        if ("IMPORT FAILED" in line or "Cannot import" in line) and any(n in line for n in names):
            bad.append(line)
    return bad


def chromium_path() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def write_png(path: Path, width: int, height: int, seed: int) -> Path:
    """A smooth photo-like RGB image (low-frequency noise upscaled), deterministic per seed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = (rng.random((max(2, height // 8), max(2, width // 8), 3)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize((width, height), Image.BICUBIC).save(path)
    return path
