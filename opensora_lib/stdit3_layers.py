"""STDiT3 building blocks: self / cross attention, the spatial-temporal block, the final layer.

Parameter names follow the official checkpoints (`attn.qkv`, `cross_attn.kv_linear`, `mlp.fc1`, ...).
Blocks take and return tokens [B, T*S, C] in (frame, row, column) order; `TokenLayout` carries the
per-forward facts every block needs (grid size, attention groups with RoPE tables, caption keys,
x_mask, i2v frames). On CUDA the element-wise chains (LN + modulation, gated residual, q/k RMS-norm +
RoPE) run as torch.compile-fused kernels, with the same maths in eager as the fallback.
The embedders are in stdit3_embedders.py.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .norms import rms_norm
from .rope import apply_rope, swap_pairs
from .stdit3_embedders import Mlp

LAYER_NORM_EPS = 1e-6
_compile_enabled = True


def set_compiled_kernels(enabled: bool) -> None:
    """Turn the torch.compile fusion of STDiT3's element-wise chains (CUDA only) on or off."""
    global _compile_enabled
    _compile_enabled = enabled


def compiled_on_cuda(fn):
    """Run fn through torch.compile (fusing its element-wise chain into one kernel) on CUDA tensors.

    The maths is the same either way; eager is used on the CPU, inside an outer torch.compile, when
    disabled, or for good if compiling fails (no Triton, no compiler).
    """
    state = {"compiled": None, "failed": False}

    @functools.wraps(fn)
    def wrapper(*args):
        # inside an outer torch.compile (e.g. core's TorchCompileModel) this is traced as plain eager maths, on any device
        if torch.compiler.is_compiling() or not (_compile_enabled and args[0].is_cuda) or state["failed"]:
            return fn(*args)
        if state["compiled"] is None:
            state["compiled"] = torch.compile(fn)
        for arg in args:  # token counts vary with the video size; the channel dim stays static (faster kernels)
            if isinstance(arg, torch.Tensor):
                for dim in range(arg.dim() - 1):
                    torch._dynamo.maybe_mark_dynamic(arg, dim)
        try:
            return state["compiled"](*args)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # any compile failure falls back to the identical eager maths
            state["failed"] = True
            message = f"{fn.__name__}: torch.compile failed ({type(e).__name__}: {e}); using eager kernels"
            warnings.warn(message, stacklevel=2)
            return fn(*args)

    return wrapper


@compiled_on_cuda
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Official t2i_modulate(LayerNorm(x)): LN(x) * (1 + scale) + shift (no affine, eps 1e-6)."""
    return torch.addcmul(shift, F.layer_norm(x, (x.shape[-1],), eps=LAYER_NORM_EPS), 1 + scale)


@compiled_on_cuda
def gated_residual(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x + gate * h."""
    return torch.addcmul(x, gate, h)


@compiled_on_cuda
def qk_norm_rope(
    qk: torch.Tensor, normalize: bool, cos_w: torch.Tensor | None, sin_w: torch.Tensor | None, weight
) -> torch.Tensor:
    """RMS-normalise q and k per head, then rotate them; the norm weights are folded into the tables.

    rotate(w * n) = n * (w * cos) + swap(n) * (swap(w) * signed_sin), so cos_w / sin_w carry the
    weights when RoPE applies; otherwise weight (or None) scales the normalised values.
    """
    if normalize:
        qk = rms_norm(qk, 1e-6)  # LlamaRMSNorm maths, weight applied below
    if cos_w is not None:
        return apply_rope(qk, cos_w, sin_w)
    return qk * weight if weight is not None else qk


@dataclass
class CaptionKeys:
    """Projected caption tokens, valid tokens first, trimmed to the longest caption in the batch."""

    tokens: torch.Tensor  # [B, L, C]
    key_mask: torch.Tensor | None  # [B, 1, 1, L] bool (True = attend); None when every token is valid
    null_tokens: torch.Tensor | None = None  # [B, L, C] projected y_null (same mask), for i2v frames


