"""Model-family detection from key names and shapes, with a clear error when a file is the wrong family.

Detection is a table of small signatures (keys that must / must not exist), tried under a few common
prefixes; the family's builder (family_configs.py) then reads the shapes into a config dict with the
OFFICIAL field names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, read_header
from .family_configs import CONFIG_BUILDERS, ShapeView


@dataclass
class ModelInfo:
    family: str  # one of FAMILIES
    version: str | None  # "1.2", "1.3", "2.0" or None (used by several)
    description: str
    config: dict[str, Any] = field(default_factory=dict)  # official config field names
    prefix: str = ""  # strip this from the keys before loading (see checkpoint.strip_prefix)


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
                version, config, text = CONFIG_BUILDERS[signature.family](ShapeView(signature.family, view))
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
