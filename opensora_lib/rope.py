"""Rotary position embedding maths for STDiT3 (Open-Sora 1.2 / 1.3).

The official code uses lucidrains' rotary_embedding_torch: interleaved pairs (2k, 2k+1) share the
frequency 1/theta^(2k/dim), and a position is arange(n) / scale. Angles are built in "pair space"
([..., dim/2]) and applied at full width: x * cos + swap_pairs(x) * signed_sin (`interleaved_tables`).

STDiT3 tables:
- 1.2 temporal attention: one axis (frame index) over the whole head.
- 1.3 spatial attention: the head is three equal chunks (t, h, w); t is position 0 (no rotation),
  h / w are the token row / column divided by scale.
- 1.3 windowed temporal attention: chunks (t, h, w) with t the frame index (not scaled) and h / w the
  row / column inside the 8x8 window, divided by scale.
"""

from __future__ import annotations

import torch


def rope_frequencies(dim: int, theta: float = 10000.0) -> torch.Tensor:
    """The dim/2 rotary frequencies 1/theta^(2k/dim), float32 on the CPU (as the official buffer)."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"rotary dim must be a positive even number, got {dim}")
    return 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))


def axis_positions(length: int, scale: float | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Positions 0..length-1 (float32), divided by scale when given (the official `interpolate_factor`)."""
    positions = torch.arange(length, device=device, dtype=torch.float32)
    return positions if scale is None else positions / scale


def rope_angles(positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Outer product positions x freqs: [..., n] -> [..., n, dim/2] angles (float32)."""
    return positions[..., None] * freqs.to(device=positions.device, dtype=torch.float32)


def interleaved_tables(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair-space angles [..., D/2] -> full-width float32 tables (cos, signed sin), each [..., D].

    With these, rotating x is x * cos + swap_pairs(x) * signed_sin, where signed_sin is -sin on even
    and +sin on odd dims: the official t*cos + rotate_half(t)*sin, element by element.
    """
    cos, sin = angles.cos(), angles.sin()
    return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...)."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [..., D] with full-width tables (see `interleaved_tables`)."""
    return torch.addcmul(x * cos, swap_pairs(x), signed_sin)


def temporal_angles(frames: int, freqs: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """1.2 temporal RoPE: angles [frames, dim/2] for frame indices 0..frames-1 (unscaled)."""
    return rope_angles(axis_positions(frames, device=device), freqs)


def spatial_angles(
    height: int, width: int, scale: float, freqs: torch.Tensor, device: torch.device | None = None
) -> torch.Tensor:
    """1.3 spatial RoPE: angles [height*width, 3*len(freqs)] in row-major token order.

    Chunk t is rotated by position 0 (identity), chunk h by row/scale, chunk w by column/scale.
    """
    return _grid_angles(1, height, width, scale, freqs, device)


def window_angles(
    frames: int, window_h: int, window_w: int, scale: float, freqs: torch.Tensor, device: torch.device | None = None
) -> torch.Tensor:
    """1.3 windowed temporal RoPE: angles [frames*window_h*window_w, 3*len(freqs)], tokens in (t, h, w) order.

    Positions are local to the window: frame index t (unscaled), row / scale and column / scale inside
    the window. A short edge window gets the positions its tokens had in the official zero-padded one.
    """
    return _grid_angles(frames, window_h, window_w, scale, freqs, device)


def _grid_angles(frames: int, height: int, width: int, scale: float, freqs: torch.Tensor, device) -> torch.Tensor:
    n = freqs.shape[0]
    shape = (frames, height, width, n)
    t = rope_angles(axis_positions(frames, device=device), freqs)[:, None, None, :].expand(shape)
    h = rope_angles(axis_positions(height, scale, device), freqs)[None, :, None, :].expand(shape)
    w = rope_angles(axis_positions(width, scale, device), freqs)[None, None, :, :].expand(shape)
    return torch.cat((t, h, w), dim=-1).reshape(frames * height * width, 3 * n)
