"""Small shared pieces of the node layer: model lists, dtypes, patchers, progress."""

from __future__ import annotations

import os

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch

CATEGORY = "OpenSora"
PatcherClass = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)

WEIGHT_DTYPES = {
    "default": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8_e4m3fn": torch.float8_e4m3fn,
}
WEIGHT_FILE_EXTENSIONS = (".safetensors", ".sft")


def model_choices(folder: str) -> list[str]:
    """Weight files in a ComfyUI model folder, plus Hugging Face folders (a folder holding config.json)."""
    files = [name for name in folder_paths.get_filename_list(folder) if name.lower().endswith(WEIGHT_FILE_EXTENSIONS)]
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


def wrap_module(module: torch.nn.Module, kind: str) -> comfy.model_patcher.ModelPatcher:
    """Put a plain module (text encoder, VAE) under ComfyUI's memory manager."""
    mm = comfy.model_management
    if kind == "text_encoder":
        load, offload = mm.text_encoder_device(), mm.text_encoder_offload_device()
    elif kind == "vae":
        load, offload = mm.vae_device(), mm.vae_offload_device()
    else:
        load, offload = mm.get_torch_device(), mm.unet_offload_device()
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


def load_for_sampling(model) -> tuple[torch.device, torch.dtype]:
    """Put the DiT on its device through the memory manager; return (device, compute dtype)."""
    comfy.model_management.load_models_gpu([model])
    return model.load_device, model.model.manual_cast_dtype or model.model.get_dtype()
