"""The main job: boot a real headless ComfyUI with the pack and the tiny default models, queue a shipped API
workflow (default: Open-Sora 1.3 text-to-video), show progress, and copy the mp4 to ./output/.

Usage: scripts/demo.sh [--workflow NAME_OR_PATH] [--full] [--resolution 240p] [--frames 33]

NAME_OR_PATH: a shipped workflow's name (opensora20_t2v, opensora13_i2v, ... as in workflows/api/) or the path of
an API-format file that uses the shipped workflows' model names. Its loaders are pointed at the tiny models of its
version (the 2.0 ones are made when first needed) and its Load Image nodes get a stand-in picture. Without --full,
1.x runs at --resolution / --frames and 2.0 at 64 x 64 pixels and 9 frames (8 for the DC-AE), its own steps.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from comfy_host import ComfyServer, output_files  # noqa: E402
from demo_models import install_tiny_models, write_reference_image  # noqa: E402
from shipped_workflows import OFFICIAL, tiny_settings, use_models  # noqa: E402

V2_ROLES = ("dit_2.0", "vae_2.0", "clip_l_2.0", "flux", "flux_ae", "dit_dcae", "vae_dcae")


def workflow_file(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = REPO / "workflows" / "api" / f"{name_or_path}.json"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in shipped.parent.glob("*.json"))
    raise SystemExit(f"[demo] no workflow {name_or_path!r}: give a file or one of {', '.join(names)}")


def demo_prompt(prompt: dict, names: dict, args) -> dict:
    """The workflow on the tiny models, shrunk unless --full (1.x: --resolution / --frames; 2.0: tiny_settings)."""
    prompt = use_models(prompt, names)
    if args.full:
        return prompt
    versions = {n["inputs"].get("version") for n in prompt.values() if n["class_type"] == "OpenSoraEmptyLatentVideo"}
    if any(str(v).startswith("2.0") for v in versions):
        steps = [n["inputs"]["steps"] for n in prompt.values() if n["class_type"] == "OpenSoraSampler"]
        return tiny_settings(prompt, steps=steps[0] if steps else 4)
    for node in prompt.values():  # the tiny VAE decodes 360p x 49 frames slowly on 2 cores; keep the demo short
        if node["class_type"] == "OpenSoraEmptyLatentVideo":
            node["inputs"].update(resolution=args.resolution, num_frames=args.frames)
    return prompt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflow", default="opensora13_t2v", help="a shipped workflow's name, or an API file")
    parser.add_argument("--output", default=str(REPO / "output"))
    parser.add_argument("--resolution", default="240p", help="the tiny model's demo size (the workflow ships 360p)")
    parser.add_argument("--frames", type=int, default=33, help="pixel frames (1.3: 16k+1)")
    parser.add_argument("--full", action="store_true", help="keep the workflow's own size and frame count")
    args = parser.parse_args()

    workflow = json.loads(workflow_file(args.workflow).read_text())
    start = time.monotonic()
    base = REPO / ".cache" / "demo-base"
    server = ComfyServer(base_dir=base)
    server.prepare()
    print("[demo] creating the tiny default models (fixed seed, official key layout)")
    names = install_tiny_models(server.models)
    used = {v for n in workflow.values() for v in n["inputs"].values() if isinstance(v, str)}
    if used & {OFFICIAL[role] for role in V2_ROLES}:
        from demo_models_v2 import install_tiny_models_v2

        print("[demo] creating the tiny 2.0 models")
        names = {**install_tiny_models_v2(server.models), **names}
    for node in workflow.values():
        if node["class_type"] == "LoadImage":
            write_reference_image(server.base / "input" / node["inputs"]["image"])
    print(f"[demo] booting ComfyUI ({server.comfy}) on {server.url}")
    with server:
        print(f"[demo] host up after {time.monotonic() - start:.1f}s; pack loaded")
        prompt = demo_prompt(workflow, names, args)

        def show(message: dict) -> None:
            kind, data = message["type"], message.get("data", {})
            if kind == "executing" and data.get("node"):
                node = prompt.get(data["node"], {})
                print(f"[demo] running {node.get('class_type', data['node'])}")
            elif kind == "progress":
                print(
                    f"\r[demo]   step {data['value']}/{data['max']}",
                    end="\n" if data["value"] == data["max"] else "",
                    flush=True,
                )

        result = server.client().run(prompt, timeout=1800, on_message=show)
        if not result.ok:
            print(f"[demo] FAILED: {result.status} {json.dumps(result.error, indent=1)[:3000]}")
            return 1
        videos = output_files(result, server.base)
        if not videos:
            print("[demo] FAILED: the workflow wrote no mp4")
            return 1
        out_dir = Path(args.output)
        out_dir.mkdir(parents=True, exist_ok=True)
        for video in videos:
            shutil.copy2(video, out_dir / video.name)
            print(f"[demo] wrote {out_dir / video.name} ({video.stat().st_size} bytes)")
    print(f"[demo] done in {time.monotonic() - start:.1f}s; server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