@dataclass
class TokenLayout:
    """What the blocks need to know about this forward's token grid."""

    batch: int
    frames: int
    height: int
    width: int
    captions: CaptionKeys
    spatial_groups: list[AttentionGroup] | None = None  # one group: B*T frames of H*W tokens
    temporal_groups: list[AttentionGroup] | None = None  # windows (1.3: 8x8, 1.2: 1x1) over all frames
    x_mask: torch.Tensor | None = None  # [B, T] bool; False frames use the timestep-0 modulation
    rec_frames: torch.Tensor | None = None  # frames that cross-attend to y_null (i2v mask_index)
    pred_frames: torch.Tensor | None = None  # the other frames

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width


# ---------------------------------------------------------------- attention


@dataclass
class AttentionGroup:
    """`count` independent sequences of `length` tokens, stored one after another in attention order.

    `rope` holds full-width float32 tables (cos, signed sin) [length, D] for the positions inside a
    sequence. `region` (temporal groups only) is (h0, h1, w0, w1, window_h, window_w): the part of the
    token grid cut into windows for this group; a sequence is one window over all frames, (t, h, w) order.
    """

    count: int
    length: int
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    region: tuple[int, int, int, int, int, int] | None = None

    @property
    def tokens(self) -> int:
        return self.count * self.length


