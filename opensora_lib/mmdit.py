"""Open-Sora 2.0 MMDiT (`MMDiTModel`, Flux-derived): config and model.

The official 11B model: 19 double + 38 single blocks, hidden 3072, 24 heads, separate q/k/v with bias,
QK RMSNorm, half-split (Liger) 3-axis RoPE, `cond_in` for the packed mask + reference latent, CLIP pooled
vector input, no guidance embedding. Inputs are packed tokens; packing lives in sampling_v2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .configs import check_field_types
from .mmdit_layers import (
    DoubleStreamBlock,
    LastLayer,
    MLPEmbedder,
    RotaryTables,
    SingleStreamBlock,
    rotary_tables,
    timestep_embedding,
)

# Optional per-block replacements, keyed ("double_block", i) or ("single_block", i): fn(args, {"original_block": f})
# returns a dict like args. args holds "img", "txt" (double blocks; a single block's "img" is the joint
# [txt, img] sequence), "vec", "pe"; f(args) runs the block itself. The protocol of ComfyUI's "dit" block
# patches (Flux), so its skip-layer guidance and block patches work unchanged.
BlockReplace = Mapping[tuple[str, int], Callable[[dict, dict], dict]]

# Official config fields that only matter for training / loading in the reference.
_IGNORED_FIELDS = ("from_pretrained", "cache_dir", "grad_ckpt_settings", "type", "model_type")


@dataclass
class MMDiTConfig:
    """Official `MMDiTConfig` fields (opensora/models/mmdit/model.py); defaults are the official ones."""

    in_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: list[int]
    theta: int
    qkv_bias: bool
    guidance_embed: bool
    cond_embed: bool = False
    fused_qkv: bool = True
    use_liger_rope: bool = False
    patch_size: int = 2
    out_channels: int | None = None  # not an official field: the reference always uses in_channels

    def __post_init__(self) -> None:
        self.axes_dim = [int(a) for a in self.axes_dim]
        if self.out_channels is None:
            self.out_channels = self.in_channels
        for name in ("in_channels", "vec_in_dim", "context_in_dim", "hidden_size", "num_heads", "patch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MMDiTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.depth < 0 or self.depth_single_blocks < 0:
            raise ValueError(
                f"MMDiTConfig depth / depth_single_blocks must be >= 0, got {self.depth} / {self.depth_single_blocks}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        if sum(self.axes_dim) != head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dim {head_dim}")
        if any(a % 2 for a in self.axes_dim):
            raise ValueError(f"every axes_dim entry must be even (RoPE rotates pairs), got {self.axes_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MMDiTConfig:
        """Build from official config / constructor keys; training-only keys are ignored, unknown ones rejected."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if k not in names and k not in _IGNORED_FIELDS)
        if unknown:
            raise ValueError(f"unknown MMDiTConfig field(s) {unknown}; known fields: {sorted(names)}")
        check_field_types(cls, values, "MMDiT")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in values]
        if missing:
            raise ValueError(f"MMDiTConfig is missing required field(s) {missing}")
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def mmdit_v2_config() -> MMDiTConfig:
    """Open_Sora_v2.safetensors (configs/diffusion/inference/256px.py and 768px.py)."""
    return MMDiTConfig(
        in_channels=64,
        vec_in_dim=768,
        context_in_dim=4096,
        hidden_size=3072,
        mlp_ratio=4.0,
        num_heads=24,
        depth=19,
        depth_single_blocks=38,
        axes_dim=[16, 56, 56],
        theta=10_000,
        qkv_bias=True,
        guidance_embed=False,
        cond_embed=True,
        fused_qkv=False,
        use_liger_rope=True,
        patch_size=2,
    )


def mmdit_v2_dcae_config() -> MMDiTConfig:
    """Open_Sora_v2_Video_DC_AE.safetensors (high_compression.py): 128 latent channels, patch 1."""
    return dataclasses.replace(mmdit_v2_config(), in_channels=128, out_channels=None, patch_size=1)


