"""Open-Sora 2.0 MMDiT benchmark: seconds, peak memory and TFLOP/s per forward and per 50-step run, forward
passes done vs the official 3 per step, and the bf16-vs-float32 relative error of one forward.

Default (GPU): the full-size 11B MMDiT with random weights in bf16; forward at 256px 16:9 129 frames (8316 image
tokens + 512 text) with batch 3 (the official step) and 1, forward at 768px batch 1, 50-step t2v and i2v_head
runs at 256px with the shipped sampler settings, and the error at 256px batch 1. --tiny --device cpu: a tiny
config. Each timed row is compared with the official code's time: measured by official_mmdit.py in the same
session (--official-json), else the figure quoted in the issues.

    python benchmarks/bench_mmdit.py --out mmdit.json
    python benchmarks/bench_mmdit.py --attention cudnn --official-json official_mmdit.json --out mmdit.json
    python benchmarks/bench_mmdit.py --tiny --device cpu --out /tmp/mmdit.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: opensora_lib and benchmarks

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import (
    DTYPES,
    VideoSize,
    add_common_arguments,
    add_dit_arguments,
    attention_flops,
    compare_with_official,
    dit_runs,
    environment,
    float32_reference,
    linear_flops,
    measure,
    pack_linears,
    parameter_count,
    peak_tflops,
    probe_cudnn_attention,
    relative_error,
    release_memory,
    report,
    setup,
    throughput,
    warmup_calls,
    write_json,
)
from opensora_lib import attention, fused_ops, mmdit_layers
from opensora_lib.gguf_dequant import BLOCKS
from opensora_lib.mmdit import MMDiT, MMDiTConfig, mmdit_v2_config
from opensora_lib.sampling_v2 import PASSES, V2SamplingOptions, image_ids, pass_plan, sample_v2, text_ids
from opensora_lib.sizes import latent_shape

VERSION = "2.0"
ASPECT_RATIO = "16:9"  # 2.0 aspect strings are W:H, so 256px 16:9 is 192x336
TIMESTEP = 0.7
# Like the mmdit_v2_forward fixture: same structure, small widths.
TINY = {
    "vec_in_dim": 16,
    "context_in_dim": 32,
    "hidden_size": 128,
    "mlp_ratio": 2.0,
    "num_heads": 2,
    "depth": 2,
    "depth_single_blocks": 2,
    "axes_dim": [8, 28, 28],
}
DEFAULTS = {
    "full": {
        "forward": ["256px:129:3", "256px:129:1", "768px:129:1"],
        "sampler": ["256px:129"],
        "error": "256px:129:1",
    },
    "tiny": {"forward": ["64x96:9:3", "64x96:9:1"], "sampler": ["64x96:9"], "error": "64x96:9:1"},
}
DEFAULT_STEPS = {"full": 50, "tiny": 12}
# t2v, and i2v from a first frame (the cond_type of the official 256px config's image-to-video use).
COND_TYPES = ("t2v", "i2v_head")
# The 2.0 T5 takes max_length 512 and the model attends to every token (no mask); tiny uses fewer.
DEFAULT_TEXT_TOKENS = {"full": 512, "tiny": 7}
# Figures quoted from the issues (official code); not measured here.
OFFICIAL = {
    "forward 256px 129f b3": "~1.26 s, ~400 TFLOP/s (H200, bf16)",
    "forward 256px 129f b1": "~0.42 s (H200, bf16)",
    "forward 768px 129f b1": "~14.1 s (H200, bf16)",
    "sampler t2v 256px 129f b1 50 steps": "60 s, 52.5 GB (whole 256px generation, H100); DiT ~63 s = 50 x 1.26 s",
    "sampler i2v_head 256px 129f b1 50 steps": "DiT ~63 s = 50 x 1.26 s (3 passes every step, H200)",
}
# The same as seconds, for the ratio when the official code was not measured in the session. The official
# denoiser runs one batch-3 forward per step whatever the cond_type, so its DiT time is 50 x the b3 forward.
_QUOTED = "quoted (issue #5, H200, bf16, SDPA)"
OFFICIAL_SECONDS = {
    "forward 256px 129f b3": (1.26, _QUOTED),
    "forward 256px 129f b1": (0.42, _QUOTED),
    "forward 768px 129f b1": (14.1, _QUOTED),
    "sampler t2v 256px 129f b1 50 steps": (50 * 1.26, "quoted b3 forward x 50 steps"),
    "sampler i2v_head 256px 129f b1 50 steps": (50 * 1.26, "quoted b3 forward x 50 steps"),
}
# Issue #5's targets: our time / the official time on the same GPU.
TARGETS = {
    "sampler t2v 256px 129f b1 50 steps": 0.45,
    "sampler i2v_head 256px 129f b1 50 steps": 0.65,
    "forward 768px 129f b1": 0.6,
}


def mmdit_flops(config: MMDiTConfig, batch: int, image_tokens: int, text_tokens: int) -> int:
    """Matmul FLOPs of one forward of `batch` samples of packed image tokens plus text tokens."""
    c = config
    hidden, heads, head_dim, mlp = c.hidden_size, c.num_heads, c.head_dim, int(c.hidden_size * c.mlp_ratio)
    image, text = batch * image_tokens, batch * text_tokens
    joint_len = image_tokens + text_tokens
    joint = batch * joint_len

    flops = linear_flops(image, c.in_channels, hidden)  # img_in
    if c.cond_embed:
        flops += linear_flops(image, c.in_channels + c.patch_size**2, hidden)  # cond_in
    embedders = [256, c.vec_in_dim] + ([256] if c.guidance_embed else [])  # time_in, vector_in, guidance_in
    flops += sum(linear_flops(batch, width, hidden) + linear_flops(batch, hidden, hidden) for width in embedders)
    flops += linear_flops(text, c.context_in_dim, hidden)  # txt_in
    attention = attention_flops(batch, heads, joint_len, joint_len, head_dim)  # joint [txt, img] attention
    double = (
        2 * linear_flops(batch, hidden, 6 * hidden)  # img_mod, txt_mod
        + linear_flops(joint, hidden, 3 * hidden)  # q, k, v of both streams
        + attention
        + linear_flops(joint, hidden, hidden)  # proj of both streams
        + linear_flops(joint, hidden, mlp)
        + linear_flops(joint, mlp, hidden)
    )
    single = (
        linear_flops(batch, hidden, 3 * hidden)  # modulation
        + linear_flops(joint, hidden, 3 * hidden + mlp)  # q, k and the shared v / MLP input
        + attention
        + linear_flops(joint, hidden + mlp, hidden)  # linear2
    )
    flops += c.depth * double + c.depth_single_blocks * single
    return flops + linear_flops(batch, hidden, 2 * hidden) + linear_flops(image, hidden, c.out_channels)  # final


def model_config(tiny: bool) -> MMDiTConfig:
    config = mmdit_v2_config()
    return dataclasses.replace(config, **TINY) if tiny else config


def latent_geometry(config: MMDiTConfig, size: VideoSize) -> tuple[int, int, int, int]:
    """(latent channels, T, H, W) of the unpacked latent."""
    frames, height, width = latent_shape(VERSION, size.num_frames, size.height, size.width)
    return config.in_channels // config.patch_size**2, frames, height, width


def forward_inputs(config: MMDiTConfig, size: VideoSize, text_tokens: int, dtype, device) -> dict:
    _, frames, height, width = latent_geometry(config, size)
    patch, batch = config.patch_size, size.batch
    tokens = frames * (height // patch) * (width // patch)
    return {
        "img": torch.randn(batch, tokens, config.in_channels, device=device, dtype=dtype),
        "img_ids": image_ids(frames, height, width, patch, device=device).to(dtype),
        "txt": torch.randn(batch, text_tokens, config.context_in_dim, device=device, dtype=dtype),
        "txt_ids": text_ids(text_tokens, device=device).to(dtype),
        "timesteps": torch.full((batch,), TIMESTEP, device=device),  # float32, as the sampler's state
        "y_vec": torch.randn(batch, config.vec_in_dim, device=device, dtype=dtype),
        "cond": torch.zeros(batch, tokens, config.in_channels + patch**2, device=device, dtype=dtype),  # t2v
    }


def bench_forward(model, config, size, text_tokens, args, device, dtype, peak, warmup: int) -> dict:
    inputs = forward_inputs(config, size, text_tokens, dtype, device)
    image_tokens = inputs["img"].shape[1]
    timing, out = measure(lambda: model(**inputs), device, args.repeats, warmup, args.max_seconds)
    return forward_row(config, size, image_tokens, text_tokens, timing, out, peak)


def forward_row(config, size, image_tokens: int, text_tokens: int, timing, out, peak) -> dict:
    """One forward's result row (ours and the official one are reported alike)."""
    name = f"forward {size.name}"
    return {
        "name": name,
        "kind": "forward",
        **dataclasses.asdict(size),
        "image_tokens": image_tokens,
        "text_tokens": text_tokens,
        **dataclasses.asdict(timing),
        **throughput(mmdit_flops(config, size.batch, image_tokens, text_tokens), timing.seconds, peak),
        "finite": bool(torch.isfinite(out).all()),
        "official_quoted": OFFICIAL.get(name),
    }


