"""STDiT3, the Open-Sora 1.2 and 1.3 video DiT (official `opensora/models/stdit/stdit3.py`).

One model for both generations, switched by the config as in the official code:
- 1.2 (`kernel_size=None`): 4 latent channels, temporal RoPE over the whole head, full temporal attention,
  and the timestep is rounded to the compute dtype before its sinusoid (official 1.2 forward).
- 1.3 (`kernel_size=(8, 8, -1)`, `use_spatial_rope=True`): 16 channels, 2-D RoPE in spatial attention,
  temporal attention inside 8x8 spatial windows with local 3-D RoPE, and the i2v embedders
  `x_embedder_cond` / `x_embedder_cond_mask` (the official 1.3 class always has them).

The model computes in the dtype of `x` (ComfyUI passes its compute dtype); the output is float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from .configs import check_field_types
from .rope import interleaved_tables, rope_frequencies, spatial_angles, temporal_angles, window_angles
from .stdit3_embedders import CaptionEmbedder, PatchEmbed3D, RotaryFrequencies, TimestepEmbedder, sincos_pos_embed_2d
from .stdit3_layers import AttentionGroup, CaptionKeys, FinalLayer, STDiT3Block, TokenLayout, window_groups


@dataclass
class STDiT3Config:
    """The inference fields of the official STDiT3Config (same names; defaults of the v1.3 class)."""

    input_sq_size: int = 512
    in_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    pred_sigma: bool = True
    caption_channels: int = 4096
    model_max_length: int = 300
    qk_norm: bool = True
    skip_temporal: bool = False
    kernel_size: tuple[int, int, int] | None = None
    use_spatial_rope: bool = False

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.kernel_size is not None:
            self.kernel_size = tuple(int(k) for k in self.kernel_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints (t, h, w), got {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size must be a multiple of 4 (2-D sin-cos pos-emb), got {self.hidden_size}")
        if self.kernel_size is not None:
            if len(self.kernel_size) != 3 or self.kernel_size[2] != -1 or min(self.kernel_size[:2]) < 1:
                raise ValueError(
                    f"kernel_size must be (window_h, window_w, -1) with positive windows (released: (8, 8, -1)), "
                    f"got {self.kernel_size}"
                )
        if self.use_spatial_rope and self.kernel_size is None:
            raise ValueError("use_spatial_rope=True requires kernel_size (as in the official STDiT3)")
        head_dim = self.hidden_size // self.num_heads
        rotation_dim = self.rotation_dim
        if rotation_dim % 2 or (self.kernel_size is not None and head_dim % 3):
            raise ValueError(
                f"head_dim {head_dim} does not split into even RoPE chunks "
                f"({'three chunks of ' if self.kernel_size else ''}{rotation_dim})"
            )

    @classmethod
    def from_dict(cls, d: dict) -> STDiT3Config:
        """Build from a case.json model_config or an HF config.json; training / kernel keys are ignored."""
        if d.get("skip_y_embedder"):
            raise ValueError("skip_y_embedder=True (pre-embedded captions) is not supported")
        check_field_types(cls, d, "STDiT3")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotation_dim(self) -> int:
        """RoPE dim: the whole head (1.2) or one of three (t, h, w) chunks (1.3 windows)."""
        return self.head_dim // 3 if self.kernel_size is not None else self.head_dim

    @property
    def has_cond_embedders(self) -> bool:
        """The 1.3 class (selected by kernel_size) carries the i2v embedders; 1.2 does not."""
        return self.kernel_size is not None

    @property
    def rounds_timestep(self) -> bool:
        """1.2 casts the timestep to the model dtype before the sinusoid (official Q3); 1.3 does not."""
        return self.kernel_size is None


def stdit3_v12_config() -> STDiT3Config:
    """The released Open-Sora 1.2 STDiT3-XL/2 (hpcai-tech/OpenSora-STDiT-v3)."""
    return STDiT3Config(in_channels=4)


def stdit3_v13_config() -> STDiT3Config:
    """The released Open-Sora 1.3 STDiT3-XL/2 (hpcai-tech/OpenSora-STDiT-v4, -360p, -i2v)."""
    return STDiT3Config(in_channels=16, kernel_size=(8, 8, -1), use_spatial_rope=True)


def _first_value(value, name: str) -> float:
    """Element 0 of a pixel size as a Python float (reads a tensor's value: a device sync, a graph break)."""
    if value is None:
        raise ValueError(f"{name} (the pixel size; only element 0 is used) is required")
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            raise ValueError(f"{name} is an empty tensor")
        return float(value.reshape(-1)[0].item())
    if isinstance(value, (list, tuple)):
        return float(value[0])
    return float(value)


def _valid_caption_tokens(mask, length: int, batch: int, device) -> torch.Tensor:
    """The caption mask as [B, L] bool (True = valid token), checked by shape only and repeated to the batch."""
    if not isinstance(mask, torch.Tensor) or mask.shape[-1] != length or mask.numel() % length:
        raise ValueError(f"mask must be [B, {length}] 0/1 (one row per caption), got {getattr(mask, 'shape', mask)}")
    valid = (mask.reshape(-1, length) != 0).to(device)
    if valid.shape[0] != batch:
        if batch % valid.shape[0]:
            raise ValueError(f"mask has {valid.shape[0]} rows, which does not divide the batch {batch}")
        valid = valid.repeat(batch // valid.shape[0], 1)  # as the official encode_text
    return valid


def reads_tensor_values(height, width, mask, caption_lengths) -> bool:
    """Whether the forward would read tensor values (pixel sizes, caption lengths); see read_step_values."""
    sizes_are_tensors = isinstance(height, torch.Tensor) or isinstance(width, torch.Tensor)
    return sizes_are_tensors or (mask is not None and caption_lengths is None)


@torch.compiler.disable
def read_step_values(y, mask, height, width, batch: int) -> tuple[float, float, tuple[int, ...] | None]:
    """The Python numbers a forward needs from its tensor inputs, read in one eager call: (height, width) (element 0)
    and caption_lengths (valid caption tokens per row, None without a mask).

    They set shapes (the trimmed caption length) and constants (the pos-emb / RoPE scale), so they must be Python
    numbers; reading them at the top of the forward, outside torch.compile (disable), keeps a compiled forward in one
    graph instead of breaking it at each read. The values are the ones the forward would read itself."""
    lengths = None
    if mask is not None:
        length = STDiT3._caption_states(y, "y", batch).shape[1]
        lengths = tuple(_valid_caption_tokens(mask, length, batch, mask.device).sum(dim=1).tolist())
    return _first_value(height, "height"), _first_value(width, "width"), lengths


def _per_sample(value, batch: int, name: str, device: torch.device, tile: bool = False) -> torch.Tensor:
    """A scalar, [1] or [B] value as a [B] tensor (kept in its dtype if floating, else float32).
    tile: n values with B a multiple of n are repeated as a block (the official SizeEmbedder's `s.repeat(bs // n)`:
    one value per video, the guidance passes stacked after each other)."""
    if value is None:
        raise ValueError(f"{name} is required")
    t = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float32)
    if not t.is_floating_point():
        t = t.float()
    t = t.to(device).reshape(-1)
    if t.numel() == 1:
        return t.expand(batch)
    if tile and batch % t.numel() == 0:
        return t.repeat(batch // t.numel())
    if t.numel() != batch:
        allowed = f"a divisor of {batch}" if tile else f"1 or {batch}"
        raise ValueError(f"{name} must hold {allowed} values (one per sample), got shape {tuple(t.shape)}")
    return t


class STDiT3(nn.Module):
    def __init__(self, config: STDiT3Config, dtype=None, device=None, operations=None):
        super().__init__()
        operations = operations or nn
        self.config = config
        c = config
        kw = {"dtype": dtype, "device": device, "operations": operations}
        self.rope = RotaryFrequencies(c.rotation_dim, device=device)
        self.x_embedder = PatchEmbed3D(c.patch_size, c.in_channels, c.hidden_size, **kw)
        if c.has_cond_embedders:
            self.x_embedder_cond = PatchEmbed3D(c.patch_size, c.in_channels, c.hidden_size, **kw)
            self.x_embedder_cond_mask = PatchEmbed3D(c.patch_size, c.in_channels, c.hidden_size, **kw)
        self.t_embedder = TimestepEmbedder(c.hidden_size, **kw)
        self.fps_embedder = TimestepEmbedder(c.hidden_size, **kw)
        self.t_block = nn.Sequential(
            nn.SiLU(), operations.Linear(c.hidden_size, 6 * c.hidden_size, dtype=dtype, device=device)
        )
        self.y_embedder = CaptionEmbedder(c.caption_channels, c.hidden_size, c.model_max_length, **kw)
        block = {"num_heads": c.num_heads, "mlp_ratio": c.mlp_ratio, "qk_norm": c.qk_norm, **kw}
        self.spatial_blocks = nn.ModuleList([STDiT3Block(c.hidden_size, **block) for _ in range(c.depth)])
        if not c.skip_temporal:
            self.temporal_blocks = nn.ModuleList(
                [STDiT3Block(c.hidden_size, temporal=True, **block) for _ in range(c.depth)]
            )
        self.final_layer = FinalLayer(c.hidden_size, math.prod(c.patch_size), c.out_channels, **kw)

    # ------------------------------------------------------------ conditioning

    def _encode_captions(
        self, y, mask, y_null, batch: int, dtype: torch.dtype, caption_lengths: tuple[int, ...] | None
    ) -> CaptionKeys:
        """Project each sample's valid caption tokens; keep them first and trim to the longest caption.
        caption_lengths: the valid tokens per row (as read_step_values reads them from mask)."""
        y = self._caption_states(y, "y", batch)
        length = y.shape[1]
        if y_null is not None:
            y_null = self._caption_states(y_null, "y_null", batch)
            if y_null.shape != y.shape:
                raise ValueError(f"y_null must have the shape of y {tuple(y.shape)}, got {tuple(y_null.shape)}")
        key_mask = None
        if mask is not None:
            valid = _valid_caption_tokens(mask, length, batch, y.device)
            if len(caption_lengths) != batch:
                raise ValueError(f"caption_lengths must hold {batch} values (one per row), got {caption_lengths}")
            counts = valid.sum(dim=1)
            longest, shortest = max(caption_lengths), min(caption_lengths)
            if shortest == 0:
                raise ValueError("mask has a sample with no valid caption token; every caption needs at least one")
            # stable sort puts each sample's valid tokens first, in order; key order does not change attention
            order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :longest]
            index = order[:, :, None].expand(-1, -1, y.shape[-1])
            y = torch.gather(y, 1, index)
            if y_null is not None:
                y_null = torch.gather(y_null, 1, index)
            if shortest != longest:
                key_mask = (torch.arange(longest, device=y.device)[None] < counts[:, None])[:, None, None, :]
        tokens = self.y_embedder(y.to(dtype))
        null_tokens = self.y_embedder(y_null.to(dtype)) if y_null is not None else None
        return CaptionKeys(tokens, key_mask, null_tokens)

    @staticmethod
    def _caption_states(y, name: str, batch: int) -> torch.Tensor:
        if not isinstance(y, torch.Tensor) or y.ndim not in (3, 4) or (y.ndim == 4 and y.shape[1] != 1):
            raise ValueError(
                f"{name} must be [B, 1, L, caption_channels] (or [B, L, caption_channels]), got {getattr(y, 'shape', y)}"
            )
        y = y.squeeze(1) if y.ndim == 4 else y
        if y.shape[0] != batch:
            raise ValueError(f"{name} has batch {y.shape[0]} but x has batch {batch}")
        return y

    def _frame_split(self, mask_index, frames: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if mask_index is None:
            return None
        index = mask_index.reshape(-1).tolist() if isinstance(mask_index, torch.Tensor) else list(mask_index)
        if not index:
            return None
        bad = [i for i in index if not 0 <= int(i) < frames]
        if bad:
            raise ValueError(f"mask_index entries must be latent frame indices in [0, {frames}), got {bad}")
        rec = sorted({int(i) for i in index})
        pred = [i for i in range(frames) if i not in rec]
        as_tensor = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        return as_tensor(rec), as_tensor(pred)

    def _attention_groups(self, batch: int, frames: int, rows: int, cols: int, scale: float, device) -> dict:
        """Spatial and temporal attention groups with their RoPE tables, built once per forward."""
        c = self.config
        freqs = rope_frequencies(c.rotation_dim)
        spatial_rope = None
        if c.use_spatial_rope:
            spatial_rope = interleaved_tables(spatial_angles(rows, cols, scale, freqs, device))
        groups = {"spatial_groups": [AttentionGroup(batch * frames, rows * cols, spatial_rope)]}
        if c.skip_temporal:
            return groups
        if c.kernel_size is not None:
            window = c.kernel_size[:2]
            rope_for = lambda wh, ww: interleaved_tables(window_angles(frames, wh, ww, scale, freqs, device))  # noqa: E731
        else:  # 1.2: every spatial token is its own 1x1 "window" over all frames; RoPE on the frame index
            window = (1, 1)
            rope_for = lambda wh, ww: interleaved_tables(temporal_angles(frames, freqs, device))  # noqa: E731
        groups["temporal_groups"] = window_groups(batch, frames, rows, cols, window, rope_for)
        return groups

    # ------------------------------------------------------------ forward

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        fps=None,
        height=None,
        width=None,
        cond: torch.Tensor | None = None,
        cond_mask: torch.Tensor | None = None,
        mask_index=None,
        y_null: torch.Tensor | None = None,
        caption_lengths: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """Predict [B, out_channels, T, H, W] (float32) for the latent x [B, C, T, H, W].

        timestep [B] on 0..1000; y [B, 1, L, caption_channels] with mask [B, L] (1 = valid token);
        fps [B] (24 for video, 120 for images); height / width pixel sizes (element 0 is used);
        x_mask [B, T] bool (False frames use timestep-0 modulation); 1.3 i2v: cond and cond_mask
        [B, C, T, H, W], mask_index (latent frames that cross-attend to y_null [B, 1, L, caption_channels]).
        caption_lengths: the valid tokens of mask per row (trusted, not checked against mask), read from mask when
        None. Tensor values (height, width, the mask's lengths) are read first, in one eager call (read_step_values);
        a caller that compiles the model reads them before it (numbers for height / width, caption_lengths), so the
        compiled forward has no break.
        """
        c = self.config
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or not x.is_floating_point():
            raise ValueError(f"x must be a floating [B, C, T, H, W] latent, got {getattr(x, 'shape', type(x))}")
        if x.shape[1] != c.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels, this model takes {c.in_channels}")
        dtype, device = x.dtype, x.device
        b, _, tx, hx, wx = x.shape
        if reads_tensor_values(height, width, mask, caption_lengths):
            height, width, caption_lengths = read_step_values(y, mask, height, width, b)
        pt, ph, pw = c.patch_size
        frames, rows, cols = -(-tx // pt), -(-hx // ph), -(-wx // pw)
        tokens_per_frame = rows * cols

        # sizes: pos-emb / RoPE scale from the pixel size, as the official (only element 0 is used)
        scale = (_first_value(height, "height") * _first_value(width, "width")) ** 0.5 / c.input_sq_size
        if not scale > 0:
            raise ValueError(f"height and width must be positive pixel sizes, got {height!r} x {width!r}")
        base_size = round(tokens_per_frame**0.5)

        # timestep and fps conditioning
        timestep = _per_sample(timestep, b, "timestep", device)
        if c.rounds_timestep:
            timestep = timestep.to(dtype)  # official 1.2: timestep.to(model dtype) before the sinusoid
        fps_emb = self.fps_embedder(_per_sample(fps, b, "fps", device, tile=True), dtype)
        t = self.t_embedder(timestep, dtype) + fps_emb
        t_mlp = self.t_block(t)
        t0 = t0_mlp = None
        if x_mask is not None:
            if tuple(x_mask.shape) != (b, frames):
                raise ValueError(
                    f"x_mask must be [B, T] = [{b}, {frames}] (one flag per latent frame), got {tuple(x_mask.shape)}"
                )
            x_mask = x_mask.to(device=device, dtype=torch.bool)
            t0 = self.t_embedder(torch.zeros_like(timestep), dtype) + fps_emb
            t0_mlp = self.t_block(t0)

        # i2v frames and captions
        frame_split = self._frame_split(mask_index, frames, device)
        if frame_split is not None and y_null is None:
            raise ValueError("mask_index needs y_null (the null caption the conditioned frames attend to)")
        null = y_null if frame_split is not None else None
        captions = self._encode_captions(y, mask, null, b, dtype, caption_lengths)

        # tokens
        h = self.x_embedder(x)
        if mask_index is not None:
            if not c.has_cond_embedders:
                raise ValueError(
                    "mask_index / cond conditioning needs the 1.3 model (kernel_size set); this is a 1.2 config"
                )
            for name, value in (("cond", cond), ("cond_mask", cond_mask)):
                if not isinstance(value, torch.Tensor) or value.shape != x.shape:
                    raise ValueError(
                        f"{name} must be a tensor shaped like x {tuple(x.shape)}, got {getattr(value, 'shape', value)}"
                    )
            h = h + self.x_embedder_cond(cond.to(dtype)) + self.x_embedder_cond_mask(cond_mask.to(dtype))
        pos = sincos_pos_embed_2d(c.hidden_size, rows, cols, scale, base_size, device).to(dtype)
        h = (h.view(b, frames, tokens_per_frame, -1) + pos).view(b, frames * tokens_per_frame, -1)

        grid = {"batch": b, "frames": frames, "height": rows, "width": cols}
        layout = TokenLayout(
            **grid,
            captions=captions,
            x_mask=x_mask,
            rec_frames=frame_split[0] if frame_split else None,
            pred_frames=frame_split[1] if frame_split else None,
            **self._attention_groups(b, frames, rows, cols, scale, device),
        )

        temporal_blocks = self.temporal_blocks if not c.skip_temporal else [None] * c.depth
        for spatial_block, temporal_block in zip(self.spatial_blocks, temporal_blocks):
            h = spatial_block(h, t_mlp, t0_mlp, layout)
            if temporal_block is not None:
                h = temporal_block(h, t_mlp, t0_mlp, layout)

        h = self.final_layer(h, t, t0, layout)
        return self.unpatchify(h, frames, rows, cols)[:, :, :tx, :hx, :wx].float()

    def unpatchify(self, x: torch.Tensor, frames: int, rows: int, cols: int) -> torch.Tensor:
        """[B, N, (pt ph pw C_out)] -> [B, C_out, T*pt, H*ph, W*pw] (padding not yet cropped)."""
        pt, ph, pw = self.config.patch_size
        out = self.config.out_channels
        x = x.view(x.shape[0], frames, rows, cols, pt, ph, pw, out)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], out, frames * pt, rows * ph, cols * pw)
