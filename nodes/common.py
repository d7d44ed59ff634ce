"""Small shared pieces of the node layer: model lists, dtypes, patchers, progress."""

from __future__ import annotations

import logging
import math
import os
import time

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch

from ..opensora_lib.memory import forward_memory

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


def check_choices(node_class, values: dict) -> None:
    """The list check core makes when a prompt is queued, for direct Python callers: each of `values` {input name:
    value} must be one of its INPUT_TYPES choices."""
    spec = node_class.INPUT_TYPES()
    for name, value in values.items():
        entry = spec.get("required", {}).get(name) or spec.get("optional", {}).get(name)
        if entry and isinstance(entry[0], list) and value not in entry[0]:
            raise ValueError(f"{name} {value!r} is not one of {', '.join(map(str, entry[0]))}")


# What core's conditioning nodes add that the Open-Sora Sampler and Guiders would drop (they guide with one text
# per prompt, oscillating): key -> the node that sets it.
CORE_CONDITIONING_KEYS = {
    "area": "ConditioningSetArea / ConditioningSetAreaPercentage",
    "mask": "ConditioningSetMask",
    "start_percent": "ConditioningSetTimestepRange or a hook node's timestep range",
    "end_percent": "ConditioningSetTimestepRange or a hook node's timestep range",
    "control": "Apply ControlNet",
    "gligen": "GLIGENTextBoxApply",
}


def check_plain_conditioning(conditioning: list, what: str) -> None:
    """Refuse, for the Open-Sora Sampler and Guiders, conditioning they would not apply: several entries
    (ConditioningCombine) or core's area / mask / timestep-range / ControlNet keys. Core KSampler applies them.
    (Hooks are applied: core's sampling runs each Guider pass with its conditioning's hooks, and the Sampler runs
    hooked conditioning through the Guider.)"""
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


def hooks_of(conditioning: list) -> dict:
    """{"hooks": ...} of a CONDITIONING's entry (core's hook nodes), for a Guider's cond dict; {} without hooks."""
    hooks = conditioning[0][1].get("hooks") if conditioning else None
    return {} if hooks is None else {"hooks": hooks}


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


# Core encoders that also give a version's conditioning, named when conditioning of another version is refused.
CORE_TEXT_ENCODERS = {
    "2.0": "2.0 takes T5 + CLIP-L conditioning, which core DualCLIPLoader(type=flux) + CLIPTextEncode give"
}


def check_conditioning_version(encoded: str | None, version: str, what: str) -> None:
    """Refuse conditioning that Open-Sora Encode Prompt made for another version (None: not from the pack)."""
    if encoded is not None and encoded != version:
        core = f"; {CORE_TEXT_ENCODERS[version]}" if version in CORE_TEXT_ENCODERS else ""
        raise ValueError(
            f"{what} was encoded for Open-Sora {encoded} but the model is Open-Sora {version}: set Load Open-Sora "
            f"Text Encoder's version to {version} (each version words the caption its own way){core}."
        )


def conditioning_entry(conditioning: list, what: str, version: str) -> tuple[torch.Tensor, dict]:
    """(tensor, meta) of a CONDITIONING's one entry, for a `version` model: refused when empty, combined, carrying
    core keys the Sampler and Guiders would not apply, or encoded for another version. For 2.0, the null caption is
    a 1.x DiT's learned one, however it is tagged: refused too."""
    if not conditioning:
        raise ValueError(f"The {what} conditioning is empty.")
    check_plain_conditioning(conditioning, what)
    tensor, meta = conditioning[0]
    encoded = meta.get("opensora_version")
    if version == "2.0" and meta.get("opensora_null_caption") and encoded in (None, "2.0"):
        encoded = "1.x"
    check_conditioning_version(encoded, version, f"The {what} conditioning")
    return tensor, meta


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
    """A ComfyUI progress bar that also serves as the sampler callback (interrupts raise from update). A sample that
    turns non-finite stops the run there, named, rather than after every step and a decode of NaNs."""

    def __init__(self, total: int, previewer=None):
        self.bar = comfy.utils.ProgressBar(total)
        self.total = total
        self.previewer = previewer

    def __call__(self, info: dict) -> None:
        x = info.get("x")
        if x is not None and not bool(torch.isfinite(x).all()):
            raise RuntimeError(
                f"Open-Sora Sampler: the sample became non-finite (NaN or inf) at step {info['i'] + 1} of "
                f"{self.total}: the DiT's output overflowed or its weights hold non-finite values. Load the DiT with "
                "weight_dtype bf16 or fp32 (fp16 overflows), or check the checkpoint file."
            )
        preview = None
        if self.previewer is not None and info.get("x") is not None:
            preview = self.previewer(info.get("denoised", info["x"]))
        self.bar.update_absolute(info["i"] + 1, self.total, preview)


