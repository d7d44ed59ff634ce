"""Open-Sora 1.3 video VAE (`OpenSoraVAE_V1_3_Pipline`): x8 spatial, x4 temporal, 16 latent channels.

Inference as in the official pipeline (tag v1.3, `opensora/models/vae_v1_3/vae.py`): 17-frame chunks that share
one frame are encoded to 5 latents each; on decode every 5-latent chunk gives 17 frames and the shared boundary
frame is the mean of both chunks. Latents are normalised with the hard-coded "video" statistics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from .configs import check_field_types
from .vae_v13_layers import VideoDecoder, VideoEncoder

# "video" per-channel latent statistics (official constants.py VAE_STAT_DICT["video"]); not in the checkpoint.
VIDEO_LATENT_MEAN = (
    -0.19016949832439423,
    -0.04480062797665596,
    0.020789705216884613,
    0.01865335740149021,
    -0.011585569009184837,
    0.0010865575168281794,
    0.08378933370113373,
    0.08902134001255035,
    0.00940945465117693,
    0.08086848258972168,
    -0.07251627743244171,
    0.05052144080400467,
    -0.0209724809974432,
    -0.1223079189658165,
    -0.003862356534227729,
    -0.023072388023138046,
)
VIDEO_LATENT_STD = (
    0.9490776062011719,
    0.9594117999076843,
    0.9444302916526794,
    0.9103284478187561,
    0.959351658821106,
    0.8430351614952087,
    0.8888124823570251,
    0.9291136860847473,
    0.972594141960144,
    0.8917953968048096,
    0.8630853891372681,
    0.8279891610145569,
    0.9114300012588501,
    0.7922844886779785,
    0.8991407155990601,
    0.9473513960838318,
)
NORMALIZATIONS = (None, "video")

NoiseFn = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


@dataclass
class VideoEncoderConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 16
    double_z: bool = True
    down_sampling_layer: tuple[int, ...] = (1, 2)  # levels with a causal 3-D downsample; others are 2-D
    micro_batch_size_2d: int | None = None  # frames per 2-D conv call (memory only)
    dropout: float = 0.0
    resamp_with_conv: bool = True
    type: str = "VideoEncoder"


@dataclass
class VideoDecoderConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # the decoder has num_res_blocks + 1 blocks per level
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 16
    temporal_up_layers: tuple[int, ...] = (2, 3)  # levels with Upsample3D; others use Upsample2D
    temporal_downsample: int = 4
    micro_batch_size_2d: int | None = None
    dropout: float = 0.0
    resamp_with_conv: bool = True
    type: str = "VideoDecoder"


@dataclass
class VAEv13Config:
    """Official field names. Defaults: the released architecture with the released inference settings
    (configs/opensora-v1-3/inference/t2v.py), including normalization="video" (Q26)."""

    encoder: VideoEncoderConfig = field(default_factory=VideoEncoderConfig)
    decoder: VideoDecoderConfig = field(default_factory=VideoDecoderConfig)
    micro_batch_size: int | None = 1  # None: whole clip in one call, no frame chunking (official training path)
    micro_batch_size_2d: int | None = 4
    micro_frame_size: int | None = 17
    temporal_overlap: bool = True
    normalization: str | None = "video"
    # Official TiledConv3d is an exact re-tiling of conv3d; accepted for config parity, plain conv3d runs here.
    use_tiled_conv3d: bool = True
    tile_size: int = 4
    tiled_dim: int | None = None
    num_tiles: int | None = None
    # Not official: spatial tiling of decode (latent pixels; None = off), overlap defaults to tile // 4.
    spatial_tile_size: int | None = None
    spatial_tile_overlap: int | None = None

    @classmethod
    def from_dict(cls, values: dict) -> VAEv13Config:
        """Build from a case.json model_config or the released config.json (unknown keys such as
        architectures / model_type / torch_dtype are ignored). Missing normalization means "video" (Q26)."""
        check_field_types(cls, values, "VAE 1.3")
        top = {f.name for f in dataclasses.fields(cls)} - {"encoder", "decoder"}
        kwargs = {k: _tuples(v) for k, v in values.items() if k in top}
        kwargs["encoder"] = _sub_config(VideoEncoderConfig, values.get("encoder", {}), "VideoEncoder")
        kwargs["decoder"] = _sub_config(VideoDecoderConfig, values.get("decoder", {}), "VideoDecoder")
        config = cls(**kwargs)
        config.validate()
        return config

    @property
    def micro_z_frame_size(self) -> int | None:
        # Official: int((micro_frame_size - 1) / 4 + 1), with the factor 4 hard-coded.
        return int((self.micro_frame_size - 1) / 4 + 1) if self.micro_frame_size else None

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.decoder.ch_mult) - 1)

    def validate(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization {self.normalization!r} is not supported; allowed: {NORMALIZATIONS}")
        if not self.encoder.double_z:
            raise ValueError("encoder.double_z must be true: the 1.3 VAE posterior needs mean and logvar channels")
        if self.encoder.z_channels != self.decoder.z_channels:
            raise ValueError(
                f"encoder.z_channels ({self.encoder.z_channels}) != decoder.z_channels ({self.decoder.z_channels})"
            )
        if self.normalization == "video" and self.encoder.z_channels != len(VIDEO_LATENT_MEAN):
            raise ValueError(
                f'normalization "video" needs z_channels {len(VIDEO_LATENT_MEAN)}, got {self.encoder.z_channels}'
            )
        if self.micro_frame_size is not None and self.micro_frame_size < 2:
            raise ValueError(f"micro_frame_size must be None or >= 2, got {self.micro_frame_size}")
        for name in ("micro_batch_size", "micro_batch_size_2d"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be None or >= 1, got {value}")
        if self.spatial_tile_size is not None:
            _check_tiling(self.spatial_tile_size, self.spatial_tile_overlap)


def _tuples(value):
    return tuple(value) if isinstance(value, list) else value


def _sub_config(cls, values: dict, expected_type: str):
    if values.get("type", expected_type) != expected_type:
        raise ValueError(f"{expected_type} config has type {values['type']!r}; only {expected_type!r} is supported")
    check_field_types(cls, values, f"VAE 1.3 {expected_type}")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: _tuples(v) for k, v in values.items() if k in names})


def _check_tiling(tile: int, overlap: int | None) -> None:
    if tile < 1:
        raise ValueError(f"spatial tile size must be >= 1 latent pixel, got {tile}")
    if overlap is not None and not 0 <= overlap < tile:
        raise ValueError(f"spatial tile overlap must be in [0, {tile - 1}] for tile size {tile}, got {overlap}")


def reference_noise(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Official posterior.sample(): float32 randn from the CPU generator, then moved and cast.
    return torch.randn(shape).to(device=device, dtype=dtype)


class OpenSoraVAEv13(nn.Module):
    def __init__(self, config: VAEv13Config | None = None, dtype=None, device=None, operations=None):
        super().__init__()
        self.config = config = config or VAEv13Config()
        config.validate()
        # The 2-D micro batch of the layers: the sub-config's own value, else the pipeline's (memory only).
        encoder_config = dataclasses.replace(
            config.encoder, micro_batch_size_2d=config.encoder.micro_batch_size_2d or config.micro_batch_size_2d
        )
        decoder_config = dataclasses.replace(
            config.decoder, micro_batch_size_2d=config.decoder.micro_batch_size_2d or config.micro_batch_size_2d
        )
        self.encoder = VideoEncoder(encoder_config, dtype=dtype, device=device, operations=operations)
        self.decoder = VideoDecoder(decoder_config, dtype=dtype, device=device, operations=operations)

    @property
    def z_channels(self) -> int:
        return self.config.encoder.z_channels

    def latent_frames(self, num_frames: int) -> int:
        """Latent length for `num_frames` pixel frames, as the official get_latent_size (used to size the noise).

        With the released settings: 1 -> 1 (image), 16k+1 -> 5k; 2..16 frames give 0 as in the reference.
        """
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
        config = self.config
        if num_frames == 1:
            return 1
        if config.micro_frame_size is None:
            return (num_frames - 1) // 4 + 1
        if not config.temporal_overlap:
            return num_frames // config.micro_frame_size * config.micro_z_frame_size
        return (num_frames - 1) // (config.micro_frame_size - 1) * config.micro_z_frame_size

    def reference_frames(self, num_frames: int) -> int:
        """How many frames of a reference video are encoded: the official collect_references_batch trims a
        reference to a length the VAE takes whole (released settings: 16k + 1)."""
        config = self.config
        if config.micro_frame_size is None:
            return (num_frames - 1) // 4 * 4 + 1
        if not config.temporal_overlap:
            return max(num_frames // config.micro_frame_size * config.micro_frame_size, 1)
        return (num_frames - 1) // (config.micro_frame_size - 1) * (config.micro_frame_size - 1) + 1

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T', H', W') of the latent; H' = ceil(H / 8) (official get_latent_size)."""
        scale = self.config.spatial_compression
        return self.latent_frames(num_frames), (height - 1) // scale + 1, (width - 1) // scale + 1

    # -- normalisation ------------------------------------------------------------------------------------

    def _statistics(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(VIDEO_LATENT_MEAN, dtype=torch.float32, device=z.device)[None, :, None, None, None]
        std = torch.tensor(VIDEO_LATENT_STD, dtype=torch.float32, device=z.device)[None, :, None, None, None]
        return mean, std

    def normalize_latent(self, z: torch.Tensor) -> torch.Tensor:
        if self.config.normalization is None:
            return z
        mean, std = self._statistics(z)
        return ((z.float() - mean) / std).to(z.dtype)  # float32 statistics, as the official type promotion

    def unnormalize_latent(self, z: torch.Tensor) -> torch.Tensor:
        if self.config.normalization is None:
            return z
        mean, std = self._statistics(z)
        return (z.float() * std + mean).to(z.dtype)

    # -- encode ---------------------------------------------------------------------------------------------

    def _encode_chunks(self, x: torch.Tensor) -> torch.Tensor:
        frame_size, frames = self.config.micro_frame_size, x.shape[2]
        if frame_size is None or frames == 1:
            return self.encoder(x)
        if self.config.temporal_overlap:
            starts = range(0, frames - 1, frame_size - 1)  # chunks share their boundary frame
        else:
            starts = range(0, frames, frame_size)
        return torch.cat([self.encoder(x[:, :, s : s + frame_size]) for s in starts], dim=2)

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Raw encoder output of all chunks, concatenated in time: [B, 2*z (mean, logvar), T', H', W']."""
        self._check_video(x)
        batch_size = self.config.micro_batch_size
        if batch_size is None:
            return self.encoder(x)  # official: no micro batch means no frame chunking either
        return torch.cat([self._encode_chunks(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])

    def encode(self, x: torch.Tensor, sample_posterior: bool = True, noise: NoiseFn | None = None) -> torch.Tensor:
        """Pixels [B, 3, T, H, W] in [-1, 1] -> normalised latent [B, 16, T', ceil(H/8), ceil(W/8)].

        `noise(shape, dtype, device)` gives the standard-normal posterior draw (one call for the whole latent,
        as the reference); None draws float32 CPU randn like the reference. Runs in x's dtype.
        """
        moments = self.encode_moments(x)
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if sample_posterior:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            draw = (noise or reference_noise)(tuple(mean.shape), mean.dtype, mean.device)
            if tuple(draw.shape) != tuple(mean.shape):
                raise ValueError(f"noise returned shape {tuple(draw.shape)}, expected {tuple(mean.shape)}")
            z = mean + std * draw.to(device=mean.device, dtype=mean.dtype)
        return self.normalize_latent(z)

    # -- decode ---------------------------------------------------------------------------------------------

    def _decode_chunks(self, z: torch.Tensor, decoder: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        chunk = self.config.micro_z_frame_size
        if chunk is None:
            return decoder(z)
        pieces: list[torch.Tensor] = []
        for start in range(0, z.shape[2], chunk):
            frames = decoder(z[:, :, start : start + chunk])
            if self.config.temporal_overlap and start > 0:
                # The chunks share a boundary frame: average both versions and keep it once.
                pieces[-1][:, :, -1:] = 0.5 * (pieces[-1][:, :, -1:] + frames[:, :, :1])
                frames = frames[:, :, 1:]
            pieces.append(frames)
        return torch.cat(pieces, dim=2)

    def decode(
        self,
        z: torch.Tensor,
        num_frames: int | None = None,
        *,
        spatial_tile_size: int | None = None,
        spatial_tile_overlap: int | None = None,
    ) -> torch.Tensor:
        """Normalised latent [B, 16, T', h, w] -> pixels [B, 3, T, 8h, 8w] (Q5: never cropped back to H, W).

        T = 16 * T'/5 + 1 for T' a multiple of 5. `num_frames` keeps only the first num_frames frames when it
        is smaller (the official decode ignores it). Spatial tiling (tile and overlap in latent pixels) is off
        unless a tile size is given here or in the config; it is approximate, see VideoDecoder.forward_tiled.
        """
        self._check_latent(z)
        if num_frames is not None and (not isinstance(num_frames, int) or num_frames < 1):
            raise ValueError(f"num_frames must be None or an int >= 1, got {num_frames!r}")
        tile = spatial_tile_size if spatial_tile_size is not None else self.config.spatial_tile_size
        overlap = spatial_tile_overlap if spatial_tile_overlap is not None else self.config.spatial_tile_overlap
        z = self.unnormalize_latent(z)
        decoder: Callable[[torch.Tensor], torch.Tensor] = self.decoder
        if tile is not None and (z.shape[3] > tile or z.shape[4] > tile):
            _check_tiling(tile, overlap)
            overlap = tile // 4 if overlap is None else overlap
            decoder = partial(self.decoder.forward_tiled, tile=tile, overlap=overlap)
        batch_size = self.config.micro_batch_size
        if batch_size is None:
            x = decoder(z)  # official: no micro batch means no frame chunking either
        else:
            batches = [z[i : i + batch_size] for i in range(0, z.shape[0], batch_size)]
            x = torch.cat([self._decode_chunks(part, decoder) for part in batches])
        if num_frames is not None and num_frames < x.shape[2]:
            x = x[:, :, :num_frames]
        return x

    # -- input checks ---------------------------------------------------------------------------------------

    def _check_video(self, x: torch.Tensor) -> None:
        channels = self.config.encoder.in_channels
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or not x.is_floating_point():
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"encode expects a float video tensor [B, {channels}, T, H, W], got {got}")
        if x.shape[1] != channels:
            raise ValueError(
                f"encode expects {channels} channels (RGB in [-1, 1]) at dim 1, got shape {tuple(x.shape)}"
            )
        if x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < 2 or x.shape[4] < 2:
            raise ValueError(f"encode needs B >= 1, T >= 1 and H, W >= 2, got shape {tuple(x.shape)}")

    def _check_latent(self, z: torch.Tensor) -> None:
        channels = self.z_channels
        if not isinstance(z, torch.Tensor) or z.dim() != 5 or not z.is_floating_point():
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"decode expects a float latent [B, {channels}, T, H, W], got {got}")
        if z.shape[1] != channels:
            raise ValueError(f"decode expects {channels} latent channels at dim 1, got shape {tuple(z.shape)}")
        if min(z.shape[0], z.shape[2], z.shape[3], z.shape[4]) < 1:
            raise ValueError(f"decode needs a non-empty latent, got shape {tuple(z.shape)}")
