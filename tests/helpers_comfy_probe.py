"""Run a test module's `probe(out, models)` inside ComfyUI (--cpu), with the pack imported as ComfyUI does."""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BOOT = r"""
import importlib.util, json, os, sys
sys.argv = ["probe", "--cpu"]
sys.path.insert(0, os.getcwd())
import comfy.options
comfy.options.enable_args_parsing()
spec = importlib.util.spec_from_file_location("opensora_pack", {init!r}, submodule_search_locations=[{repo!r}])
module = importlib.util.module_from_spec(spec)
sys.modules["opensora_pack"] = module
spec.loader.exec_module(module)
sys.path.insert(0, {tests!r})
import {test_module}
{test_module}.probe({out!r}, {models!r})
"""


def error_of(call, errors: tuple = (ValueError, RuntimeError, FileNotFoundError, MemoryError)) -> str:
    """For probes that report messages: "<ExceptionType>: <message>" of what call() raises, or "no error"."""
    try:
        call()
    except errors as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def result_of(output):
    """The first output of a core node's execute: a NodeOutput (v3 nodes) or a plain tuple (older cores)."""
    return output.result[0] if hasattr(output, "result") else output[0]


def max_diff(a, b) -> float:
    """The largest absolute difference of two tensors, as a float (for the probes' JSON)."""
    return float((a.float() - b.float()).abs().max())


def run_probe(test_module: str, out: Path, models: Path, timeout: float = 600) -> dict:
    """Call `<test_module>.probe(out, models)` in a ComfyUI process; return the JSON it wrote to `out`."""
    sys.path.insert(0, str(REPO / "scripts"))
    from comfy_host import comfyui_dir

    code = BOOT.format(
        init=str(REPO / "__init__.py"),
        repo=str(REPO),
        tests=str(REPO / "tests"),
        test_module=test_module,
        out=str(out),
        models=str(models),
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=comfyui_dir(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(Path(out).read_text())


def probe_with_tiny_dits(test_module: str, models: Path, dits: dict[str, str]) -> dict:
    """Write the tiny DiTs {version: file name} (scripts/demo_models*.py; a name ending in "/" is a 1.x folder) into
    `models`/diffusion_models, then run_probe(test_module)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from demo_models import make_dit
    from demo_models_v2 import make_mmdit

    for version, name in dits.items():
        path = models / "diffusion_models" / name.rstrip("/")
        if version == "2.0":
            make_mmdit(path)
        else:
            make_dit(version, path)
    return run_probe(test_module, models / "results.json", models)


@contextlib.contextmanager
def pack_warnings():
    """Collects the messages of the warnings the pack logs ("OpenSora" logger) inside the block into a list."""
    messages: list[str] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("OpenSora")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
