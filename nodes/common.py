"""Small shared pieces of the node layer: model lists, dtypes, patchers, progress."""

from __future__ import annotations

import logging
import os

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch

CATEGORY = "OpenSora"

_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Log `message` as a warning the first time `key` is seen in this process (for per-step conditions)."""
    if key not in _WARNED:
        _WARNED.add(key)
        logging.getLogger("OpenSora").warning(message)


def match_timestep_scale(model_sampling, multiplier: float, version: str) -> None:
    """Core's shift nodes replace the MODEL's model_sampling, and with it the timestep BaseModel hands the DiT:
    ModelSamplingSD3 gives 1000 x sigma, ModelSamplingAuraFlow and ModelSamplingFlux give sigma. The Open-Sora DiTs
    take one scale each (`multiplier`: 1000 for the 1.x STDiT3; 1 for the 2.0 MMDiT, which embeds 1000 x t itself).
    A flow sampling's schedule does not depend on its multiplier (ModelSamplingDiscreteFlow's sigmas are
    time_snr_shift(shift, t) for any multiplier; timestep() and sigma() are its only users), so a shift node with
    another scale gets the DiT's own and keeps its shift. ModelSamplingFlux (timestep = sigma) fits 2.0 only; a
    sampling that is not a flow (e.g. ModelSamplingDiscrete eps / v) is refused by name."""
    import comfy.model_sampling as sampling

    if isinstance(model_sampling, sampling.ModelSamplingDiscreteFlow):
        if model_sampling.multiplier != multiplier:
            model_sampling.multiplier = multiplier  # only this MODEL's patch object (the shift node made it)
            warn_once(
                f"timestep scale {version}",
                f"OpenSora: the MODEL's shift node (e.g. ModelSamplingSD3 / AuraFlow) gives the DiT timesteps on "
                f"another scale; its shift is kept and the timestep is given as the Open-Sora {version} DiT takes it",
            )
        return
    if isinstance(model_sampling, sampling.ModelSamplingFlux) and multiplier == 1.0:
        return
    kinds = [c.__name__ for c in type(model_sampling).__mro__ if c.__module__ == sampling.__name__]
    raise ValueError(
        f"The MODEL's sampling was replaced by {' + '.join(kinds) or type(model_sampling).__name__} (a model sampling "
        f"node such as ModelSamplingFlux or ModelSamplingDiscrete), which the Open-Sora {version} DiT cannot take: "
        f"it is a rectified-flow model; for a shift use ModelSamplingSD3 or ModelSamplingAuraFlow"
        + (" or ModelSamplingFlux." if multiplier == 1.0 else ".")
    )


def compute_dtype(model) -> torch.dtype:
    """The dtype the DiT computes in (core's memory_required uses the same: manual cast, else the weights')."""
    return model.manual_cast_dtype or model.get_dtype()


def input_range_error(node_class, values: dict) -> str | None:
    """The min / max check core skips for the inputs a node's VALIDATE_INPUTS names (ComfyUI's execution.py), for
    `values` {input name: value}; the first violation as a message, or None."""
    spec = node_class.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            value, options = values.get(name), entry[1] if len(entry) > 1 else {}
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            low, high = options.get("min"), options.get("max")
            if (low is not None and value < low) or (high is not None and value > high):
                return f"{name} must be between {low} and {high}, got {value}"
    return None


# What core's conditioning nodes add that the Open-Sora Sampler and Guiders would drop (they guide with one text
# per prompt, oscillating): key -> the node that sets it.
CORE_CONDITIONING_KEYS = {
    "area": "ConditioningSetArea / ConditioningSetAreaPercentage",
    "mask": "ConditioningSetMask",
    "start_percent": "ConditioningSetTimestepRange",
    "end_percent": "ConditioningSetTimestepRange",
    "control": "Apply ControlNet",
    "gligen": "GLIGENTextBoxApply",
    "hooks": "the conditioning hook nodes",
}


def check_plain_conditioning(conditioning: list, what: str) -> None:
    """Refuse, for the Open-Sora Sampler and Guiders, conditioning they would not apply: several entries
    (ConditioningCombine) or core's area / mask / timestep-range / ControlNet keys. Core KSampler applies them."""
    if len(conditioning) > 1:
        raise ValueError(
            f"The {what} conditioning has {len(conditioning)} entries (e.g. from ConditioningCombine); the Open-Sora "
            "Sampler and Guider guide with one text per prompt. Use core KSampler for combined conditioning, or one "
            "Encode Prompt."
        )
    meta = conditioning[0][1]
    unused = [key for key in CORE_CONDITIONING_KEYS if meta.get(key) is not None]
    if meta.get("start_percent", 0.0) == 0.0 and meta.get("end_percent", 1.0) == 1.0:  # the whole range: no change
        unused = [key for key in unused if key not in ("start_percent", "end_percent")]
    if unused:
        nodes = ", ".join(dict.fromkeys(CORE_CONDITIONING_KEYS[key] for key in unused))
        raise ValueError(
            f"The {what} conditioning has {', '.join(unused)} (from {nodes}), which the Open-Sora Sampler and Guider "
            "do not apply. Use core KSampler, or take that node out."
        )


