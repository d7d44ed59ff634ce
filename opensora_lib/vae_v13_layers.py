"""Building blocks of the Open-Sora 1.3 video VAE (encoder and decoder of one 17-frame chunk).

Parameter names follow the official checkpoint (`opensora/models/vae_v1_3` at tag v1.3), so its
state_dict loads with strict=True. Every weight-bearing layer comes from `operations` (default torch.nn).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention

TORCH_OPERATIONS = SimpleNamespace(
    Linear=nn.Linear,
    Conv2d=nn.Conv2d,
    Conv3d=nn.Conv3d,
    LayerNorm=nn.LayerNorm,
    GroupNorm=nn.GroupNorm,
    Embedding=nn.Embedding,
)

# Largest causal-mask block (query rows x key columns) built at once in the mid attention.
MASK_BLOCK_ELEMENTS = 1 << 26


def silu(x: torch.Tensor) -> torch.Tensor:
    # In place when no graph is recorded: the VAE activations are the memory peak at 720p.
    return F.silu(x, inplace=not torch.is_grad_enabled())


def group_norm(operations, channels: int, eps: float, dtype, device) -> nn.Module:
    return operations.GroupNorm(32, channels, eps=eps, affine=True, dtype=dtype, device=device)


class CausalConv3d(nn.Module):
    """Conv3d with zero padding of (kernel_t - 1) frames in front only and "same" zero padding in H, W.

    Official: F.pad (w, w, h, h, time_pad, 0) then an unpadded conv; here the spatial zeros come from the
    conv's own padding, which is the same arithmetic without one extra copy of the activations.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dtype=None,
        device=None,
        operations=None,
    ):
        super().__init__()
        operations = operations or TORCH_OPERATIONS
        # Official time_pad = (k - 1) + max(1 - stride, 0) = k - 1 for the strides used here.
        self.time_pad = kernel_size - 1
        self.conv = operations.Conv3d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(0, kernel_size // 2, kernel_size // 2),
            dtype=dtype,
            device=device,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_pad:
            x = F.pad(x, (0, 0, 0, 0, self.time_pad, 0))
        return self.conv(x)


class ResnetBlock3D(nn.Module):
    """GN -> SiLU -> causal conv, twice, plus a (1x1x1 conv when widths differ) shortcut. Official Resnet3DBlock."""

    def __init__(self, in_channels: int, out_channels: int, dtype=None, device=None, operations=None):
        super().__init__()
        operations = operations or TORCH_OPERATIONS
        factory = dict(dtype=dtype, device=device, operations=operations)
        self.norm1 = group_norm(operations, in_channels, 1e-6, dtype, device)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, **factory)
        self.norm2 = group_norm(operations, out_channels, 1e-6, dtype, device)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, **factory)
        if in_channels != out_channels:
            self.nin_shortcut = CausalConv3d(in_channels, out_channels, 1, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(silu(self.norm1(x)))
        h = self.conv2(silu(self.norm2(h)))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return h.add_(shortcut)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Token-causal attention ([B, heads, L, D]) in query blocks, so the bool mask never holds L x L entries."""
    length = q.shape[2]
    rows = max(1, min(length, MASK_BLOCK_ELEMENTS // length))
    outputs = []
    for start in range(0, length, rows):
        stop = min(start + rows, length)
        query_index = torch.arange(start, stop, device=q.device)[:, None]
        key_index = torch.arange(stop, device=q.device)[None, :]
        mask = key_index <= query_index
        outputs.append(attention(q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop], mask=mask))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all t*h*w tokens of a chunk, channel width = head dim. Official AttnBlock."""

    def __init__(self, channels: int, dtype=None, device=None, operations=None):
        super().__init__()
        operations = operations or TORCH_OPERATIONS
        factory = dict(dtype=dtype, device=device, operations=operations)
        self.norm = group_norm(operations, channels, 1e-6, dtype, device)
        self.q = CausalConv3d(channels, channels, 1, **factory)
        self.k = CausalConv3d(channels, channels, 1, **factory)
        self.v = CausalConv3d(channels, channels, 1, **factory)
        self.proj_out = CausalConv3d(channels, channels, 1, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, frames, height, width = x.shape
        h = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.flatten(2).transpose(1, 2).unsqueeze(1)  # [B, 1, t*h*w, C]

        q, k, v = tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h))
        # Q7: SDPA is_causal over the flattened (t, h, w) order, a token-level (not frame-level) causal mask.
        h = causal_attention(q, k, v)
        h = h.squeeze(1).transpose(1, 2).reshape(batch, channels, frames, height, width)
        return x + self.proj_out(h)


def per_frame(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, frames_per_call: int | None) -> torch.Tensor:
    """Apply a 2-D image function to every frame of [B, C, T, H, W], `frames_per_call` frames at a time.

    Results are written straight into the 5-D output (no (b t) copy and no concatenation): at 720p these
    tensors are several GiB each. Frames are independent, so the grouping does not change the result.
    """
    batch, frames = x.shape[0], x.shape[2]
    step = frames_per_call or frames
    out = None
    for b in range(batch):
        for start in range(0, frames, step):
            result = fn(x[b, :, start : start + step].transpose(0, 1))  # [n, C, H, W] -> [n, C', H', W']
            if out is None:
                out = result.new_empty((batch, result.shape[1], frames, *result.shape[2:]))
            out[b, :, start : start + step] = result.transpose(0, 1)
    return out


