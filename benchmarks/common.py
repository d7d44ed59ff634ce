"""Shared pieces of the benchmark scripts: arguments, timing, peak memory, FLOP formulas, JSON and table output.

FLOPs count matrix products only (what the tensor cores run), written out from the config and the input size:
a Linear over M rows is 2*M*in*out, attention of Lq queries over Lk keys is 4*sequences*heads*Lq*Lk*head_dim
(QK^T and PV), a convolution is 2*output elements*in_channels*kernel volume. Norms, activations, RoPE and
softmax are left out, as in the usual MFU accounting. Achieved TFLOP/s = FLOPs / seconds / 1e12.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import resource
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from opensora_lib import attention, sizes

# Dense bf16 tensor-core peak of the spec sheet, by a substring of the CUDA device name.
PEAK_BF16_TFLOPS = {"H200": 989.0}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The backend asked for on the command line and why another one runs (setup fills it; environment reports it).
_ATTENTION_REQUEST: dict[str, str | None] = {"requested": None, "note": None}


# ---------------------------------------------------------------- arguments and setup


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny model configs and sizes (the CPU check)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="compute / weight dtype")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls at most (the best is reported)")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="stop repeating once the timed calls took this")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (compile, autotuning)")
    parser.add_argument("--attention", choices=attention.BACKENDS, default="sdpa", help="attention backend")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for the %%-of-peak column")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")


def setup(args: argparse.Namespace) -> torch.device:
    """Check the device, turn autograd off, select the attention backend, seed."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here (for the CPU check: --tiny --device cpu)")
    if device.type not in ("cuda", "cpu"):
        raise SystemExit(f"--device must be cuda, cuda:N or cpu, got {args.device!r}")
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    torch.set_grad_enabled(False)
    select_attention(args.attention, device)
    torch.manual_seed(args.seed)
    return device


def select_attention(name: str, device: torch.device) -> None:
    """Select the attention backend. On the CPU a CUDA-only backend that is not available here (cudnn without
    CUDA) runs as sdpa, as attention() itself does with CPU tensors, and the environment says so."""
    _ATTENTION_REQUEST.update(requested=name, note=None)
    try:
        attention.set_backend(name)
    except ValueError as e:
        if device.type != "cpu":
            raise SystemExit(f"--attention {name}: {e}") from None
        attention.set_backend("sdpa")
        _ATTENTION_REQUEST["note"] = f"{name} not available here ({e}); ran sdpa, as attention() does on the CPU"
        print(f"note: --attention {name}: not available here; running sdpa (the CPU fallback)")


def probe_cudnn_attention(device: torch.device, dtype: torch.dtype, batch: int, heads: int, length: int, head_dim: int):
    """Whether torch's cuDNN attention kernel alone takes [batch, heads, length, head_dim] queries laid out as the
    models lay them out ([B, L, heads, D] views): "ran", or "rejected: <why>". The cudnn backend falls back to SDPA's
    other kernels where cuDNN refuses, so this says which kernel the timings measured."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return "not applicable (needs CUDA and bf16 / fp16)"
    q, k, v = (torch.randn(batch, length, heads, head_dim, device=device, dtype=dtype).transpose(1, 2) for _ in "qkv")
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        synchronize(device)
        return "ran" if bool(torch.isfinite(out).all()) else "ran, non-finite output"
    except RuntimeError as e:
        return "rejected: " + " ".join(str(e).split())[:300]
    finally:
        del q, k, v


def release_memory(device: torch.device) -> None:
    """Hand cached blocks back (after the float32 copy is gone), so later peaks start from a clean pool."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_tflops(device: torch.device, dtype: torch.dtype, override: float | None) -> float | None:
    """The device's dense peak for this dtype, if known (only the bf16 spec figure is tabulated)."""
    if override is not None:
        return override
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


@dataclass
class VideoSize:
    """A benchmark input: pixel size, frame count and batch; `label` is the preset name or HxW."""

    label: str
    height: int
    width: int
    num_frames: int
    batch: int

    @property
    def name(self) -> str:
        return f"{self.label} {self.num_frames}f b{self.batch}"