# Latent-sized float32 tensors a sampler keeps in RAM at once besides the model's work: the input latent (ComfyUI
# caches it), the noise drawn on the CPU, the output, and one transfer copy.
SAMPLER_HOST_LATENTS = 4
# The activation estimates are measured for the CUDA kernels; on the CPU the same work can take more, so RAM checks
# for work on the CPU count this much more. Measured peak RSS over the estimate on the CPU (one fresh process per
# case, real model widths): VAE decode / encode 1.17x - 1.38x of decode_memory / encode_memory (1.3, DC-AE; bf16 and
# float32); DiT forwards at most 0.71x of forward_memory (1.2, 1.3, 2.0, DC-AE; 144 - 17656 tokens; no L x L
# attention matrix on the CPU path), the small ones over activation_memory alone by glibc's retained heap, which
# the 512 MiB workspace term covers.
CPU_WORK_FACTOR = 1.5
SMALLER_VIDEO = "Use fewer frames, a smaller size or a smaller batch_size on Open-Sora Empty Latent Video."


def check_host_memory(
    host_bytes: int, what: str, advice: str, device: torch.device | None = None, device_bytes: int = 0
) -> None:
    """Refuse work that cannot fit in free RAM before allocating any of it. Running short of GPU memory fails cleanly
    (torch.OutOfMemoryError); running short of RAM does not: the kernel's OOM killer ends the whole ComfyUI server.
    host_bytes stay in RAM wherever the model runs (latents, decoded frames); device_bytes (the model's activation
    estimate, x CPU_WORK_FACTOR) are RAM too when the device is the CPU (--cpu) or shares it (mps)."""
    on_host = device is not None and torch.device(device).type in ("cpu", "mps")
    needed = host_bytes + (int(device_bytes * CPU_WORK_FACTOR) if on_host else 0)
    mm = comfy.model_management
    free = mm.get_free_memory(torch.device("cpu"))
    # Newer cores pin offloaded weights in RAM and release them under RAM pressure (free_pins): do the same, when the
    # pins could cover the shortfall (else the refusal is certain and the pins would go for nothing).
    if free < needed <= free + getattr(mm, "TOTAL_PINNED_MEMORY", 0) and hasattr(mm, "free_pins"):
        mm.free_pins(needed - free)
        time.sleep(0.05)  # as core waits after freeing: the OS's available figure lags the release
        free = mm.get_free_memory(torch.device("cpu"))
    if needed > free:
        raise MemoryError(
            f"{what} needs about {needed / 2**30:.3g} GiB of RAM but {free / 2**30:.3g} GiB is free, so it was refused "
            f"before allocating (running out of RAM would end the ComfyUI server). {advice}"
        )


def sampling_memory(model, noise_shape, passes: int = 1, text_tokens: int = 0, window: int | None = None) -> int:
    """Bytes to keep free on the device for the largest forward a sampler runs on noise_shape [B, C, T, H, W]
    (forward_memory of B x passes rows; of `window` latent frames when context windows cut the video), once
    check_host_memory has found room for the run in RAM."""
    shape = (int(noise_shape[0]) * passes, *noise_shape[1:])
    if window is not None:
        shape = (*shape[:2], min(window, int(shape[2])), *shape[3:])
    required = forward_memory(model.model.diffusion_model, shape, text_tokens, compute_dtype(model.model))
    check_host_memory(
        SAMPLER_HOST_LATENTS * math.prod(int(d) for d in noise_shape) * 4,
        f"Sampling a latent of {' x '.join(str(int(d)) for d in noise_shape)} ({passes} guidance pass(es) at once)",
        SMALLER_VIDEO,
        model.load_device,
        required,
    )
    return required


def load_for_sampling(model, noise_shape, passes: int = 1, text_tokens: int = 0) -> tuple[torch.device, torch.dtype]:
    """Put the DiT on its device through the memory manager; return (device, compute dtype).

    ComfyUI is told the memory of the largest forward the sampler runs on noise_shape [B, C, T, H, W]
    (sampling_memory: the guidance passes are batched), as core's sampling does with BaseModel.memory_required, so
    partial loading leaves that much VRAM free instead of filling it with weights. It is also the minimum: unlike
    core's calc_cond_batch, the samplers cannot split a batch when memory is short.
    """
    required = sampling_memory(model, noise_shape, passes, text_tokens)
    comfy.model_management.load_models_gpu([model], memory_required=required, minimum_memory_required=required)
    return model.load_device, compute_dtype(model.model)