def check_v1_text(states: torch.Tensor, mask, what: str, channels: int | None = None) -> None:
    """1.x T5 states [B, (1,) L, C] against the DiT's caption width and their attention mask (one entry per token:
    core's ConditioningConcat joins the states but not the mask)."""
    if channels is not None and states.shape[-1] != channels:
        raise ValueError(
            f"{what} holds text states of shape {tuple(states.shape)}; this Open-Sora 1.x model needs T5 states "
            f"[batch, tokens, {channels}] (wrong text encoder? use Open-Sora Encode Prompt)."
        )
    if torch.is_tensor(mask) and mask.shape[-1] != states.shape[-2]:
        raise ValueError(
            f"{what} has {states.shape[-2]} T5 tokens but an attention mask for {mask.shape[-1]}: core's "
            "ConditioningConcat joins the text states but not Open-Sora's mask, so it does not work with 1.x "
            "conditioning. Encode the whole prompt with one Open-Sora Encode Prompt."
        )


def check_conditioning_version(encoded: str | None, version: str, what: str) -> None:
    """Refuse conditioning that Open-Sora Encode Prompt made for another version (None: not from the pack)."""
    if encoded is not None and encoded != version:
        raise ValueError(
            f"{what} was encoded for Open-Sora {encoded} but the model is Open-Sora {version}: set Load Open-Sora "
            f"Text Encoder's version to {version} (each version words the caption its own way)."
        )


WEIGHT_DTYPES = {
    "default": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8_e4m3fn": torch.float8_e4m3fn,
}
WEIGHT_FILE_EXTENSIONS = (".safetensors", ".sft")
GGUF_FOLDERS = ("diffusion_models", "text_encoders")  # where the loaders also read GGUF files (DiT, T5)


def gguf_files(folder: str) -> list[str]:
    """The .gguf files under a model folder, named as ComfyUI names files (relative, "/"-separated). Core lists only
    the extensions registered for a folder, and .gguf is not one of them (ComfyUI-GGUF registers its own keys)."""
    names = []
    for root in folder_paths.get_folder_paths(folder):
        for directory, subdirs, files in os.walk(root, followlinks=True):
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
            for name in files:
                if name.lower().endswith(".gguf"):
                    names.append(os.path.relpath(os.path.join(directory, name), root).replace(os.sep, "/"))
    return names


def model_choices(folder: str) -> list[str]:
    """Weight files in a ComfyUI model folder (GGUF too, in GGUF_FOLDERS), plus Hugging Face folders (a folder
    holding config.json)."""
    files = [name for name in folder_paths.get_filename_list(folder) if name.lower().endswith(WEIGHT_FILE_EXTENSIONS)]
    if folder in GGUF_FOLDERS:
        files += gguf_files(folder)
    folders = []
    for root in folder_paths.get_folder_paths(folder):
        if not os.path.isdir(root):
            continue
        for entry in sorted(os.listdir(root)):
            path = os.path.join(root, entry)
            if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
                folders.append(entry + "/")
    return sorted(set(files + folders))


def model_path(folder: str, name: str) -> str:
    """Resolve a name from `model_choices` to a file or folder path, with a clear error."""
    if name.endswith("/"):
        for root in folder_paths.get_folder_paths(folder):
            path = os.path.join(root, name.rstrip("/"))
            if os.path.isdir(path):
                return path
        raise FileNotFoundError(f"model folder {name!r} not found in models/{folder}")
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise FileNotFoundError(
            f"model file {name!r} not found in models/{folder} ({', '.join(folder_paths.get_folder_paths(folder))})"
        )
    return path


class Holder(torch.nn.Module):
    """ModelPatcher writes bookkeeping attributes (e.g. `device`) onto its module; transformers models
    have a read-only `device`, so the patcher gets this container instead."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.inner = module


def wrap_module(module: torch.nn.Module, kind: str, on_cpu: bool = False) -> comfy.model_patcher.ModelPatcher:
    """Put a plain module (text encoder, VAE) under ComfyUI's memory manager; on_cpu: loaded and kept on the CPU (as
    core's CLIP loaders with device "cpu")."""
    mm = comfy.model_management
    if on_cpu:
        load = offload = torch.device("cpu")
    elif kind == "text_encoder":
        load, offload = mm.text_encoder_device(), mm.text_encoder_offload_device()
    elif kind == "vae":
        load, offload = mm.vae_device(), mm.vae_offload_device()
    else:
        raise ValueError(f"kind must be 'text_encoder' or 'vae', got {kind!r}")
    module.to(offload)
    return comfy.model_patcher.ModelPatcher(Holder(module), load_device=load, offload_device=offload)