def parse_video(spec: str, version: str, aspect_ratio: str, batch: int = 1) -> VideoSize:
    """Parse RESOLUTION:FRAMES[:BATCH]: "720p:113:2" (a preset of `version` at `aspect_ratio`) or "360x640:49"."""
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"size {spec!r} must be RESOLUTION:FRAMES[:BATCH], e.g. 720p:113:2 or 360x640:49")
    resolution, frames = parts[0], int(parts[1])
    batch = int(parts[2]) if len(parts) == 3 else batch
    pixels = re.fullmatch(r"(\d+)x(\d+)", resolution)
    if pixels:
        height, width = int(pixels[1]), int(pixels[2])
    else:
        height, width = sizes.image_size(version, resolution, aspect_ratio)
    sizes.latent_shape(version, frames, height, width)  # raises a ValueError that names the rule broken
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch} in {spec!r}")
    return VideoSize(resolution, height, width, frames, batch)


def parse_videos(specs: list[str] | None, default_specs: list[str], version: str, aspect_ratio: str) -> list[VideoSize]:
    """The sizes given on the command line (an empty list: none), else the defaults; a bad one exits with why."""
    try:
        return [parse_video(spec, version, aspect_ratio) for spec in (default_specs if specs is None else specs)]
    except ValueError as e:
        raise SystemExit(f"bad size: {e}") from None


def add_dit_arguments(parser: argparse.ArgumentParser, forward_example: str, default_steps: int) -> None:
    """--forward / --sampler / --steps / --error-size, the runs both DiT benchmarks offer."""
    parser.add_argument("--forward", nargs="*", default=None, help=f"RES:FRAMES:BATCH, e.g. {forward_example}")
    parser.add_argument("--sampler", nargs="*", default=None, help="RES:FRAMES[:VIDEOS] for the sampler runs")
    steps_help = f"sampler steps (default {default_steps}; tiny 12; 0 = no run)"
    parser.add_argument("--steps", type=int, default=None, help=steps_help)
    parser.add_argument("--error-size", default=None, help="RES:FRAMES:BATCH of the bf16 error check, or none")


@dataclass
class DiTRuns:
    """What a DiT benchmark runs: forward sizes, sampler sizes and steps, and the size of the error check."""

    forward: list[VideoSize]
    sampler: list[VideoSize]  # empty when steps is 0
    steps: int
    error: VideoSize | None  # None: no bf16-vs-float32 check


def dit_runs(
    args: argparse.Namespace,
    defaults: dict[str, Any],
    default_steps: int,
    version: str,
    aspect_ratio: str,
    dtype: torch.dtype,
) -> DiTRuns:
    """The runs from add_dit_arguments' options, else the script's defaults ({"forward", "sampler", "error"})."""
    forward = parse_videos(args.forward, defaults["forward"], version, aspect_ratio)
    sampler = parse_videos(args.sampler, defaults["sampler"], version, aspect_ratio)
    steps = default_steps if args.steps is None else args.steps
    error_spec = args.error_size or defaults["error"]
    error = None
    if error_spec != "none" and dtype != torch.float32:  # the error of a float32 run against itself is 0
        error = parse_video(error_spec, version, aspect_ratio)
    return DiTRuns(forward, sampler if steps > 0 else [], steps, error)


# ---------------------------------------------------------------- timing and memory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory over a region: CUDA max_memory_allocated (tensors PyTorch allocated, weights included; not the
    allocator's cache), or on the CPU the growth of the process's peak RSS (0 if it stayed under an earlier peak)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss_growth"
        self.start = 0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.start) / 2**20


@dataclass
class Timing:
    seconds: float  # best timed run
    seconds_mean: float
    seconds_runs: list[float]
    first_call_seconds: float | None  # first warm-up call: includes torch.compile and kernel autotuning
    peak_memory_gib: float
    memory_kind: str


def measure(
    fn: Callable[[], Any], device: torch.device, repeats: int = 3, warmup: int = 1, max_seconds: float = math.inf
) -> tuple[Timing, Any]:
    """Time fn (device-synchronised wall clock) after `warmup` calls; returns the timing and the last output.

    Up to `repeats` timed calls, fewer once they add up to `max_seconds` (at least one).
    """
    device = torch.device(device)
    memory = PeakMemory(device)

    def once() -> tuple[float, Any]:
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        return time.perf_counter() - start, out

    first = None
    for _ in range(warmup):
        seconds, _ = once()
        first = seconds if first is None else first
    memory.reset()
    runs, out = [], None
    while len(runs) < repeats and sum(runs) < max_seconds:
        seconds, out = once()
        runs.append(seconds)
    timing = Timing(min(runs), sum(runs) / len(runs), runs, first, memory.peak_gib(), memory.kind)
    return timing, out


