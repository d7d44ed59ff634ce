"""Per-frame 2-D KL-VAE with the diffusers `AutoencoderKL` parameter layout, in plain torch.

Open-Sora 1.2 wraps the SDXL-type VAE (`PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers`) as its spatial stage.
Only the forward maths of diffusers' `AutoencoderKL` (DownEncoderBlock2D / UpDecoderBlock2D, a mid block with one
single-head attention, GroupNorm eps 1e-6) is reproduced here; no diffusers import. Also holds `tiled_apply`, the
overlap-and-blend helper used for optional spatial tiling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .configs import check_field_types

_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "mish": F.mish, "gelu": F.gelu, "relu": F.relu}
# diffusers config keys that change nothing in the forward pass (sample_size only drives diffusers' own tiling;
# scaling_factor is unused because Open-Sora 1.2 hard-codes 0.18215, quirk Q11).
_IGNORED_KEYS = {
    "sample_size",
    "scaling_factor",
    "shift_factor",
    "force_upcast",
    "latents_mean",
    "latents_std",
}
_RESNET_EPS = 1e-6  # diffusers VAE blocks use resnet_eps=1e-6 everywhere


@dataclass
class AutoencoderKLConfig:
    """diffusers AutoencoderKL config fields; defaults = the SDXL-type VAE inside Open-Sora VAE 1.2."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    def __post_init__(self) -> None:
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        levels = len(self.block_out_channels)
        if levels == 0:
            raise ValueError("block_out_channels must not be empty")
        if self.down_block_types != ("DownEncoderBlock2D",) * levels:
            raise ValueError(f"down_block_types must be {levels} x 'DownEncoderBlock2D', got {self.down_block_types}")
        if self.up_block_types != ("UpDecoderBlock2D",) * levels:
            raise ValueError(f"up_block_types must be {levels} x 'UpDecoderBlock2D', got {self.up_block_types}")
        if self.act_fn not in _ACTIVATIONS:
            raise ValueError(f"act_fn {self.act_fn!r} is not supported; allowed: {sorted(_ACTIVATIONS)}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")

    @classmethod
    def from_dict(cls, values: dict) -> AutoencoderKLConfig:
        """Build from a diffusers-style config dict; metadata keys ('_class_name', ...) are ignored."""
        known = {f.name for f in fields(cls)}
        check_config_keys(values, known, _IGNORED_KEYS, "AutoencoderKL")
        check_field_types(cls, values, "AutoencoderKL")
        return cls(**{k: v for k, v in values.items() if k in known})

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def check_config_keys(values: dict, allowed: set, ignored: set, what: str) -> None:
    """Reject keys that are neither fields (`allowed`) nor known loader/metadata keys; "_"-prefixed ones pass."""
    unknown = sorted(k for k in values if k not in allowed and k not in ignored and not k.startswith("_"))
    if unknown:
        raise ValueError(f"unknown {what} config keys {unknown}; allowed: {sorted(allowed)}")


