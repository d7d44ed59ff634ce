"""Loader nodes: the DiT (-> MODEL), the text encoders, the 1.x VAEs and the 2.0 Video DC-AE."""

from __future__ import annotations

import logging
import math
import os
import weakref

import comfy.model_management
import torch

from ..opensora_lib import attention as attention_lib
from ..opensora_lib import checkpoint, detection, gguf_dequant, gguf_file
from ..opensora_lib.configs import read_config_json
from ..opensora_lib.text_encoders import T5_V1, T5_V2, CLIPPooledEmbedder, T5Embedder
from .comfy_model import build_stdit3_patcher
from .comfy_model_v2 import build_mmdit_patcher
from .common import CATEGORY, WEIGHT_DTYPES, check_choices, model_choices, model_path, wrap_module
from .vae import DC_AE_SCALINGS, build_dcae, build_vae

log = logging.getLogger("OpenSora")

FP8_FAST = "fp8_e4m3fn_fast"  # core's name: fp8 weights + fp8 matrix multiplication where the GPU has it


def bundled_tokenizer(name: str) -> str:
    """The tokenizers that ship with ComfyUI (T5: comfy/text_encoders/t5_tokenizer, CLIP: comfy/sd1_tokenizer)."""
    import comfy.sd1_clip

    comfy_dir = os.path.dirname(comfy.sd1_clip.__file__)
    return (
        os.path.join(comfy_dir, "text_encoders", "t5_tokenizer")
        if name == "t5"
        else os.path.join(comfy_dir, "sd1_tokenizer")
    )


class OpenSoraLoadDiT:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit_name": (
                    model_choices("diffusion_models"),
                    {
                        "tooltip": "An official Open-Sora DiT from models/diffusion_models: a .safetensors file, a Hugging Face folder or a .gguf file (default: its matrices stay quantized) (1.2 STDiT-v3, 1.3 STDiT-v4, 2.0 Open_Sora_v2 or Open_Sora_v2_Video_DC_AE). The version is detected from the weights."
                    },
                ),
                "weight_dtype": (
                    [*WEIGHT_DTYPES, FP8_FAST],
                    {
                        "default": "default",
                        "tooltip": "Storage dtype of the DiT weights. default: as core's Load Diffusion Model (fp8 files stay fp8 where that pays, else bf16 / fp32); GGUF and ComfyUI scaled-fp8 files keep their packed matrices (about the file's size; LoRA works). fp8 halves memory at a small quality cost; fp8_e4m3fn_fast also multiplies in fp8 on GPUs that can (RTX 40xx, H100). README: Model files.",
                    },
                ),
                "attention": (
                    list(attention_lib.backend_names()),
                    {
                        "default": "sdpa",
                        "tooltip": "Attention kernel. sdpa (PyTorch) works everywhere; cudnn is often faster for 2.0 on Hopper GPUs; math is plain float32 (slow, for checking numbers); comfy is ComfyUI's own, as its startup flags (--use-sage-attention, ...) pick it. flash_attn, flash_attn_3 and sageattention need their package (bf16 / fp16 on NVIDIA), else loading says why. An attention patch node on the MODEL applies whatever is chosen.",
                    },
                ),
            }
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/loaders"
    DESCRIPTION = "Load an Open-Sora DiT (STDiT3 1.2/1.3, the 2.0 MMDiT or its Video DC-AE variant) as a native MODEL."

    def load(self, dit_name, weight_dtype, attention="sdpa"):
        check_choices(type(self), {"weight_dtype": weight_dtype})
        attention_lib.check_backend(attention)  # the DiT selects it at every forward (use_backend)
        path = model_path("diffusion_models", dit_name)
        header = checkpoint.read_header(path)
        info = detection.detect(header)
        detection.expect_family(info, {"stdit3", "mmdit"}, "Open-Sora DiT loader")
        fast = weight_dtype == FP8_FAST
        dtype = torch.float8_e4m3fn if fast else WEIGHT_DTYPES[weight_dtype]
        read_dtype = matrix_dtype = None  # as stored, so that "default" can keep an fp8 file's storage as core does
        keep_blocks = keep_scaled = False
        if checkpoint.is_quantized(path):  # scaled fp8 / GGUF: the comfy.ops layers take plain weights
            # The matrices go straight into their storage dtype (no bf16 copy of the whole model on the way to fp8: a
            # 0.8B-weight 2.0 DiT as Q8_0 GGUF, fp8, peaked at 2.4 GB anonymous memory before, 1.0 GB now); the small
            # rest is read in fp32, so load_weights rounds it once, to the compute dtype.
            read_dtype, matrix_dtype = torch.float32, dtype
            if dtype is None:  # Linear matrices stay packed (GGUF blocks, scaled fp8 rows: packed_layers.py) as core
                # keeps a scaled fp8 file; the rest goes into what default picks (fp32 on GPUs without bf16)
                params = sum(math.prod(shape) for _, shape in header.values())
                supported = [torch.bfloat16, torch.float32]
                dtype = matrix_dtype = comfy.model_management.unet_dtype(
                    model_params=params, supported_dtypes=supported
                )
                keep_blocks = gguf_file.is_gguf(path)
                keep_scaled = not keep_blocks
        if keep_blocks:
            sd = gguf_file.load_keeping_blocks(path, narrower_than=dtype)
            expanded = gguf_file.expanded_on_load(header)
            if expanded:
                kinds = ", ".join(f"{count} {qtype}" for qtype, count in expanded.items())
                log.warning(
                    "OpenSora: %s: %s matrices are dequantized on loading (into %s), so they take that dtype's "
                    "memory: the DiT keeps %s blocks only.",
                    dit_name,
                    kinds,
                    dtype,
                    " / ".join(gguf_dequant.BLOCKS),
                )
        else:
            pack = (lambda stored, scaled: scaled or stored.itemsize == 1) if keep_scaled else None  # fp8 (scale 1)
            sd = checkpoint.load_state_dict(path, dtype=read_dtype, matrix_dtype=matrix_dtype, pack=pack)
        sd = checkpoint.strip_prefix(sd, info.prefix)
        config_values = {**info.config, **(read_config_json(path) or {})}  # a folder's config.json wins
        build = build_mmdit_patcher if info.family == "mmdit" else build_stdit3_patcher
        patcher = build(sd, info, config_values, dtype, fp8_matmul=fast)
        patcher.model.diffusion_model.attention_backend = attention
        return (patcher,)