class Downsample2D(nn.Module):
    """Spatial /2 per frame (encoder level 0)."""

    def __init__(self, channels: int, micro_batch_size_2d: int | None = None, dtype=None, device=None, operations=None):
        super().__init__()
        operations = operations or TORCH_OPERATIONS
        self.conv = operations.Conv2d(channels, channels, 3, stride=2, padding=0, dtype=dtype, device=device)
        self.micro_batch_size_2d = micro_batch_size_2d

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        # Official: zero pad right/bottom by one, then a stride-2 unpadded conv.
        return self.conv(F.pad(images, (0, 1, 0, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_frame(self._images, x, self.micro_batch_size_2d)


class Downsample3D(nn.Module):
    """Causal stride-(2,2,2) conv: T -> (T - 1)//2 + 1, H -> (H - 1)//2 + 1."""

    def __init__(self, channels: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=2, dtype=dtype, device=device, operations=operations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest x2 in H, W per frame, then a 3x3 conv (decoder level 1)."""

    def __init__(self, channels: int, micro_batch_size_2d: int | None = None, dtype=None, device=None, operations=None):
        super().__init__()
        operations = operations or TORCH_OPERATIONS
        self.conv = operations.Conv2d(channels, channels, 3, stride=1, padding=1, dtype=dtype, device=device)
        self.micro_batch_size_2d = micro_batch_size_2d

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(images, scale_factor=2.0, mode="nearest"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_frame(self._images, x, self.micro_batch_size_2d)


class ResidualUpsampleBlock(nn.Module):
    """conv -> GN -> SiLU -> conv -> GN, + input, SiLU. Official Res3DBlockUpsample (GN eps is torch's 1e-5)."""

    def __init__(self, channels: int, dtype=None, device=None, operations=None):
        super().__init__()
        operations = operations or TORCH_OPERATIONS
        factory = dict(dtype=dtype, device=device, operations=operations)
        self.conv1 = CausalConv3d(channels, channels, 3, **factory)
        self.norm1 = group_norm(operations, channels, 1e-5, dtype, device)
        self.conv2 = CausalConv3d(channels, channels, 3, **factory)
        self.norm2 = group_norm(operations, channels, 1e-5, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(silu(self.norm1(self.conv1(x))))
        return silu(self.norm2(h).add_(x))


class Upsample3D(nn.Module):
    """Nearest x2 in T, H, W, then x + ResidualUpsampleBlock(x) (decoder levels 2 and 3)."""

    def __init__(self, channels: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.conv3d = ResidualUpsampleBlock(channels, dtype=dtype, device=device, operations=operations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv3d(x).add_(x)


class VideoEncoder(nn.Module):
    """[B, 3, T, H, W] -> moments [B, 2*z, (T-1)//4 + 1, ceil(H/8), ceil(W/8)] (mean then logvar)."""

    def __init__(self, config, dtype=None, device=None, operations=None):
        super().__init__()
        operations = operations or TORCH_OPERATIONS
        factory = dict(dtype=dtype, device=device, operations=operations)
        ch, ch_mult = config.ch, tuple(config.ch_mult)
        self.conv_in = CausalConv3d(config.in_channels, ch, 3, **factory)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                stage.block.append(ResnetBlock3D(block_in, ch * mult, **factory))
                block_in = ch * mult
            if level != len(ch_mult) - 1:
                if level in config.down_sampling_layer:
                    stage.downsample = Downsample3D(block_in, **factory)
                else:
                    stage.downsample = Downsample2D(block_in, config.micro_batch_size_2d, **factory)
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock3D(block_in, block_in, **factory)
        self.mid.attn_1 = AttentionBlock(block_in, **factory)
        self.mid.block_2 = ResnetBlock3D(block_in, block_in, **factory)
        self.norm_out = group_norm(operations, block_in, 1e-6, dtype, device)
        z_out = 2 * config.z_channels if config.double_z else config.z_channels
        self.conv_out = CausalConv3d(block_in, z_out, 3, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(silu(self.norm_out(h)))


class VideoDecoder(nn.Module):
    """[B, z, t, h, w] -> [B, 3, 4t - 3, 8h, 8w] (with the official temporal_up_layers [2, 3])."""

    def __init__(self, config, dtype=None, device=None, operations=None):
        super().__init__()
        operations = operations or TORCH_OPERATIONS
        factory = dict(dtype=dtype, device=device, operations=operations)
        ch, ch_mult = config.ch, tuple(config.ch_mult)
        self.temporal_downsample = config.temporal_downsample
        block_in = ch * ch_mult[-1]
        self.conv_in = CausalConv3d(config.z_channels, block_in, 3, **factory)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock3D(block_in, block_in, **factory)
        self.mid.attn_1 = AttentionBlock(block_in, **factory)
        self.mid.block_2 = ResnetBlock3D(block_in, block_in, **factory)
        stages: list[nn.Module] = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                stage.block.append(ResnetBlock3D(block_in, ch * ch_mult[level], **factory))
                block_in = ch * ch_mult[level]
            if level != 0:
                if level in config.temporal_up_layers:
                    stage.upsample = Upsample3D(block_in, **factory)
                else:
                    stage.upsample = Upsample2D(block_in, config.micro_batch_size_2d, **factory)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)  # up[level], run from the deepest level
        self.norm_out = group_norm(operations, block_in, 1e-6, dtype, device)
        # Plain Conv3d (key decoder.conv_out.weight); spatial zero padding 1 as the official F.pad.
        self.conv_out = operations.Conv3d(block_in, config.out_ch, 3, padding=(0, 1, 1), dtype=dtype, device=device)

    def _steps(self) -> list[tuple[nn.Module, int]]:
        """The modules from conv_in to the last upsample, each with the spatial scale of its output."""
        steps: list[tuple[nn.Module, int]] = [(self.conv_in, 1), (self.mid.block_1, 1)]
        steps += [(self.mid.attn_1, 1), (self.mid.block_2, 1)]
        scale = 1
        for stage in reversed(self.up):
            steps += [(block, scale) for block in stage.block]
            if hasattr(stage, "upsample"):
                scale *= 2
                steps.append((stage.upsample, scale))
        return steps

    def _output(self, h: torch.Tensor) -> torch.Tensor:
        h = silu(self.norm_out(h))
        # Official: pad 2 zero frames in front, conv, drop the first temporal_downsample - 1 outputs. The kept
        # outputs never see a padded frame, so this equals an unpadded conv starting at frame (drop - 2).
        drop = self.temporal_downsample - 1
        if drop >= 2 and h.shape[2] - (drop - 2) >= 3:
            return self.conv_out(h[:, :, drop - 2 :])
        return self.conv_out(F.pad(h, (0, 0, 0, 0, 2, 0)))[:, :, drop:]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z
        for module, _ in self._steps():
            h = module(h)
        return self._output(h)

    def forward_tiled(self, z: torch.Tensor, tile: int, overlap: int, head_scale: int = 2) -> torch.Tensor:
        """Approximate decode for memory: everything up to `head_scale` x latent resolution (conv_in, the mid
        attention, the deepest stages) runs on the whole chunk; the high-resolution rest runs on overlapping
        spatial tiles (`tile` / `overlap` in latent pixels) blended with linear ramps. Differences from the
        untiled decode come only from per-tile GroupNorm statistics and zero padding at tile borders."""
        steps = self._steps()
        split = 0
        while split < len(steps) and steps[split][1] <= head_scale:
            split += 1
        h = z
        for module, _ in steps[:split]:
            h = module(h)
        feature_scale = steps[split - 1][1]
        out_scale = (steps[-1][1] if steps else 1) // feature_scale

        def tail(part: torch.Tensor) -> torch.Tensor:
            for module, _ in steps[split:]:
                part = module(part)
            return self._output(part)

        return blend_tiles(h, tail, tile * feature_scale, overlap * feature_scale, out_scale)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    return [*range(0, size - tile, tile - overlap), size - tile]


def blend_ramp(length: int, ramp: int, rising: bool, falling: bool) -> torch.Tensor:
    """Per-pixel tile weight along one axis: linear ramps where the tile overlaps a neighbour."""
    weight = torch.ones(length)
    edge = torch.arange(1, ramp + 1, dtype=torch.float32) / (ramp + 1)
    if ramp and rising:
        weight[:ramp] = edge
    if ramp and falling:
        weight[-ramp:] = torch.minimum(weight[-ramp:], edge.flip(0))
    return weight


def blend_tiles(x: torch.Tensor, fn, tile: int, overlap: int, scale: int) -> torch.Tensor:
    """fn over overlapping H/W tiles of [B, C, T, H, W] (fn scales H, W by `scale`), blended in float32."""
    height, width = x.shape[3], x.shape[4]
    out = weights = None
    for top in tile_starts(height, tile, overlap):
        for left in tile_starts(width, tile, overlap):
            part = fn(x[:, :, :, top : top + tile, left : left + tile])
            rows = slice(top * scale, top * scale + part.shape[3])
            cols = slice(left * scale, left * scale + part.shape[4])
            weight_h = blend_ramp(part.shape[3], overlap * scale, top > 0, top + tile < height)
            weight_w = blend_ramp(part.shape[4], overlap * scale, left > 0, left + tile < width)
            weight = (weight_h[:, None] * weight_w[None, :]).to(part.device)
            if out is None:
                shape = (*part.shape[:3], height * scale, width * scale)
                out = torch.zeros(shape, dtype=torch.float32, device=part.device)
                weights = torch.zeros(shape[3:], dtype=torch.float32, device=part.device)
            out[..., rows, cols] += part.float() * weight
            weights[rows, cols] += weight
    return (out / weights).to(x.dtype)