class MMDiT(nn.Module):
    """The official MMDiTModel: forward(img, img_ids, txt, txt_ids, timesteps, y_vec, cond, guidance)."""

    def __init__(self, config: MMDiTConfig | dict, dtype=None, device=None, operations=None):
        super().__init__()
        if isinstance(config, dict):
            config = MMDiTConfig.from_dict(config)
        self.config = config
        self._dtype = dtype
        operations = operations or nn
        factory = dict(dtype=dtype, device=device)
        hidden = config.hidden_size

        self.img_in = operations.Linear(config.in_channels, hidden, bias=True, **factory)
        self.time_in = MLPEmbedder(256, hidden, operations=operations, **factory)
        self.vector_in = MLPEmbedder(config.vec_in_dim, hidden, operations=operations, **factory)
        if config.guidance_embed:
            self.guidance_in = MLPEmbedder(256, hidden, operations=operations, **factory)
        if config.cond_embed:
            # Mask channel(s) (one per patch position) + the masked reference latent.
            cond_features = config.in_channels + config.patch_size**2
            self.cond_in = operations.Linear(cond_features, hidden, bias=True, **factory)
        self.txt_in = operations.Linear(config.context_in_dim, hidden, bias=True, **factory)

        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(
                hidden,
                config.num_heads,
                config.mlp_ratio,
                qkv_bias=config.qkv_bias,
                fused_qkv=config.fused_qkv,
                operations=operations,
                **factory,
            )
            for _ in range(config.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(
                hidden,
                config.num_heads,
                config.mlp_ratio,
                fused_qkv=config.fused_qkv,
                operations=operations,
                **factory,
            )
            for _ in range(config.depth_single_blocks)
        )
        self.final_layer = LastLayer(hidden, 1, config.out_channels, operations=operations, **factory)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the weights' dtype, or the constructor's when weights are stored narrower (fp8)."""
        weight_dtype = self.img_in.weight.dtype
        if weight_dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            return weight_dtype
        return self._dtype if self._dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16

    def rope(self, ids: Tensor) -> RotaryTables:
        """RoPE tables for (t, h, w) positions ids [B, L, 3]; computed once per forward."""
        return rotary_tables(ids, self.config.axes_dim, self.config.theta, half_split=self.config.use_liger_rope)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y_vec: Tensor,
        cond: Tensor | None = None,
        guidance: Tensor | None = None,
        block_replace: BlockReplace | None = None,
    ) -> Tensor:
        """img [B, L, in_channels] packed latent, txt [B, Lt, context_in_dim], ids [B or 1, L(t), 3],
        timesteps [B] in [0, 1], y_vec [B, vec_in_dim], cond [B, L, in_channels + patch^2];
        block_replace: see BlockReplace (none: the official forward). Returns the velocity [B, L, out_channels]."""
        config = self.config
        self._check_inputs(img, img_ids, txt, txt_ids, timesteps, y_vec, cond, guidance)

        x = self.img_in(img)
        if config.cond_embed:
            x = x + self.cond_in(cond)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(x.dtype))
        if config.guidance_embed:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(x.dtype))
        vec = vec + self.vector_in(y_vec)
        context = self.txt_in(txt)

        if txt_ids.shape[0] != img_ids.shape[0]:  # one side given once for the whole batch
            batch = max(txt_ids.shape[0], img_ids.shape[0])
            txt_ids, img_ids = txt_ids.expand(batch, -1, -1), img_ids.expand(batch, -1, -1)
        pe = self.rope(torch.cat((txt_ids, img_ids), dim=1))

        replace = block_replace or {}
        for index, block in enumerate(self.double_blocks):
            if ("double_block", index) in replace:
                x, context = _replaced_double(replace[("double_block", index)], block, x, context, vec, pe)
            else:
                x, context = block(x, context, vec, pe)
        txt_len = context.shape[1]
        joint = torch.cat((context, x), dim=1)
        del x, context  # the single blocks' peak holds no more than needed
        for index, block in enumerate(self.single_blocks):
            if ("single_block", index) in replace:
                joint = _replaced_single(replace[("single_block", index)], block, joint, vec, pe)
            else:
                joint = block(joint, vec, pe)
        return self.final_layer(joint[:, txt_len:], vec)

    def _check_inputs(self, img, img_ids, txt, txt_ids, timesteps, y_vec, cond, guidance) -> None:
        config = self.config
        if img.ndim != 3 or img.shape[-1] != config.in_channels:
            raise ValueError(f"img must be packed tokens [B, L, {config.in_channels}], got {tuple(img.shape)}")
        if txt.ndim != 3 or txt.shape[-1] != config.context_in_dim:
            raise ValueError(f"txt must be [B, L_txt, {config.context_in_dim}], got {tuple(txt.shape)}")
        batch = img.shape[0]
        for name, ids, length in (("img_ids", img_ids, img.shape[1]), ("txt_ids", txt_ids, txt.shape[1])):
            if ids.ndim != 3 or ids.shape[1:] != (length, len(config.axes_dim)) or ids.shape[0] not in (1, batch):
                raise ValueError(
                    f"{name} must be [B or 1, {length}, {len(config.axes_dim)}] position ids, got {tuple(ids.shape)}"
                )
        if txt.shape[0] != batch or y_vec.shape != (batch, config.vec_in_dim):
            raise ValueError(
                f"txt / y_vec batch must match img ({batch}) and y_vec must be [B, {config.vec_in_dim}]; "
                f"got txt {tuple(txt.shape)}, y_vec {tuple(y_vec.shape)}"
            )
        if timesteps.shape != (batch,):
            raise ValueError(f"timesteps must be [B] = [{batch}] values in [0, 1], got {tuple(timesteps.shape)}")
        if config.cond_embed:
            features = config.in_channels + config.patch_size**2
            if cond is None:
                raise ValueError("this MMDiT has cond_embed: pass cond (packed mask + masked reference; zeros for t2v)")
            if cond.shape != (batch, img.shape[1], features):
                raise ValueError(f"cond must be [{batch}, {img.shape[1]}, {features}], got {tuple(cond.shape)}")
        if config.guidance_embed and (guidance is None or guidance.shape != (batch,)):
            raise ValueError("this MMDiT has guidance_embed: pass guidance as a [B] tensor of guidance strengths")


def _replaced_double(replace, block, img, txt, vec, pe) -> tuple[Tensor, Tensor]:
    def original_block(args: dict) -> dict:
        img_out, txt_out = block(args["img"], args["txt"], args["vec"], args["pe"])
        return {"img": img_out, "txt": txt_out}

    out = replace({"img": img, "txt": txt, "vec": vec, "pe": pe}, {"original_block": original_block})
    return out["img"], out["txt"]


def _replaced_single(replace, block, joint, vec, pe) -> Tensor:
    def original_block(args: dict) -> dict:
        return {"img": block(args["img"], args["vec"], args["pe"])}

    return replace({"img": joint, "vec": vec, "pe": pe}, {"original_block": original_block})["img"]


__all__ = ["BlockReplace", "MMDiT", "MMDiTConfig", "mmdit_v2_config", "mmdit_v2_dcae_config"]
