"""Open-Sora 2.0 under ComfyUI's memory manager: a whole 256px generation within a VRAM budget (issue #5).

Default (one GPU): the full-size 11B MMDiT (22.1 GiB of bf16 weights) is built through the pack's
build_mmdit_patcher from an in-memory random bf16 state dict (no file is written), the GPU is capped at
--budget-gib (default 24), and the 2.0 Sampler node's function (nodes/sampling_v2.sample_v2_node) runs a t2v of
256px 16:9 (192x336), 129 frames, with the shipped settings (cfg 7.5, oscillation) on random T5 [1, 512, 4096]
and CLIP-L pooled [1, 768] conditioning (no text encoder runs). The node loads the model itself through
nodes/common.load_for_sampling, i.e. comfy.model_management.load_models_gpu, so ComfyUI decides what stays
resident and what is streamed per forward (its "lowvram" partial loading). Recorded: seconds (load, first step,
per step), steps/s, torch.cuda.max_memory_allocated / reserved, weight bytes resident vs streamed (the patcher's
loaded_size vs model_size), the memory_required the pack passed, and PASS/FAIL against the budget. Then (--decode,
default on) the shipped workflow's decode in the same budget: core VAEDecodeTiled (256 / 64 / 4096 / 8) on the
sampled latent, through the pack's HunyuanVideo VAE fix, with core's VAE built from random weights in the
hunyuan_vae.safetensors layout (ComfyUI offloads the DiT for it); the verdict covers both. The T5 (9.5 GB in bf16)
is not run: it fits any 24 GB card alone. Also, for every run, the activation peak of the forward measured on the
meta device vs the pack's estimate (opensora_lib/memory.activation_memory) and core's memory_usage_factor formula.

The budget is applied twice, because one knob alone does not simulate a smaller card:
- `--reserve-vram` (comfy.model_management.EXTRA_RESERVED_VRAM) = total - budget + 0.4 GiB (0.4 GiB is ComfyUI's
  own Linux default, which the flag replaces): ComfyUI then sees the free memory a budget-sized card would have
  and plans partial loading for it. It enforces nothing.
- torch.cuda.set_per_process_memory_fraction((budget - CUDA context) / total): PyTorch's allocator refuses to hold
  more, so anything that would not fit on the smaller card raises OutOfMemoryError (reported as FAIL). It alone
  would not steer ComfyUI, whose free-memory figure comes from cudaMemGetInfo, not from the allocator cap.
The newest ComfyUI's DynamicVRAM (comfy-aimdo) starts only from main.py, so this script measures the classic
estimate-based partial loading on any host version (pinned 0.3.75 by default; $COMFYUI_DIR for another).

Expected on a 24 GiB budget (ComfyUI 0.3.75's own planning code run on a meta-device copy of the model, see
tests/test_partial_loading.py): the pack asks for 1.62 GiB of activations (6 H + M per token in bf16 + 3 H in float32,
batch 2) plus the 0.5 GiB workspace margin (opensora_lib/memory.FORWARD_WORKSPACE_BYTES), so ComfyUI keeps ~20.9 GiB of the
weights resident and streams ~1.2 GiB per forward; tensors peak at ~22.8 GiB with a 0.5 GiB CUDA context (weights
+ 1.32 GiB of tracked activations for the batch-2 step + offload buffer). Measured on an H200 before the margin (20.6 GiB
resident): allocated 22.7 GiB, but reserved 23.4 GiB + 0.75 GiB outside the allocator = 24.16 GiB, FAIL by 0.16; the
margin should leave ~0.3 GiB. With --estimate none (the old call without the activation estimate) every weight
stays resident and the step needs ~24.0 GiB of tensors, plus the ~0.9 GiB of workspaces and allocator cache the H200
showed: FAIL (OOM) expected.

Expected time on one H200 (estimated, not yet measured): ComfyUI import ~5 s; random weights generated on the GPU
and copied to host memory ~5 s (23.8 GB); partial load ~2 s (~20 GiB host->device); a 256px 129-frame forward is
~0.4 s at batch 1 (265 TFLOP at ~790 TFLOP/s; ~0.8 s for the batch-2 cond+uncond steps) plus ~1.2 GiB of streamed
weights per forward (~0.03 s at ~50 GB/s). Default 10 steps (all batch 2): ~9 s sampling, ~25-35 s in all (seconds
per step ~0.85). A whole 50-step run (30 batch-2 + 20 batch-1 steps with oscillation): ~35 s sampling, ~55 s in all.

    python benchmarks/bench_comfy_memory.py --out $OUT/comfy_memory.json            # GPU, 24 GiB, 10 steps
    python benchmarks/bench_comfy_memory.py --steps 50 --budget-gib 24 --out m.json   # the whole generation
    python benchmarks/bench_comfy_memory.py --estimate none --out m.json              # the old behaviour
    python benchmarks/bench_comfy_memory.py --tiny --device cpu --out /tmp/m.json     # CPU check (tiny model)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import statistics
import sys
import time
import types
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # opensora_lib and scripts/comfy_host.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from benchmarks.common import write_json  # noqa: E402
from opensora_lib.mmdit import MMDiT, MMDiTConfig, mmdit_v2_config  # noqa: E402
from opensora_lib.sampling_v2 import V2SamplingOptions, image_ids, pass_plan, text_ids  # noqa: E402
from opensora_lib.stdit3 import STDiT3, STDiT3Config  # noqa: E402

GIB = 2**30
COMFY_DEFAULT_RESERVE_GIB = 0.4  # comfy.model_management.EXTRA_RESERVED_VRAM on Linux, replaced by --reserve-vram
# The factor core's BaseModel.memory_required formula used for 2.0 before OpenSoraV2Model overrode it (reported
# for comparison only; the model configs' memory_usage_factor attributes are read by nothing now).
OLD_CORE_MEMORY_USAGE_FACTOR = 1.8
SHIPPED = {"cfg": 7.5, "image_cfg": 3.0, "oscillation": True, "image_oscillation": True, "scale_image_weight": True}
# (num_frames, height, width, text tokens) of the measured generation: 256px 16:9 129 frames; tiny: 9 x 64 x 96
SIZES = {"full": (129, 192, 336, 512), "tiny": (9, 64, 96, 7)}
# The official MMDiT with only sizes shrunk (the tiny test model of scripts/demo_models_v2.py).
TINY_MMDIT = {
    "vec_in_dim": 32,
    "context_in_dim": 32,
    "hidden_size": 64,
    "num_heads": 2,
    "depth": 1,
    "depth_single_blocks": 1,
    "axes_dim": [4, 14, 14],
}


def mmdit_config(tiny: bool) -> MMDiTConfig:
    return dataclasses.replace(mmdit_v2_config(), **TINY_MMDIT) if tiny else mmdit_v2_config()


# ---------------------------------------------------------------- activation peak on the meta device


class AllocationTracker(TorchDispatchMode):
    """Live and peak bytes of every storage allocated while active, each storage counted once until it is freed
    (weakref.finalize on the storage object observes that). Views and in-place results allocate nothing, and
    neither does an op that hands back a storage it did not declare as an alias in its schema: aten._unsafe_view,
    the second half of a reshape that had to copy, returns the storage of the clone before it."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.counted: set[int] = set()  # the live storages counted, by StorageImpl address

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.counted.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        flat_inputs = tree_flatten((args, kwargs))[0]
        inputs = {t.untyped_storage()._cdata for t in flat_inputs if isinstance(t, torch.Tensor)}
        for index, tensor in enumerate(tree_flatten(out)[0]):
            if not isinstance(tensor, torch.Tensor):
                continue
            if index < len(returns) and returns[index].alias_info is not None:
                continue  # a view of, or written into, an input
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self.counted:
                continue  # an undeclared alias: an input's storage, or one already counted
            nbytes = storage.nbytes()
            if nbytes:
                self.counted.add(key)
                self.live += nbytes
                weakref.finalize(storage, self._release, key, nbytes)
                self.peak = max(self.peak, self.live)
        return out


