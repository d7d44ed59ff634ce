"""The official Open-Sora 2.0 MMDiT and I2V denoiser, timed on the same random weights as ours, side by side.

The official code is not part of this project: scripts/fetch_official.sh copies the few files needed from a git
mirror into the git-ignored .official/, and this script imports them from there at run time. What those files
import but the device lacks is replaced here:
- flash_attn.flash_attn_func -> torch SDPA. On CUDA its flash backend by default (--official-attention flash):
  the FlashAttention-2 kernel, which the official code reaches through flash_attn v2 when FA3 is not installed
  (flash_attn_interface is made unimportable here), and how issue #5 defines the official figures ("flash
  attention through PyTorch SDPA"). --official-attention
  default leaves the kernel choice to torch (cuDNN on an H200 with torch 2.11: faster than what is published).
- liger_kernel RoPE / RMSNorm: the real liger_kernel==0.5.2 (Triton; carried as a wheel in .whl/) on CUDA, a
  plain-torch shim of the same formulas for CPU dry runs (--liger).
- colossalai, mmengine, peft (when missing), and the official modules for checkpoint loading, text encoders,
  datasets and logging: stubs that only provide the imported names; the benchmark never calls them.
The official timestep embedding keeps its @torch.compile on CUDA (--compile; off on the CPU).

Runs: ours vs official on the same inputs (max abs / relative error in float32 and in --dtype), the official
forward at the benchmark sizes, and the official denoiser's 50-step t2v and i2v_head runs (3 passes every step)
with the shipped 256px.py options. Result names equal bench_mmdit.py's, which reads this JSON (--official-json)
for its ratios.

    bash scripts/fetch_official.sh
    python benchmarks/official_mmdit.py --out official_mmdit.json
    python benchmarks/official_mmdit.py --tiny --device cpu --out /tmp/official_mmdit.json   # CPU dry run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: opensora_lib and benchmarks

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.bench_mmdit import (
    ASPECT_RATIO,
    COND_TYPES,
    DEFAULT_STEPS,
    DEFAULT_TEXT_TOKENS,
    DEFAULTS,
    OFFICIAL_SECONDS,
    VERSION,
    forward_inputs,
    forward_row,
    latent_geometry,
    model_config,
    sampler_inputs,
    sampler_row,
)
from benchmarks.common import (
    DTYPES,
    add_common_arguments,
    add_dit_arguments,
    compare_with_official,
    dit_runs,
    environment,
    float32_reference,
    measure,
    parameter_count,
    parse_video,
    peak_tflops,
    relative_error,
    release_memory,
    report,
    setup,
    synchronize,
    warmup_calls,
)
from opensora_lib.mmdit import MMDiT, MMDiTConfig
from opensora_lib.sampling_v2 import V2SamplingOptions, sample_v2

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_DIR = REPO / ".official"
# float32 agreement size (full: fewer frames than the benchmark, so the float32 forwards stay short).
FP32_CHECK = {"full": "256px:33:1", "tiny": "64x96:9:1"}
# Relative error allowed between ours and the official code in float32: the same maths, only the order of
# operations differs (tiny, CPU: measured 0). At full size 57 blocks of random weights carry the reduction-order
# differences of the Triton RMSNorm / RoPE kernels along; a real mistake (e.g. the other RoPE layout) is > 1e-2.
FP32_TOLERANCE = {"tiny": 1e-5, "full": 1e-4}
# Official 256px.py sampling options (configs/diffusion/inference/256px.py).
GUIDANCE, GUIDANCE_IMG, SIGMA_MIN = 7.5, 3.0, 1e-5


class OfficialMissing(RuntimeError):
    """The official code is not in .official/ (run scripts/fetch_official.sh)."""


# ---------------------------------------------------------------- shims for what the device lacks


SDPA_BACKENDS: list | None = None  # the official attention's SDPA backends (None: torch's own choice)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, *args, **kwargs):
    """flash_attn's [B, L, heads, D] call through torch SDPA (the backends in SDPA_BACKENDS for fp16 / bf16; the
    float32 agreement check gets torch's choice: flash kernels, flash_attn's included, take half precision only)."""
    restrict = SDPA_BACKENDS and q.dtype in (torch.float16, torch.bfloat16)
    backends = sdpa_kernel(SDPA_BACKENDS) if restrict else contextlib.nullcontext()
    with backends:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            dropout_p=dropout_p,
            is_causal=causal,
            scale=softmax_scale,
        )
    return out.transpose(1, 2)


class LigerRopeShim:
    """liger_kernel's LigerRopeFunction in plain torch: half-split rotation (dim j pairs with j + D/2) with the
    left half of the tiled cos / sin tables, computed in float32 and stored in q's dtype, as the kernel does.
    The kernel reads the table rows of batch item 0 for every item (row = token index); so does the shim."""

    @staticmethod
    def apply(q, k, cos, sin):
        half = q.shape[-1] // 2
        cos = cos[:1, :, :half].float().unsqueeze(1)  # [1, 1, L, D/2] against q, k [B, heads, L, D]
        sin = sin[:1, :, :half].float().unsqueeze(1)

        def rotate(x):
            x1, x2 = x.float().chunk(2, dim=-1)
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

        return rotate(q), rotate(k)


class LigerRMSNormShim:
    """liger_kernel's LigerRMSNormFunction, "llama" casting: float32 RMS, cast to x's dtype, then x (offset + w)."""

    @staticmethod
    def apply(x, weight, eps, offset=0.0, casting_mode="llama", in_place=False):
        if casting_mode != "llama":
            raise NotImplementedError(f"the RMSNorm shim does the official 'llama' casting only, not {casting_mode!r}")
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return (normed * (offset + weight)).to(x.dtype)


def _not_used(name: str):
    def stub(*args, **kwargs):
        raise NotImplementedError(f"{name} is a stub in benchmarks/official_mmdit.py; the benchmark does not use it")

    return stub


class _Registry:
    """mmengine.registry.Registry, enough for the official @MODELS.register_module("flux")."""

    def __init__(self, name: str, **kwargs):
        self.name, self.modules = name, {}

    def register_module(self, name=None, **kwargs):
        def register(obj):
            self.modules[name or obj.__name__] = obj
            return obj

        return register

    build = staticmethod(_not_used("Registry.build"))


def _install(name: str, path: Path | None = None, **attributes) -> None:
    """Put a module `name` with `attributes` into sys.modules (a package, when `path` holds its real files)."""
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    # A spec, so that importlib.util.find_spec(name) answers instead of raising "__spec__ is None" (transformers
    # probes flash_attn so, and then finds no installed distribution: not available, as wanted).
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=path is not None)
    if path is not None:
        module.__path__ = module.__spec__.submodule_search_locations = [str(path)]
    sys.modules[name] = module


def _missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def install_shims(liger: str, attention: str = "default") -> dict[str, str]:
    """Install the replacements described in the module docstring; returns what each name resolves to."""
    global SDPA_BACKENDS
    SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION] if attention == "flash" else None
    kernel = "flash backend (FlashAttention-2)" if SDPA_BACKENDS else "default kernel choice"
    used = {"flash_attn": f"shim: torch SDPA, {kernel}"}
    _install("flash_attn", flash_attn_func=flash_attn_func)
    # The official math.py prefers FA3 when flash_attn_interface imports; issue #5's official figures are the
    # FlashAttention-2 path, so FA3 stays out of reach here even where it is installed (None: the import fails).
    sys.modules["flash_attn_interface"] = None
    if liger == "real":
        import liger_kernel.ops.rms_norm  # noqa: F401  (raises here if the wheel is not installed)
        import liger_kernel.ops.rope  # noqa: F401

        version = importlib.metadata.version("liger_kernel")
        used["liger_kernel"] = f"real liger_kernel {version} (Triton)"
    else:
        _install("liger_kernel", path=None)
        _install("liger_kernel.ops", path=None)
        _install("liger_kernel.ops.rope", LigerRopeFunction=LigerRopeShim)
        _install("liger_kernel.ops.rms_norm", LigerRMSNormFunction=LigerRMSNormShim)
        used["liger_kernel"] = "shim: plain torch (same formulas)"
    if _missing("colossalai"):
        _install("colossalai", path=None)
        _install(
            "colossalai.utils", get_current_device=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        used["colossalai"] = "stub"
    if _missing("mmengine"):
        _install("mmengine", path=None)
        _install("mmengine.registry", Registry=_Registry)
        _install("mmengine.config", Config=dict)
        used["mmengine"] = "stub"
    if _missing("peft"):
        _install("peft", PeftModel=_not_used("peft.PeftModel"))
        used["peft"] = "stub"
    # Official modules whose real imports pull in ColossalAI, Hugging Face, video IO or an LLM client.
    package = OFFICIAL_DIR / "opensora"
    _install("opensora.utils.ckpt", load_checkpoint=_not_used("load_checkpoint"))
    _install("opensora.utils.logger", log_message=_not_used("log_message"))
    _install("opensora.utils.prompt_refine", refine_prompts=_not_used("refine_prompts"))
    _install("opensora.models.text", path=package / "models" / "text", HFEmbedder=object)
    _install("opensora.models.text.conditioner", HFEmbedder=object)
    _install("opensora.datasets", path=package / "datasets", save_sample=_not_used("save_sample"))
    _install("opensora.datasets.utils", read_from_path=_not_used("x"), rescale_image_by_path=_not_used("x"))
    used["opensora"] = "stubs: utils.ckpt, utils.logger, utils.prompt_refine, models.text, datasets (+ .utils)"
    return used


def import_official(liger: str, compile_embedding: bool, attention: str = "default") -> types.SimpleNamespace:
    """Import the official model, sampling and inference modules from .official/ with the shims installed."""
    if not (OFFICIAL_DIR / "opensora" / "models" / "mmdit" / "model.py").is_file():
        raise OfficialMissing(f"the official code is not in {OFFICIAL_DIR}: run `bash scripts/fetch_official.sh` first")
    shims = install_shims(liger, attention)
    sys.path.insert(0, str(OFFICIAL_DIR))
    if not compile_embedding:
        torch._dynamo.config.disable = True  # the official @torch.compile'd timestep embedding then runs eagerly
    commit_file = OFFICIAL_DIR / "COMMIT"
    return types.SimpleNamespace(
        model=importlib.import_module("opensora.models.mmdit.model"),
        sampling=importlib.import_module("opensora.utils.sampling"),
        inference=importlib.import_module("opensora.utils.inference"),
        commit=commit_file.read_text().strip() if commit_file.is_file() else "unknown",
        shims=shims,
    )


# ---------------------------------------------------------------- the official model on our weights


def build_official(official, config: MMDiTConfig, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The official MMDiTModel for our config, holding the very tensors of `state_dict` (no copy: assign=True)."""
    if config.out_channels != config.in_channels:
        raise ValueError("the official MMDiT has out_channels = in_channels")
    official_fields = {f.name for f in dataclasses.fields(official.model.MMDiTConfig)}
    values = {k: v for k, v in dataclasses.asdict(config).items() if k in official_fields}
    official_config = official.model.MMDiTConfig(from_pretrained=None, cache_dir=None, **values)
    with torch.device("meta"):
        model = official.model.MMDiTModel(official_config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"official model tensors not loaded from our state dict: {left[:5]}")
    return model.eval()