class OpenSoraLoadTextEncoder:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "t5_name": (
                    model_choices("text_encoders"),
                    {
                        "tooltip": "T5-v1.1-XXL from models/text_encoders: ComfyUI's t5xxl_fp16 / t5xxl_fp8_e4m3fn, a Hugging Face folder, or a GGUF. Matrices stay as narrow as the file stores them (an fp8 T5-XXL takes about 5 GB), with the same encodings as that file expanded to full precision on load."
                    },
                ),
                "precision": (
                    ["default", "fp32", "bf16"],
                    {
                        "default": "default",
                        "tooltip": "Compute dtype. default = what the official code uses: fp32 for 1.x, bf16 for 2.0. bf16 for 1.x halves the T5's memory with a tiny deviation from the official numbers.",
                    },
                ),
                "version": (
                    ["1.3", "1.2", "2.0"],
                    {
                        "default": "1.3",
                        "tooltip": "Which Open-Sora generation the prompts are for: 1.x uses 300 masked tokens, 2.0 512 unmasked tokens plus CLIP-L.",
                    },
                ),
            },
            "optional": {
                "clip_name": (
                    ["none", *model_choices("text_encoders")],
                    {"default": "none", "tooltip": "CLIP-L text model (clip_l.safetensors); needed for 2.0 only."},
                ),
                "tokenizer_folder": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Optional folder with the T5 tokenizer files. Empty: the tokenizer beside the model, else the one bundled with ComfyUI.",
                    },
                ),
                "device": (
                    ["default", "cpu"],
                    {
                        "default": "default",
                        "advanced": True,
                        "tooltip": "Where the encoders run. default: ComfyUI's text-encoder device (the GPU, offloaded after use). cpu: always on the CPU, as core's CLIP loaders offer: no VRAM at all (the 2.0 T5-XXL is 9.5 GB in bf16), slower encoding.",
                    },
                ),
            },
        }

    RETURN_TYPES = ("OPENSORA_TEXT_ENCODER",)
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/loaders"
    DESCRIPTION = "Load the T5 text encoder (and CLIP-L for 2.0) with Open-Sora's exact tokenisation rules."

    def load(self, t5_name, precision, version, clip_name="none", tokenizer_folder="", device="default"):
        from .text import TextEncoder

        check_choices(type(self), {"precision": precision, "version": version, "device": device})
        v2 = version == "2.0"
        if v2 and clip_name == "none":
            raise ValueError("Open-Sora 2.0 needs CLIP-L as well: choose clip_name (clip_l.safetensors)")
        settings = T5_V2 if v2 else T5_V1  # max_length, use_mask and the official dtype
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(precision, settings["dtype"])
        path = model_path("text_encoders", t5_name)
        tokenizer = tokenizer_folder.strip() or None
        if (
            tokenizer is None
            and not os.path.isfile(os.path.join(path, "tokenizer.json"))
            and not os.path.isfile(os.path.join(path, "spiece.model"))
        ):
            tokenizer = bundled_tokenizer("t5")
        clip_path = model_path("text_encoders", clip_name) if v2 else None
        # The version input splits ComfyUI's cache between 1.2 and 1.3, which read the T5 alike: share one copy.
        mm = comfy.model_management
        devices = "cpu" if device == "cpu" else (str(mm.text_encoder_device()), str(mm.text_encoder_offload_device()))
        key = (files_state(path), files_state(clip_path), tokenizer, dtype, devices, tuple(sorted(settings.items())))
        encoders = SHARED_ENCODERS.get(key)
        if encoders is None:
            encoders = load_encoders(path, tokenizer, clip_path, {**settings, "dtype": dtype}, device == "cpu")
            SHARED_ENCODERS[key] = encoders
        return (TextEncoder(version, encoders),)


