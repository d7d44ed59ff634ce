"""Building blocks of the Open-Sora 2.0 MMDiT (Flux-derived): embedders, RoPE, QK RMSNorm, blocks.

Parameter names are the official checkpoint keys. Token tensors inside attention are kept as
[B, L, heads, head_dim] (the natural view of a Linear output); SDPA receives them as [B, heads, L, D]
views, so no copy is made for the layout change.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fused_ops
from .attention import attention
from .norms import rms_norm

LAYER_NORM_EPS = 1e-6
RMS_NORM_EPS = 1e-6


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding [N, dim] of times in [0, 1] (scaled by 1000 first), cos half then sin half."""
    t = time_factor * t  # in t's own dtype, as the reference (bf16 times are rounded here)
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding.to(t.dtype) if t.is_floating_point() else embedding


def eager_out_allowed(*tensors: Tensor) -> bool:
    """Whether results may be written into preallocated buffers or over spent tensors (out=, slices, in-place GELU):
    in eager inference only. torch.compile graph-breaks on a strided out= (and fuses the plain form anyway);
    autograd cannot go through out= or in-place writes to what backward needs (core's LoRA training, gradient
    guidance)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # a trace would record the unwritten buffer
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


@dataclass
class RotaryTables:
    """cos / sin of the 3-axis RoPE angles, [B or 1, L, 1, head_dim / 2] in float32.

    half_split=True is the Liger / Llama layout of Open-Sora v2 (dim j pairs with dim j + D/2);
    False is BFL Flux's interleaved layout (dim 2k pairs with 2k + 1).
    """

    cos: Tensor
    sin: Tensor
    half_split: bool = True

    def apply(self, x: Tensor) -> Tensor:
        """Rotate x [B, L, heads, head_dim]; computed in float32, returned in x's dtype."""
        return self.apply_joint((x,))

    def apply_joint(self, parts: tuple[Tensor, ...], gains: tuple[Tensor | None, ...] | None = None) -> Tensor:
        """Rotate cat(parts, dim=1) (a double block's [txt, img] q or k; the tables cover the joint length), each
        part first multiplied by its gain where one is given (the q / k RMSNorm gain, in the part's dtype)."""
        gains = gains or (None,) * len(parts)
        x = parts[0]
        if self.cos.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"RoPE tables for batch {self.cos.shape[0]} cannot rotate a batch of {x.shape[0]}")
        length = sum(part.shape[1] for part in parts)
        if length != self.cos.shape[1]:
            raise ValueError(f"RoPE tables for {self.cos.shape[1]} tokens cannot rotate {length} tokens")
        if not (self.half_split and eager_out_allowed(*parts)):
            # Gains come eagerly only (QKNorm.heads), with q / k temporaries: multiplied in place then, as the torch
            # RoPE form does (no second copy of q / k).
            in_place = eager_out_allowed(*parts, *[gain for gain in gains if gain is not None])
            parts = tuple(
                part if gain is None else part.mul_(gain) if in_place else part * gain
                for part, gain in zip(parts, gains)
            )
            x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            if not self.half_split:
                return self._rotate_interleaved(x)
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((x1 * self.cos - x2 * self.sin, x2 * self.cos + x1 * self.sin), dim=-1).to(x.dtype)
        # x's halves times the float32 tables compute in float32 (type promotion: the products an upcast copy of x
        # would give), and the sums are rounded straight into the joint output: no float32 copy of x, no
        # concatenation before or after, no final cast (identical values, much less memory traffic).
        # On CUDA one Triton kernel does it, the gain included, with the same values (fused_ops: self-checked).
        dtype = functools.reduce(torch.promote_types, [part.dtype for part in parts])  # as cat would give
        out = x.new_empty(x.shape[0], length, *x.shape[2:], dtype=dtype)
        start = 0
        for part, gain in zip(parts, gains):
            rows = slice(start, start + part.shape[1])
            fused_ops.rotate_into(out[:, rows], part, self.cos[:, rows], self.sin[:, rows], gain)
            start += part.shape[1]
        return out

    def _rotate_interleaved(self, x: Tensor) -> Tensor:
        pairs = x.float().unflatten(-1, (-1, 2))
        x1, x2 = pairs[..., 0], pairs[..., 1]
        out = torch.stack((x1 * self.cos - x2 * self.sin, x1 * self.sin + x2 * self.cos), dim=-1).flatten(-2)
        return out.to(x.dtype)


