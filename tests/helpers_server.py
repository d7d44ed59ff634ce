"""Shared helpers for tests that drive the real ComfyUI host."""

from __future__ import annotations

import json
from pathlib import Path

import av
import demo_models
import numpy as np
from comfy_host import output_files
from shipped_workflows import tiny_settings, use_models

REPO = Path(__file__).resolve().parent.parent
API = REPO / "workflows" / "api"


def api_workflow(name: str) -> dict:
    return json.loads((API / f"{name}.json").read_text())


def tiny_workflow(server, name: str, steps: int = 3, **latent_overrides) -> dict:
    """A shipped API workflow (any version) pointed at the tiny models, at a small size and few steps."""
    return tiny_settings(use_models(api_workflow(name), server.tiny_models), steps=steps, **latent_overrides)


def write_reference_image(server, name: str = "opensora_reference.png", seed: int = 0) -> Path:
    return demo_models.write_reference_image(server.base / "input" / name, seed)


def video_properties(path: Path) -> dict:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return {
            "frames": len(frames),
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": float(stream.average_rate),
            "pixels": np.stack(frames),
        }


def node_of(prompt: dict, class_type: str) -> str:
    """The id of the first node of class_type in an API prompt."""
    return next(key for key, node in prompt.items() if node["class_type"] == class_type)


def run_ok(server, prompt: dict, timeout: float = 900) -> list[Path]:
    result = server.client().run(prompt, timeout=timeout)
    assert result.ok, f"{result.status}: {json.dumps(result.error)[:3000]}"
    videos = output_files(result, server.base)
    return videos