# Encoders alive in some TextEncoder (a cached loader output), by the files and settings they were loaded with.
SHARED_ENCODERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def files_state(path: str | None) -> tuple:
    """What identifies a model file or folder's content on disk: each file's path, size and modification time."""
    if path is None:
        return ()
    paths = [os.path.join(path, name) for name in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
    return tuple((p, stat.st_size, stat.st_mtime_ns) for p in paths for stat in [os.stat(p)])


def load_encoders(t5_path: str, tokenizer: str | None, clip_path: str | None, settings: dict, on_cpu: bool):
    from .text import Encoders

    t5 = T5Embedder.from_files(t5_path, tokenizer_path=tokenizer, **settings, device="cpu")
    clip = None
    if clip_path is not None:
        clip = CLIPPooledEmbedder.from_files(
            clip_path, tokenizer_path=bundled_tokenizer("clip"), dtype=settings["dtype"], device="cpu"
        )
    return Encoders(
        t5,
        wrap_module(t5.model, "text_encoder", on_cpu),
        clip,
        wrap_module(clip.model, "text_encoder", on_cpu) if clip else None,
    )


class OpenSoraLoadVAE:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae_name": (
                    model_choices("vae"),
                    {
                        "tooltip": "An Open-Sora VAE from models/vae: 1.x (OpenSora-VAE-v1.2 or -v1.3 model.safetensors, or its folder) or the 2.0 Video DC-AE (F32T4C128_AE.safetensors). For 2.0 with the HunyuanVideo VAE use core's Load VAE with hunyuan_vae.safetensors."
                    },
                ),
                "dtype": (
                    ["default", "bf16", "fp32"],
                    {"default": "default", "tooltip": "default: bf16 on GPU (as the official inference), fp32 on CPU."},
                ),
            },
            "optional": {
                "dc_ae_scaling": (
                    list(DC_AE_SCALINGS),
                    {
                        "default": "trained 0.493",
                        "tooltip": "Video DC-AE only (ignored for 1.x VAEs). trained 0.493: latents are z / 0.493, the scaling the DC-AE DiT was trained with (recommended: without it the decoder gets the DiT's latents about 2x too large and i2v references reach the DiT at about half size). none: no scaling, exactly the official inference config (high_compression.py sets none, quirk Q12).",
                    },
                ),
            },
        }

    RETURN_TYPES = ("OPENSORA_VAE",)
    FUNCTION = "load"
    CATEGORY = f"{CATEGORY}/loaders"
    DESCRIPTION = "Load the Open-Sora 1.2 or 1.3 video VAE or the 2.0 Video DC-AE (detected from the weights)."

    def load(self, vae_name, dtype, dc_ae_scaling="trained 0.493"):
        check_choices(type(self), {"dtype": dtype, "dc_ae_scaling": dc_ae_scaling})
        path = model_path("vae", vae_name)
        info = detection.detect(checkpoint.read_header(path))
        detection.expect_family(info, {"vae_v12", "vae_v13", "dc_ae"}, "Open-Sora VAE loader")
        device = comfy.model_management.vae_device()
        if dtype == "default":
            torch_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        else:
            torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        sd = checkpoint.strip_prefix(checkpoint.load_state_dict(path), info.prefix)
        if info.family == "dc_ae":
            # Default: the trained 0.493, not the official inference config's none (Q12): see nodes/vae.py.
            return (build_dcae(info, sd, torch_dtype, DC_AE_SCALINGS[dc_ae_scaling]),)
        return (build_vae(info, sd, torch_dtype, path),)


NODE_CLASS_MAPPINGS = {
    "OpenSoraLoadDiT": OpenSoraLoadDiT,
    "OpenSoraLoadTextEncoder": OpenSoraLoadTextEncoder,
    "OpenSoraLoadVAE": OpenSoraLoadVAE,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "OpenSoraLoadDiT": "Load Open-Sora DiT",
    "OpenSoraLoadTextEncoder": "Load Open-Sora Text Encoder",
    "OpenSoraLoadVAE": "Load Open-Sora VAE",
}
