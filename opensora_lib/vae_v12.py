"""Open-Sora 1.2 video VAE (`VideoAutoencoderPipeline` / `OpenSoraVAE_V1_2`) in plain torch.

Pipeline: a 2-D KL-VAE on every frame (x8 spatially, latent scaled by the hard-coded 0.18215, quirk Q11), then a
causal "MAGVIT-v2 style" temporal VAE on the 4-channel latents (x4 in time), applied per chunk of 17 frames; the
final latent is normalised per channel with the checkpoint's `shift` / `scale` buffers. Reference:
`opensora/models/vae/vae.py` at v1.2.0; the temporal VAE is in vae_temporal.py. Parameter names equal the
released checkpoint keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from functools import partial

import torch
from torch import nn

from .configs import check_field_types
from .vae_kl2d import AutoencoderKL2D, AutoencoderKLConfig, check_config_keys, split_moments, tiled_apply
from .vae_temporal import VAETemporal, VAETemporalConfig

Noise = Callable[[tuple, torch.dtype, torch.device], torch.Tensor]
# keys of the official configs that only concern loading / training, not the forward maths
_LOADER_KEYS_2D = {"type", "from_pretrained", "subfolder", "cache_dir", "local_files_only"}
_LOADER_KEYS_PIPELINE = {"from_pretrained", "freeze_vae_2d", "local_files_only", "model_type", "architectures"}


@dataclass
class VAEv12Config:
    """`VideoAutoencoderPipelineConfig` + `OpenSoraVAE_V1_2` fields; defaults = the released VAE 1.2."""

    vae_2d: AutoencoderKLConfig = field(default_factory=AutoencoderKLConfig)
    vae_temporal: VAETemporalConfig = field(default_factory=VAETemporalConfig)
    micro_frame_size: int | None = 17
    micro_batch_size: int | None = 4
    shift: float | tuple[float, ...] = (-0.10, 0.34, 0.27, 0.98)
    scale: float | tuple[float, ...] = (3.85, 2.32, 2.33, 3.06)
    spatial_scaling_factor: float = 0.18215  # hard-coded in the reference, not the SDXL 0.13025 (quirk Q11)

    def __post_init__(self) -> None:
        if isinstance(self.vae_2d, dict):
            self.vae_2d = AutoencoderKLConfig.from_dict(self.vae_2d)
        if isinstance(self.vae_temporal, dict):
            self.vae_temporal = VAETemporalConfig.from_dict(self.vae_temporal)
        if self.vae_temporal.in_out_channels != self.vae_2d.latent_channels:
            raise ValueError(
                f"vae_temporal.in_out_channels ({self.vae_temporal.in_out_channels}) must equal "
                f"vae_2d.latent_channels ({self.vae_2d.latent_channels})"
            )
        for name in ("micro_frame_size", "micro_batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        for name in ("shift", "scale"):
            value = getattr(self, name)
            if isinstance(value, Sequence):
                value = tuple(float(v) for v in value)
                if len(value) != self.vae_temporal.embed_dim:
                    raise ValueError(
                        f"{name} needs {self.vae_temporal.embed_dim} values (one per channel), got {value}"
                    )
                setattr(self, name, value)

    @classmethod
    def from_dict(cls, values: dict) -> VAEv12Config:
        """From an official-style dict (case.json model_config); `vae_2d` may carry the AutoencoderKL fields."""
        known = {f.name for f in fields(cls)}
        check_config_keys(values, known, _LOADER_KEYS_PIPELINE | {"cal_loss"}, "VideoAutoencoderPipeline")
        check_field_types(cls, values, "VideoAutoencoderPipeline")
        if values.get("cal_loss"):
            raise ValueError("cal_loss=True (training mode) is not supported")
        kwargs = {k: v for k, v in values.items() if k in known}
        vae_2d = dict(values.get("vae_2d") or {})
        if "micro_batch_size" in vae_2d:  # the reference passes it to the 2-D wrapper
            kwargs["micro_batch_size"] = vae_2d.pop("micro_batch_size")
        if "scaling_factor_hardcoded" in vae_2d:
            kwargs["spatial_scaling_factor"] = float(vae_2d.pop("scaling_factor_hardcoded"))
        kind = vae_2d.pop("type", "VideoAutoencoderKL")
        if kind != "VideoAutoencoderKL":
            raise ValueError(f"vae_2d type {kind!r} not supported; allowed: ['VideoAutoencoderKL']")
        kwargs["vae_2d"] = AutoencoderKLConfig.from_dict({k: v for k, v in vae_2d.items() if k not in _LOADER_KEYS_2D})
        kwargs["vae_temporal"] = VAETemporalConfig.from_dict(values.get("vae_temporal") or {})
        return cls(**kwargs)


def _check_noise(sample: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if tuple(sample.shape) != tuple(shape):
        raise ValueError(f"noise callable returned shape {tuple(sample.shape)}, expected {tuple(shape)}")
    return sample


def _noise_2d(shape, dtype, device) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=device)  # diffusers draws on the target device


def _noise_temporal(shape, dtype, device) -> torch.Tensor:
    return torch.randn(shape).to(device=device, dtype=dtype)  # the reference draws float32 on the CPU


def _check_tiles(tile_size: int, overlap: int, factor: int) -> None:
    """Tile size and overlap in pixels."""
    if tile_size % factor or overlap % factor or tile_size < 2 * factor:
        raise ValueError(f"tile_size and overlap must be multiples of {factor}, tile_size >= {2 * factor}")
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be in [0, tile_size), got overlap={overlap}, tile_size={tile_size}")


class SpatialVAE(nn.Module):
    """`VideoAutoencoderKL`: the 2-D VAE run on frames in micro-batches; decode optionally on spatial tiles."""

    def __init__(self, config: VAEv12Config, dtype=None, device=None, operations=None):
        super().__init__()
        self.module = AutoencoderKL2D(config.vae_2d, dtype=dtype, device=device, operations=operations)
        self.micro_batch_size = config.micro_batch_size
        self.scaling_factor = config.spatial_scaling_factor
        self.factor = config.vae_2d.downsample_factor

    def _micro_batches(self, count: int) -> range:
        return range(0, count, self.micro_batch_size or count)

    def encode(self, x: torch.Tensor, sample_posterior: bool = True, noise: Noise | None = None) -> torch.Tensor:
        """Video [B, 3, T, H, W] -> scaled 2-D latents [B, 4, T, H//8, W//8]; one posterior draw per micro-batch."""
        batch, frames = x.shape[0], x.shape[2]
        pixels = x.transpose(1, 2).flatten(0, 1)
        noise = noise or _noise_2d
        out = None
        for start in self._micro_batches(pixels.shape[0]):
            chunk = pixels[start : start + (self.micro_batch_size or len(pixels))]
            mean, std = split_moments(self.module.encode_moments(chunk))
            if sample_posterior:
                mean = mean + std * _check_noise(noise(mean.shape, mean.dtype, mean.device), mean.shape)
            if out is None:
                out = mean.new_empty(pixels.shape[0], *mean.shape[1:])
            out[start : start + mean.shape[0]] = mean * self.scaling_factor
        return out.unflatten(0, (batch, frames)).transpose(1, 2)

    def decode(self, z: torch.Tensor, tile: int | None = None, overlap: int = 0) -> torch.Tensor:
        """Scaled 2-D latents [B, 4, T, h, w] -> frames [B, 3, T, 8h, 8w] (a transposed view). tile / overlap (latent
        pixels, checked by OpenSoraVAEv12.decode): decode on overlapping tiles blended linearly (approximate, saves
        memory); None: whole frames, the parity path."""
        batch, frames = z.shape[0], z.shape[2]
        latents = z.transpose(1, 2).flatten(0, 1)
        if tile:
            decode = partial(tiled_apply, self.module.decode, tile=tile, overlap=overlap, scale=self.factor)
        else:
            decode = self.module.decode
        out = None
        for start in self._micro_batches(latents.shape[0]):
            chunk = decode(latents[start : start + (self.micro_batch_size or len(latents))] / self.scaling_factor)
            if out is None:
                out = chunk.new_empty(latents.shape[0], *chunk.shape[1:])
            out[start : start + chunk.shape[0]] = chunk
        return out.unflatten(0, (batch, frames)).transpose(1, 2)


class OpenSoraVAEv12(nn.Module):
    """The Open-Sora 1.2 VAE: video [B, 3, T, H, W] in [-1, 1] <-> normalised latent [B, 4, T', H/8, W/8]."""

    def __init__(self, config: VAEv12Config | None = None, dtype=None, device=None, operations=None):
        super().__init__()
        config = config or VAEv12Config()
        self.config = config
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.spatial_vae = SpatialVAE(config, **kw)
        self.temporal_vae = VAETemporal(config.vae_temporal, **kw)
        self.micro_frame_size = config.micro_frame_size
        for name in ("scale", "shift"):
            value = torch.tensor(getattr(config, name), dtype=dtype or torch.float32, device=device)
            self.register_buffer(name, value.view(1, -1, 1, 1, 1) if value.ndim else value)

    @property
    def micro_latent_frames(self) -> int | None:
        return None if self.micro_frame_size is None else self.temporal_vae.latent_frames(self.micro_frame_size)

    def latent_frames(self, num_frames: int) -> int:
        """Latent length for a pixel frame count: 5 per full 17-frame chunk + ceil(rest / 4)."""
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        if self.micro_frame_size is None:
            return self.temporal_vae.latent_frames(num_frames)
        full, rest = divmod(num_frames, self.micro_frame_size)
        return full * self.micro_latent_frames + (self.temporal_vae.latent_frames(rest) if rest else 0)

    def longest_video(self, latent_frames: int) -> int:
        """The most pixel frames a latent of `latent_frames` frames decodes to (a latent without its frame count,
        e.g. after core's Save / Load Latent). One latent frame is one image: 1.2 makes 1 or >= 17 frames, and
        the other frames of a 1-frame latent would come from the encoder's padding."""
        if latent_frames == 1:
            return 1
        frames = [n for n in range(1, 4 * latent_frames + 1) if self.latent_frames(n) == latent_frames]
        if not frames:
            raise ValueError(f"no frame count gives {latent_frames} latent frames")
        return frames[-1]

    def _chunks(self, length: int, size: int | None) -> range:
        return range(0, length, size or length)

    def encode_temporal_moments(self, x_z: torch.Tensor) -> list[torch.Tensor]:
        """Temporal posterior parameters per micro-frame chunk of the scaled 2-D latents."""
        size = self.micro_frame_size
        return [
            self.temporal_vae.encode_moments(x_z[:, :, i : i + (size or x_z.shape[2])])
            for i in self._chunks(x_z.shape[2], size)
        ]

    def reference_frames(self, num_frames: int) -> int:
        """How many frames of a reference video are encoded: all (the official 1.2 collect_references_batch does
        not trim; the 1.3 VAE's method of this name does)."""
        return num_frames

    def encode(self, x: torch.Tensor, sample_posterior: bool = True, noise: Noise | None = None) -> torch.Tensor:
        """Video [B, 3, T, H, W] in [-1, 1] -> normalised latent [B, 4, latent_frames(T), H//8, W//8].

        `noise(shape, dtype, device)` supplies every posterior draw in the reference order: the 2-D posterior per
        micro-batch of frames, then the temporal posterior per 17-frame chunk. None draws with torch.randn.
        """
        self._check_video(x)
        x_z = self.spatial_vae.encode(x, sample_posterior, noise)
        size, latents = self.micro_frame_size, []
        for i in self._chunks(x_z.shape[2], size):
            mean, std = split_moments(self.temporal_vae.encode_moments(x_z[:, :, i : i + (size or x_z.shape[2])]))
            if sample_posterior:
                draw = (noise or _noise_temporal)(mean.shape, mean.dtype, mean.device)
                mean = mean + std * _check_noise(draw, mean.shape)
            latents.append(mean)
        z = torch.cat(latents, dim=2) if len(latents) > 1 else latents[0]
        return (z - self.shift.to(z)) / self.scale.to(z)  # .to(z): dtype and device (partially loaded VAE)

    def decode(
        self,
        z: torch.Tensor,
        num_frames: int | None = None,
        *,
        spatial_tile_size: int | None = None,
        spatial_tile_overlap: int | None = None,
    ) -> torch.Tensor:
        """Normalised latent [B, 4, T', h, w] -> video [B, 3, num_frames, 8h, 8w] in about [-1, 1]; num_frames None:
        the longest video with that many latent frames. spatial_tile_size / _overlap (latent pixels, as the 1.3 VAE's
        decode): the 2-D VAE decodes on blended tiles (SpatialVAE.decode)."""
        if spatial_tile_size:
            factor = self.spatial_vae.factor
            _check_tiles(spatial_tile_size * factor, (spatial_tile_overlap or 0) * factor, factor)
        if num_frames is None:
            num_frames = self.longest_video(z.shape[2])
        self._check_latent(z, num_frames)
        z = z * self.scale.to(z) + self.shift.to(z)
        size, step, parts = self.micro_frame_size, self.micro_latent_frames, []
        remaining = num_frames
        for i in self._chunks(z.shape[2], step):
            frames = min(size, remaining) if size else remaining
            parts.append(self.temporal_vae.decode(z[:, :, i : i + (step or z.shape[2])], num_frames=frames))
            remaining -= frames
        x_z = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
        return self.spatial_vae.decode(x_z, spatial_tile_size, spatial_tile_overlap or 0)

    def _check_video(self, x: torch.Tensor) -> None:
        channels, factor = self.config.vae_2d.in_channels, self.spatial_vae.factor
        if not isinstance(x, torch.Tensor) or x.ndim != 5:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"encode expects a video tensor [B, {channels}, T, H, W], got {shape}")
        if x.shape[1] != channels:
            raise ValueError(
                f"encode expects {channels} channels at dim 1 ([B, C, T, H, W]), got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"encode expects a floating-point video in [-1, 1], got dtype {x.dtype}")
        if x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < factor or x.shape[4] < factor:
            raise ValueError(f"encode needs B >= 1, T >= 1 and H, W >= {factor}; got shape {tuple(x.shape)}")

    def _check_latent(self, z: torch.Tensor, num_frames: int) -> None:
        channels = self.config.vae_temporal.embed_dim
        if not isinstance(z, torch.Tensor) or z.ndim != 5 or z.shape[1] != channels:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"decode expects a latent [B, {channels}, T, h, w], got {shape}")
        expected = self.latent_frames(num_frames)
        if expected != z.shape[2]:
            upper = 4 * z.shape[2] + (self.micro_frame_size or 0)  # a latent frame never stands for more than 4
            valid = [n for n in range(1, upper + 1) if self.latent_frames(n) == z.shape[2]]
            allowed = f"{valid[0]}..{valid[-1]}" if valid else "none"
            raise ValueError(
                f"num_frames={num_frames} needs {expected} latent frames but z has {z.shape[2]}; "
                f"for {z.shape[2]} latent frames num_frames must be in {allowed}"
            )
