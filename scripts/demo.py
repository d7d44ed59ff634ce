"""The main job: boot a real headless ComfyUI with the pack and the tiny default models, queue the shipped
Open-Sora 1.3 text-to-video API workflow, show progress, and copy the mp4 to ./output/.

Usage: scripts/demo.sh [--workflow workflows/<name>_api.json] [--keep-server]
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
from demo_models import install_tiny_models  # noqa: E402
from shipped_workflows import use_models  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflow", default=str(REPO / "workflows" / "api" / "opensora13_t2v.json"))
    parser.add_argument("--output", default=str(REPO / "output"))
    parser.add_argument("--resolution", default="240p", help="the tiny model's demo size (the workflow ships 360p)")
    parser.add_argument("--frames", type=int, default=33, help="pixel frames (1.3: 16k+1)")
    parser.add_argument("--full", action="store_true", help="keep the workflow's own size and frame count")
    args = parser.parse_args()

    start = time.monotonic()
    base = REPO / ".cache" / "demo-base"
    server = ComfyServer(base_dir=base)
    server.prepare()
    print("[demo] creating the tiny default models (fixed seed, official key layout)")
    names = install_tiny_models(server.models)
    print(f"[demo] booting ComfyUI ({server.comfy}) on {server.url}")
    with server:
        print(f"[demo] host up after {time.monotonic() - start:.1f}s; pack loaded")
        prompt = use_models(json.loads(Path(args.workflow).read_text()), names)
        if not args.full:  # the tiny VAE decodes 360p x 49 frames slowly on 2 cores; keep the demo short
            for node in prompt.values():
                if node["class_type"] == "OpenSoraEmptyLatentVideo":
                    node["inputs"].update(resolution=args.resolution, num_frames=args.frames)

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