class Progress:
    """A ComfyUI progress bar that also serves as the sampler callback (interrupts raise from update)."""

    def __init__(self, total: int, previewer=None):
        self.bar = comfy.utils.ProgressBar(total)
        self.total = total
        self.previewer = previewer

    def __call__(self, info: dict) -> None:
        preview = None
        if self.previewer is not None and info.get("x") is not None:
            preview = self.previewer(info.get("denoised", info["x"]))
        self.bar.update_absolute(info["i"] + 1, self.total, preview)


# Peak activation bytes per token of one DiT forward, in units of (compute dtype size x hidden size H), with
# M = H x mlp_ratio. Measured by tracking every tensor allocation of a forward on the meta device, each storage
# counted once (a reshape's copy included), attention counted as the CUDA flash / memory-efficient kernels
# allocate (the output only, no L x L scores) (benchmarks/bench_comfy_memory.py peak_activation_bytes;
# tests/test_benchmarks_memory.py and test_memory_estimates.py keep these formulas between 1.0x and 1.25x of that
# measurement at the real model sizes):
# - MMDiT (2.0): 13.12 H per token in bf16 at mlp_ratio 4 (11.1 / 17.1 H at mlp_ratio 2 / 8), 11.04 H in float32:
#   5 H + M in the compute dtype plus ~2.1 H in float32 (the float32 temporaries of q / k's RMSNorm, whatever the
#   compute dtype), the same for any image / text token count and batch. The traced peak is at the q / k RMSNorm in a
#   single-stream block (x, the v + MLP projection [L, H + M], q, k and the norm's float32 upcast); RoPE's float32
#   products come next (12.08 H with the norm's temporaries removed, 11.08 H with RoPE's removed too, as CUDA runs
#   both: F.rms_norm is one fused kernel there and the Triton RoPE of opensora_lib/fused_ops.py has no
#   temporaries; measured on the meta device with output-only replacements). Eagerly a single block
#   writes linear2's input over that projection and the MLPs run their GELU in place, so no 4x-wide activation is
#   held twice. 6 H + M + 3 H float32 bounds it: 1.22x in bf16, 1.18x in float32 (1.17x - 1.26x for mlp_ratio 8 - 2),
#   the same ~3 H per token (bf16) of headroom as before, for the caching allocator's rounding and block reuse on a
#   GPU (the workspace margin below adds what a GPU run showed on top). The estimate keeps the bound of the form
#   every device can run. Per batch row, full 11B model:
#     size (latent)                     tokens  dtype  measured GiB  estimate GiB  ratio
#     256px 16:9 129f (33x24x42)          8828  bf16         0.662         0.808  1.221  (0.660 / row at 2-3 rows)
#     256px 16:9 33f (9x24x42)            2780  bf16         0.209         0.255  1.218
#     256px 16:9 129f                     8828  fp32         1.116         1.313  1.177
#     768px 16:9 129f (33x96x168)       133568  bf16        10.023        12.229  1.220
#     768px 16:9 33f (9x96x168)          36800  bf16         2.762         3.369  1.220  (fp32: 4.650 / 5.475)
#     DC-AE 768px 128f (32x24x42, p1)    32768  bf16         2.459         3.000  1.220
#   Flux-layout files (fused qkv / linear1, `fused_qkv`) keep the plain concatenation in single blocks (linear1's
#   [v | mlp] is a strided view there), so they hold linear1's output, the GELU and the concatenation: 6.1 H + 3 M
#   (18.1 H in bf16 and float32 at mlp_ratio 4, 12.1 / 30.1 H at 2 / 8), bounded by 9 H + 3 M (1.16x; 1.10x - 1.24x).
#   So a 3-pass 256px step needs ~2.0 GiB (estimate 2.4) on top of the weights. Core's formula with
#   memory_usage_factor 1.8 scales with the latent only and ignores the 512 text tokens: 1.17 GiB per row at 256px
#   129f (1.77x), 0.319 at 33f (1.53x), 0.035 for one frame (0.61x of 0.057): no single per-latent-element factor
#   fits.
# - STDiT3 (1.x): 13.2 - 15.6 H per token (most for one frame), independent of mlp_ratio: the peak is in the
#   attention (qkv, normalised and rotated q / k, window reordering copies), not in the MLP. 16 H bounds it
#   (1.03x - 1.21x); 8 H + 2 M takes over for MLPs wider than 4 H. 720p 113 frames (126000 tokens) peaks at 3.9 GiB
#   per row in bf16; core's formula with memory_usage_factor 2.0 gave 19.7 GiB (5x too high).
# These formulas drive the pack's Sampler node (load_for_sampling) and, through the BaseModel.memory_required
# overrides in comfy_model.py / comfy_model_v2.py, core's samplers (KSampler, the Open-Sora Guider) too.
MMDIT_BYTES_PER_TOKEN = (6, 1, 3)  # (x H, x M) in compute-dtype elements + x H in float32 (q / k norm temporaries)
MMDIT_FUSED_BYTES_PER_TOKEN = (9, 3, 0)  # the fused (Flux) layout: the same terms, no float32 one
STDIT3_BYTES_PER_TOKEN = (16, 8, 2)  # max(16 H, 8 H + 2 M)
# What a forward takes on the GPU besides its tensors: cuBLAS / cuDNN workspaces and plans (0.24 GiB grew outside
# PyTorch's allocator during a 256px 2.0 run on an H200) and the blocks the caching allocator holds over the tensor
# peak (reserved - allocated: 0.68 GiB there). Without it that 24 GiB run (10 steps, ComfyUI 0.3.75 partial
# loading) needed 24.16 GiB; ComfyUI's own 0.4 GiB reserve did not cover both. Added once per forward estimate.
FORWARD_WORKSPACE_BYTES = 512 * 2**20


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def activation_memory(
    diffusion_model: torch.nn.Module, latent_shape, text_tokens: int = 0, dtype: torch.dtype | None = None
) -> int:
    """Peak activation bytes of one forward of an Open-Sora DiT on a latent batch [B, C, T, H, W] (B = every row
    the forward sees, e.g. latent batch x guidance passes); text_tokens: T5 tokens in the joint sequence (2.0)."""
    config = diffusion_model.config
    batch, _channels, frames, height, width = (int(d) for d in latent_shape)
    element = torch.empty((), dtype=dtype or torch.float32).element_size()
    hidden = config.hidden_size
    mlp = int(hidden * config.mlp_ratio)
    if isinstance(config.patch_size, int):  # MMDiT: image tokens (latent padded to the patch) + text tokens
        patch = config.patch_size
        tokens = frames * _ceil_div(height, patch) * _ceil_div(width, patch) + text_tokens
        terms = MMDIT_FUSED_BYTES_PER_TOKEN if config.fused_qkv else MMDIT_BYTES_PER_TOKEN
        per_hidden, per_mlp, float32_per_hidden = terms
        per_token_bytes = (per_hidden * hidden + per_mlp * mlp) * element + float32_per_hidden * hidden * 4
        return batch * tokens * per_token_bytes
    # STDiT3: (t, h, w) patches; the caption is only cross-attention keys
    pt, ph, pw = config.patch_size
    tokens = _ceil_div(frames, pt) * _ceil_div(height, ph) * _ceil_div(width, pw)
    flat, base, wide = STDIT3_BYTES_PER_TOKEN
    return batch * tokens * max(flat * hidden, base * hidden + wide * mlp) * element


