"""Safe checkpoint loading (safetensors only) and model-family detection from key names and shapes.

Nothing here unpickles: PyTorch pickles (.bin/.pt/.ckpt, zip or raw) are recognised by their magic bytes and
refused with a message. Every safetensors file is checked against its own header before any tensor is read,
so a truncated download fails with the expected and actual sizes instead of a deep library error.

Detection is a table of small signatures (keys that must / must not exist), tried under a few common
prefixes; a per-family builder then reads the shapes into a config dict with the OFFICIAL field names.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """A file or folder that is not a usable safetensors checkpoint (the message says why)."""


# ---------------------------------------------------------------------------------------------------------------
# Files


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2}
_DTYPE_BYTES |= {"I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_MAX_HEADER_BYTES = 100_000_000  # the format's own limit
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.safetensors$")
_PICKLE_HINT = "this is a PyTorch pickle checkpoint, which is not loaded for safety; convert it to safetensors"


def _foreign_format(head: bytes) -> str | None:
    """Name what a file is when its first bytes show it is not safetensors."""
    if head.startswith(b"PK\x03\x04"):
        return _PICKLE_HINT + " (zip archive written by torch.save)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return _PICKLE_HINT + " (raw pickle stream)"
    if head.startswith(b"GGUF"):
        return "this is a GGUF file; load it with ComfyUI-GGUF, or use a .safetensors file here"
    if head.startswith(b"version "):
        return "this is a Git LFS pointer file, not the weights; fetch the real file (git lfs pull)"
    if head.lstrip().lower().startswith((b"<!doctype", b"<html")):
        return "this is an HTML page, not weights (a failed download?)"
    return None


def _check_file(path: Path) -> dict[str, Any]:
    """Validate one safetensors file against its header without reading tensor data; return the header."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); the download or copy probably failed")
    with open(path, "rb") as f:
        head = f.read(16)
        foreign = _foreign_format(head)
        if foreign:
            raise CheckpointError(f"{path}: {foreign}")
        if size < 8:
            raise CheckpointError(f"{path}: truncated safetensors file: {size} bytes, shorter than the 8-byte header")
        header_len = int.from_bytes(head[:8], "little")
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(
                f"{path}: not a valid safetensors file, or truncated: its header length field says {header_len} "
                f"bytes but the whole file has {size} bytes"
            )
        f.seek(8)
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    data_end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = [int(x) for x in entry["shape"]]
            dtype = str(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header: bad entry for tensor {key!r}") from None
        if dtype in _DTYPE_BYTES and end - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: tensor {key!r} ({dtype} {shape}) needs "
                f"{math.prod(shape) * _DTYPE_BYTES[dtype]} bytes but is given {end - begin}"
            )
        data_end = max(data_end, end)
    expected = 8 + header_len + data_end
    if size < expected:
        raise CheckpointError(
            f"{path}: truncated safetensors file: its header describes {expected} bytes but the file has {size} "
            f"bytes ({expected - size} missing); download or copy it again"
        )
    if size > expected:
        raise CheckpointError(
            f"{path}: corrupt safetensors file: {size - expected} unexpected bytes after the tensor data "
            f"(expected {expected} bytes, found {size})"
        )
    return header


def _shards_from_index(folder: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    files = [folder / name for name in sorted(set(weight_map.values()))]
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{index} lists the shard {file.name}, which is missing from {folder}")
    return files


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors file(s) behind a file path or an HF-style folder (single file or shards + index)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_file():
        return [path]
    for stem in ("model", "diffusion_pytorch_model"):
        index = path / f"{stem}.safetensors.index.json"
        if index.is_file():
            return _shards_from_index(path, index)
        if (path / f"{stem}.safetensors").is_file():
            return [path / f"{stem}.safetensors"]
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".sft"))
    shards = [m for m in (_SHARD.match(p.name) for p in found) if m]
    if shards and len(shards) == len(found) and len({m["stem"] + m["total"] for m in shards}) == 1:
        total = int(shards[0]["total"])
        if len(found) != total:
            raise FileNotFoundError(f"{path}: found {len(found)} of {total} shards; some are missing")
        return found
    if len(found) == 1:
        return found
    if found:
        raise CheckpointError(f"{path}: several weight files, pass one of them: {', '.join(p.name for p in found)}")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{path}: only PyTorch pickle weights here ({', '.join(pickles[:4])}); {_PICKLE_HINT}")
    names = sorted(p.name for p in path.iterdir())[:8]
    raise FileNotFoundError(
        f"{path}: no weights in this folder (looked for model.safetensors, diffusion_pytorch_model.safetensors, "
        f"*.safetensors shards with an index); it holds: {', '.join(names) or 'nothing'}"
    )