def sampler_inputs(config: MMDiTConfig, size: VideoSize, text_tokens: int, device) -> dict:
    """Random initial noise, text states (prompt and negative) and a one-frame reference latent, float32."""
    channels, frames, height, width = latent_geometry(config, size)
    batch = size.batch
    return {
        "noise": torch.randn(batch, channels, frames, height, width, device=device),
        "text": {
            "t5": torch.randn(batch, text_tokens, config.context_in_dim, device=device),
            "pooled": torch.randn(batch, config.vec_in_dim, device=device),
            "neg_t5": torch.randn(batch, text_tokens, config.context_in_dim, device=device),
            "neg_pooled": torch.randn(batch, config.vec_in_dim, device=device),
        },
        "reference": torch.randn(batch, channels, 1, height, width, device=device),  # encoded first frame
    }


def sampler_name(cond_type: str, size: VideoSize, steps: int) -> str:
    return f"sampler {cond_type} {size.name} {steps} steps"


def bench_sampler(model, config, size, steps, text_tokens, cond_type, device, dtype, peak) -> dict:
    _, frames, height, width = latent_geometry(config, size)
    image_tokens = frames * (height // config.patch_size) * (width // config.patch_size)
    batch_rows: list[int] = []
    passes_per_step: list[int] = []

    def call(**kwargs):  # counts the rows of every model call
        batch_rows.append(kwargs["img"].shape[0])
        return model(**kwargs)

    inputs = sampler_inputs(config, size, text_tokens, device)
    cond = inputs["reference"] if cond_type != "t2v" else None
    options = V2SamplingOptions(num_steps=steps, model_dtype=dtype)  # shipped 256px.py: guidance 7.5, oscillation

    def run():
        batch_rows.clear()
        passes_per_step.clear()
        callback = lambda info: passes_per_step.append(len(info["passes"]))  # noqa: E731
        return sample_v2(
            call, inputs["noise"], inputs["text"], options, cond=cond, cond_type=cond_type, callback=callback
        )

    # Untimed: one forward of each batch shape the run uses, so first-call costs are not timed.
    for rows in sorted({len(passes) * size.batch for passes in pass_plan(options, cond_type, frames)}):
        model(**forward_inputs(config, dataclasses.replace(size, batch=rows), text_tokens, dtype, device))
    timing, out = measure(run, device, repeats=1, warmup=0)
    row = sampler_row(config, size, steps, cond_type, image_tokens, text_tokens, timing, out, batch_rows, peak)
    return {**row, "passes_per_step": passes_per_step}


def sampler_row(config, size, steps: int, cond_type: str, image_tokens: int, text_tokens: int, timing, out, rows, peak):
    """One whole sampler run's result row; `rows` = the batch rows of every model call (ours and the official)."""
    name = sampler_name(cond_type, size, steps)
    flops = sum(mmdit_flops(config, batch, image_tokens, text_tokens) for batch in rows)
    return {
        "name": name,
        "kind": "sampler",
        "cond_type": cond_type,
        **dataclasses.asdict(size),
        "steps": steps,
        "image_tokens": image_tokens,
        "text_tokens": text_tokens,
        **dataclasses.asdict(timing),
        "seconds_per_step": timing.seconds / steps,
        "model_calls": len(rows),
        "forward_passes": sum(rows) // size.batch,
        "official_forward_passes": len(PASSES) * steps,  # the official denoiser always runs all three
        **throughput(flops, timing.seconds, peak),
        "finite": bool(torch.isfinite(out).all()),
        "official_quoted": OFFICIAL.get(name),
    }


def bench_precision(model, config, size, text_tokens, device, dtype) -> dict:
    """float32 forward, then the same weights cast to `dtype` (in place) on the same inputs."""
    inputs = forward_inputs(config, size, text_tokens, torch.float32, device)
    with float32_reference():
        reference = model(**inputs)
    model.to(dtype)
    cast = {k: v.to(dtype) if k != "timesteps" else v for k, v in inputs.items()}
    test = model(**cast)
    return {
        "name": f"error {str(dtype).removeprefix('torch.')} vs fp32 {size.name}",
        "kind": "precision",
        **dataclasses.asdict(size),
        "text_tokens": text_tokens,
        **relative_error(test.float(), reference),
        "finite": bool(torch.isfinite(test).all()),
    }


def buffered_forms_check(model: MMDiT, device, dtype, text_tokens: int = 64, image_tokens: int = 1024) -> dict:
    """The eager forms that write into buffers or over spent tensors (RoPE into one joint q / k, by the Triton kernel
    where it passed its self-check, linear2's input over the v + MLP projection, GELU in place) against the plain
    forms, on the model's first double and single block on this device: identical values, bit for bit, is what the
    CPU tests show; this checks the device's kernels (the strided out= and in-place writes) too."""
    generator = torch.Generator().manual_seed(0)
    hidden = model.config.hidden_size

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    img, txt, vec = randn(2, image_tokens, hidden), randn(2, text_tokens, hidden), randn(2, hidden)
    pe = model.rope(torch.randint(0, 32, (1, text_tokens + image_tokens, 3), generator=generator).float().to(device))

    def run():
        with torch.no_grad():
            double, single = model.double_blocks[0], model.single_blocks[0]
            return (*double(img, txt, vec, pe), single(torch.cat((txt, img), 1), vec, pe))

    allowed = []  # what eager_out_allowed answered: the buffered forms must really have run

    real_answer = mmdit_layers.eager_out_allowed

    def spy(*tensors):
        allowed.append(real_answer(*tensors))
        return allowed[-1]

    used = fused_ops.uses()  # the fast eager forms' runs (self-checks included); 0 where none is used
    with mock.patch.object(mmdit_layers, "eager_out_allowed", spy):
        buffered = run()
    used = fused_ops.uses() - used
    with mock.patch.object(mmdit_layers, "eager_out_allowed", lambda *tensors: False):
        plain = run()
    return {
        "buffered_forms_ran": bool(allowed) and all(allowed),
        "fused_ops_uses": used,
        "fused_ops": fused_ops.state(),
        "bit_identical": all(torch.equal(a, b) for a, b in zip(buffered, plain)),
        "max_abs_difference": max((a.float() - b.float()).abs().max().item() for a, b in zip(buffered, plain)),
        "tokens": [text_tokens, image_tokens],
    }


def read_official(path: Path | None) -> tuple[list[dict], str | None]:
    """Results of official_mmdit.py (same names as ours), and a line saying where they come from."""
    if path is None:
        return [], None
    if not path.is_file():
        raise SystemExit(f"--official-json {path}: no such file (run benchmarks/official_mmdit.py first)")
    payload = json.loads(path.read_text())
    env = payload.get("environment", {})
    where = f"{payload.get('official_commit', '?')[:12]} on {env.get('device_name', '?')}"
    return payload.get("results", []), f"x official: measured by official_mmdit.py ({where}) where the name matches"


def cudnn_probes(config: MMDiTConfig, sizes: list[VideoSize], text_tokens: int, device, dtype) -> dict[str, str]:
    """Whether cuDNN attention alone takes each benchmarked joint sequence (batch 1; the kernel is per sequence)."""
    probes = {}
    for size in sizes:
        _, frames, height, width = latent_geometry(config, size)
        length = frames * (height // config.patch_size) * (width // config.patch_size) + text_tokens
        key = f"{size.label} {size.num_frames}f ({length} tokens)"
        if key not in probes:
            probes[key] = probe_cudnn_attention(device, dtype, 1, config.num_heads, length, config.head_dim)
    return probes


# Joint sequences up to this length also get the float32 reference of the attention-kernel rows (at 768px the
# float32 attention alone would take seconds per call).
ERROR_TOKENS = 16_384


# The attention-kernel rows' extra entry: torch SDPA held to its FlashAttention-2 kernel, the official code's path
# (plain sdpa lets torch choose: cuDNN on the H200 with torch 2.11).
SDPA_FLASH = "sdpa_flash"


def attention_kernels(config: MMDiTConfig, sizes: list[VideoSize], text_tokens: int, args, device, dtype, peak):
    """One joint attention call per forward size ([B, L, heads, D] views, as the blocks pass them) through every
    backend this process can select (not math on a GPU: it would hold the whole score matrix) and SDPA_FLASH:
    seconds, TFLOP/s, and up to ERROR_TOKENS the error against float32 attention of the same inputs. What the
    backend choice alone changes, apart from the rest of the forward. The packages' kernels run last, so that one
    failing badly cannot cost the torch kernels' rows."""
    available = [name for name in attention.available_backends() if device.type == "cpu" or name != "math"]
    backends = [name for name in available if name not in attention._PACKAGES]
    backends = [backends[0], SDPA_FLASH, *backends[1:], *(name for name in available if name in attention._PACKAGES)]
    selected, rows = attention.get_backend(), []
    try:
        for size in sizes:
            rows += _attention_rows(config, size, text_tokens, backends, args, device, dtype, peak)
            release_memory(device)
    finally:
        attention.set_backend(selected)
    return rows


def _sdpa_flash(q, k, v):
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _attention_rows(config: MMDiTConfig, size: VideoSize, text_tokens, backends, args, device, dtype, peak):
    _, frames, height, width = latent_geometry(config, size)
    length = frames * (height // config.patch_size) * (width // config.patch_size) + text_tokens
    generator = torch.Generator(device).manual_seed(0)
    shape = (size.batch, length, config.num_heads, config.head_dim)
    qkv = [torch.randn(shape, generator=generator, device=device, dtype=dtype).transpose(1, 2) for _ in "qkv"]
    reference = None
    if length <= ERROR_TOKENS:
        with float32_reference():
            reference = torch.nn.functional.scaled_dot_product_attention(*(t.float() for t in qkv))
    flops = attention_flops(size.batch, config.num_heads, length, length, config.head_dim)
    rows = []
    for backend in backends:
        row = {"name": f"attention {size.name} {backend}", "kind": "attention", "backend": backend}
        row["shape"] = list(qkv[0].shape)
        if backend != SDPA_FLASH:
            attention.set_backend(backend)
        call = _sdpa_flash if backend == SDPA_FLASH else attention.attention
        try:
            timing, out = measure(lambda: call(*qkv), device, args.repeats, 1, args.max_seconds)  # noqa: B023
        except Exception as e:  # a kernel that fails here is a finding: the other backends' rows still count
            rows.append({**row, "error": " ".join(f"{type(e).__name__}: {e}".split())[:500]})
            continue
        rows.append(
            {
                **row,
                **dataclasses.asdict(timing),
                **throughput(flops, timing.seconds, peak),
                **(relative_error(out.float(), reference) if reference is not None else {}),
                "finite": bool(torch.isfinite(out).all()),
            }
        )
    return rows


def compile_blocks(model: MMDiT, backend: str) -> None:
    """torch.compile each block in place with static shapes: the blocks of one kind share their code, so each kind
    compiles once per input shape (every new shape's first call is untimed). Static, because automatic dynamic
    shapes would turn the sequence length symbolic once a second resolution runs in the process; a user's
    TorchCompileModel sees one resolution per run (only the batch rows change)."""
    for block in (*model.double_blocks, *model.single_blocks):
        block.compile(backend=backend, dynamic=False)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    add_dit_arguments(parser, "256px:129:3 or 64x96:9:1", DEFAULT_STEPS["full"])
    parser.add_argument("--text-tokens", type=int, default=None, help="T5 tokens (default 512; tiny 7)")
    parser.add_argument(
        "--cond-types", nargs="*", choices=COND_TYPES, default=list(COND_TYPES), help="sampler runs (default both)"
    )
    parser.add_argument("--official-json", type=Path, default=None, help="official_mmdit.py results, for the ratios")
    parser.add_argument(
        "--compile-blocks",
        choices=("off", "inductor", "eager"),
        default="off",
        help="torch.compile every double / single block (what core's TorchCompileModel gives a user); eager: the "
        "code path only (CPU dry run)",
    )
    parser.add_argument(
        "--attention-kernels",
        action="store_true",
        help="also time one joint attention call per forward size through every available backend",
    )
    parser.add_argument(
        "--packed",
        choices=sorted(BLOCKS),
        default=None,
        help="time the DiT with its Linear weights kept in GGUF blocks of this type, expanded at each forward (as "
        "Load Open-Sora DiT keeps a GGUF file; random blocks)",
    )
    args = parser.parse_args(argv)
    device = setup(args)
    dtype = DTYPES[args.dtype]
    mode = "tiny" if args.tiny else "full"

    config = model_config(args.tiny)
    text_tokens = args.text_tokens or DEFAULT_TEXT_TOKENS[mode]
    runs = dit_runs(args, DEFAULTS[mode], DEFAULT_STEPS[mode], VERSION, ASPECT_RATIO, dtype)
    peak = peak_tflops(device, dtype, args.peak_tflops)
    official_results, official_note = read_official(args.official_json)
    env = environment(device, dtype, peak, args.tiny)
    if attention.get_backend() == "cudnn":
        env["cudnn_attention_probe"] = cudnn_probes(config, runs.forward + runs.sampler, text_tokens, device, dtype)

    # Random weights; built in float32 first when the error check needs the float32 copy, then cast in place.
    torch.manual_seed(args.seed)
    model = MMDiT(config, dtype=torch.float32 if runs.error else dtype, device=device).eval()
    results = []
    if runs.error is not None:
        results.append(bench_precision(model, config, runs.error, text_tokens, device, dtype))  # before any write
    env["buffered_forms_check"] = buffered_forms_check(model, device, dtype)
    parameters = parameter_count(model)  # before packing: a packed weight's elements are its bytes
    if args.packed:
        env["packed"] = pack_linears(model, args.packed, dtype)
    release_memory(device)
    if args.compile_blocks != "off":
        compile_blocks(model, args.compile_blocks)
        env["compiled_blocks"] = args.compile_blocks
    payload = {
        "benchmark": "mmdit v2.0" + (f", Linear weights kept as GGUF {args.packed}" if args.packed else ""),
        "environment": env,
        "model": {"config": dataclasses.asdict(config), "parameters": parameters},
        "results": results,
        "notes": [
            "random weights; FLOPs are matmul FLOPs counted from the config (benchmarks/common.py)",
            "official (quoted): figures from the issues for the official code, not measured by this script",
            official_note or "x official: ours / the quoted official figure (no --official-json given)",
            "sampler: t2v skips the uncond-all pass (identical to uncond-text) and 1.0-guidance passes, i2v the "
            "passes of 1.0-guidance steps; the official denoiser runs 3 per step",
        ],
        "complete": False,
    }

    def add(result: dict) -> None:
        """Keep a row and write what is done so far: a run its time limit kills still leaves its finished rows."""
        results.append(result)
        env["fused_ops"] = fused_ops.state()  # as of the rows so far: a form refused while timing shows here
        compare_with_official(results, official_results, OFFICIAL_SECONDS, TARGETS)
        write_json(payload, args.out)

    if args.attention_kernels:
        for row in attention_kernels(config, runs.forward, text_tokens, args, device, dtype, peak):
            add(row)
    warmed: set = set()
    for size in runs.forward:
        key = size.batch if args.compile_blocks == "off" else (size.batch, size.label, size.num_frames)
        warmup = warmup_calls(args.warmup, key, warmed)
        add(bench_forward(model, config, size, text_tokens, args, device, dtype, peak, warmup))
    for size in runs.sampler:
        for cond_type in args.cond_types:
            add(bench_sampler(model, config, size, runs.steps, text_tokens, cond_type, device, dtype, peak))
    payload["complete"] = True
    report(payload, args.out)
    return payload


if __name__ == "__main__":
    main()