def _ops(operations):
    return operations if operations is not None else nn


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels, out_channels, groups, act, dtype=None, device=None, operations=None):
        super().__init__()
        ops = _ops(operations)
        self.act = act
        self.norm1 = ops.GroupNorm(groups, in_channels, eps=_RESNET_EPS, dtype=dtype, device=device)
        self.conv1 = ops.Conv2d(in_channels, out_channels, 3, padding=1, dtype=dtype, device=device)
        self.norm2 = ops.GroupNorm(groups, out_channels, eps=_RESNET_EPS, dtype=dtype, device=device)
        self.conv2 = ops.Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype, device=device)
        self.conv_shortcut = None
        if in_channels != out_channels:
            self.conv_shortcut = ops.Conv2d(in_channels, out_channels, 1, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nn.Module):
    def __init__(self, channels, dtype=None, device=None, operations=None):
        super().__init__()
        self.conv = _ops(operations).Conv2d(channels, channels, 3, stride=2, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # diffusers VAE downsampling: pad right/bottom by one, no symmetric padding (odd sizes floor)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    def __init__(self, channels, dtype=None, device=None, operations=None):
        super().__init__()
        self.conv = _ops(operations).Conv2d(channels, channels, 3, padding=1, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock2D(nn.Module):
    def __init__(
        self, in_channels, out_channels, layers, downsample, groups, act, dtype=None, device=None, operations=None
    ):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act, **kw)
            for i in range(layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, **kw)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(
        self, in_channels, out_channels, layers, upsample, groups, act, dtype=None, device=None, operations=None
    ):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, act, **kw)
            for i in range(layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, **kw)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlockAttention(nn.Module):
    """Single-head self-attention over all pixels of a frame, with residual (diffusers VAE mid-block)."""

    def __init__(self, channels, groups, dtype=None, device=None, operations=None):
        super().__init__()
        ops = _ops(operations)
        self.group_norm = ops.GroupNorm(groups, channels, eps=_RESNET_EPS, dtype=dtype, device=device)
        self.to_q = ops.Linear(channels, channels, dtype=dtype, device=device)
        self.to_k = ops.Linear(channels, channels, dtype=dtype, device=device)
        self.to_v = ops.Linear(channels, channels, dtype=dtype, device=device)
        self.to_out = nn.ModuleList([ops.Linear(channels, channels, dtype=dtype, device=device)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # [N, HW, C]
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # one head of width C
        h = self.to_out[0](attention(q, k, v).squeeze(1))
        return x + h.transpose(1, 2).reshape(batch, channels, height, width)


class UNetMidBlock2D(nn.Module):
    def __init__(self, channels, groups, act, add_attention, dtype=None, device=None, operations=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups, act, **kw) for _ in range(2)])
        self.attentions = nn.ModuleList([MidBlockAttention(channels, groups, **kw)]) if add_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder2D(nn.Module):
    def __init__(self, config: AutoencoderKLConfig, dtype=None, device=None, operations=None):
        super().__init__()
        ops = _ops(operations)
        kw = dict(dtype=dtype, device=device, operations=operations)
        act, groups, channels = _ACTIVATIONS[config.act_fn], config.norm_num_groups, config.block_out_channels
        self.act = act
        self.conv_in = ops.Conv2d(config.in_channels, channels[0], 3, padding=1, dtype=dtype, device=device)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(
                channels[max(i - 1, 0)], out, config.layers_per_block, i < len(channels) - 1, groups, act, **kw
            )
            for i, out in enumerate(channels)
        )
        self.mid_block = UNetMidBlock2D(channels[-1], groups, act, config.mid_block_add_attention, **kw)
        self.conv_norm_out = ops.GroupNorm(groups, channels[-1], eps=_RESNET_EPS, dtype=dtype, device=device)
        self.conv_out = ops.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class Decoder2D(nn.Module):
    def __init__(self, config: AutoencoderKLConfig, dtype=None, device=None, operations=None):
        super().__init__()
        ops = _ops(operations)
        kw = dict(dtype=dtype, device=device, operations=operations)
        act, groups = _ACTIVATIONS[config.act_fn], config.norm_num_groups
        channels = tuple(reversed(config.block_out_channels))
        self.act = act
        self.conv_in = ops.Conv2d(config.latent_channels, channels[0], 3, padding=1, dtype=dtype, device=device)
        self.mid_block = UNetMidBlock2D(channels[0], groups, act, config.mid_block_add_attention, **kw)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(
                channels[max(i - 1, 0)], out, config.layers_per_block + 1, i < len(channels) - 1, groups, act, **kw
            )
            for i, out in enumerate(channels)
        )
        self.conv_norm_out = ops.GroupNorm(groups, channels[-1], eps=_RESNET_EPS, dtype=dtype, device=device)
        self.conv_out = ops.Conv2d(channels[-1], config.out_channels, 3, padding=1, dtype=dtype, device=device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class AutoencoderKL2D(nn.Module):
    """Frames [N, C, H, W] -> posterior moments [N, 2*latent, H/8, W/8] (floor) and latents -> frames (x8)."""

    def __init__(self, config: AutoencoderKLConfig, dtype=None, device=None, operations=None):
        super().__init__()
        ops = _ops(operations)
        self.config = config
        latent = config.latent_channels
        self.encoder = Encoder2D(config, dtype=dtype, device=device, operations=operations)
        self.decoder = Decoder2D(config, dtype=dtype, device=device, operations=operations)
        self.quant_conv = (
            ops.Conv2d(2 * latent, 2 * latent, 1, dtype=dtype, device=device) if config.use_quant_conv else None
        )
        self.post_quant_conv = (
            ops.Conv2d(latent, latent, 1, dtype=dtype, device=device) if config.use_post_quant_conv else None
        )

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior parameters: mean then logvar along channels (logvar not yet clamped)."""
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def split_moments(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of a diagonal Gaussian stored as [mean, logvar] along dim 1; logvar clamped to [-30, 20]."""
    mean, logvar = moments.chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


def _tile_starts(size: int, tile: int, stride: int, align: int) -> list[int]:
    """Start offsets (multiples of `align`) of tiles covering [0, size); the last tile runs to the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    last = (size - tile) // align * align
    if last > starts[-1]:
        starts.append(last)
    return starts


def _ramp(length: int, blend: int, rise: bool, fall: bool, like: torch.Tensor) -> torch.Tensor:
    """1-D blend weight: linear ramps of `blend` samples at the sides that overlap a neighbour, never zero."""
    weight = torch.ones(length, dtype=torch.float32, device=like.device)
    ramp = torch.arange(1, min(blend, length) + 1, dtype=torch.float32, device=like.device) / (blend + 1)
    if rise:
        weight[: ramp.numel()] = torch.minimum(weight[: ramp.numel()], ramp)
    if fall:
        weight[-ramp.numel() :] = torch.minimum(weight[-ramp.numel() :], ramp.flip(0))
    return weight


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    scale: float,
    align: int = 1,
) -> torch.Tensor:
    """Run `fn` on overlapping spatial tiles of x [..., H, W] and blend the results linearly.

    `tile` / `overlap` are in input samples; `fn` maps an h x w tile to about (h*scale) x (w*scale) (floor);
    tile starts are multiples of `align` so that scaled positions stay integral. Only an approximation of
    `fn(x)`: GroupNorm statistics and attention see one tile at a time.
    """
    height, width = x.shape[-2:]
    if height <= tile and width <= tile:
        return fn(x)
    stride = tile - overlap
    rows, cols = _tile_starts(height, tile, stride, align), _tile_starts(width, tile, stride, align)
    out = weights = None
    blend = max(int(overlap * scale), 1)
    for r, top in enumerate(rows):
        bottom = height if r == len(rows) - 1 else top + tile
        for c, left in enumerate(cols):
            right = width if c == len(cols) - 1 else left + tile
            piece = fn(x[..., top:bottom, left:right])
            if out is None:
                out_h, out_w = math.floor(height * scale), math.floor(width * scale)
                out = piece.new_zeros(*piece.shape[:-2], out_h, out_w, dtype=torch.float32)
                weights = torch.zeros(out_h, out_w, dtype=torch.float32, device=piece.device)
                out_dtype = piece.dtype
            ph, pw = piece.shape[-2:]
            oy, ox = int(top * scale), int(left * scale)
            weight = _ramp(ph, blend, r > 0, r < len(rows) - 1, piece)[:, None] * _ramp(
                pw, blend, c > 0, c < len(cols) - 1, piece
            )
            out[..., oy : oy + ph, ox : ox + pw] += piece.float() * weight
            weights[oy : oy + ph, ox : ox + pw] += weight
    return (out / weights).to(out_dtype)


__all__ = [
    "AutoencoderKLConfig",
    "AutoencoderKL2D",
    "split_moments",
    "tiled_apply",
]