def read_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (safetensors dtype string, shape)} for a file or folder, without reading tensor data."""
    result: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in weight_files(path):
        for key, entry in _check_file(file).items():
            if key == "__metadata__":
                continue
            if key in result:
                raise CheckpointError(f"{path}: tensor {key!r} appears in more than one shard")
            result[key] = (str(entry["dtype"]), tuple(int(x) for x in entry["shape"]))
    if not result:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    return result


_UNSUPPORTED_QUANT = (".comfy_quant", ".weight_scale", ".weight_scale_2", ".input_scale")


def load_state_dict(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    select: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Load a safetensors file or folder. Every file is validated before anything is read.

    dtype=None returns the tensors as stored. With a dtype, floating tensors (fp8 included) are cast to it one
    at a time, and ComfyUI "scaled fp8" weights are dequantized (weight * scale_weight; the scale keys are dropped).
    `select(key)` -> False skips a tensor without reading it (e.g. the decoder of a full T5 checkpoint).
    """
    files = weight_files(path)
    headers = {file: _check_file(file) for file in files}
    keys = [k for h in headers.values() for k in h if k != "__metadata__"]
    if not keys:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    scales: dict[str, torch.Tensor] = {}
    if dtype is not None:
        odd = [k for k in keys if k.endswith(_UNSUPPORTED_QUANT)]
        if odd:
            raise CheckpointError(
                f"{path}: uses a quantization format this loader does not dequantize (e.g. {odd[0]}); "
                "use an fp32, fp16, bf16 or fp8_e4m3fn (optionally scaled) file"
            )
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key.endswith(".scale_weight"):
                        scales[key[: -len("scale_weight")] + "weight"] = f.get_tensor(key).float()
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if dtype is not None and (key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input"))):
                    continue
                if select is not None and not select(key):
                    continue
                tensor = f.get_tensor(key)
                if dtype is not None and tensor.is_floating_point():
                    if key in scales:
                        tensor = tensor.float() * scales[key]
                    tensor = tensor.to(dtype)
                state_dict[key] = tensor.to(device)
    return state_dict


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Keys under `prefix` with the prefix removed; other keys are dropped (e.g. a CLIP vision tower)."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------------------------
# Detection


@dataclass
class ModelInfo:
    family: str  # one of FAMILIES
    version: str | None  # "1.2", "1.3", "2.0" or None (used by several)
    description: str
    config: dict[str, Any] = field(default_factory=dict)  # official config field names
    prefix: str = ""  # strip this from the keys before loading (see strip_prefix)


@dataclass(frozen=True)
class Signature:
    family: str
    required: tuple[str, ...]
    forbidden: tuple[str, ...] = ()
    any_of: tuple[str, ...] = ()  # at least one of these must exist


# Order matters only across prefixes of merged files: diffusion models first. The entries are mutually exclusive.
SIGNATURES = (
    Signature("stdit3", ("x_embedder.proj.weight", "spatial_blocks.0.attn.qkv.weight", "y_embedder.y_proj.fc1.weight")),
    # Open-Sora 2.0: split q/k/v and/or the cond_in image-conditioning layer
    Signature(
        "mmdit",
        ("img_in.weight", "txt_in.weight", "double_blocks.0.img_mod.lin.weight"),
        any_of=("cond_in.weight", "double_blocks.0.img_attn.q_proj.weight"),
    ),
    Signature(
        "flux",
        ("img_in.weight", "txt_in.weight", "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"),
        forbidden=("cond_in.weight",),
    ),
    Signature("vae_v12", ("spatial_vae.module.encoder.conv_in.weight", "temporal_vae.encoder.conv_in.conv.weight")),
    Signature("vae_v13", ("encoder.down.0.block.0.conv1.conv.weight", "decoder.conv_in.conv.weight")),
    Signature("hunyuan_vae", ("encoder.down_blocks.0.resnets.0.conv1.conv.weight", "decoder.conv_in.conv.weight")),
    Signature("flux_ae", ("encoder.down.0.block.0.conv1.weight", "decoder.conv_in.weight")),
    Signature("dc_ae", ("encoder.project_in.conv.weight", "decoder.project_in.main.conv.weight")),
    Signature(
        "t5",
        ("encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.final_layer_norm.weight"),
        any_of=("shared.weight", "encoder.embed_tokens.weight"),
    ),
    Signature("clip_l", ("embeddings.token_embedding.weight", "encoder.layers.0.self_attn.q_proj.weight")),
)
FAMILIES = tuple(s.family for s in SIGNATURES)
PREFIXES = ("", "model.diffusion_model.", "diffusion_model.", "model.", "module.", "text_model.", "first_stage_model.")
PREFIXES += ("vae.",)

FAMILY_LABELS = {
    "stdit3": "an Open-Sora STDiT3 (1.2/1.3)",
    "mmdit": "an Open-Sora 2.0 MMDiT",
    "flux": "a FLUX.1 transformer (BFL layout)",
    "vae_v12": "an Open-Sora 1.2 VAE",
    "vae_v13": "an Open-Sora 1.3 VAE",
    "hunyuan_vae": "a HunyuanVideo VAE (Open-Sora 2.0)",
    "flux_ae": "a FLUX.1 autoencoder",
    "dc_ae": "a Video DC-AE (Open-Sora 2.0 high compression)",
    "t5": "a T5 encoder",
    "clip_l": "a CLIP text encoder",
}


class _Shapes:
    """Key -> shape view of one model (prefix already removed), with helpers for the builders."""

    def __init__(self, family: str, shapes: dict[str, tuple[int, ...]]):
        self.family, self.shapes = family, shapes

    def has(self, key: str) -> bool:
        return key in self.shapes

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.shapes:
            raise CheckpointError(f"this {self.family} checkpoint is incomplete: it has no {key!r}")
        return self.shapes[key]

    def count(self, stem: str) -> int:
        """Number of indexed children `stem{i}.` (max index + 1)."""
        pattern = re.compile(re.escape(stem) + r"(\d+)\.")
        found = {int(m.group(1)) for k in self.shapes if (m := pattern.match(k))}
        return max(found) + 1 if found else 0


def _stdit3(s: _Shapes) -> tuple[str | None, dict, str]:
    hidden, in_channels, *patch = s.shape("x_embedder.proj.weight")
    head_dim = s.shape("spatial_blocks.0.attn.q_norm.weight")[0] if s.has("spatial_blocks.0.attn.q_norm.weight") else 72
    out_channels = s.shape("final_layer.linear.weight")[0] // math.prod(patch)
    if s.has("x_embedder_cond.proj.weight"):  # 1.3 always builds the i2v embedders
        version = "1.3"
    elif s.has("rope.freqs"):  # 1.2 rotates the full head (dim/2 freqs); 1.3 rotates head/3 chunks (dim/6)
        version = "1.3" if s.shape("rope.freqs")[0] * 6 == head_dim else "1.2"
    else:
        version = "1.2" if in_channels == 4 else "1.3"
    config = dict(
        in_channels=in_channels,
        patch_size=tuple(patch),
        hidden_size=hidden,
        depth=s.count("spatial_blocks."),
        num_heads=hidden // head_dim,
        mlp_ratio=s.shape("spatial_blocks.0.mlp.fc1.weight")[0] / hidden,
        pred_sigma=out_channels == 2 * in_channels,
        caption_channels=s.shape("y_embedder.y_proj.fc1.weight")[1],
        model_max_length=s.shape("y_embedder.y_embedding")[0] if s.has("y_embedder.y_embedding") else 300,
        qk_norm=s.has("spatial_blocks.0.attn.q_norm.weight"),
        input_sq_size=512,
        class_dropout_prob=0.1,
    )
    if version == "1.3":
        config.update(kernel_size=(8, 8, -1), use_spatial_rope=True)  # OPENSORA.md Q8: not in the 1.3 config.json
    extra = ", with i2v embedders" if s.has("x_embedder_cond.proj.weight") else ""
    text = (
        f"Open-Sora {version} STDiT3 (hidden {hidden}, depth {config['depth']}, {in_channels} latent channels{extra})"
    )
    return version, config, text


def _flux_like(s: _Shapes, open_sora: bool) -> tuple[str | None, dict, str]:
    hidden, in_channels = s.shape("img_in.weight")
    head_dim = s.shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    fused = s.has("double_blocks.0.img_attn.qkv.weight")
    cond_embed = s.has("cond_in.weight")
    patch_size = 2
    if cond_embed:  # cond_in takes in_channels + patch_size**2 features (the mask channel per sub-pixel)
        patch_size = math.isqrt(s.shape("cond_in.weight")[1] - in_channels)
    bias_key = "double_blocks.0.img_attn." + ("qkv.bias" if fused else "q_proj.bias")
    time_axis = head_dim // 8  # official split of 128 is [16, 56, 56]; scaled the same way for other head sizes
    config = dict(
        in_channels=in_channels,
        vec_in_dim=s.shape("vector_in.in_layer.weight")[1],
        context_in_dim=s.shape("txt_in.weight")[1],
        hidden_size=hidden,
        mlp_ratio=s.shape("double_blocks.0.img_mlp.0.weight")[0] / hidden,
        num_heads=hidden // head_dim,
        depth=s.count("double_blocks."),
        depth_single_blocks=s.count("single_blocks."),
        axes_dim=[time_axis, (head_dim - time_axis) // 2, (head_dim - time_axis) // 2],
        theta=10_000,
        qkv_bias=s.has(bias_key),
        guidance_embed=s.has("guidance_in.in_layer.weight"),
        cond_embed=cond_embed,
        fused_qkv=fused,
        use_liger_rope=open_sora,  # Open-Sora 2.0 was trained with half-split RoPE; Flux is interleaved (Q25)
        patch_size=patch_size,
    )
    size = f"hidden {hidden}, {config['depth']} double + {config['depth_single_blocks']} single blocks"
    if open_sora:
        latent = " for the Video DC-AE latent" if in_channels == 128 else ""
        text = f"Open-Sora 2.0 MMDiT{latent} ({size}, in_channels {in_channels}, patch {patch_size})"
    else:
        kind = "dev (guidance-distilled)" if config["guidance_embed"] else "schnell-type (no guidance input)"
        text = f"FLUX.1 {kind} transformer, BFL layout ({size})"
    return "2.0", config, text


def _vae_v12(s: _Shapes) -> tuple[str | None, dict, str]:
    sp, tp = "spatial_vae.module.", "temporal_vae."
    levels = s.count(sp + "encoder.down_blocks.")
    filters, in_out = s.shape(tp + "encoder.conv_in.conv.weight")[:2]
    blocks = s.count(tp + "encoder.block_res_blocks.")
    vae_2d = dict(
        block_out_channels=[s.shape(f"{sp}encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels)],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        latent_channels=s.shape(sp + "post_quant_conv.weight")[0],
        layers_per_block=s.count(sp + "encoder.down_blocks.0.resnets."),
        norm_num_groups=32,  # not visible in shapes; the official SDXL-type VAE uses 32
        in_channels=s.shape(sp + "encoder.conv_in.weight")[1],
        out_channels=s.shape(sp + "decoder.conv_out.weight")[0],
        act_fn="silu",
        micro_batch_size=4,
    )
    vae_temporal = dict(
        type="VAE_Temporal_SD",
        in_out_channels=in_out,
        latent_embed_dim=s.shape(tp + "post_quant_conv.conv.weight")[0],
        embed_dim=s.shape(tp + "post_quant_conv.conv.weight")[1],
        filters=filters,
        num_res_blocks=s.count(tp + "encoder.block_res_blocks.0."),
        channel_multipliers=[
            s.shape(f"{tp}encoder.block_res_blocks.{i}.0.conv1.conv.weight")[0] // filters for i in range(blocks)
        ],
        # a level without temporal downsampling has an Identity (no weights) in conv_blocks
        temporal_downsample=[s.has(f"{tp}encoder.conv_blocks.{i}.conv.weight") for i in range(blocks - 1)],
        num_groups=32,  # not visible in shapes; official value
        activation_fn="swish",
    )
    config = dict(
        vae_2d=vae_2d,
        vae_temporal=vae_temporal,
        micro_frame_size=17,
        shift=[-0.10, 0.34, 0.27, 0.98],  # official values; the checkpoint's own buffers are loaded over them
        scale=[3.85, 2.32, 2.33, 3.06],
    )
    return "1.2", config, f"Open-Sora 1.2 VAE (2-D KL-VAE + temporal VAE, {vae_2d['latent_channels']} latent channels)"


def _vae_v13(s: _Shapes) -> tuple[str | None, dict, str]:
    ch, in_channels = s.shape("encoder.conv_in.conv.weight")[:2]
    z_channels = s.shape("decoder.conv_in.conv.weight")[1]
    levels = s.count("encoder.down.")
    out_ch = s.shape("decoder.conv_out.weight")[0]
    encoder = dict(
        type="VideoEncoder",
        double_z=s.shape("encoder.conv_out.conv.weight")[0] == 2 * z_channels,
        z_channels=z_channels,
        in_channels=in_channels,
        out_ch=out_ch,
        ch=ch,
        ch_mult=[s.shape(f"encoder.down.{i}.block.0.conv1.conv.weight")[0] // ch for i in range(levels)],
        num_res_blocks=s.count("encoder.down.0.block."),
        down_sampling_layer=[i for i in range(levels) if s.has(f"encoder.down.{i}.downsample.conv.conv.weight")],
        micro_batch_size_2d=4,
    )
    decoder = dict(
        type="VideoDecoder",
        z_channels=z_channels,
        in_channels=in_channels,
        out_ch=out_ch,
        ch=ch,
        ch_mult=[s.shape(f"decoder.up.{i}.block.0.conv1.conv.weight")[0] // ch for i in range(levels)],
        num_res_blocks=s.count("decoder.up.0.block.") - 1,  # the decoder has num_res_blocks + 1 per level
        temporal_up_layers=[i for i in range(levels) if s.has(f"decoder.up.{i}.upsample.conv3d.conv1.conv.weight")],
        micro_batch_size_2d=4,
    )
    # runtime options of the released inference configs (configs/opensora-v1-3/inference/*.py)
    config = dict(encoder=encoder, decoder=decoder, micro_batch_size=1, micro_batch_size_2d=4, micro_frame_size=17)
    config.update(use_tiled_conv3d=True, tile_size=4, temporal_overlap=True, normalization="video")
    return "1.3", config, f"Open-Sora 1.3 VAE ({z_channels} latent channels, ch {ch})"


def _hunyuan_vae(s: _Shapes) -> tuple[str | None, dict, str]:
    levels = s.count("encoder.down_blocks.")
    latent = s.shape("post_quant_conv.weight")[0]
    config = dict(
        act_fn="silu",
        in_channels=s.shape("encoder.conv_in.conv.weight")[1],
        out_channels=s.shape("decoder.conv_out.conv.weight")[0],
        latent_channels=latent,
        layers_per_block=s.count("encoder.down_blocks.0.resnets."),
        norm_num_groups=32,  # not visible in shapes; official value
        scale_factor=0.476986,
        shift_factor=0.0,
        time_compression_ratio=4,
        spatial_compression_ratio=2
        ** sum(s.has(f"encoder.down_blocks.{i}.downsamplers.0.conv.conv.weight") for i in range(levels)),
        mid_block_add_attention=s.has("encoder.mid_block.attentions.0.to_q.weight"),
        block_out_channels=[s.shape(f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight")[0] for i in range(levels)],
        sample_size=256,
        sample_tsize=64,
        use_spatial_tiling=True,  # configs/diffusion/inference/256px.py
        use_temporal_tiling=False,
        tile_overlap_factor=0.25,
    )
    return "2.0", config, f"HunyuanVideo causal 3-D VAE ({latent} latent channels), as used by Open-Sora 2.0"


def _flux_ae(s: _Shapes) -> tuple[str | None, dict, str]:
    ch, in_channels = s.shape("encoder.conv_in.weight")[:2]
    levels = s.count("encoder.down.")
    config = dict(
        resolution=256,
        in_channels=in_channels,
        ch=ch,
        out_ch=s.shape("decoder.conv_out.weight")[0],
        ch_mult=[s.shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(levels)],
        num_res_blocks=s.count("encoder.down.0.block."),
        z_channels=s.shape("decoder.conv_in.weight")[1],
        scale_factor=0.3611,
        shift_factor=0.1159,
    )
    return "2.0", config, f"FLUX.1 2-D autoencoder ({config['z_channels']} latent channels)"


def _dc_ae(s: _Shapes) -> tuple[str | None, dict, str]:
    def stages(part: str) -> tuple[list[int], list[int], list[str]]:
        widths, depths, kinds = [], [], []
        for i in range(s.count(f"{part}.stages.")):
            ops = range(s.count(f"{part}.stages.{i}.op_list."))
            res = [j for j in ops if s.has(f"{part}.stages.{i}.op_list.{j}.main.conv1.conv.weight")]
            vit = [j for j in ops if s.has(f"{part}.stages.{i}.op_list.{j}.context_module.main.qkv.conv.weight")]
            if res:
                widths.append(s.shape(f"{part}.stages.{i}.op_list.{res[0]}.main.conv1.conv.weight")[0])
            else:
                widths.append(s.shape(f"{part}.stages.{i}.op_list.{vit[0]}.context_module.main.qkv.conv.weight")[1])
            depths.append(len(res) + len(vit))
            kinds.append("ResBlock" if res else "EViTS5_GLU")
        return widths, depths, kinds

    enc_w, enc_d, enc_k = stages("encoder")
    dec_w, dec_d, dec_k = stages("decoder")
    latent = s.shape("decoder.project_in.main.conv.weight")[1]
    down = [False, False, False, True, True, False]  # temporal x4 is not visible in shapes; official layout

    def listed(values: list) -> str:
        return "[" + ",".join(map(str, values)) + "]"

    dotlist = [  # same order as the official dc_ae_f32; norms/activations are not visible in shapes
        "time_compression_ratio=4",
        f"spatial_compression_ratio={2 ** (len(enc_w) - 1)}",
        f"encoder.block_type={listed(enc_k)}",
        f"encoder.width_list={listed(enc_w)}",
        f"encoder.depth_list={listed(enc_d)}",
        "encoder.downsample_block_type=Conv",
        "encoder.norm=rms3d",
        "encoder.is_video=True",
        f"decoder.block_type={listed(dec_k)}",
        f"decoder.width_list={listed(dec_w)}",
        f"decoder.depth_list={listed(dec_d)}",
        "decoder.upsample_block_type=InterpolateConv",
        "decoder.norm=rms3d",
        "decoder.act=silu",
        "decoder.out_norm=rms3d",
        "decoder.is_video=True",
        f"encoder.temporal_downsample={listed(down)}",
        f"decoder.temporal_upsample={listed(down)}",
        f"latent_channels={latent}",
    ]
    config = dict(
        model_name="dc-ae-f32t4c128",
        dotlist=dotlist,
        width_list=enc_w,
        depth_list=enc_d,
        decoder_depth_list=dec_d,
        latent_channels=latent,
        # runtime options of configs/diffusion/inference/high_compression.py (scaling unset there, see Q12)
        use_spatial_tiling=True,
        use_temporal_tiling=True,
        spatial_tile_size=256,
        temporal_tile_size=32,
        tile_overlap_factor=0.25,
        scaling_factor=None,
    )
    return "2.0", config, f"Video DC-AE (x{2 ** (len(enc_w) - 1)} spatial, {latent} latent channels)"


def _t5(s: _Shapes) -> tuple[str | None, dict, str]:
    vocab, d_model = s.shape("shared.weight" if s.has("shared.weight") else "encoder.embed_tokens.weight")
    buckets, heads = s.shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    gated = s.has("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    ff_key = "encoder.block.0.layer.1.DenseReluDense." + ("wi_0.weight" if gated else "wi.weight")
    config = dict(  # transformers T5Config field names
        vocab_size=vocab,
        d_model=d_model,
        d_kv=s.shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0] // heads,
        d_ff=s.shape(ff_key)[0],
        num_layers=s.count("encoder.block."),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu" if gated else "relu",  # t5 v1.1 is gated-gelu
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
    )
    name = "T5 v1.1 XXL encoder" if (d_model, config["num_layers"]) == (4096, 24) else "T5 encoder"
    return None, config, f"{name} (d_model {d_model}, {config['num_layers']} layers, {heads} heads)"


def _clip_l(s: _Shapes) -> tuple[str | None, dict, str]:
    vocab, hidden = s.shape("embeddings.token_embedding.weight")
    config = dict(  # transformers CLIPTextConfig field names
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=s.shape("encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=s.count("encoder.layers."),
        num_attention_heads=hidden // 64,  # not visible in shapes; CLIP text towers use 64-dim heads
        max_position_embeddings=s.shape("embeddings.position_embedding.weight")[0],
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=768,
    )
    name = "CLIP ViT-L/14 text encoder" if hidden == 768 else f"CLIP text encoder (hidden {hidden}, not ViT-L/14)"
    return "2.0", config, f"{name}, {config['num_hidden_layers']} layers"


_BUILDERS: dict[str, Callable[[_Shapes], tuple[str | None, dict, str]]] = {
    "stdit3": _stdit3,
    "mmdit": lambda s: _flux_like(s, open_sora=True),
    "flux": lambda s: _flux_like(s, open_sora=False),
    "vae_v12": _vae_v12,
    "vae_v13": _vae_v13,
    "hunyuan_vae": _hunyuan_vae,
    "flux_ae": _flux_ae,
    "dc_ae": _dc_ae,
    "t5": _t5,
    "clip_l": _clip_l,
}


def _as_shape(value: Any) -> tuple[int, ...]:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        return tuple(int(x) for x in value[1])  # (dtype, shape) from read_header
    return tuple(int(x) for x in value)


def _matches(signature: Signature, keys: set[str], prefix: str) -> bool:
    return (
        all(prefix + k in keys for k in signature.required)
        and not any(prefix + k in keys for k in signature.forbidden)
        and (not signature.any_of or any(prefix + k in keys for k in signature.any_of))
    )


def detect(keys_and_shapes: Mapping[str, Any]) -> ModelInfo:
    """Identify a checkpoint from {key: shape} (or read_header's {key: (dtype, shape)}, or a state dict)."""
    if not keys_and_shapes:
        raise CheckpointError("the checkpoint holds no tensors")
    keys = set(keys_and_shapes)
    for signature in SIGNATURES:
        for prefix in PREFIXES:
            if _matches(signature, keys, prefix):
                view = {k[len(prefix) :]: _as_shape(v) for k, v in keys_and_shapes.items() if k.startswith(prefix)}
                version, config, text = _BUILDERS[signature.family](_Shapes(signature.family, view))
                return ModelInfo(signature.family, version, text, config, prefix)
    sample = ", ".join(sorted(keys)[:6])
    raise CheckpointError(
        f"unrecognised checkpoint ({len(keys)} tensors; first keys: {sample}). Known families: {', '.join(FAMILIES)}"
    )


def detect_file(path: str | Path) -> ModelInfo:
    """detect() on a file or folder, reading only the headers."""
    return detect(read_header(path))


def _label(info: ModelInfo) -> str:
    if info.family == "stdit3" and info.version:
        return f"an Open-Sora {info.version} STDiT3"
    return FAMILY_LABELS.get(info.family, info.family)


def expect_family(info: ModelInfo, allowed: Iterable[str], what: str) -> None:
    """Raise a ValueError naming what was found and what `what` (e.g. "1.x DiT loader") accepts."""
    allowed = set(allowed)
    if info.family in allowed:
        return
    order = sorted(allowed, key=lambda f: FAMILIES.index(f) if f in FAMILIES else len(FAMILIES))
    expected = " or ".join(FAMILY_LABELS.get(f, f) for f in order)
    raise CheckpointError(f"this is {_label(info)} checkpoint ({info.description}); the {what} expects {expected}")
