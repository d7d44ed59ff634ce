"""STDiT3 embedders: patchify, timestep / fps sinusoid + MLP, caption projection, RoPE constant, 2-D pos-emb.

Parameter names follow the official checkpoints (`x_embedder.proj`, `t_embedder.mlp`, `y_embedder.y_proj.fc1`,
`rope.freqs`, ...). Mlp is also the blocks' feed-forward (timm's Mlp with tanh GELU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .rope import rope_frequencies


class PatchEmbed3D(nn.Module):
    """Conv3d patchify; the latent is zero-padded right/bottom/back to whole patches first."""

    def __init__(self, patch_size, in_channels: int, hidden_size: int, dtype=None, device=None, operations=None):
        super().__init__()
        operations = operations or nn
        self.patch_size = tuple(patch_size)
        self.proj = operations.Conv3d(
            in_channels, hidden_size, kernel_size=self.patch_size, stride=self.patch_size, dtype=dtype, device=device
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, t, h, w = x.shape
        pt, ph, pw = self.patch_size
        pads = ((-w) % pw, (-h) % ph, (-t) % pt)
        if any(pads):
            x = F.pad(x, (0, pads[0], 0, pads[1], 0, pads[2]))
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, C]


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos | sin] embedding of t [N] (float32), with the official operation order."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs.to(t.device)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """Sinusoid of a scalar per sample, then Linear-SiLU-Linear (`t_embedder` and `fps_embedder`)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, dtype=None, device=None, operations=None):
        super().__init__()
        operations = operations or nn
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            operations.Linear(frequency_embedding_size, hidden_size, dtype=dtype, device=device),
            nn.SiLU(),
            operations.Linear(hidden_size, hidden_size, dtype=dtype, device=device),
        )

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_sinusoid(t, self.frequency_embedding_size).to(dtype))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2, as timm's Mlp with approx_gelu."""

    def __init__(
        self, in_features: int, hidden_features: int, out_features: int, dtype=None, device=None, operations=None
    ):
        super().__init__()
        operations = operations or nn
        self.fc1 = operations.Linear(in_features, hidden_features, dtype=dtype, device=device)
        self.fc2 = operations.Linear(hidden_features, out_features, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """T5 states -> hidden size; `y_embedding` is the learned null caption (a persistent buffer)."""

    def __init__(self, in_channels: int, hidden_size: int, token_num: int, dtype=None, device=None, operations=None):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size, dtype=dtype, device=device, operations=operations)
        null = torch.randn(token_num, in_channels, device=device) / in_channels**0.5
        self.register_buffer("y_embedding", null.to(dtype) if dtype is not None else null)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.y_proj(caption)


class RotaryFrequencies(nn.Module):
    """Holds `rope.freqs`, a constant the official checkpoints store (a frozen Parameter there).

    The forward recomputes the same constant in float32, so a model cast to bf16 does not round it.
    Loading tolerates the key being absent (some files omit it): the constant is filled in.
    """

    def __init__(self, dim: int, device=None):
        super().__init__()
        self.dim = dim
        self.register_buffer("freqs", rope_frequencies(dim).to(device))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        if prefix + "freqs" not in state_dict:
            state_dict[prefix + "freqs"] = rope_frequencies(self.dim)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)


def sincos_pos_embed_2d(
    hidden_size: int, height: int, width: int, scale: float, base_size: int | None, device: torch.device
) -> torch.Tensor:
    """Absolute 2-D pos-emb [1, H*W, C] (float32): [sin(x f), cos(x f), sin(y f), cos(y f)], x = column.

    Coordinates are index / scale * base_size / size, as the official PositionEmbedding2D computes them.
    """
    half_dim = hidden_size // 2
    inv_freq = (1.0 / (10000 ** (torch.arange(0, half_dim, 2).float() / half_dim))).to(device)
    rows = torch.arange(height, device=device) / scale
    cols = torch.arange(width, device=device) / scale
    if base_size is not None:
        rows *= base_size / height
        cols *= base_size / width
    col_grid = cols[None, :].expand(height, width).reshape(-1)
    row_grid = rows[:, None].expand(height, width).reshape(-1)
    col_angles = col_grid[:, None] * inv_freq[None]
    row_angles = row_grid[:, None] * inv_freq[None]
    emb = torch.cat([col_angles.sin(), col_angles.cos(), row_angles.sin(), row_angles.cos()], dim=-1)
    return emb.unsqueeze(0)