class FlashAttentionStub(TorchFunctionMode):
    """SDPA as the CUDA flash / memory-efficient kernels use memory: the output only (in the [B, L, H, D] layout
    they return), never the L x L scores that the meta / math fallback would materialise."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, _k, v = args[:3]
            batch, heads, length, _ = q.shape
            return q.new_empty(batch, length, heads, v.shape[-1]).transpose(1, 2)
        return func(*args, **(kwargs or {}))


def peak_activation_bytes(run: Callable[[], Any]) -> int:
    """Peak bytes allocated by run() above what existed before (its result is dropped inside), see AllocationTracker."""
    tracker = AllocationTracker()
    with torch.no_grad(), FlashAttentionStub(), tracker:
        result = run()
        del result
    return tracker.peak


def mmdit_forward_peak(
    config: MMDiTConfig,
    batch: int,
    frames: int,
    height: int,
    width: int,
    text_tokens: int,
    dtype: torch.dtype,
) -> int:
    """Activation peak of one MMDiT forward on a latent [batch, C, frames, height, width] (meta device)."""
    model = MMDiT(config, dtype=dtype, device="meta")
    patch = config.patch_size
    tokens = frames * (height // patch) * (width // patch)

    def empty(*shape, float32=False):
        return torch.empty(*shape, device="meta", dtype=torch.float32 if float32 else dtype)

    inputs = {
        "img": empty(batch, tokens, config.in_channels),
        "img_ids": image_ids(frames, height, width, patch, device="meta").to(dtype),
        "txt": empty(batch, text_tokens, config.context_in_dim),
        "txt_ids": text_ids(text_tokens, device="meta").to(dtype),
        "timesteps": empty(batch, float32=True),
        "y_vec": empty(batch, config.vec_in_dim),
        "cond": empty(batch, tokens, config.in_channels + patch**2),
    }
    return peak_activation_bytes(lambda: model(**inputs))


def stdit3_forward_peak(
    config: STDiT3Config,
    batch: int,
    frames: int,
    height: int,
    width: int,
    dtype: torch.dtype,
) -> int:
    """Activation peak of one STDiT3 forward on a latent [batch, C, frames, height, width] (meta device; every
    caption token valid, so no key mask)."""
    model = STDiT3(config, dtype=dtype, device="meta")
    x = torch.empty(batch, config.in_channels, frames, height, width, device="meta", dtype=dtype)
    y = torch.empty(batch, 1, config.model_max_length, config.caption_channels, device="meta", dtype=dtype)
    timestep = torch.empty(batch, device="meta")
    pixels = {"fps": 24.0, "height": height * 8.0, "width": width * 8.0}
    return peak_activation_bytes(lambda: model(x, timestep, y, mask=None, **pixels))


def core_formula_bytes(latent_shape, dtype: torch.dtype, memory_usage_factor: float) -> float:
    """core BaseModel.memory_required on CUDA (flash / pytorch attention branch): area x dtype x 0.01 x factor MiB."""
    area = latent_shape[0] * math.prod(latent_shape[2:])
    return area * torch.empty((), dtype=dtype).element_size() * 0.01 * memory_usage_factor * 2**20


def activation_check(config: MMDiTConfig, rows: list[int], size: tuple, dtype: torch.dtype, estimate, factor) -> list:
    """Meta-device peak vs the pack's estimate vs core's formula, for the sampled size at each batch."""
    num_frames, height, width, text_tokens = size
    frames, latent_h, latent_w = (num_frames - 1) // 4 + 1, height // 8, width // 8
    one_block_each = dataclasses.replace(config, depth=1, depth_single_blocks=1)  # the peak is inside one block
    out = []
    for batch in rows:
        shape = (batch, 16, frames, latent_h, latent_w)
        measured = mmdit_forward_peak(one_block_each, batch, frames, latent_h, latent_w, text_tokens, dtype)
        estimated = estimate(shape, text_tokens)
        core = core_formula_bytes(shape, dtype, factor)
        out.append(
            {
                "batch": batch,
                "latent_shape": list(shape),
                "measured_meta_gib": measured / GIB,
                "pack_estimate_gib": estimated / GIB,
                "core_formula_gib": core / GIB,
                "pack_over_measured": estimated / measured,
                "core_over_measured": core / measured,
            }
        )
    return out


# ---------------------------------------------------------------- ComfyUI host


def comfy_host_dir() -> Path:
    sys.path.insert(0, str(REPO / "scripts"))
    from comfy_host import comfyui_dir

    return comfyui_dir()


def import_pack(device: torch.device, reserve_gib: float | None):
    """Import ComfyUI (argv parsed as main.py would: --cpu, or --reserve-vram) and this pack as ComfyUI does."""
    comfy_dir = comfy_host_dir()
    # No --cuda-device: it sets CUDA_VISIBLE_DEVICES, too late once CUDA is up; ComfyUI takes the current device.
    argv = ["bench_comfy_memory"] + (["--cpu"] if device.type == "cpu" else [])
    if reserve_gib is not None:
        argv += ["--reserve-vram", f"{reserve_gib:.4f}"]
    sys.argv = argv
    sys.path.insert(0, str(comfy_dir))
    os.chdir(comfy_dir)  # ComfyUI resolves some folders from the working directory
    import comfy.options

    comfy.options.enable_args_parsing()
    spec = importlib.util.spec_from_file_location(
        "opensora_pack", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["opensora_pack"] = module
    spec.loader.exec_module(module)
    return comfy_dir


def random_state_dict(config: MMDiTConfig, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """bf16 weights in host memory with the checkpoint's keys: matrices uniform +-1/sqrt(fan_in) (nn.Linear's
    range), biases 0, RMSNorm scales 1. Drawn on `device` one tensor at a time (fast on a GPU), then moved."""
    shapes = {k: v.shape for k, v in MMDiT(config, device="meta").state_dict().items()}
    generator = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if len(shape) >= 2:
            bound = 1.0 / math.sqrt(math.prod(shape[1:]))
            tensor = torch.empty(shape, device=device, dtype=torch.bfloat16).uniform_(
                -bound, bound, generator=generator
            )
        elif key.endswith("scale"):
            tensor = torch.ones(shape, device=device, dtype=torch.bfloat16)
        else:
            tensor = torch.zeros(shape, device=device, dtype=torch.bfloat16)
        out[key] = tensor.to("cpu")
    return out


class LoadRecorder:
    """Wraps comfy.model_management.load_models_gpu: what the pack asked for and how long the load took."""

    def __init__(self, model_management):
        self.mm = model_management
        self.original = model_management.load_models_gpu
        self.calls: list[dict] = []
        model_management.load_models_gpu = self

    def __call__(self, models, *args, **kwargs):
        start = time.perf_counter()
        result = self.original(models, *args, **kwargs)
        self.calls.append(
            {
                "memory_required": kwargs.get("memory_required", args[0] if args else 0),
                "minimum_memory_required": kwargs.get("minimum_memory_required"),
                "seconds": time.perf_counter() - start,
            }
        )
        return result


class StepClock:
    """The time each sampler step completes: wraps the node's Progress callback (called once per step; ComfyUI's
    progress-bar hook is throttled on newer hosts, so it cannot count steps)."""

    def __init__(self, device: torch.device, sampling_module):
        self.device = device
        self.times: list[float] = []
        progress_class = sampling_module.Progress
        clock = self

        class TimedProgress(progress_class):
            def __call__(self, info: dict) -> None:
                if clock.device.type == "cuda":
                    torch.cuda.synchronize(clock.device)
                clock.times.append(time.perf_counter())
                super().__call__(info)

        sampling_module.Progress = TimedProgress


def conditioning(config: MMDiTConfig, text_tokens: int, generator: torch.Generator) -> tuple[list, list]:
    def one():
        t5 = torch.randn(1, text_tokens, config.context_in_dim, generator=generator)
        pooled = torch.randn(1, config.vec_in_dim, generator=generator)
        return [[t5, {"pooled_output": pooled, "opensora_version": "2.0"}]]

    return one(), one()


def weight_residency(patcher) -> dict:
    modules = list(patcher.model.diffusion_model.modules())
    return {
        "model_bytes": int(patcher.model_size()),
        "resident_bytes": int(patcher.loaded_size()),
        "streamed_bytes": int(patcher.model_size() - patcher.loaded_size()),
        "cast_path_modules": sum(1 for m in modules if getattr(m, "comfy_cast_weights", False)),
        "comfy_ops_modules": sum(1 for m in modules if hasattr(m, "comfy_cast_weights")),
        "lowvram": bool(getattr(patcher.model, "model_lowvram", False)),
    }


def passes_per_step(steps: int, cfg: float, oscillation: bool) -> list[int]:
    options = V2SamplingOptions(num_steps=steps, guidance=cfg, text_osci=oscillation)
    return [len(passes) for passes in pass_plan(options, "t2v")]


def step_timing(clock: StepClock, start: float, rows: list[int]) -> dict:
    """First step (includes the load) and the steady per-step time; a 50-step estimate scaled by forward rows."""
    ends = clock.times
    durations = [b - a for a, b in zip([start, *ends[:-1]], ends)]
    steady = durations[1:] or durations
    per_step = statistics.median(steady)
    per_row = statistics.median(d / r for d, r in zip(durations[1:], rows[1:])) if len(durations) > 1 else per_step
    full_rows = passes_per_step(50, SHIPPED["cfg"], SHIPPED["oscillation"])
    return {
        "first_step_seconds": durations[0],
        "seconds_per_step": per_step,
        "steps_per_second": 1.0 / per_step if per_step > 0 else None,
        "step_seconds": durations,
        "forward_rows_per_step": rows,
        "estimated_50_step_sampling_seconds": durations[0] + per_row * sum(full_rows[1:]),
    }


def use_estimate(sampling_module, mode: str) -> dict:
    """Wrap the Sampler's load_for_sampling: record whether the node passes the activation estimate, and with
    mode "none" drop it (the old behaviour: weights fill the free VRAM; expected to fail a tight budget)."""
    import comfy.model_management
    from opensora_pack.nodes.common import compute_dtype

    original = sampling_module.load_for_sampling
    record = {"mode": mode, "node_passed_estimate": None}

    def load(model, *args, **kwargs):
        record["node_passed_estimate"] = bool(args) or "noise_shape" in kwargs
        if mode != "none":
            return original(model, *args, **kwargs)
        comfy.model_management.load_models_gpu([model])  # no memory_required
        return model.load_device, compute_dtype(model.model)

    sampling_module.load_for_sampling = load
    return record


def cuda_peak(device: torch.device, context_gib: float) -> dict[str, float]:
    """Peak bytes since the last reset_peak_memory_stats, in GiB: allocated, reserved, what the CUDA libraries hold
    outside the allocator now (the context grows as libraries load), and reserved + outside (what the card needs)."""
    torch.cuda.synchronize(device)
    allocated, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    free_now, total = torch.cuda.mem_get_info(device)
    outside = max(context_gib * GIB, total - free_now - torch.cuda.memory_reserved(device))
    return {
        "max_allocated_gib": allocated / GIB,
        "max_reserved_gib": reserved / GIB,
        "outside_allocator_end_gib": outside / GIB,
        "peak_with_context_gib": (reserved + outside) / GIB,
    }


# The shipped opensora20_t2v workflow's decode: core VAEDecodeTiled(tile_size, overlap, temporal_size, temporal_overlap)
SHIPPED_DECODE = (256, 64, 4096, 8)


def _placeholder(name: str) -> type:
    if name.startswith("__"):  # __file__, __wrapped__ ...: absent, as on a real module (inspect relies on it)
        raise AttributeError(name)
    return type(name, (), {})


def stub_av_if_missing() -> bool:
    """ComfyUI's nodes.py imports comfy_api, which imports PyAV (`av`) at module level for video I/O. The GPU machine
    has no PyAV and its wheel (35 MB) does not fit the device call; this benchmark does no video I/O, so when `av`
    cannot be imported, placeholder modules with the names comfy_api imports are installed. Returns whether it
    stubbed."""
    try:
        import av  # noqa: F401
    except ImportError:
        pass
    else:
        return False

    def module(name: str, **names) -> types.ModuleType:
        stub = types.ModuleType(name)
        stub.__dict__.update(names)
        stub.__getattr__ = _placeholder  # av.VideoStream etc. in isinstance / annotations
        sys.modules[name] = stub
        return stub

    av = module("av")
    av.container = module("av.container", InputContainer=type("InputContainer", (), {}))
    av.subtitles = module("av.subtitles")
    av.subtitles.stream = module("av.subtitles.stream", SubtitleStream=type("SubtitleStream", (), {}))
    return True


def decode_phase(device: torch.device, samples: dict, seed: int, context_gib: float | None) -> dict:
    """The workflow's decode in the same budget: core's VAE from a random state dict in the hunyuan_vae.safetensors
    layout (official sizes, 246.5M parameters), the pack's frame-causal fix with whole_video (its default), core
    VAEDecodeTiled with the shipped settings. ComfyUI offloads the DiT for it as it would in the workflow."""
    import comfy.model_management
    import comfy.sd
    from demo_models_v2 import hunyuan_vae_layout, random_weights
    from opensora_pack.nodes.hunyuan_vae import frame_causal_vae

    av_stubbed = stub_av_if_missing()
    import nodes as comfy_nodes

    error, frames, finite, build_seconds = None, None, False, 0.0
    started = time.perf_counter()
    try:
        vae = frame_causal_vae(comfy.sd.VAE(sd=random_weights(hunyuan_vae_layout(), seed)), whole_video=True)
        # The load decode_tiled does first (the whole-video estimate makes ComfyUI offload the DiT), done here so
        # that the peak below starts from what the decode itself finds on the card, not from the sampling state.
        latent_shape = samples["samples"].shape
        comfy.model_management.load_models_gpu(
            [vae.patcher],
            memory_required=vae.memory_used_decode(latent_shape, vae.vae_dtype),
            force_full_load=getattr(vae, "disable_offload", False),
        )
        comfy.model_management.soft_empty_cache()
        build_seconds = time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        with torch.inference_mode():  # as ComfyUI's executor runs every node (newer hosts rely on it)
            (images,) = comfy_nodes.VAEDecodeTiled().decode(vae, samples, *SHIPPED_DECODE)
        frames = list(images.shape)
        finite = bool(torch.isfinite(images).all())
    except Exception as e:  # recorded (the verdict fails); the sampling results are still written
        error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    result = {
        "settings": dict(zip(("tile_size", "overlap", "temporal_size", "temporal_overlap"), SHIPPED_DECODE)),
        "frames_shape": frames,
        "error": error,
        "finite": finite,
        "seconds": {"build_and_load_vae": build_seconds, "decode": time.perf_counter() - started},
        "av_stubbed": av_stubbed,
    }
    if device.type == "cuda":
        result["memory"] = cuda_peak(device, context_gib)
    return result


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here (for the CPU check: --tiny --device cpu)")
    if device.type not in ("cuda", "cpu"):
        raise SystemExit(f"--device must be cuda, cuda:N or cpu, got {args.device!r}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.set_grad_enabled(False)
    mode = "tiny" if args.tiny else "full"
    config = mmdit_config(args.tiny)
    size = SIZES[mode]
    num_frames, height, width, text_tokens = size
    budget = args.budget_gib * GIB
    memory: dict[str, Any] = {"budget_gib": args.budget_gib}

    reserve_gib = None
    if device.type == "cuda":
        torch.cuda.set_device(device)
        free, total = torch.cuda.mem_get_info(device)
        context = total - free  # the CUDA context and anything else already there
        reserve_gib = max(0.0, (total - budget) / GIB) + COMFY_DEFAULT_RESERVE_GIB
        allowed = max(0, budget - context)
        torch.cuda.set_per_process_memory_fraction(min(1.0, allowed / total), device)
        memory.update(
            total_gib=total / GIB,
            context_gib=context / GIB,
            allocator_cap_gib=allowed / GIB,
            reserve_vram_gib=reserve_gib,
        )

    started = time.perf_counter()
    comfy_dir = import_pack(device, reserve_gib)
    import comfy.model_management
    from opensora_pack.nodes import sampling_v2
    from opensora_pack.nodes.comfy_model_v2 import build_mmdit_patcher
    from opensora_pack.nodes.sampling_v2 import sample_v2_node
    from opensora_pack.opensora_lib.detection import ModelInfo
    from opensora_pack.opensora_lib.memory import activation_memory

    import_seconds = time.perf_counter() - started
    compute_dtype = torch.bfloat16
    check = activation_check(
        config,
        [1, 2, 3],
        size,
        compute_dtype,
        lambda shape, tokens: activation_memory(MMDiT(config, device="meta"), shape, tokens, compute_dtype),
        OLD_CORE_MEMORY_USAGE_FACTOR,
    )

    started = time.perf_counter()
    state_dict = random_state_dict(config, device, args.seed)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the drawing's cached blocks: the run starts from an empty pool
    weights_seconds = time.perf_counter() - started
    started = time.perf_counter()
    info = ModelInfo("mmdit", "2.0", "the random Open-Sora 2.0 MMDiT", config.to_dict())
    patcher = build_mmdit_patcher(state_dict, info, config.to_dict(), torch.bfloat16)
    del state_dict
    build_seconds = time.perf_counter() - started

    generator = torch.Generator().manual_seed(args.seed)
    positive, negative = conditioning(config, text_tokens, generator)
    rows = passes_per_step(args.steps, SHIPPED["cfg"], SHIPPED["oscillation"])
    frames, latent_h, latent_w = (num_frames - 1) // 4 + 1, height // 8, width // 8
    latent = {
        "samples": torch.zeros(1, 16, frames, latent_h, latent_w),
        "opensora": {"version": "2.0", "height": height, "width": width, "num_frames": num_frames, "fps": 24},
    }
    loads = LoadRecorder(comfy.model_management)
    estimate_use = use_estimate(sampling_v2, args.estimate)
    clock = StepClock(device, sampling_v2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    error = None
    started = time.perf_counter()
    try:
        with torch.inference_mode():  # as ComfyUI's executor runs every node
            (result,) = sample_v2_node(
                patcher, positive, negative, latent, args.seed, args.steps, timestep_transform=True, **SHIPPED
            )
        finite = bool(torch.isfinite(result["samples"]).all())
    except torch.OutOfMemoryError as oom:
        error, finite = f"OutOfMemoryError: {str(oom).splitlines()[0]}", False
    sampling_seconds = time.perf_counter() - started
    if device.type == "cuda":
        memory.update(cuda_peak(device, memory["context_gib"]))
        verdict = "FAIL" if error or memory["peak_with_context_gib"] * GIB > budget else "PASS"
    else:
        verdict = None  # no VRAM on the CPU: the run checks the code path only
    residency = weight_residency(patcher)  # before the decode offloads the DiT
    comfy.model_management.load_models_gpu = loads.original  # load_calls: the sampler's only
    decode = None
    if args.decode and not error:
        decode = decode_phase(device, result, args.seed, memory.get("context_gib"))
        if device.type == "cuda" and (decode["error"] or decode["memory"]["peak_with_context_gib"] * GIB > budget):
            verdict = "FAIL"
    if device.type == "cuda":
        resident = residency["resident_bytes"]
        memory["activations_and_buffers_gib"] = (memory["max_allocated_gib"] * GIB - resident) / GIB
    timing = step_timing(clock, started, rows[: len(clock.times)]) if clock.times and not error else {}
    return {
        "benchmark": "comfy memory: Open-Sora 2.0 t2v in a VRAM budget",
        "environment": {
            "mode": mode,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "comfyui": str(comfy_dir),
            "comfyui_version": comfyui_version(comfy_dir),
            "vram_state": str(comfy.model_management.vram_state),
        },
        "generation": {
            "num_frames": num_frames,
            "height": height,
            "width": width,
            "latent_shape": list(latent["samples"].shape),
            "text_tokens": text_tokens,
            "steps": args.steps,
            **SHIPPED,
            "conditioning": "random T5 / CLIP-L tensors (no text encoder run)",
        },
        "model": {"config": config.to_dict(), "parameters": sum(math.prod(s) for s in mmdit_shapes(config))},
        "verdict": verdict,  # sampling and (with --decode) the decode, each within the budget
        "error": error,
        "finite": finite,
        "decode": decode,
        "seconds": {
            "comfy_import": import_seconds,
            "random_weights": weights_seconds,
            "build_patcher": build_seconds,
            "load_models_gpu": sum(call["seconds"] for call in loads.calls),
            "sampling": sampling_seconds,
            **timing,
        },
        "memory": memory,
        "weights": residency,
        "load_calls": loads.calls,
        "memory_estimate": estimate_use,
        "activation_check": check,
    }


def mmdit_shapes(config: MMDiTConfig) -> list[torch.Size]:
    return [p.shape for p in MMDiT(config, device="meta").parameters()]


def comfyui_version(comfy_dir: Path) -> str | None:
    version_file = comfy_dir / "comfyui_version.py"
    if not version_file.is_file():
        return None
    for line in version_file.read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return None


def summary(payload: dict) -> str:
    seconds, weights, memory = payload["seconds"], payload["weights"], payload["memory"]
    lines = [
        f"{payload['benchmark']} [{payload['environment']['mode']}, {payload['environment']['device']}, "
        f"ComfyUI {payload['environment']['comfyui_version']}]",
        f"verdict: {payload['verdict']}  error: {payload['error']}  finite: {payload['finite']}",
        f"weights: {weights['model_bytes'] / GIB:.3f} GiB, resident {weights['resident_bytes'] / GIB:.3f} GiB, "
        f"streamed {weights['streamed_bytes'] / GIB:.3f} GiB, cast-path modules {weights['cast_path_modules']}"
        f"/{weights['comfy_ops_modules']}",
        "memory: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in memory.items()),
        "seconds: " + ", ".join(f"{k} {v:.3f}" for k, v in seconds.items() if isinstance(v, float)),
    ]
    estimate = payload["memory_estimate"]
    lines.append(
        f"estimate: --estimate {estimate['mode']}, the node passed one itself: {estimate['node_passed_estimate']}"
    )
    decode = payload.get("decode")
    if decode:
        lines.append(
            f"decode: frames {decode['frames_shape']} error {decode['error']} finite {decode['finite']} "
            + ", ".join(f"{k} {v:.3f}" for k, v in {**decode["seconds"], **decode.get("memory", {})}.items())
        )
    for call in payload["load_calls"]:
        lines.append(f"load_models_gpu: memory_required {call['memory_required'] / GIB:.4f} GiB")
    lines.append("activation peak per forward (GiB): batch, meta-measured, pack estimate, core formula")
    for row in payload["activation_check"]:
        values = (row["measured_meta_gib"], row["pack_estimate_gib"], row["core_formula_gib"])
        lines.append(f"  {row['batch']}  " + "  ".join(f"{value:.4g}" for value in values))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny MMDiT and a 9-frame 64x96 video (the CPU check)")
    parser.add_argument(
        "--budget-gib", type=float, default=24.0, help="VRAM of the simulated card in GiB, CUDA context included (24)"
    )
    parser.add_argument("--steps", type=int, default=10, help="sampler steps (default 10; the official run is 50)")
    parser.add_argument(
        "--estimate",
        choices=("node", "none"),
        default="node",
        help="node: the Sampler node tells ComfyUI its activation memory (default); none: it tells nothing (the old "
        "behaviour, for comparison)",
    )
    parser.add_argument(
        "--decode",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after sampling, decode as the shipped workflow does (core VAEDecodeTiled 256/64/4096/8, HunyuanVideo "
        "VAE with the pack's fix) in the same budget (default on)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.budget_gib <= 0:
        raise SystemExit(f"--steps must be >= 1 and --budget-gib > 0, got {args.steps} and {args.budget_gib}")
    if args.out is not None:
        args.out = args.out.resolve()  # import_pack changes the working directory
    payload = run(args)
    print(summary(payload))
    write_json(payload, args.out)
    return payload


if __name__ == "__main__":
    main()