def official_forward_inputs(config, size, text_tokens, dtype, device) -> dict:
    """bench_mmdit's forward inputs as the official prepare() gives them: ids per sample, times in the model dtype."""
    inputs = forward_inputs(config, size, text_tokens, dtype, device)
    for key in ("img_ids", "txt_ids"):
        inputs[key] = inputs[key].expand(size.batch, -1, -1).contiguous()
    inputs["timesteps"] = inputs["timesteps"].to(dtype)  # the official denoiser's t_vec is in the state dtype
    return inputs


def agreement(ours, official_model, config, size, text_tokens, dtype, device, tolerance: float) -> dict:
    """Our forward vs the official one on identical inputs. The float32 check runs with TF32 off and the official
    timestep embedding eager (a float32 compile would cost a second compile, for one tiny element-wise kernel)."""
    inputs = official_forward_inputs(config, size, text_tokens, dtype, device)
    eager = dtype == torch.float32
    was_disabled = torch._dynamo.config.disable
    torch._dynamo.config.disable = was_disabled or eager
    try:
        with float32_reference() if eager else contextlib.nullcontext(), torch.inference_mode():
            mine, theirs = ours(**inputs), official_model(**inputs)
    finally:
        torch._dynamo.config.disable = was_disabled
    errors = relative_error(mine.float(), theirs.float())
    result = {
        "name": f"ours vs official {str(dtype).removeprefix('torch.')} {size.name}",
        "kind": "agreement",
        **dataclasses.asdict(size),
        "text_tokens": text_tokens,
        **errors,
        "finite": bool(torch.isfinite(mine).all() and torch.isfinite(theirs).all()),
        "official_compiled_embedding": not torch._dynamo.config.disable and not eager,
    }
    if eager:
        result.update(tolerance=tolerance, passed=errors["relative_error"] < tolerance)
    return result