def rotary_tables(ids: Tensor, axes_dim: list[int], theta: float, half_split: bool = True) -> RotaryTables:
    """RoPE tables for positions ids [B, L, n_axes]; axis a uses axes_dim[a] dims, omega = theta^(-2k/d_a)."""
    angles = []
    for axis, dim in enumerate(axes_dim):
        # The half-split reference builds omega in float32, the interleaved one in float64.
        omega_dtype = torch.float32 if half_split else torch.float64
        scale = torch.arange(0, dim, 2, dtype=omega_dtype, device=ids.device) / dim
        omega = 1.0 / (theta**scale)
        angles.append(ids[..., axis].to(omega_dtype)[..., None] * omega)
    angle = torch.cat(angles, dim=-1)[:, :, None, :]  # [B, L, 1, D/2]
    return RotaryTables(angle.cos().float(), angle.sin().float(), half_split)


class Heads(NamedTuple):
    """One stream's attention inputs [B, L, heads, head_dim]: q and k RMS-normed, still to be multiplied by q_gain /
    k_gain where those are given (eagerly the RoPE multiplies them in: one kernel on CUDA; q and k are then
    temporaries it may overwrite)."""

    q: Tensor
    k: Tensor
    v: Tensor
    q_gain: Tensor | None = None
    k_gain: Tensor | None = None


def rope_attention(parts: tuple[Heads, ...], pe: RotaryTables) -> Tensor:
    """Joint attention over the parts concatenated along the tokens, RoPE on q and k; returns [B, L, heads * D].
    A single block passes one part; a double block passes (txt, img) and RoPE writes them into one joint q / k."""
    q = pe.apply_joint(tuple(part.q for part in parts), tuple(part.q_gain for part in parts))
    k = pe.apply_joint(tuple(part.k for part in parts), tuple(part.k_gain for part in parts))
    v = torch.cat([part.v for part in parts], dim=1) if len(parts) > 1 else parts[0].v
    out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """(1 + scale) * LayerNorm(x) + shift, LayerNorm without affine parameters."""
    return add_product(shift, 1 + scale, F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS))


