"""The causal temporal VAE of Open-Sora 1.2 (`VAE_Temporal_SD`, "MAGVIT-v2 style"), in plain torch.

It runs on the 4-channel latents of the per-frame 2-D VAE, [B, C, T, h, w], compressing time x4 with causal
3-D convolutions (zeros in front in time). Reference: `opensora/models/vae/vae_temporal.py` at v1.2.0.
Parameter names equal the released checkpoint keys (under `temporal_vae.`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .configs import check_field_types
from .vae_kl2d import check_config_keys

_TEMPORAL_ACTIVATIONS = {"swish": F.silu, "relu": F.relu}
_TEMPORAL_TYPES = {"VAE_Temporal", "VAE_Temporal_SD"}


@dataclass
class VAETemporalConfig:
    """`VAE_Temporal` constructor fields; defaults = `VAE_Temporal_SD` (the released temporal VAE)."""

    in_out_channels: int = 4
    latent_embed_dim: int = 4
    embed_dim: int = 4
    filters: int = 128
    num_res_blocks: int = 4
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    num_groups: int = 32
    activation_fn: str = "swish"

    def __post_init__(self) -> None:
        self.channel_multipliers = tuple(int(m) for m in self.channel_multipliers)
        self.temporal_downsample = tuple(bool(d) for d in self.temporal_downsample)
        if len(self.temporal_downsample) != len(self.channel_multipliers) - 1:
            raise ValueError(
                f"temporal_downsample needs {len(self.channel_multipliers) - 1} entries (one per level transition), "
                f"got {len(self.temporal_downsample)}"
            )
        if self.activation_fn not in _TEMPORAL_ACTIVATIONS:
            raise ValueError(
                f"activation_fn {self.activation_fn!r} not supported; allowed: {sorted(_TEMPORAL_ACTIVATIONS)}"
            )

    @classmethod
    def from_dict(cls, values: dict) -> VAETemporalConfig:
        kind = values.get("type", "VAE_Temporal")
        if kind not in _TEMPORAL_TYPES:
            raise ValueError(f"temporal VAE type {kind!r} not supported; allowed: {sorted(_TEMPORAL_TYPES)}")
        known = {f.name for f in fields(cls)}
        check_config_keys(values, known, {"type", "from_pretrained"}, "temporal VAE")
        check_field_types(cls, values, "temporal VAE")
        return cls(**{k: v for k, v in values.items() if k in known})

    @property
    def time_downsample_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)


def _ops(operations):
    return operations if operations is not None else nn


class CausalConv3d(nn.Module):
    """Conv3d padded with zeros at the front in time only (causal) and symmetrically in space."""

    def __init__(
        self, chan_in, chan_out, kernel_size, time_stride=1, bias=True, dtype=None, device=None, operations=None
    ):
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        self.padding = (kw // 2, kw // 2, kh // 2, kh // 2, kt - time_stride, 0)
        self.conv = _ops(operations).Conv3d(
            chan_in, chan_out, (kt, kh, kw), stride=(time_stride, 1, 1), bias=bias, dtype=dtype, device=device
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding) if any(self.padding) else x)


class ResBlock3D(nn.Module):
    def __init__(self, in_channels, filters, num_groups, act, dtype=None, device=None, operations=None):
        super().__init__()
        ops = _ops(operations)
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.act = act
        self.norm1 = ops.GroupNorm(num_groups, in_channels, dtype=dtype, device=device)
        self.conv1 = CausalConv3d(in_channels, filters, 3, bias=False, **kw)
        self.norm2 = ops.GroupNorm(num_groups, filters, dtype=dtype, device=device)
        self.conv2 = CausalConv3d(filters, filters, 3, bias=False, **kw)
        self.conv3 = CausalConv3d(in_channels, filters, 1, bias=False, **kw) if in_channels != filters else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        return h + (self.conv3(x) if self.conv3 is not None else x)


class TemporalEncoder(nn.Module):
    def __init__(self, config: VAETemporalConfig, dtype=None, device=None, operations=None):
        super().__init__()
        ops = _ops(operations)
        kw = dict(dtype=dtype, device=device, operations=operations)
        act, groups, blocks = _TEMPORAL_ACTIVATIONS[config.activation_fn], config.num_groups, config.num_res_blocks
        widths = [config.filters * m for m in config.channel_multipliers]
        self.act = act
        self.conv_in = CausalConv3d(config.in_out_channels, config.filters, 3, bias=False, **kw)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        previous = config.filters
        for level, width in enumerate(widths):
            res = [ResBlock3D(previous if i == 0 else width, width, groups, act, **kw) for i in range(blocks)]
            self.block_res_blocks.append(nn.ModuleList(res))
            previous = width if blocks else previous
            if level < len(widths) - 1:
                # an Identity (no keys) where time is not downsampled, as in the reference
                downsample = config.temporal_downsample[level]
                self.conv_blocks.append(
                    CausalConv3d(previous, width, 3, time_stride=2, **kw) if downsample else nn.Identity()
                )
                previous = width
        self.res_blocks = nn.ModuleList(
            ResBlock3D(previous if i == 0 else widths[-1], widths[-1], groups, act, **kw) for i in range(blocks)
        )
        self.norm1 = ops.GroupNorm(groups, widths[-1], dtype=dtype, device=device)
        self.conv2 = CausalConv3d(widths[-1], 2 * config.latent_embed_dim, 1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level, res_blocks in enumerate(self.block_res_blocks):
            for block in res_blocks:
                x = block(x)
            if level < len(self.conv_blocks):
                x = self.conv_blocks[level](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(self.act(self.norm1(x)))


class TemporalDecoder(nn.Module):
    def __init__(self, config: VAETemporalConfig, dtype=None, device=None, operations=None):
        super().__init__()
        ops = _ops(operations)
        kw = dict(dtype=dtype, device=device, operations=operations)
        act, groups, blocks = _TEMPORAL_ACTIVATIONS[config.activation_fn], config.num_groups, config.num_res_blocks
        widths = [config.filters * m for m in config.channel_multipliers]
        self.act = act
        self.time_strides = [2 if d else 1 for d in config.temporal_downsample]
        self.conv1 = CausalConv3d(config.latent_embed_dim, widths[-1], 3, **kw)
        self.res_blocks = nn.ModuleList(ResBlock3D(widths[-1], widths[-1], groups, act, **kw) for _ in range(blocks))
        # modules are indexed by level (0 = finest) but run from the coarsest level down, as in the reference
        self.block_res_blocks = nn.ModuleList()
        for level, width in enumerate(widths):
            incoming = widths[min(level + 1, len(widths) - 1)]
            res = [ResBlock3D(incoming if i == 0 else width, width, groups, act, **kw) for i in range(blocks)]
            self.block_res_blocks.append(nn.ModuleList(res))
        self.conv_blocks = nn.ModuleList(
            CausalConv3d(widths[level], widths[level] * 2, 3, **kw) if stride == 2 else nn.Identity()
            for level, stride in enumerate(self.time_strides, start=1)
        )
        self.norm1 = ops.GroupNorm(groups, widths[0], dtype=dtype, device=device)
        self.conv_out = CausalConv3d(widths[0], config.in_out_channels, 3, **kw)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv1(z)
        for block in self.res_blocks:
            x = block(x)
        for level in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[level]:
                x = block(x)
            if level > 0 and self.time_strides[level - 1] == 2:
                x = self.conv_blocks[level - 1](x)
                # depth to time: channels are (C, 2) with the time phase fastest
                batch, channels, frames, height, width = x.shape
                x = x.view(batch, channels // 2, 2, frames, height, width).transpose(2, 3)
                x = x.reshape(batch, channels // 2, frames * 2, height, width)
        return self.conv_out(self.act(self.norm1(x)))


class VAETemporal(nn.Module):
    """Causal temporal VAE on 2-D latents [B, C, T, h, w]; time is front-padded to a multiple of 4."""

    def __init__(self, config: VAETemporalConfig, dtype=None, device=None, operations=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.config = config
        self.factor = config.time_downsample_factor
        self.encoder = TemporalEncoder(config, **kw)
        self.quant_conv = CausalConv3d(2 * config.latent_embed_dim, 2 * config.embed_dim, 1, **kw)
        self.post_quant_conv = CausalConv3d(config.embed_dim, config.latent_embed_dim, 1, **kw)
        self.decoder = TemporalDecoder(config, **kw)

    def time_padding(self, num_frames: int) -> int:
        return -num_frames % self.factor

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames + self.time_padding(num_frames)) // self.factor

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, T, h, w] -> posterior [mean, logvar] along channels, T' = ceil(T / 4)."""
        padding = self.time_padding(x.shape[2])
        if padding:  # zeros in front, as the reference's pad_at_dim
            x = F.pad(x, (0, 0, 0, 0, padding, 0))
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        x = self.decoder(self.post_quant_conv(z))
        return x[:, :, self.time_padding(num_frames) :]  # drop the frames that stood for the front padding