def warmup_calls(requested: int, key: Hashable, warmed: set) -> int:
    """Warm-up calls for a forward keyed `key`: `requested` the first time, 0 once a forward of that key ran in this
    process. Eager code keys on the batch size (the same kernels: nothing left to compile or autotune; a new sequence
    length only picks cuBLAS heuristics, and the cudnn probe already planned its attention), which saves an untimed
    10 s 768px call; torch.compile'd code keys on the whole shape (every new shape compiles)."""
    calls = 0 if key in warmed else requested
    warmed.add(key)
    return calls


# ---------------------------------------------------------------- FLOPs


def linear_flops(rows: int, in_features: int, out_features: int) -> int:
    return 2 * rows * in_features * out_features


def attention_flops(sequences: int, heads: int, q_len: int, k_len: int, head_dim: int) -> int:
    """QK^T and PV of `sequences` independent attentions (batch x groups)."""
    return 4 * sequences * heads * q_len * k_len * head_dim


def counted_flops(fn: Callable[[], Any]) -> int:
    """Matmul / conv / attention FLOPs that torch's FlopCounterMode sees while fn runs (use meta tensors to
    count without computing). Used for the VAE, whose many conv shapes are easier traced than written out."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def throughput(flops: int, seconds: float, peak: float | None) -> dict[str, float | None]:
    tflops = flops / seconds / 1e12 if seconds > 0 else None
    fraction = tflops / peak if tflops is not None and peak else None
    return {"flops": int(flops), "tflops": tflops, "peak_fraction": fraction}


def relative_error(test: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """||test - ref|| / ||ref|| (Frobenius, float64) and the max absolute difference."""
    difference = test.double() - reference.double()
    return {
        "relative_error": (difference.norm() / reference.double().norm()).item(),
        "max_abs_error": difference.abs().max().item(),
    }


@contextmanager
def float32_reference() -> Iterator[None]:
    """True float32 matmuls and convolutions (no TF32) inside, for the reference side of an error check."""
    matmul, convolution = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = convolution


def official_stand_in(name: str) -> str | None:
    """The official run that times the same work as `name` when that name itself was not run: the official
    I2VDenoiser runs the same batch-3 (cond, text-uncond, image-uncond) forward every step for every cond type, so
    its i2v sampler costs what its t2v sampler costs (a GPU session times only the official t2v)."""
    if name.startswith("sampler i2v_head "):
        return "sampler t2v " + name.removeprefix("sampler i2v_head ")
    return None


def measured_name(name: str, measured) -> str | None:
    """`name` itself, else its stand-in (official_stand_in), whichever the official run measured; None if neither."""
    return next((n for n in (name, official_stand_in(name)) if n is not None and n in measured), None)


def official_time(name: str, measured: dict[str, float], quoted: dict[str, tuple[float, str]]):
    """(seconds, source) of the official figure for `name`: measured under that name, else measured under its
    stand-in, else quoted; None when there is none."""
    found = measured_name(name, measured)
    if found is None:
        return quoted.get(name)
    return measured[found], "measured" if found == name else "measured (its t2v run: the same 3 passes per step)"


def compare_with_official(
    results: list[dict[str, Any]],
    official_results: list[dict[str, Any]] | None,
    quoted_seconds: dict[str, tuple[float, str]],
    targets: dict[str, float],
) -> None:
    """Add, by result name: official_seconds, official_source ("measured" when the official run of the same name,
    or of its stand-in, is in `official_results`, else the quoted figure's source), ratio_to_official = ours /
    official, and where the issue sets a target ratio: target_ratio and meets_target (ratio < target)."""
    measured = {r["name"]: r["seconds"] for r in official_results or [] if r.get("seconds")}
    for result in results:
        name, seconds = result["name"], result.get("seconds")
        if not seconds:
            continue
        found = official_time(name, measured, quoted_seconds)
        if found is None:
            continue
        official, source = found
        ratio = seconds / official
        result.update(official_seconds=official, official_source=source, ratio_to_official=ratio)
        if name in targets:
            result.update(target_ratio=targets[name], meets_target=ratio < targets[name])


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- output


def environment(device: torch.device, dtype: torch.dtype, peak: float | None, tiny: bool) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {
        "mode": "tiny" if tiny else "full",
        "device": str(device),
        "device_name": name,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "attention_backend": attention.get_backend(),
        "attention_module": getattr(attention._kernels, "__name__", None),  # which package runs flash_attn(_3)
        "attention_requested": _ATTENTION_REQUEST["requested"] or attention.get_backend(),
        "attention_note": _ATTENTION_REQUEST["note"],
        "peak_tflops": peak,
        "cpu_threads": torch.get_num_threads(),
    }


def cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _ratio_cell(result: dict[str, Any]) -> str:
    if "ratio_to_official" not in result:
        return "-"
    source = "measured" if result["official_source"] == "measured" else "quoted"
    return f"{result['ratio_to_official']:.3f} ({source})"


def _target_cell(result: dict[str, Any]) -> str:
    if "target_ratio" not in result:
        return "-"
    return f"< {result['target_ratio']:g}: {'met' if result['meets_target'] else 'NOT met'}"


def format_table(results: list[dict[str, Any]]) -> str:
    """One line per result. `x official`: ours / official seconds, the official run measured in the same session
    or a quoted figure; `target`: the issue's ratio target; `official (quoted)`: the figure from the issues."""
    columns = [
        ("name", lambda r: r["name"]),
        ("seconds", lambda r: cell(r.get("seconds"))),
        ("s/step", lambda r: cell(r.get("seconds_per_step"))),
        ("peak GiB", lambda r: cell(r.get("peak_memory_gib"))),
        ("TFLOP/s", lambda r: cell(r.get("tflops"))),
        ("% peak", lambda r: cell(100 * r["peak_fraction"]) if r.get("peak_fraction") else "-"),
        ("passes", lambda r: f"{r['forward_passes']}/{r['official_forward_passes']}" if "forward_passes" in r else "-"),
        ("rel err", lambda r: cell(r.get("relative_error"))),
        ("x official", _ratio_cell),
        ("target", _target_cell),
        ("official (quoted)", lambda r: r.get("official_quoted") or "-"),
    ]
    return text_table([title for title, _ in columns], [[cell(r) for _, cell in columns] for r in results])


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns under a dashed rule."""
    rows = [header, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def write_json(payload: dict[str, Any], out: Path | None) -> None:
    """Write the payload (whole, replacing the file: a reader never sees half a file's worth of rows as JSON)."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    partial.replace(out)


def report(payload: dict[str, Any], out: Path | None) -> None:
    """Print the table (and the quoted reference notes), and write the JSON if asked."""
    env = payload["environment"]
    print(f"\n{payload['benchmark']} ({env['mode']}) on {env['device_name']}, {env['dtype']}, torch {env['torch']}")
    print(format_table(payload["results"]))
    for note in payload.get("notes", []):
        print(f"note: {note}")
    if out is not None:
        write_json(payload, out)
        print(f"wrote {out}")


def pack_linears(model: torch.nn.Module, qtype: str, compute_dtype: torch.dtype) -> dict:
    """Replace every Linear whose rows split into `qtype` blocks with a PackedLinear of random blocks (what a kept
    GGUF DiT runs; opensora_lib/packed_linear.py), its float16 scales small so the forward stays finite. Timing
    does not depend on the values. Returns {"qtype", "layers", "weight_gib" (the blocks)}."""
    from opensora_lib.gguf_dequant import BLOCKS, FLOAT16_FIELDS, row_bytes
    from opensora_lib.packed_linear import PackedLinear, QuantizedWeight

    values = BLOCKS[qtype][0]
    layers, nbytes = 0, 0
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, torch.nn.Linear) or layer.in_features % values:
            continue
        device = layer.weight.device
        raw = torch.randint(
            0, 256, (layer.out_features, row_bytes(qtype, layer.in_features)), dtype=torch.uint8, device=device
        )
        blocks = raw.view(-1, BLOCKS[qtype][1])
        scale = torch.tensor([2.0**-12], dtype=torch.float16, device=device).view(torch.uint8)
        for offset in FLOAT16_FIELDS[qtype]:
            blocks[:, offset : offset + 2] = scale
        packed = PackedLinear(
            QuantizedWeight(raw, qtype, (layer.out_features, layer.in_features)), False, compute_dtype
        )
        packed.bias = layer.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, packed)
        layers, nbytes = layers + 1, nbytes + raw.numel()
    return {"qtype": qtype, "layers": layers, "weight_gib": nbytes / 2**30}