def window_groups(
    batch: int, frames: int, height: int, width: int, window: tuple[int, int], rope_for=None
) -> list[AttentionGroup]:
    """Temporal attention groups: whole windows, then the short bottom / right edge windows.

    The official code zero-pads the grid to whole windows and masks the padded keys, so a valid token
    sees exactly the valid tokens of its window: cutting edge windows short (no padding, no mask) gives
    the same result without computing padded tokens. `rope_for(window_h, window_w)` gives the tables.
    """

    def spans(size: int, step: int) -> list[tuple[int, int, int]]:
        full = size // step * step
        return ([(0, full, step)] if full else []) + ([(full, size, size - full)] if size > full else [])

    groups = []
    for h0, h1, wh in spans(height, window[0]):
        for w0, w1, ww in spans(width, window[1]):
            count = batch * ((h1 - h0) // wh) * ((w1 - w0) // ww)
            rope = rope_for(wh, ww) if rope_for is not None else None
            groups.append(AttentionGroup(count, frames * wh * ww, rope, (h0, h1, w0, w1, wh, ww)))
    return groups


def window_views(grid: torch.Tensor, flat: torch.Tensor, groups: list[AttentionGroup]):
    """Pairs (grid view, flat view), both [B, T, nh, wh, nw, ww, C], one per temporal group.

    grid is [B, T, H, W, C] (natural token order), flat is [M, C] in attention order; writing through
    one view of a pair reads / writes the other's tokens, so reordering fuses into an elementwise op.
    """
    b, t, _, _, c = grid.shape
    offset = 0
    for group in groups:
        h0, h1, w0, w1, wh, ww = group.region
        nh, nw = (h1 - h0) // wh, (w1 - w0) // ww
        grid_view = grid[:, :, h0:h1, w0:w1].unflatten(3, (nw, ww)).unflatten(2, (nh, wh))
        chunk = flat[offset : offset + group.tokens].view(b, nh, nw, t, wh, ww, c)
        yield grid_view, chunk.permute(0, 3, 1, 4, 2, 5, 6)
        offset += group.tokens


class SelfAttention(nn.Module):
    """QKV self-attention over groups of equal-length sequences, with per-head RMS qk-norm before RoPE."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, dtype=None, device=None, operations=None):
        super().__init__()
        operations = operations or nn
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = operations.Linear(dim, dim * 3, bias=True, dtype=dtype, device=device)
        if qk_norm:
            norm = getattr(operations, "RMSNorm", nn.RMSNorm)
            self.q_norm = norm(self.head_dim, eps=1e-6, dtype=dtype, device=device)
            self.k_norm = norm(self.head_dim, eps=1e-6, dtype=dtype, device=device)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        self.proj = operations.Linear(dim, dim, dtype=dtype, device=device)

    def _qk_weight(self, like: torch.Tensor) -> torch.Tensor | None:
        """The q / k norm weights stacked as [2, 1, D] float32 (None without qk-norm)."""
        if isinstance(self.q_norm, nn.Identity):
            return None
        weights = (self.q_norm.weight, self.k_norm.weight)
        return torch.stack([w.to(device=like.device, dtype=torch.float32) for w in weights])[:, None, :]

    def _norm_and_rotate(self, qk: torch.Tensor, group: AttentionGroup, weight: torch.Tensor | None) -> torch.Tensor:
        """qk [count, length, 2, heads, D] -> normalised, scaled by the norm weights, rotated (contiguous)."""
        normalize = weight is not None
        if group.rope is None:
            return qk_norm_rope(qk, normalize, None, None, weight.to(qk.dtype) if normalize else None)
        cos, signed_sin = group.rope  # [length, D] float32
        if weight is None:
            weight = torch.ones(2, 1, self.head_dim, device=qk.device)
        cos_w = (cos[:, None, None, :] * weight).to(qk.dtype)  # [length, 2, 1, D]
        sin_w = (signed_sin[:, None, None, :] * swap_pairs(weight)).to(qk.dtype)
        return qk_norm_rope(qk, normalize, cos_w, sin_w, None)

    def forward(self, x: torch.Tensor, groups: list[AttentionGroup]) -> torch.Tensor:
        """x [M, C] in attention order (groups one after another) -> projected output [M, C]."""
        m, c = x.shape
        heads, d = self.num_heads, self.head_dim
        qkv = self.qkv(x).view(m, 3, heads, d)
        weight = self._qk_weight(x)
        out = x.new_empty(m, heads, d) if len(groups) > 1 else None
        offset = 0
        for group in groups:
            part = qkv[offset : offset + group.tokens].view(group.count, group.length, 3, heads, d)
            qk = self._norm_and_rotate(part[:, :, :2], group, weight)
            q, k, v = qk[:, :, 0], qk[:, :, 1], part[:, :, 2]
            o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
            if out is None:
                out = o.reshape(m, heads, d)
            else:
                out[offset : offset + group.tokens].view(group.count, group.length, heads, d).copy_(o)
            offset += group.tokens
        return self.proj(out.view(m, c))


class CrossAttention(nn.Module):
    """Tokens attend to their own sample's valid caption tokens (batched, key-padding mask)."""

    def __init__(self, dim: int, num_heads: int, dtype=None, device=None, operations=None):
        super().__init__()
        operations = operations or nn
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = operations.Linear(dim, dim, dtype=dtype, device=device)
        self.kv_linear = operations.Linear(dim, dim * 2, dtype=dtype, device=device)
        self.proj = operations.Linear(dim, dim, dtype=dtype, device=device)

    def _attend(self, q: torch.Tensor, tokens: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """q [B, n, heads, D] against caption tokens [B, L, C] -> [B, n, heads, D]."""
        b, length, _ = tokens.shape
        k, v = self.kv_linear(tokens).view(b, length, 2, self.num_heads, self.head_dim).unbind(2)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask=key_mask)
        return out.transpose(1, 2)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        b, n, c = x.shape
        captions = layout.captions
        q = self.q_linear(x).view(b, n, self.num_heads, self.head_dim)
        if layout.rec_frames is None:
            out = self._attend(q, captions.tokens, captions.key_mask)
        else:
            # i2v: tokens of the conditioned frames attend to y_null, the others to the caption
            t, s = layout.frames, layout.tokens_per_frame
            q = q.view(b, t, s, self.num_heads, self.head_dim)
            out = torch.empty_like(q)
            for frames, tokens in ((layout.rec_frames, captions.null_tokens), (layout.pred_frames, captions.tokens)):
                if frames.numel() == 0:
                    continue
                part = q.index_select(1, frames).flatten(1, 2)
                part = self._attend(part, tokens, captions.key_mask)
                out.index_copy_(1, frames, part.view(b, -1, s, self.num_heads, self.head_dim))
        return self.proj(out.reshape(b, n, c))


# ---------------------------------------------------------------- blocks


def _modulation(table: torch.Tensor, t_mlp: torch.Tensor, t0_mlp: torch.Tensor | None, layout: TokenLayout):
    """table + t_mlp chunked per row, each shaped [B, T|1, 1, C]; x_mask frames take the t0 rows."""
    b, rows = t_mlp.shape[0], table.shape[0]
    table = table.to(dtype=t_mlp.dtype, device=t_mlp.device)
    params = (table[None] + t_mlp.view(b, rows, -1))[:, None]  # [B, 1, rows, C]
    if layout.x_mask is not None:
        params0 = (table[None] + t0_mlp.view(b, rows, -1))[:, None]
        params = torch.where(layout.x_mask[:, :, None, None], params, params0)  # [B, T, rows, C]
    return params.unsqueeze(3).unbind(2)


class STDiT3Block(nn.Module):
    """adaLN-single block: self-attention (spatial or temporal), cross-attention, MLP."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        temporal: bool = False,
        dtype=None,
        device=None,
        operations=None,
    ):
        super().__init__()
        self.temporal = temporal
        self.scale_shift_table = nn.Parameter(_init_table(6, hidden_size, dtype, device))
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm, dtype=dtype, device=device, operations=operations)
        self.cross_attn = CrossAttention(hidden_size, num_heads, dtype=dtype, device=device, operations=operations)
        self.mlp = Mlp(
            hidden_size, int(hidden_size * mlp_ratio), hidden_size, dtype=dtype, device=device, operations=operations
        )

    def forward(
        self, x: torch.Tensor, t_mlp: torch.Tensor, t0_mlp: torch.Tensor | None, layout: TokenLayout
    ) -> torch.Tensor:
        b, n, c = x.shape
        grid = (b, layout.frames, layout.tokens_per_frame, c)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(
            self.scale_shift_table, t_mlp, t0_mlp, layout
        )
        x = x.view(grid)
        h = modulate(x, shift_msa, scale_msa)
        if self.temporal:
            h = self._temporal_attention(h, layout)
        else:
            h = self.attn(h.view(b * n, c), layout.spatial_groups)
        x = gated_residual(x, gate_msa, h.view(grid))

        x = x + self.cross_attn(x.view(b, n, c), layout).view(grid)

        x = gated_residual(x, gate_mlp, self.mlp(modulate(x, shift_mlp, scale_mlp)))
        return x.view(b, n, c)

    def _temporal_attention(self, h: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Reorder tokens into windows over all frames, attend, and reorder back to (frame, row, column)."""
        c = h.shape[-1]
        groups = layout.temporal_groups
        grid = h.view(layout.batch, layout.frames, layout.height, layout.width, c)
        tokens = h.new_empty(h.numel() // c, c)
        for grid_view, flat_view in window_views(grid, tokens, groups):
            flat_view.copy_(grid_view)
        tokens = self.attn(tokens, groups)
        out = torch.empty_like(grid)
        for grid_view, flat_view in window_views(out, tokens, groups):
            grid_view.copy_(flat_view)
        return out


class FinalLayer(nn.Module):
    """LayerNorm, modulation by (table + t), Linear to patch pixels (official T2IFinalLayer)."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int, dtype=None, device=None, operations=None):
        super().__init__()
        operations = operations or nn
        self.scale_shift_table = nn.Parameter(_init_table(2, hidden_size, dtype, device))
        self.linear = operations.Linear(hidden_size, num_patch * out_channels, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, t: torch.Tensor, t0: torch.Tensor | None, layout: TokenLayout) -> torch.Tensor:
        b, n, c = x.shape
        table = self.scale_shift_table.to(dtype=t.dtype, device=t.device)
        shift, scale = (table[None] + t[:, None]).chunk(2, dim=1)
        x = modulate(x, shift, scale)
        if layout.x_mask is not None:
            shift0, scale0 = (table[None] + t0[:, None]).chunk(2, dim=1)
            # official quirk: the t0 branch normalises the already t-modulated activations again
            x0 = modulate(x, shift0, scale0)
            grid = (b, layout.frames, layout.tokens_per_frame, c)
            x = torch.where(layout.x_mask[:, :, None, None], x.view(grid), x0.view(grid)).view(b, n, c)
        return self.linear(x)


def _init_table(rows: int, hidden_size: int, dtype, device) -> torch.Tensor:
    """A modulation table initialised as the official randn / sqrt(hidden) (replaced by the checkpoint)."""
    table = torch.randn(rows, hidden_size, device=device) / hidden_size**0.5
    return table.to(dtype) if dtype is not None else table
