"""Open-Sora 2.0 Video DC-AE ("dc-ae-f32t4c128"): x32 spatial, x4 temporal (not causal), 128 latent channels.

As the official `opensora/models/dc_ae/` (branch main) with the runtime options of
configs/diffusion/inference/high_compression.py: each batch item is encoded / decoded on its own; clips longer
than the temporal tile and frames larger than the spatial tile are cut into overlapping tiles whose overlaps are
blended linearly. scaling_factor stays None as in that config (Q12: training used 0.493), so latents are unscaled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .dcae_layers import (
    ConvLayer,
    DuplicateShuffle,
    OpSequential,
    Residual,
    UnshuffleAverage,
    build_activation,
    build_block,
    build_downsample,
    build_norm,
    build_upsample,
)

DOWNSAMPLE_TYPES = ("Conv",)  # the official ConvPixelUnshuffle raises for video
UPSAMPLE_TYPES = ("InterpolateConv",)  # the official ConvPixelShuffle raises for video

# The official registry entry "dc-ae-f32t4c128" (ae_model_zoo.py / dc_ae_f32), as an OmegaConf dot-list.
DC_AE_F32T4C128_DOTLIST = (
    "time_compression_ratio=4",
    "spatial_compression_ratio=32",
    "encoder.block_type=[ResBlock,ResBlock,ResBlock,EViTS5_GLU,EViTS5_GLU,EViTS5_GLU]",
    "encoder.width_list=[128,256,512,512,1024,1024]",
    "encoder.depth_list=[2,2,2,3,3,3]",
    "encoder.downsample_block_type=Conv",
    "encoder.norm=rms3d",
    "encoder.is_video=True",
    "decoder.block_type=[ResBlock,ResBlock,ResBlock,EViTS5_GLU,EViTS5_GLU,EViTS5_GLU]",
    "decoder.width_list=[128,256,512,512,1024,1024]",
    "decoder.depth_list=[3,3,3,3,3,3]",
    "decoder.upsample_block_type=InterpolateConv",
    "decoder.norm=rms3d",
    "decoder.act=silu",
    "decoder.out_norm=rms3d",
    "decoder.is_video=True",
    "encoder.temporal_downsample=[False,False,False,True,True,False]",
    "decoder.temporal_upsample=[False,False,False,True,True,False]",
    "latent_channels=128",
)
# Runtime options of configs/diffusion/inference/high_compression.py (scaling_factor not set there: Q12).
INFERENCE_OPTIONS = dict(
    use_spatial_tiling=True,
    use_temporal_tiling=True,
    spatial_tile_size=256,
    temporal_tile_size=32,
    tile_overlap_factor=0.25,
    scaling_factor=None,
)


@dataclass
class EncoderConfig:
    """Official EncoderConfig; in_channels / latent_channels None = inherit from DCAEConfig (official ${..x})."""

    in_channels: int | None = None
    latent_channels: int | None = None
    width_list: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    depth_list: tuple[int, ...] = (2, 2, 2, 2, 2, 2)
    block_type: str | tuple[str, ...] = "ResBlock"
    norm: str | None = "rms2d"
    act: str | None = "silu"
    downsample_block_type: str = "ConvPixelUnshuffle"
    downsample_match_channel: bool = True
    downsample_shortcut: str | None = "averaging"
    out_norm: str | None = None
    out_act: str | None = None
    out_shortcut: str | None = "averaging"
    double_latent: bool = False
    is_video: bool = False
    temporal_downsample: tuple[bool, ...] = ()


@dataclass
class DecoderConfig:
    """Official DecoderConfig (norm and act may be one value or one per stage)."""

    in_channels: int | None = None
    latent_channels: int | None = None
    in_shortcut: str | None = "duplicating"
    width_list: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    depth_list: tuple[int, ...] = (2, 2, 2, 2, 2, 2)
    block_type: str | tuple[str, ...] = "ResBlock"
    norm: str | None | tuple[str | None, ...] = "rms2d"
    act: str | None | tuple[str | None, ...] = "silu"
    upsample_block_type: str = "ConvPixelShuffle"
    upsample_match_channel: bool = True
    upsample_shortcut: str | None = "duplicating"
    out_norm: str | None = "rms2d"
    out_act: str | None = "relu"
    is_video: bool = False
    temporal_upsample: tuple[bool, ...] = ()


@dataclass
class DCAEConfig:
    """Official DCAEConfig fields and defaults (the dot-list is merged onto these, as OmegaConf does), plus the
    runtime options the official DC_AE factory sets. Accepted for parity but unused here: use_quant_conv (the
    official builds no quant conv either), is_image_model (official forward() only) and is_training (the official
    VAE-training path: whole batch at once and no scaling; inference sets it False)."""

    in_channels: int = 3
    latent_channels: int = 32
    time_compression_ratio: int = 1
    spatial_compression_ratio: int = 32
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    use_quant_conv: bool = False
    scaling_factor: float | None = None
    is_image_model: bool = False
    is_training: bool = False
    use_spatial_tiling: bool = False
    use_temporal_tiling: bool = False
    spatial_tile_size: int = 256
    temporal_tile_size: int = 32
    tile_overlap_factor: float = 0.25

    def __post_init__(self) -> None:
        for sub in (self.encoder, self.decoder):
            sub.in_channels = self.in_channels if sub.in_channels is None else sub.in_channels
            sub.latent_channels = self.latent_channels if sub.latent_channels is None else sub.latent_channels

    @classmethod
    def from_dotlist(cls, dotlist: Sequence[str], **options: Any) -> DCAEConfig:
        """Merge "key=value" / "encoder.key=value" items (OmegaConf dot-list syntax) onto the defaults."""
        top: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {"encoder": {}, "decoder": {}}
        for item in dotlist:
            key, sep, text = item.partition("=")
            if not sep:
                raise ValueError(f"dot-list item {item!r} is not key=value")
            section, _, name = key.strip().rpartition(".")
            target = nested.get(section) if section else top
            if target is None:
                raise ValueError(f"dot-list key {key!r}: only top-level, encoder.* and decoder.* keys exist")
            target[name] = _parse_value(text.strip())
        top.update(options)
        encoder = _build(EncoderConfig, nested["encoder"], "encoder.")
        decoder = _build(DecoderConfig, nested["decoder"], "decoder.")
        return _build(cls, {**top, "encoder": encoder, "decoder": decoder}, "")

    @classmethod
    def from_dict(cls, values: dict) -> DCAEConfig:
        """From a case.json model_config: {"dotlist": [...], runtime options...} or {"model_name": ...}.
        Keys that are not config fields (e.g. an informational width_list) are ignored."""
        if "dotlist" in values:
            dotlist = values["dotlist"]
        elif values.get("model_name", "dc-ae-f32t4c128") == "dc-ae-f32t4c128":
            dotlist = DC_AE_F32T4C128_DOTLIST
        else:
            raise ValueError(f"model_name {values['model_name']!r} is not supported; allowed: 'dc-ae-f32t4c128'")
        runtime = {f.name for f in dataclasses.fields(cls)} - {"encoder", "decoder"}
        return cls.from_dotlist(dotlist, **{k: v for k, v in values.items() if k in runtime})

    @property
    def num_stages(self) -> int:
        return len(self.encoder.width_list)

    def validate(self) -> None:
        for name, sub, resample, allowed in (
            ("encoder", self.encoder, self.encoder.downsample_block_type, DOWNSAMPLE_TYPES),
            ("decoder", self.decoder, self.decoder.upsample_block_type, UPSAMPLE_TYPES),
        ):
            if not sub.is_video:
                raise ValueError(f"{name}.is_video must be True: only the video DC-AE is implemented")
            if resample not in allowed:
                raise ValueError(f"{name} resampling block {resample!r} is not supported for video; allowed: {allowed}")
            stages = len(sub.width_list)
            for field_name in ("depth_list", "block_type", "norm", "act"):
                value = getattr(sub, field_name, None)
                if isinstance(value, tuple) and len(value) != stages:
                    raise ValueError(f"{name}.{field_name} has {len(value)} entries for {stages} stages")
            if sub.depth_list[0] < 1:
                raise ValueError(f"{name}.depth_list[0] must be >= 1 (the official raises for video otherwise)")
        temporal = (self.encoder.temporal_downsample, self.decoder.temporal_upsample)
        for name, flags in zip(("encoder.temporal_downsample", "decoder.temporal_upsample"), temporal):
            if flags and len(flags) != self.num_stages:
                raise ValueError(f"{name} has {len(flags)} entries for {self.num_stages} stages")
        if len(self.decoder.width_list) != self.num_stages:
            raise ValueError("encoder and decoder must have the same number of stages")
        spatial = 2 ** sum(1 for d in self.encoder.depth_list[:-1] if d > 0)
        if spatial != self.spatial_compression_ratio:
            raise ValueError(f"spatial_compression_ratio {self.spatial_compression_ratio} != {spatial} from the stages")
        if 2 ** sum(map(bool, self.encoder.temporal_downsample)) != self.time_compression_ratio:
            raise ValueError(f"time_compression_ratio {self.time_compression_ratio} != the temporal_downsample stages")
        if not 0.0 <= self.tile_overlap_factor < 1.0:
            raise ValueError(f"tile_overlap_factor must be in [0, 1), got {self.tile_overlap_factor}")
        for size, ratio, name in (
            (self.spatial_tile_size, self.spatial_compression_ratio, "spatial_tile_size"),
            (self.temporal_tile_size, self.time_compression_ratio, "temporal_tile_size"),
        ):
            step = int(size * (1 - self.tile_overlap_factor))
            if size < ratio or size % ratio or step < ratio or step % ratio:
                raise ValueError(
                    f"{name} {size} with tile_overlap_factor {self.tile_overlap_factor}: the tile ({size}) and its "
                    f"step ({step}) must be positive multiples of the compression {ratio}"
                )


def dc_ae_f32t4c128_config(**overrides: Any) -> DCAEConfig:
    """The released Video DC-AE (F32T4C128_AE.safetensors) with the official high-compression inference options."""
    return DCAEConfig.from_dotlist(DC_AE_F32T4C128_DOTLIST, **{**INFERENCE_OPTIONS, **overrides})


def _parse_value(text: str) -> Any:
    """One OmegaConf dot-list value: [a,b] lists, ints, floats, True/False, null/None, else the string."""
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return tuple(_parse_value(part.strip()) for part in inner.split(",")) if inner else ()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none", "~"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _build(cls, values: dict[str, Any], prefix: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown DC-AE config keys {[prefix + k for k in unknown]}; allowed: {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _per_stage(value, stage: int):
    return value[stage] if isinstance(value, tuple) else value


class Encoder(nn.Module):
    def __init__(self, config: EncoderConfig, dtype=None, device=None, operations=None):
        super().__init__()
        factory = dict(dtype=dtype, device=device, operations=operations)
        widths, depths = config.width_list, config.depth_list
        self.project_in = ConvLayer(config.in_channels, widths[0], 3, **factory)
        stages = []
        for stage, (width, depth) in enumerate(zip(widths, depths)):
            kind = _per_stage(config.block_type, stage)
            ops = [build_block(kind, width, config.norm, config.act, **factory) for _ in range(depth)]
            if stage < len(widths) - 1 and depth > 0:
                out = widths[stage + 1] if config.downsample_match_channel else width
                temporal = bool(config.temporal_downsample[stage]) if config.temporal_downsample else False
                ops.append(build_downsample(width, out, config.downsample_shortcut, temporal, **factory))
            stages.append(OpSequential(ops))
        self.stages = nn.ModuleList(stages)
        latent = config.latent_channels * (2 if config.double_latent else 1)
        project_out = OpSequential(
            [
                build_norm(config.out_norm, widths[-1], dtype=dtype, device=device),
                build_activation(config.out_act),
                ConvLayer(widths[-1], latent, 3, **factory),
            ]
        )
        if config.out_shortcut == "averaging":
            project_out = Residual(project_out, UnshuffleAverage(widths[-1], latent, factor=1))
        elif config.out_shortcut is not None:
            raise ValueError(f"encoder.out_shortcut {config.out_shortcut!r} is not supported; allowed: 'averaging'")
        self.project_out = project_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project_in(x)
        for stage in self.stages:
            x = stage(x)
        return self.project_out(x)


class Decoder(nn.Module):
    def __init__(self, config: DecoderConfig, dtype=None, device=None, operations=None):
        super().__init__()
        factory = dict(dtype=dtype, device=device, operations=operations)
        widths, depths = config.width_list, config.depth_list
        project_in = ConvLayer(config.latent_channels, widths[-1], 3, **factory)
        if config.in_shortcut == "duplicating":
            project_in = Residual(project_in, DuplicateShuffle(config.latent_channels, widths[-1], factor=1))
        elif config.in_shortcut is not None:
            raise ValueError(f"decoder.in_shortcut {config.in_shortcut!r} is not supported; allowed: 'duplicating'")
        self.project_in = project_in
        stages = []  # stages[i] is stage i; they run from the last (narrowest resolution) to the first
        for stage, (width, depth) in enumerate(zip(widths, depths)):
            ops = []
            if stage < len(widths) - 1 and depth > 0:
                out = width if config.upsample_match_channel else widths[stage + 1]
                temporal = bool(config.temporal_upsample[stage]) if config.temporal_upsample else False
                ops.append(build_upsample(widths[stage + 1], out, config.upsample_shortcut, temporal, **factory))
            kind, norm, act = (_per_stage(v, stage) for v in (config.block_type, config.norm, config.act))
            ops.extend(build_block(kind, width, norm, act, **factory) for _ in range(depth))
            stages.append(OpSequential(ops))
        self.stages = nn.ModuleList(stages)
        self.project_out = OpSequential(
            [
                build_norm(config.out_norm, widths[0], dtype=dtype, device=device),
                build_activation(config.out_act),
                ConvLayer(widths[0], config.in_channels, 3, **factory),
            ]
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project_in(z)
        for stage in reversed(self.stages):
            x = stage(x)
        return self.project_out(x)


class DCAE(nn.Module):
    """Video DC-AE: encode [B, 3, T, H, W] in [-1, 1] -> [B, latent, T/4, H/32, W/32]; decode the reverse.

    The runtime options (tiling, tile sizes, overlap, scaling_factor) are attributes, as in the official model,
    read from the config at construction.
    """

    def __init__(self, config: DCAEConfig | None = None, dtype=None, device=None, operations=None):
        super().__init__()
        self.config = config = config or dc_ae_f32t4c128_config()
        config.validate()
        self.encoder = Encoder(config.encoder, dtype=dtype, device=device, operations=operations)
        self.decoder = Decoder(config.decoder, dtype=dtype, device=device, operations=operations)
        self.scaling_factor = config.scaling_factor
        self.use_spatial_tiling = config.use_spatial_tiling
        self.use_temporal_tiling = config.use_temporal_tiling

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def spatial_tile_latent_size(self) -> int:
        return self.config.spatial_tile_size // self.config.spatial_compression_ratio

    @property
    def temporal_tile_latent_size(self) -> int:
        return self.config.temporal_tile_size // self.config.time_compression_ratio

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T', H', W') of the latent of a valid input size (see check_video_size)."""
        self.check_video_size(num_frames, height, width)
        frames = num_frames
        for temporal in self.config.encoder.temporal_downsample:
            frames = (frames + 1) // 2 if temporal else frames
        ratio = self.config.spatial_compression_ratio
        return frames, height // ratio, width // ratio

    def check_video_size(self, num_frames: int, height: int, width: int) -> None:
        """Raise ValueError unless (T, H, W) can pass the encoder: H, W multiples of 32 (every stride-2 stage
        halves an even size), T a multiple of 4 (1 and 2 also pass: a single frame is never halved in time)."""
        ratio = self.config.spatial_compression_ratio
        if height < ratio or width < ratio or height % ratio or width % ratio:
            raise ValueError(
                f"DC-AE needs height and width that are positive multiples of {ratio}, got {height} x {width}"
            )
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"DC-AE needs an int frame count >= 1, got {num_frames!r}")
        frames, factor = num_frames, self.config.time_compression_ratio
        for temporal in self.config.encoder.temporal_downsample:
            if temporal and frames > 1 and frames % 2:
                raise ValueError(
                    f"DC-AE cannot encode {num_frames} frames: use a multiple of {factor} frames (or 1 or 2), "
                    f"each temporal downsampling stage needs an even frame count"
                )
            frames = (frames + 1) // 2 if temporal else frames

    # -- encode ---------------------------------------------------------------------------------------------

    def _encode_items(self, x: torch.Tensor) -> torch.Tensor:
        # Official encode_single: one batch item at a time; the scaling divides (official convention).
        z = torch.cat([self.encoder(x[i : i + 1]) for i in range(x.shape[0])])
        return z if self.scaling_factor is None else z / self.scaling_factor

    def _encode_frames(self, x: torch.Tensor) -> torch.Tensor:
        size = self.config.spatial_tile_size
        if self.use_spatial_tiling and (x.shape[-1] > size or x.shape[-2] > size):
            return self._tiled(x, self._encode_items, size, self.spatial_tile_latent_size, dims=(3, 4))
        return self._encode_items(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, T, H, W] in [-1, 1] -> latent [B, latent_channels, T', H/32, W/32] (T' = T/4)."""
        self._check_input(x, self.config.in_channels, "encode", "pixels in [-1, 1]")
        self.check_video_size(x.shape[2], x.shape[3], x.shape[4])
        size = self.config.temporal_tile_size
        if self.use_temporal_tiling and x.shape[2] > size:
            return self._tiled(x, self._encode_frames, size, self.temporal_tile_latent_size, dims=(2,))
        return self._encode_frames(x)

    # -- decode ---------------------------------------------------------------------------------------------

    def _decode_items(self, z: torch.Tensor) -> torch.Tensor:
        if self.scaling_factor is not None:
            z = z * self.scaling_factor
        return torch.cat([self.decoder(z[i : i + 1]) for i in range(z.shape[0])])

    def _decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        size = self.spatial_tile_latent_size
        if self.use_spatial_tiling and (z.shape[-1] > size or z.shape[-2] > size):
            return self._tiled(z, self._decode_items, size, self.config.spatial_tile_size, dims=(3, 4))
        return self._decode_items(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent [B, latent_channels, T', h, w] -> pixels [B, 3, 4T', 32h, 32w] (a one-frame tile gives 1 frame)."""
        self._check_input(z, self.config.latent_channels, "decode", "latent channels")
        size = self.temporal_tile_latent_size
        if self.use_temporal_tiling and z.shape[2] > size:
            return self._tiled(z, self._decode_frames, size, self.config.temporal_tile_size, dims=(2,))
        return self._decode_frames(z)

    # -- tiling ---------------------------------------------------------------------------------------------

    def _tiled(
        self,
        x: torch.Tensor,
        fn: Callable[[torch.Tensor], torch.Tensor],
        tile: int,
        out_tile: int,
        dims: tuple[int, ...],
    ) -> torch.Tensor:
        """fn over overlapping tiles along `dims` (T, or H and W), then the official blend and crop.

        Tiles start every int(tile * (1 - overlap)); each output tile's first int(out_tile * overlap) entries
        are blended with the end of its already-blended predecessor (the official blends in place in row-major
        order), and each tile keeps out_tile - blend entries before concatenation.
        """
        overlap = self.config.tile_overlap_factor
        step = int(tile * (1 - overlap))
        blend = int(out_tile * overlap)
        keep = out_tile - blend
        if dims == (2,):
            tiles = [fn(x[:, :, start : start + tile]) for start in range(0, x.shape[2], step)]
            for i in range(1, len(tiles)):
                tiles[i] = _blend(tiles[i - 1], tiles[i], blend, dim=2)
            return torch.cat([t[:, :, :keep] for t in tiles], dim=2)
        grid = [
            [fn(x[:, :, :, top : top + tile, left : left + tile]) for left in range(0, x.shape[4], step)]
            for top in range(0, x.shape[3], step)
        ]
        for i, row in enumerate(grid):
            for j in range(len(row)):
                if i > 0:
                    row[j] = _blend(grid[i - 1][j], row[j], blend, dim=3)
                if j > 0:
                    row[j] = _blend(row[j - 1], row[j], blend, dim=4)
        rows = [torch.cat([t[:, :, :, :keep, :keep] for t in row], dim=4) for row in grid]
        return torch.cat(rows, dim=3)

    @staticmethod
    def _check_input(x: torch.Tensor, channels: int, what: str, meaning: str) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or not x.is_floating_point():
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"DC-AE {what} expects a float tensor [B, {channels}, T, H, W], got {got}")
        if x.shape[1] != channels:
            raise ValueError(f"DC-AE {what} expects {channels} {meaning} at dim 1, got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"DC-AE {what} got an empty tensor of shape {tuple(x.shape)}")


def _blend(previous: torch.Tensor, current: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """current with its first `extent` entries along dim faded in from the last `extent` of previous (linear ramp
    k/extent, as the official blend_t / blend_v / blend_h)."""
    extent = min(previous.shape[dim], current.shape[dim], extent)
    if extent <= 0:
        return current
    ramp = torch.arange(extent, dtype=torch.float64) / extent
    shape = [1] * current.dim()
    shape[dim] = extent
    weight = ramp.view(shape).to(device=current.device, dtype=current.dtype)
    keep = (1 - ramp).view(shape).to(device=current.device, dtype=current.dtype)
    head = previous.narrow(dim, previous.shape[dim] - extent, extent) * keep + current.narrow(dim, 0, extent) * weight
    return torch.cat([head, current.narrow(dim, extent, current.shape[dim] - extent)], dim=dim)