def forward_memory(
    diffusion_model: torch.nn.Module, latent_shape, text_tokens: int = 0, dtype: torch.dtype | None = None
) -> int:
    """VRAM to keep free for one forward (what ComfyUI's memory manager is told): the activation estimate plus the
    workspace margin."""
    return activation_memory(diffusion_model, latent_shape, text_tokens, dtype) + FORWARD_WORKSPACE_BYTES


def load_for_sampling(
    model, noise_shape=None, passes: int = 1, text_tokens: int = 0
) -> tuple[torch.device, torch.dtype]:
    """Put the DiT on its device through the memory manager; return (device, compute dtype).

    With noise_shape [B, C, T, H, W], ComfyUI is told the memory of the largest forward the sampler runs
    (forward_memory of B x passes rows: the guidance passes are batched), as core's sampling does with
    BaseModel.memory_required, so partial loading leaves that much VRAM free instead of filling it with weights.
    It is also the minimum: unlike core's calc_cond_batch, the samplers cannot split a batch when memory is short.
    """
    dtype = compute_dtype(model.model)
    if noise_shape is None:
        comfy.model_management.load_models_gpu([model])
    else:
        shape = (int(noise_shape[0]) * passes, *noise_shape[1:])
        required = forward_memory(model.model.diffusion_model, shape, text_tokens, dtype)
        comfy.model_management.load_models_gpu([model], memory_required=required, minimum_memory_required=required)
    return model.load_device, dtype
