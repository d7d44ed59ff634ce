"""Host memory and time of Load Open-Sora DiT for each file format and weight dtype (CPU; any ComfyUI host).

Writes a 2.0 MMDiT at the full width (hidden 3072, 24 heads; fewer blocks, --double / --single) as a bf16
safetensors file and as GGUF files (written by the `gguf` package), then loads each one with the node inside a fresh
ComfyUI process (--cpu) per case and reports:
- peak_anon_gib: the peak anonymous resident memory above the process's own before the load (sampled every 10 ms
  from /proc/self/status RssAnon). A safetensors file is memory-mapped, so its pages are file-backed page cache the
  kernel may drop; what counts against RAM is the anonymous part: dequantized and converted copies.
- weights_gib: the loaded model's weights (ModelPatcher.model_size()); seconds: the node's load call.

    python benchmarks/bench_load_memory.py [--double 1 --single 3 --formats bf16 Q8_0 --dtypes bf16 fp8_e4m3fn]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, {repo!r})
from benchmarks.bench_comfy_memory import import_pack
import torch
import_pack(torch.device("cpu"), None)
import folder_paths
from opensora_pack.nodes import loaders

def anon():
    return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0]) * 1024
peak = [anon()]
def sample():
    while True:
        peak[0] = max(peak[0], anon())
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
folder_paths.add_model_folder_path("diffusion_models", {folder!r}, True)
before = anon()
start = time.perf_counter()
model = loaders.OpenSoraLoadDiT().load({name!r}, {dtype!r})[0]
seconds = time.perf_counter() - start
time.sleep(0.05)
print("RESULT " + json.dumps({{"peak_anon_gib": (peak[0] - before) / 2**30, "weights_gib": model.model_size() / 2**30,
                               "seconds": seconds}}))
"""


def write_files(folder: Path, double: int, single: int, formats: list[str]) -> dict[str, str]:
    """The test DiT in each format: {format: file name}."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    from helpers_gguf import write_gguf

    from benchmarks.bench_comfy_memory import random_state_dict
    from opensora_lib.mmdit import mmdit_v2_config

    config = dataclasses.replace(mmdit_v2_config(), depth=double, depth_single_blocks=single)
    state_dict = random_state_dict(config, torch.device("cpu"), seed=0)
    names = {}
    for kind in formats:
        names[kind] = "dit.safetensors" if kind == "bf16" else f"dit-{kind}.gguf"
        if kind == "bf16":
            save_file(state_dict, str(folder / names[kind]))
        else:
            write_gguf(folder / names[kind], state_dict, kind)
    return names


def measure(folder: Path, name: str, dtype: str) -> dict:
    code = CHILD.format(repo=str(REPO), folder=str(folder), name=name, dtype=dtype)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not lines:
        raise RuntimeError(f"loading {name} as {dtype} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--double", type=int, default=1, help="double blocks (official: 19)")
    parser.add_argument("--single", type=int, default=3, help="single blocks (official: 38)")
    parser.add_argument("--formats", nargs="+", default=["bf16", "Q8_0"], help="bf16 and/or GGUF types")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp8_e4m3fn"], help="weight_dtype values")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = write_files(folder, args.double, args.single, args.formats)
        for kind, name in names.items():
            file_gib = (folder / name).stat().st_size / 2**30
            for dtype in args.dtypes:
                row = {"format": kind, "weight_dtype": dtype, "file_gib": file_gib, **measure(folder, name, dtype)}
                rows.append(row)
                print(
                    f"{kind:>6} -> {dtype:<11} file {row['file_gib']:.2f} GiB  weights {row['weights_gib']:.2f} GiB  "
                    f"peak anon {row['peak_anon_gib']:.2f} GiB  {row['seconds']:.1f} s",
                    flush=True,
                )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
