"""Shared helpers for tests that drive the real ComfyUI host."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
from comfy_host import output_files
from PIL import Image
from shipped_workflows import use_models

REPO = Path(__file__).resolve().parent.parent
API = REPO / "workflows" / "api"

# Small enough for a 2-core CPU, still exercising every node of the workflow.
FAST = {"resolution": "144p", "aspect_ratio": "9:16", "num_frames": 17}


def api_workflow(name: str) -> dict:
    return json.loads((API / f"{name}.json").read_text())


def tiny_workflow(server, name: str, steps: int = 3, **latent_overrides) -> dict:
    """A shipped API workflow pointed at the tiny models, at a small size and few steps."""
    prompt = api_workflow(name)
    version = next(n["inputs"]["version"] for n in prompt.values() if n["class_type"] == "OpenSoraEmptyLatentVideo")
    names = server.tiny_models
    if version == "2.0":
        from workflows_v2 import tiny_settings_v2, use_models_v2

        return tiny_settings_v2(use_models_v2(prompt, names), steps=steps)
    prompt = use_models(prompt, {"dit": names[f"dit_{version}"], "vae": names[f"vae_{version}"], "t5": names["t5"]})
    for node in prompt.values():
        if node["class_type"] == "OpenSoraEmptyLatentVideo":
            node["inputs"].update({**FAST, **latent_overrides})
        if node["class_type"] == "OpenSoraSampler":
            node["inputs"]["steps"] = steps
    return prompt


def write_reference_image(server, name: str = "opensora_reference.png", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 255, 320, dtype=np.float32)[None, :, None]
    pixels = (gradient + rng.normal(0, 20, (200, 320, 3))).clip(0, 255).astype(np.uint8)
    path = server.base / "input" / name
    Image.fromarray(pixels).save(path)
    return path


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


def run_ok(server, prompt: dict, timeout: float = 900) -> list[Path]:
    result = server.client().run(prompt, timeout=timeout)
    assert result.ok, f"{result.status}: {json.dumps(result.error)[:3000]}"
    videos = output_files(result, server.base)
    return videos
