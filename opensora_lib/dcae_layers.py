"""Building blocks of the Open-Sora 2.0 Video DC-AE (official `opensora/models/dc_ae/` on branch main).

Video layout only: every tensor is [B, C, T, H, W]. Module and parameter names are the official checkpoint
keys, including the `op_list` / `main` wrappers, so F32T4C128_AE.safetensors loads with strict=True.
Every weight-bearing conv comes from `operations` (default torch.nn); the RMS norms hold plain parameters
(the checkpoint's `weight` / `bias`), cast to the activation dtype on use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

RMS_NORM_EPS = 1e-5  # official RMSNorm2d/3d default
LINEAR_ATTENTION_EPS = 1e-15  # official LiteMLA eps
ATTENTION_HEAD_DIM = 32  # official EfficientViTBlock dim
GLU_EXPAND_RATIO = 4  # official EfficientViTBlock expand_ratio

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hswish": nn.Hardswish,
    "silu": nn.SiLU,
    "gelu": lambda: nn.GELU(approximate="tanh"),
}
NORMS = ("rms3d",)
BLOCK_TYPES = ("ResBlock", "EViT_GLU", "EViTS5_GLU")


def build_activation(name: str | None) -> nn.Module | None:
    if name is None:
        return None
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; allowed: None or one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def build_norm(name: str | None, channels: int, dtype=None, device=None) -> nn.Module | None:
    if name is None:
        return None
    if name not in NORMS:
        raise ValueError(f"norm {name!r} is not supported by the video DC-AE; allowed: None or one of {NORMS}")
    return ChannelRMSNorm(channels, dtype=dtype, device=device)


class ChannelRMSNorm(nn.Module):
    """Official RMSNorm3d: divide by the float32 RMS over channels, cast back, then per-channel weight and bias."""

    def __init__(self, channels: int, eps: float = RMS_NORM_EPS, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(channels, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = torch.sqrt(x.float().square().mean(dim=1, keepdim=True) + self.eps)
        x = (x / rms).to(x.dtype)
        weight = self.weight.to(device=x.device, dtype=x.dtype).view(1, -1, 1, 1, 1)
        bias = self.bias.to(device=x.device, dtype=x.dtype).view(1, -1, 1, 1, 1)
        return x * weight + bias


class ConvLayer(nn.Module):
    """Official ConvLayer for video: conv with zero "same" padding in T, H and W, then optional norm and activation.

    Official pads with F.pad(mode="constant") before an unpadded conv; the conv's own zero padding is the same sum.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int | tuple[int, int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        norm: str | None = None,
        act: str | None = None,
        dtype=None,
        device=None,
        operations=None,
    ):
        super().__init__()
        operations = operations or nn
        if kernel_size % 2 != 1:
            raise ValueError(f"video conv kernels must be odd (official restriction), got {kernel_size}")
        self.conv = operations.Conv3d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=bias,
            dtype=dtype,
            device=device,
        )
        self.norm = build_norm(norm, out_channels, dtype=dtype, device=device)
        self.act = build_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class OpSequential(nn.Module):
    """Official OpSequential: the ops that are not None, in order, under the checkpoint's `op_list` name."""

    def __init__(self, ops: Sequence[nn.Module | None]):
        super().__init__()
        self.op_list = nn.ModuleList([op for op in ops if op is not None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.op_list:
            x = op(x)
        return x


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Residual(nn.Module):
    """Official ResidualBlock: main(x) + shortcut(x). The wrapper gives the checkpoint's `main.` key prefix."""

    def __init__(self, main: nn.Module, shortcut: nn.Module):
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.shortcut(x)


# -- parameter-free space/time <-> channel rearrangements (F.pixel_shuffle channel order) -------------------------


def space_to_channels(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, C*f*f, T, H/f, W/f]; channel c*f*f + i*f + j holds pixel (h*f + i, w*f + j)."""
    b, c, t, h, w = x.shape
    if h % factor or w % factor:
        raise ValueError(f"H and W must be multiples of {factor} to fold into channels, got shape {tuple(x.shape)}")
    x = x.reshape(b, c, t, h // factor, factor, w // factor, factor)
    return x.permute(0, 1, 4, 6, 2, 3, 5).reshape(b, c * factor * factor, t, h // factor, w // factor)


def space_time_to_channels(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, C*f^3, T/f, H/f, W/f]; channel c*f^3 + a*f^2 + i*f + j (official pixel_unshuffle_3d)."""
    b, c, t, h, w = x.shape
    if t % factor or h % factor or w % factor:
        raise ValueError(f"T, H and W must be multiples of {factor} to fold into channels, got shape {tuple(x.shape)}")
    x = x.reshape(b, c, t // factor, factor, h // factor, factor, w // factor, factor)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * factor**3, t // factor, h // factor, w // factor)


def channels_to_space(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Inverse of space_to_channels."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c // (factor * factor), factor, factor, t, h, w)
    return x.permute(0, 1, 4, 5, 2, 6, 3).reshape(b, c // (factor * factor), t, h * factor, w * factor)


def channels_to_space_time(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Inverse of space_time_to_channels (official pixel_shuffle_3d)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c // factor**3, factor, factor, factor, t, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // factor**3, t * factor, h * factor, w * factor)


class UnshuffleAverage(nn.Module):
    """Official PixelUnshuffleChannelAveragingDownSampleLayer: fold space (and time) into channels, then average
    groups of consecutive channels down to out_channels. A one-frame input is folded in space only (official)."""

    def __init__(self, in_channels: int, out_channels: int, factor: int, temporal: bool = False):
        super().__init__()
        folded = in_channels * factor ** (3 if temporal else 2)
        if in_channels * factor * factor % out_channels or folded % out_channels:
            raise ValueError(f"averaging shortcut: {in_channels} channels x {factor}^2 not divisible by {out_channels}")
        self.out_channels, self.factor, self.temporal = out_channels, factor, temporal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.temporal and x.shape[2] != 1:
            x = space_time_to_channels(x, self.factor)
        else:
            x = space_to_channels(x, self.factor)
        b, c, t, h, w = x.shape
        return x.view(b, self.out_channels, c // self.out_channels, t, h, w).mean(dim=2)


class DuplicateShuffle(nn.Module):
    """Official ChannelDuplicatingPixelShuffleUpSampleLayer: repeat each channel, then unfold channels into space
    (and time). A one-frame input is unfolded in space only (official)."""

    def __init__(self, in_channels: int, out_channels: int, factor: int, temporal: bool = False):
        super().__init__()
        if out_channels * factor * factor % in_channels:
            raise ValueError(f"duplicating shortcut: {out_channels} x {factor}^2 is not divisible by {in_channels}")
        self.in_channels, self.out_channels, self.factor, self.temporal = in_channels, out_channels, factor, temporal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_time = self.temporal and x.shape[2] != 1
        repeats = self.out_channels * self.factor ** (3 if in_time else 2) // self.in_channels
        x = x.repeat_interleave(repeats, dim=1)
        return channels_to_space_time(x, self.factor) if in_time else channels_to_space(x, self.factor)


class InterpolateConv(nn.Module):
    """Official InterpolateConvUpSampleLayer: nearest x2 upsampling (time too when temporal and T > 1), then conv."""

    def __init__(self, in_channels: int, out_channels: int, temporal: bool, dtype=None, device=None, operations=None):
        super().__init__()
        self.temporal = temporal
        self.conv = ConvLayer(in_channels, out_channels, 3, dtype=dtype, device=device, operations=operations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time_scale = 2 if self.temporal and x.shape[2] != 1 else 1
        x = F.interpolate(x, scale_factor=(time_scale, 2, 2), mode="nearest")
        return self.conv(x)


# -- main blocks ----------------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """Official ResBlock: conv(bias) -> act -> conv(no bias) -> norm (the residual add is the Residual wrapper)."""

    def __init__(self, channels: int, norm: str | None, act: str | None, dtype=None, device=None, operations=None):
        super().__init__()
        factory = dict(dtype=dtype, device=device, operations=operations)
        self.conv1 = ConvLayer(channels, channels, 3, bias=True, act=act, **factory)
        self.conv2 = ConvLayer(channels, channels, 3, bias=False, norm=norm, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class LiteMLA(nn.Module):
    """Official LiteMLA (video): ReLU linear attention over all T*H*W tokens, with multi-scale q/k/v from
    depthwise 5x5x5 aggregation convs. Heads of `dim` channels each; q, k, v are consecutive in every head."""

    def __init__(
        self,
        channels: int,
        norm: str | None,
        scales: tuple[int, ...],
        dim: int = ATTENTION_HEAD_DIM,
        dtype=None,
        device=None,
        operations=None,
    ):
        super().__init__()
        operations = operations or nn
        heads = channels // dim  # official heads_ratio 1.0
        total = 3 * heads * dim
        self.dim = dim
        self.qkv = ConvLayer(channels, total, 1, bias=False, dtype=dtype, device=device, operations=operations)
        self.aggreg = nn.ModuleList(
            nn.Sequential(
                operations.Conv3d(
                    total, total, scale, padding=scale // 2, groups=total, bias=False, dtype=dtype, device=device
                ),
                operations.Conv3d(total, total, 1, groups=3 * heads, bias=False, dtype=dtype, device=device),
            )
            for scale in scales
        )
        self.proj = ConvLayer(
            heads * dim * (1 + len(scales)),
            channels,
            1,
            bias=False,
            norm=norm,
            dtype=dtype,
            device=device,
            operations=operations,
        )

    def linear_attention(self, qkv: torch.Tensor) -> torch.Tensor:
        b, _, t, h, w = qkv.shape
        # Float32 throughout (official: bf16 matmuls, float32 division); identical in float32.
        qkv = qkv.float().reshape(b, -1, 3 * self.dim, t * h * w)
        q, k, v = qkv.split(self.dim, dim=2)
        q, k = F.relu(q), F.relu(k)
        v = F.pad(v, (0, 0, 0, 1), value=1.0)  # the extra row of ones yields the normaliser k . q
        out = (v @ k.transpose(-1, -2)) @ q
        out = out[:, :, :-1] / (out[:, :, -1:] + LINEAR_ATTENTION_EPS)
        return out.reshape(b, -1, t, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        qkv = torch.cat([qkv] + [aggregate(qkv) for aggregate in self.aggreg], dim=1)
        return self.proj(self.linear_attention(qkv).to(qkv.dtype))


class GLUMBConv(nn.Module):
    """Official GLUMBConv: 1x1 expand (x2 for the gate) -> act -> depthwise 3x3x3 -> x * act(gate) -> 1x1 -> norm."""

    def __init__(self, channels: int, norm: str | None, act: str | None, dtype=None, device=None, operations=None):
        super().__init__()
        factory = dict(dtype=dtype, device=device, operations=operations)
        mid = round(channels * GLU_EXPAND_RATIO)
        self.glu_act = build_activation(act) or Identity()
        self.inverted_conv = ConvLayer(channels, 2 * mid, 1, bias=True, act=act, **factory)
        self.depth_conv = ConvLayer(2 * mid, 2 * mid, 3, groups=2 * mid, bias=True, **factory)
        self.point_conv = ConvLayer(mid, channels, 1, bias=False, norm=norm, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.depth_conv(self.inverted_conv(x)).chunk(2, dim=1)
        return self.point_conv(x * self.glu_act(gate))


class EfficientViTBlock(nn.Module):
    """Official EfficientViTBlock with local_module="GLUMBConv": residual linear attention, then residual GLU conv."""

    def __init__(
        self,
        channels: int,
        norm: str | None,
        act: str | None,
        scales: tuple[int, ...],
        dtype=None,
        device=None,
        operations=None,
    ):
        super().__init__()
        factory = dict(dtype=dtype, device=device, operations=operations)
        self.context_module = Residual(LiteMLA(channels, norm, scales, **factory), Identity())
        self.local_module = Residual(GLUMBConv(channels, norm, act, **factory), Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_module(self.context_module(x))


def build_block(
    block_type: str, channels: int, norm: str | None, act: str | None, dtype=None, device=None, operations=None
) -> nn.Module:
    factory = dict(dtype=dtype, device=device, operations=operations)
    if block_type == "ResBlock":
        return Residual(ResBlock(channels, norm, act, **factory), Identity())
    if block_type == "EViT_GLU":
        return EfficientViTBlock(channels, norm, act, scales=(), **factory)
    if block_type == "EViTS5_GLU":
        return EfficientViTBlock(channels, norm, act, scales=(5,), **factory)
    raise ValueError(f"block_type {block_type!r} is not supported; allowed: {BLOCK_TYPES}")


def build_downsample(
    in_channels: int, out_channels: int, shortcut: str | None, temporal: bool, dtype=None, device=None, operations=None
) -> nn.Module:
    """Official "Conv" downsample: stride-2 conv in H, W (and T when temporal), with the averaging shortcut."""
    stride = (2, 2, 2) if temporal else (1, 2, 2)
    conv = ConvLayer(in_channels, out_channels, 3, stride=stride, dtype=dtype, device=device, operations=operations)
    if shortcut is None:
        return conv
    return Residual(conv, UnshuffleAverage(in_channels, out_channels, factor=2, temporal=temporal))


def build_upsample(
    in_channels: int, out_channels: int, shortcut: str | None, temporal: bool, dtype=None, device=None, operations=None
) -> nn.Module:
    """Official "InterpolateConv" upsample, with the duplicating shortcut."""
    block = InterpolateConv(in_channels, out_channels, temporal, dtype=dtype, device=device, operations=operations)
    if shortcut is None:
        return block
    return Residual(block, DuplicateShuffle(in_channels, out_channels, factor=2, temporal=temporal))