def add_product(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """a + b * c, rounded as torch rounds it (the product, then the sum). Eagerly it is written over c, which must be
    a spent temporary: on CUDA one kernel instead of two, the product never written out (fused_ops)."""
    if (
        eager_out_allowed(a, b, c)
        and a.dtype == b.dtype == c.dtype
        and torch.broadcast_shapes(a.shape, b.shape, c.shape) == c.shape
    ):
        return fused_ops.add_product_into(c, a, b, c)
    return a + b * c


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, dtype=None, device=None, operations=None):
        super().__init__()
        operations = operations or nn
        self.in_layer = operations.Linear(in_dim, hidden_dim, bias=True, dtype=dtype, device=device)
        self.out_layer = operations.Linear(hidden_dim, hidden_dim, bias=True, dtype=dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMSNorm with a learnable `scale` (the checkpoint's name, so not operations.RMSNorm's `weight`)."""

    def __init__(self, dim: int, dtype=None, device=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        # Liger "llama" casting: normalise in float32, cast back, then multiply by the gain.
        return rms_norm(x, RMS_NORM_EPS) * self.gain(x)

    def gain(self, x: Tensor) -> Tensor:
        return self.scale.to(device=x.device, dtype=x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int, dtype=None, device=None):
        super().__init__()
        self.query_norm = RMSNorm(dim, dtype=dtype, device=device)
        self.key_norm = RMSNorm(dim, dtype=dtype, device=device)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)

    def heads(self, q: Tensor, k: Tensor, v: Tensor) -> Heads:
        """q and k normed with the values forward gives. Eagerly their gains are left to the RoPE where nothing
        changes dtype on the way (else the official order: times the gain, then cast to v's dtype); then the forward
        hooks of this module and its norms do not run."""
        query, key = self.query_norm, self.key_norm
        if not eager_out_allowed(q, k, query.scale, key.scale):  # e.g. a trainable gain: autograd needs the plain form
            return Heads(*self(q, k, v), v)
        q_gain, k_gain = query.gain(q), key.gain(k)
        q, k = rms_norm(q, RMS_NORM_EPS), rms_norm(k, RMS_NORM_EPS)
        if not q.dtype == k.dtype == v.dtype == q_gain.dtype == k_gain.dtype:  # CUDA autocast normalises in float32
            return Heads((q * q_gain).to(v.dtype), (k * k_gain).to(v.dtype), v)
        return Heads(q, k, v, q_gain, k_gain)


class SelfAttention(nn.Module):
    """Projection weights of one stream of a double block (the joint attention runs in the block)."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool, fused_qkv: bool, dtype=None, device=None, operations=None
    ):
        super().__init__()
        operations = operations or nn
        self.num_heads = num_heads
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.qkv = operations.Linear(dim, dim * 3, bias=qkv_bias, dtype=dtype, device=device)
        else:
            self.q_proj = operations.Linear(dim, dim, bias=qkv_bias, dtype=dtype, device=device)
            self.k_proj = operations.Linear(dim, dim, bias=qkv_bias, dtype=dtype, device=device)
            self.v_proj = operations.Linear(dim, dim, bias=qkv_bias, dtype=dtype, device=device)
        self.norm = QKNorm(dim // num_heads, dtype=dtype, device=device)
        self.proj = operations.Linear(dim, dim, dtype=dtype, device=device)

    def qkv_heads(self, x: Tensor) -> Heads:
        """q, k (RMS-normed), v as [B, L, heads, head_dim]."""
        if self.fused_qkv:
            q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)
        else:
            q = self.q_proj(x).unflatten(-1, (self.num_heads, -1))
            k = self.k_proj(x).unflatten(-1, (self.num_heads, -1))
            v = self.v_proj(x).unflatten(-1, (self.num_heads, -1))
        return self.norm.heads(q, k, v)


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool, dtype=None, device=None, operations=None):
        super().__init__()
        operations = operations or nn
        self.multiplier = 6 if double else 3
        self.lin = operations.Linear(dim, self.multiplier * dim, bias=True, dtype=dtype, device=device)

    def forward(self, vec: Tensor) -> tuple[Tensor, ...]:
        """(shift, scale, gate) for the attention branch [+ the same for the MLP branch], each [B, 1, dim]."""
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def _mlp(hidden_size: int, mlp_hidden: int, dtype, device, operations) -> nn.Sequential:
    # Sequential so that the keys are the official `.0` / `.2`.
    return nn.Sequential(
        operations.Linear(hidden_size, mlp_hidden, bias=True, dtype=dtype, device=device),
        nn.GELU(approximate="tanh"),
        operations.Linear(mlp_hidden, hidden_size, bias=True, dtype=dtype, device=device),
    )