class CountingModel:
    """Calls the model and records the batch rows of every call (forward passes = rows / videos)."""

    def __init__(self, model):
        self.model, self.rows = model, []

    def __call__(self, **kwargs):
        self.rows.append(kwargs["img"].shape[0])
        return self.model(**kwargs)


def profile_forward(model, inputs: dict, device, top: int = 25) -> list[dict]:
    """One forward (after one untimed) under torch.profiler: the `top` ops by device time (CPU time on a CPU),
    printed and returned as rows of name / calls / milliseconds / share of the total."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with torch.inference_mode():
        model(**inputs)
        synchronize(device)
        with profile(activities=activities) as prof:
            model(**inputs)
            synchronize(device)
    attr = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    # The op rows only (each kernel's time is also a row of its own, on the device; counting both doubles the
    # total), without CUPTI's "Command Buffer Full" marker (launch-queue back-pressure, not work).
    events = [
        e
        for e in prof.key_averages()
        if e.device_type == DeviceType.CPU and getattr(e, attr) > 0 and e.key != "Command Buffer Full"
    ]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    rows = [
        {"name": e.key[:90], "calls": e.count, "ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / total}
        for e in events[:top]
    ]
    print(f"profile {type(model).__module__}.{type(model).__name__}: total {total / 1e3:.1f} ms ({attr})")
    for row in rows:
        print(f"  {row['ms']:9.2f} ms {row['share']:6.1%} {row['calls']:6d}x  {row['name']}")
    return rows


def official_denoise(official, model, config, inputs: dict, steps: int, cond_type: str, dtype) -> torch.Tensor:
    """The official I2VDenoiser run of scripts/diffusion/inference.py's api_fn with the 256px.py options, on our
    noise / text / reference; returns the packed final state (before the reference is pasted back)."""
    sampling, patch = official.sampling, config.patch_size
    z = inputs["noise"].to(dtype)  # the official state is in the model dtype
    batch, _, frames, height, width = z.shape
    text = inputs["text"]
    # prepare_guidance: text = prompts + negatives + negatives; prepare_ids packs and builds the position ids.
    t5 = torch.cat((text["t5"], text["neg_t5"], text["neg_t5"]))
    pooled = torch.cat((text["pooled"], text["neg_pooled"], text["neg_pooled"]))
    model_inputs = sampling.prepare_ids(z.repeat(3, 1, 1, 1, 1), t5, pooled)  # on z's device, in z's dtype
    references = [[inputs["reference"][i].to(dtype)] for i in range(batch)] if cond_type != "t2v" else [None] * batch
    masks, masked_ref = official.inference.prepare_inference_condition(z, cond_type, ref_list=references, causal=True)
    timesteps = sampling.get_schedule(steps, (height * width) // patch**2, frames, shift=True, shift_alpha=None)
    with torch.inference_mode():  # api_fn is decorated with it
        return sampling.I2VDenoiser().denoise(
            model,
            **model_inputs,
            masks=masks,
            masked_ref=masked_ref,
            sigma_min=SIGMA_MIN,
            guidance_img=GUIDANCE_IMG,
            timesteps=timesteps,
            guidance=GUIDANCE,
            text_osci=True,
            image_osci=True,
            scale_temporal_osci="i2v" in cond_type,
            flow_shift=None,
            patch_size=patch,
        )


def sampler_agreement(
    ours, official, official_model, config, size, steps, text_tokens, cond_type, device, tolerance: float
) -> dict:
    """Our sampler (passes skipped, float32 state) vs the official denoiser (3 passes), float32, same inputs."""
    inputs = sampler_inputs(config, size, text_tokens, device)
    options = V2SamplingOptions(num_steps=steps, state_dtype=torch.float32, paste_reference="none")
    cond = inputs["reference"] if cond_type != "t2v" else None
    with float32_reference():
        mine = sample_v2(ours, inputs["noise"], inputs["text"], options, cond=cond, cond_type=cond_type)
        packed = official_denoise(official, official_model, config, inputs, steps, cond_type, torch.float32)
    errors = relative_error(official.sampling.pack(mine, patch_size=config.patch_size), packed.float())
    return {
        "name": f"ours vs official sampler float32 {cond_type} {size.name} {steps} steps",
        "kind": "agreement",
        **dataclasses.asdict(size),
        "steps": steps,
        "cond_type": cond_type,
        **errors,
        "finite": bool(torch.isfinite(packed).all() and torch.isfinite(mine).all()),
        "tolerance": tolerance,
        "passed": errors["relative_error"] < tolerance,
    }


def bench_official_forward(model, config, size, text_tokens, args, device, dtype, peak, warmup: int) -> dict:
    inputs = official_forward_inputs(config, size, text_tokens, dtype, device)
    image_tokens = inputs["img"].shape[1]

    def run():
        with torch.inference_mode():
            return model(**inputs)

    timing, out = measure(run, device, args.repeats, warmup, args.max_seconds)
    return forward_row(config, size, image_tokens, text_tokens, timing, out, peak)


def bench_official_sampler(official, model, config, size, steps, text_tokens, cond_type, device, dtype, peak) -> dict:
    _, frames, height, width = latent_geometry(config, size)
    image_tokens = frames * (height // config.patch_size) * (width // config.patch_size)
    inputs = sampler_inputs(config, size, text_tokens, device)
    counting = CountingModel(model)
    with torch.inference_mode():  # untimed: the batch-3 shape once (and the inference-mode compile)
        model(
            **official_forward_inputs(
                config, dataclasses.replace(size, batch=3 * size.batch), text_tokens, dtype, device
            )
        )

    def run():
        counting.rows.clear()
        return official_denoise(official, counting, config, inputs, steps, cond_type, dtype)

    timing, out = measure(run, device, repeats=1, warmup=0)
    return sampler_row(config, size, steps, cond_type, image_tokens, text_tokens, timing, out, counting.rows, peak)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)  # --attention: OUR model's backend in the agreement checks
    add_dit_arguments(parser, "256px:129:3 or 64x96:9:1", DEFAULT_STEPS["full"])
    parser.add_argument("--text-tokens", type=int, default=None, help="T5 tokens (default 512; tiny 7)")
    parser.add_argument("--cond-types", nargs="*", choices=COND_TYPES, default=list(COND_TYPES))
    parser.add_argument("--fp32-size", default=None, help="RES:FRAMES:BATCH of the float32 agreement, or none")
    parser.add_argument(
        "--liger", choices=("auto", "real", "shim"), default="auto", help="auto: real on CUDA if installed"
    )
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="official @torch.compile")
    parser.add_argument(
        "--official-attention",
        choices=("auto", "flash", "default"),
        default="auto",
        help="the official attention's SDPA kernel: flash (FlashAttention-2, as published) or torch's default "
        "choice; auto: flash on CUDA, default on the CPU (no flash kernel there)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also profile one forward of ours and of the official model"
    )
    parser.add_argument("--compare-sampler", choices=("auto", "on", "off"), default="auto", help="float32; auto: tiny")
    args = parser.parse_args(argv)
    device = setup(args)
    dtype = DTYPES[args.dtype]
    mode = "tiny" if args.tiny else "full"
    on_cuda = device.type == "cuda"
    liger = args.liger
    if liger == "auto":  # the real kernels need CUDA (Triton) and the carried wheel
        liger = "real" if on_cuda and not _missing("liger_kernel") else "shim"
        if on_cuda and liger == "shim":
            print("WARNING: liger_kernel is not installed: the official RoPE / RMSNorm run as plain-torch shims")
    compile_embedding = on_cuda if args.compile == "auto" else args.compile == "on"
    attention = args.official_attention
    if attention == "auto":
        attention = "flash" if on_cuda else "default"
    compare_sampler = args.tiny if args.compare_sampler == "auto" else args.compare_sampler == "on"
    try:
        official = import_official(liger, compile_embedding, attention)
    except OfficialMissing as e:
        raise SystemExit(f"official_mmdit: {e}") from None

    config = model_config(args.tiny)
    text_tokens = args.text_tokens or DEFAULT_TEXT_TOKENS[mode]
    runs = dit_runs(args, DEFAULTS[mode], DEFAULT_STEPS[mode], VERSION, ASPECT_RATIO, dtype)
    fp32_spec = args.fp32_size or FP32_CHECK[mode]
    fp32_size = None if fp32_spec == "none" else parse_video(fp32_spec, VERSION, ASPECT_RATIO)
    peak = peak_tflops(device, dtype, args.peak_tflops)

    # Our seeded random weights; the official model holds the same tensors.
    torch.manual_seed(args.seed)
    first_dtype = torch.float32 if (fp32_size or compare_sampler) else dtype
    ours = MMDiT(config, dtype=first_dtype, device=device).eval()
    official_model = build_official(official, config, ours.state_dict())
    results = []
    tolerance = FP32_TOLERANCE[mode]
    if first_dtype == torch.float32:
        if fp32_size is not None:
            fp32 = agreement(ours, official_model, config, fp32_size, text_tokens, torch.float32, device, tolerance)
            results.append(fp32)
        if compare_sampler:
            for size in runs.sampler:
                for cond_type in args.cond_types:
                    case = (config, size, runs.steps, text_tokens, cond_type, device, tolerance)
                    results.append(sampler_agreement(ours, official, official_model, *case))
        ours.to(dtype)
        official_model = build_official(official, config, ours.state_dict())  # share the cast tensors again
        release_memory(device)
    if runs.error is not None:
        results.append(agreement(ours, official_model, config, runs.error, text_tokens, dtype, device, tolerance))
    warmed: set[int] = set()
    for size in runs.forward:
        warmup = warmup_calls(args.warmup, size.batch, warmed)
        results.append(
            bench_official_forward(official_model, config, size, text_tokens, args, device, dtype, peak, warmup)
        )
    for size in runs.sampler:
        for cond_type in args.cond_types:
            results.append(
                bench_official_sampler(
                    official, official_model, config, size, runs.steps, text_tokens, cond_type, device, dtype, peak
                )
            )
    profiles = {}
    if args.profile and runs.forward:
        inputs = official_forward_inputs(config, runs.forward[0], text_tokens, dtype, device)
        profiles = {
            "ours": profile_forward(ours, inputs, device),
            "official": profile_forward(official_model, inputs, device),
        }
    compare_with_official(results, None, OFFICIAL_SECONDS, {})  # here: this official run / the quoted figure

    failed = [r["name"] for r in results if r.get("passed") is False]
    env = environment(device, dtype, peak, args.tiny)
    env.update(official_shims=official.shims, official_compile=compile_embedding, official_attention=attention)
    payload = {
        "benchmark": "official mmdit v2.0",
        "official_commit": official.commit,
        "environment": env,
        "model": {"config": dataclasses.asdict(config), "parameters": parameter_count(official_model)},
        "results": results,
        "agreement_failed": failed,
        **({"profile": profiles} if profiles else {}),
        "notes": [
            f"official Open-Sora main {official.commit[:12]} from {OFFICIAL_DIR.name}/ (scripts/fetch_official.sh)",
            "same random weights as ours (seeded MMDiT, shared tensors); --attention applies to OUR model only",
            "x official here: this official run / the quoted official figure (does the setup reproduce the issue?)",
            f"float32 agreement passes below relative error {FP32_TOLERANCE[mode]:g}",
        ],
    }
    report(payload, args.out)
    if failed:
        print(f"AGREEMENT FAILED: {failed}")
    return payload


if __name__ == "__main__":
    main()
