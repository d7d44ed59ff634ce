"""STDiT3 (Open-Sora 1.2 / 1.3) benchmark: seconds, peak memory and TFLOP/s per forward and per sampler step,
and the bf16-vs-float32 relative error of one forward.

Default (GPU): the full-size STDiT3-XL/2 with random weights in bf16, forward with the CFG batch 2 at 360p 49
frames and 720p 113 frames, a 30-step RFlow run at both sizes (official 1.x settings), and the error at 360p.
--tiny --device cpu runs the same code on a tiny config (the check that the script works).

    python benchmarks/bench_stdit3.py --out stdit3.json
    python benchmarks/bench_stdit3.py --tiny --device cpu --out /tmp/stdit3.json
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: opensora_lib and benchmarks

import torch

from benchmarks.common import (
    DTYPES,
    VideoSize,
    add_common_arguments,
    add_dit_arguments,
    attention_flops,
    dit_runs,
    environment,
    float32_reference,
    linear_flops,
    measure,
    parameter_count,
    peak_tflops,
    relative_error,
    release_memory,
    report,
    setup,
    throughput,
)
from opensora_lib.rflow import RFlowOptions, RFlowText, sample_rflow
from opensora_lib.sizes import latent_shape
from opensora_lib.stdit3 import STDiT3, STDiT3Config, stdit3_v12_config, stdit3_v13_config
from opensora_lib.stdit3_layers import set_compiled_kernels, window_groups

ASPECT_RATIO = "9:16"  # 1.x aspect strings are H:W, so 720p 9:16 is 720x1280
TIMESTEP = 900.0
FPS = 24.0
# Like the stdit3_v1x_forward fixtures: same structure, small widths.
TINY = {"depth": 2, "hidden_size": 96, "num_heads": 4, "caption_channels": 32, "model_max_length": 12}
DEFAULTS = {
    "full": {"forward": ["360p:49:2", "720p:113:2"], "sampler": ["360p:49", "720p:113"], "error": "360p:49:2"},
    "tiny": {"forward": ["64x144:17:2"], "sampler": ["64x144:17"], "error": "64x144:17:2"},
}
DEFAULT_STEPS = {"full": 30, "tiny": 12}
# Figures quoted from the issues (official code, one H200); not measured here.
OFFICIAL = {
    "forward 720p 113f b2": "~4.4 s, ~170 TFLOP/s (H200, bf16, SDPA flash)",
    "forward 360p 49f b2": "~0.45 s (H200, bf16)",
    "sampler 720p 113f b1 30 steps": "157 s, 35 GB (whole 1.3 run)",
    "sampler 360p 49f b1 30 steps": "16 s, 23 GB (whole 1.3 run)",
}


def stdit3_flops(config: STDiT3Config, batch: int, latent: tuple[int, int, int], text_tokens: int) -> int:
    """Matmul FLOPs of one t2v forward of `batch` latents [C, T, H, W] (latent = (T, H, W)) with `text_tokens`
    valid caption tokens per sample (the model trims captions to the longest one)."""
    c = config
    frames, rows, cols = (math.ceil(size / patch) for size, patch in zip(latent, c.patch_size))
    per_frame, video = rows * cols, frames * rows * cols
    tokens, text = batch * video, batch * text_tokens
    hidden, heads, head_dim, mlp = c.hidden_size, c.num_heads, c.head_dim, int(c.hidden_size * c.mlp_ratio)
    patch = math.prod(c.patch_size)

    flops = linear_flops(tokens, c.in_channels * patch, hidden)  # x_embedder: a Conv3d over whole patches
    flops += 2 * (linear_flops(batch, 256, hidden) + linear_flops(batch, hidden, hidden))  # t and fps embedders
    flops += linear_flops(batch, hidden, 6 * hidden)  # t_block
    flops += linear_flops(text, c.caption_channels, hidden) + linear_flops(text, hidden, hidden)  # y_embedder
    block = (
        linear_flops(tokens, hidden, 3 * hidden)  # attn.qkv
        + linear_flops(tokens, hidden, hidden)  # attn.proj
        + 2 * linear_flops(tokens, hidden, hidden)  # cross_attn.q_linear, cross_attn.proj
        + linear_flops(text, hidden, 2 * hidden)  # cross_attn.kv_linear
        + attention_flops(batch, heads, video, text_tokens, head_dim)  # cross attention
        + linear_flops(tokens, hidden, mlp)
        + linear_flops(tokens, mlp, hidden)
    )
    spatial = attention_flops(batch * frames, heads, per_frame, per_frame, head_dim)
    flops += c.depth * (block + spatial)
    if not c.skip_temporal:
        window = c.kernel_size[:2] if c.kernel_size is not None else (1, 1)  # 1.2: each token over all frames
        groups = window_groups(batch, frames, rows, cols, window)
        temporal = sum(attention_flops(g.count, heads, g.length, g.length, head_dim) for g in groups)
        flops += c.depth * (block + temporal)
    return flops + linear_flops(tokens, hidden, patch * c.out_channels)  # final_layer


def model_config(version: str, tiny: bool) -> STDiT3Config:
    config = stdit3_v13_config() if version == "1.3" else stdit3_v12_config()
    return dataclasses.replace(config, **TINY) if tiny else config


def forward_inputs(config: STDiT3Config, version: str, size: VideoSize, text_tokens: int, dtype, device) -> dict:
    frames, height, width = latent_shape(version, size.num_frames, size.height, size.width)
    batch = size.batch
    mask = torch.zeros(batch, config.model_max_length, dtype=torch.long, device=device)
    mask[:, :text_tokens] = 1
    return {
        "x": torch.randn(batch, config.in_channels, frames, height, width, device=device, dtype=dtype),
        "timestep": torch.full((batch,), TIMESTEP, device=device),
        "y": torch.randn(batch, 1, config.model_max_length, config.caption_channels, device=device),
        "mask": mask,
        "fps": torch.full((batch,), FPS, device=device),
        "height": torch.full((batch,), float(size.height), device=device),
        "width": torch.full((batch,), float(size.width), device=device),
    }


def bench_forward(model, config, version, size, text_tokens, args, device, dtype, peak) -> dict:
    inputs = forward_inputs(config, version, size, text_tokens, dtype, device)
    latent = tuple(inputs["x"].shape[2:])
    timing, out = measure(lambda: model(**inputs), device, args.repeats, args.warmup, args.max_seconds)
    flops = stdit3_flops(config, size.batch, latent, text_tokens)
    name = f"forward {size.name}"
    return {
        "name": name,
        "kind": "forward",
        **dataclasses.asdict(size),
        "latent_shape": list(inputs["x"].shape),
        "tokens_per_sample": math.prod(math.ceil(s / p) for s, p in zip(latent, config.patch_size)),
        "text_tokens": text_tokens,
        **dataclasses.asdict(timing),
        **throughput(flops, timing.seconds, peak),
        "finite": bool(torch.isfinite(out).all()),
        "official_quoted": OFFICIAL.get(name),
    }


def sampler_options(version: str, steps: int) -> RFlowOptions:
    """The official inference settings: 1.3 t2v.py (cfg 7.5, oscillation, flaw fix), 1.2 sample.py (cfg 7)."""
    if version == "1.3":
        return RFlowOptions(
            num_steps=steps, cfg_scale=7.5, version="1.3", use_oscillation_guidance=True, use_flaw_fix=True
        )
    return RFlowOptions(num_steps=steps, cfg_scale=7.0, version="1.2")


def bench_sampler(model, config, version, size, steps, text_tokens, device, dtype, peak) -> dict:
    frames, height, width = latent_shape(version, size.num_frames, size.height, size.width)
    batch_rows: list[int] = []

    def call(x, timestep, **kwargs):  # one call per step on the CFG batch; counts the passes
        batch_rows.append(x.shape[0])
        return model(x.to(dtype), timestep, **kwargs)

    z = torch.randn(size.batch, config.in_channels, frames, height, width, device=device)
    mask = torch.zeros(size.batch, config.model_max_length, dtype=torch.long, device=device)
    mask[:, :text_tokens] = 1
    y = torch.randn(size.batch, 1, config.model_max_length, config.caption_channels, device=device)
    text = RFlowText(y=y, mask=mask, y_null=model.y_embedder.y_embedding.float())
    options = sampler_options(version, steps)

    def run():
        batch_rows.clear()
        return sample_rflow(
            call, z, text, options, height=size.height, width=size.width, num_frames=size.num_frames, fps=FPS
        )

    # Untimed: the one- and two-pass batch shapes once, so torch.compile's specialisations are not timed.
    for rows in (size.batch, 2 * size.batch):
        model(**forward_inputs(config, version, dataclasses.replace(size, batch=rows), text_tokens, dtype, device))
    timing, out = measure(run, device, repeats=1, warmup=0)
    flops = sum(stdit3_flops(config, rows, (frames, height, width), text_tokens) for rows in batch_rows)
    name = f"sampler {size.name} {steps} steps"
    return {
        "name": name,
        "kind": "sampler",
        **dataclasses.asdict(size),
        "steps": steps,
        "text_tokens": text_tokens,
        **dataclasses.asdict(timing),
        "seconds_per_step": timing.seconds / steps,
        "model_calls": len(batch_rows),
        "forward_passes": sum(batch_rows) // size.batch,
        "official_forward_passes": 2 * steps,  # the official RFLOW always runs the cond + uncond batch
        **throughput(flops, timing.seconds, peak),
        "finite": bool(torch.isfinite(out).all()),
        "official_quoted": OFFICIAL.get(name),
    }


def bench_precision(model, config, version, size, text_tokens, device, dtype, compiled: bool) -> dict:
    """float32 forward, then the same weights cast to `dtype` (in place) on the same inputs."""
    inputs = forward_inputs(config, version, size, text_tokens, torch.float32, device)
    set_compiled_kernels(False)  # same maths; skips compiling float32 kernels that are used once
    try:
        with float32_reference():
            reference = model(**inputs)
    finally:
        set_compiled_kernels(compiled)
    model.to(dtype)
    test = model(**{**inputs, "x": inputs["x"].to(dtype)})
    velocity = slice(0, config.in_channels)  # the sampler uses these; the learned-sigma half is unused
    return {
        "name": f"error {str(dtype).removeprefix('torch.')} vs fp32 {size.name}",
        "kind": "precision",
        **dataclasses.asdict(size),
        "text_tokens": text_tokens,
        "channels": f"velocity (first {config.in_channels} of {config.out_channels})",
        **relative_error(test[:, velocity], reference[:, velocity]),
        "finite": bool(torch.isfinite(test).all()),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--version", choices=("1.3", "1.2"), default="1.3")
    add_dit_arguments(parser, "720p:113:2 or 64x112:17:2", DEFAULT_STEPS["full"])
    parser.add_argument("--text-tokens", type=int, default=None, help="valid caption tokens (default: all)")
    parser.add_argument("--no-compile", action="store_true", help="eager element-wise kernels (no torch.compile)")
    args = parser.parse_args(argv)
    device = setup(args)
    dtype = DTYPES[args.dtype]
    mode = "tiny" if args.tiny else "full"
    set_compiled_kernels(not args.no_compile)

    config = model_config(args.version, args.tiny)
    text_tokens = args.text_tokens or config.model_max_length
    if not 1 <= text_tokens <= config.model_max_length:
        raise SystemExit(f"--text-tokens must be in [1, {config.model_max_length}], got {text_tokens}")
    runs = dit_runs(args, DEFAULTS[mode], DEFAULT_STEPS[mode], args.version, ASPECT_RATIO, dtype)
    peak = peak_tflops(device, dtype, args.peak_tflops)

    # Random weights; built in float32 first when the error check needs the float32 copy, then cast in place.
    torch.manual_seed(args.seed)
    model = STDiT3(config, dtype=torch.float32 if runs.error else dtype, device=device).eval()
    results = []
    if runs.error is not None:
        results.append(
            bench_precision(model, config, args.version, runs.error, text_tokens, device, dtype, not args.no_compile)
        )
    release_memory(device)
    for size in runs.forward:
        results.append(bench_forward(model, config, args.version, size, text_tokens, args, device, dtype, peak))
    for size in runs.sampler:
        results.append(bench_sampler(model, config, args.version, size, runs.steps, text_tokens, device, dtype, peak))

    payload = {
        "benchmark": f"stdit3 v{args.version}",
        "environment": environment(device, dtype, peak, args.tiny),
        "model": {
            "config": dataclasses.asdict(config),
            "parameters": parameter_count(model),
            "compiled_kernels": not args.no_compile,
        },
        "results": results,
        "notes": [
            "random weights; FLOPs are matmul FLOPs counted from the config (benchmarks/common.py)",
            "official (quoted): figures from the issues for the official code, not measured by this script",
            "sampler: our run skips passes whose guidance is exactly 1 (oscillation); official runs 2 per step",
        ],
    }
    report(payload, args.out)
    return payload


if __name__ == "__main__":
    main()