class DoubleStreamBlock(nn.Module):
    """Separate img / txt weights, one joint attention over concat[txt, img]."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool = False,
        fused_qkv: bool = True,
        dtype=None,
        device=None,
        operations=None,
    ):
        super().__init__()
        operations = operations or nn
        mlp_hidden = int(hidden_size * mlp_ratio)
        factory = dict(dtype=dtype, device=device, operations=operations)
        self.img_mod = Modulation(hidden_size, double=True, **factory)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias, fused_qkv, **factory)
        self.img_mlp = _mlp(hidden_size, mlp_hidden, dtype, device, operations)
        self.txt_mod = Modulation(hidden_size, double=True, **factory)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias, fused_qkv, **factory)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden, dtype, device, operations)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: RotaryTables) -> tuple[Tensor, Tensor]:
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)

        img_heads = self.img_attn.qkv_heads(modulate(img, img_shift1, img_scale1))
        txt_heads = self.txt_attn.qkv_heads(modulate(txt, txt_shift1, txt_scale1))
        joint = rope_attention((txt_heads, img_heads), pe)
        del img_heads, txt_heads  # the activation peak is in the MLPs: hold no more than needed
        txt_len = txt.shape[1]
        img = add_product(img, img_gate1, self.img_attn.proj(joint[:, txt_len:]))
        txt = add_product(txt, txt_gate1, self.txt_attn.proj(joint[:, :txt_len]))
        del joint
        img = add_product(img, img_gate2, _mlp_forward(self.img_mlp, modulate(img, img_shift2, img_scale2)))
        txt = add_product(txt, txt_gate2, _mlp_forward(self.txt_mlp, modulate(txt, txt_shift2, txt_scale2)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP on concat[txt, img]; v and the MLP input share one projection (v_mlp)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        fused_qkv: bool = True,
        dtype=None,
        device=None,
        operations=None,
    ):
        super().__init__()
        operations = operations or nn
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.fused_qkv = fused_qkv
        factory = dict(dtype=dtype, device=device)
        if fused_qkv:
            self.linear1 = operations.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim, **factory)
        else:
            # Always with bias: the reference ignores qkv_bias here.
            self.q_proj = operations.Linear(hidden_size, hidden_size, **factory)
            self.k_proj = operations.Linear(hidden_size, hidden_size, **factory)
            self.v_mlp = operations.Linear(hidden_size, hidden_size + self.mlp_hidden_dim, **factory)
        self.linear2 = operations.Linear(hidden_size + self.mlp_hidden_dim, hidden_size, **factory)
        self.norm = QKNorm(hidden_size // num_heads, **factory)
        self.modulation = Modulation(hidden_size, double=False, operations=operations, **factory)

    def forward(self, x: Tensor, vec: Tensor, pe: RotaryTables) -> Tensor:
        shift, scale, gate = self.modulation(vec)
        x_mod = modulate(x, shift, scale)
        hidden = self.hidden_size
        if self.fused_qkv:
            projected = self.linear1(x_mod)
            q, k, v_and_mlp = projected[..., :hidden], projected[..., hidden : 2 * hidden], projected[..., 2 * hidden :]
        else:
            q, k, v_and_mlp = self.q_proj(x_mod), self.k_proj(x_mod), self.v_mlp(x_mod)
        del x_mod  # the activation peak is at linear2: hold no more than needed
        heads = (self.num_heads, -1)
        v = v_and_mlp[..., :hidden].unflatten(-1, heads)
        qkv = self.norm.heads(q.unflatten(-1, heads), k.unflatten(-1, heads), v)
        del q, k, v
        attn = rope_attention((qkv,), pe)
        del qkv
        return add_product(x, gate, self.linear2(_attn_and_gelu(attn, v_and_mlp)))


def _attn_and_gelu(attn: Tensor, v_and_mlp: Tensor) -> Tensor:
    """linear2's input [attn | gelu_tanh(mlp)] from the [v | mlp] projection. Eagerly it is written over that
    projection (v is spent once attention has run; the GELU runs in place, on CUDA over the whole buffer: see
    fused_ops.gelu_tail_): no new [L, H + M] tensor, and the same values as the concatenation. Not for the fused
    layout, whose [v | mlp] is a strided view of linear1's output (a matrix product over a strided input may sum
    in another order)."""
    width = attn.shape[-1]
    if not (eager_out_allowed(attn, v_and_mlp) and v_and_mlp.is_contiguous()):
        return torch.cat((attn, F.gelu(v_and_mlp[..., width:], approximate="tanh")), dim=-1)
    fused_ops.gelu_tail_(v_and_mlp, width)
    v_and_mlp[..., :width] = attn
    return v_and_mlp


def _mlp_forward(mlp: nn.Sequential, x: Tensor) -> Tensor:
    """mlp(x) for the [Linear, GELU, Linear] MLP; eagerly the GELU runs in place on the 4x-wide hidden activation,
    so it is not held twice (the same values). Calls the layers, not the Sequential: hooks on the Sequential itself
    do not run."""
    hidden = mlp[0](x)
    if eager_out_allowed(hidden):
        return mlp[2](torch.ops.aten.gelu_(hidden, approximate=mlp[1].approximate))
    return mlp[2](mlp[1](hidden))


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, dtype=None, device=None, operations=None):
        super().__init__()
        operations = operations or nn
        self.linear = operations.Linear(
            hidden_size, patch_size * patch_size * out_channels, bias=True, dtype=dtype, device=device
        )
        # Sequential so that the key is the official `adaLN_modulation.1`.
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), operations.Linear(hidden_size, 2 * hidden_size, bias=True, dtype=dtype, device=device)
        )

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear(modulate(x, shift[:, None, :], scale[:, None, :]))
