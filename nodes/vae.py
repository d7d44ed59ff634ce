"""The 1.x VAEs and the 2.0 Video DC-AE under ComfyUI's memory manager (core's VAE class cannot build them).

OPENSORA_VAE.encode returns the latent the DiT works on and decode takes it back. For the DC-AE that space
depends on the scaling chosen on Load Open-Sora VAE: z / 0.493 (the scaling the DC-AE DiT was trained with,
configs/diffusion/train/high_compression.py) or z itself (the official inference config sets none, Q12). The
DC-AE encode / decode always use the official tiles of high_compression.py (256 px, 32 frames, overlap 0.25).

Before each encode / decode, ComfyUI is told the activation memory it needs (encode_memory / decode_memory), as
core's VAE does with memory_used_encode / memory_used_decode, so partial loading leaves that much VRAM free.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from math import ceil

import comfy.model_management
import comfy.model_patcher
import comfy.ops
import torch

from ..opensora_lib.dcae import DCAE, DCAEConfig
from ..opensora_lib.vae_v12 import OpenSoraVAEv12, VAEv12Config
from ..opensora_lib.vae_v13 import OpenSoraVAEv13, VAEv13Config
from .common import wrap_module

BUILDERS = {"vae_v12": ("1.2", VAEv12Config, OpenSoraVAEv12), "vae_v13": ("1.3", VAEv13Config, OpenSoraVAEv13)}
# Load Open-Sora VAE's DC-AE scaling choices -> DCAE scaling_factor (encode divides by it, decode multiplies).
DC_AE_SCALINGS = {"trained 0.493": 0.493, "none (official inference)": None}


@dataclass
class OpenSoraVAE:
    """What flows along an OPENSORA_VAE link."""

    version: str
    model: torch.nn.Module
    patcher: comfy.model_patcher.ModelPatcher
    dtype: torch.dtype
    autoencoder: str | None = None  # "dc_ae" for the 2.0 Video DC-AE, None for the 1.x VAEs

    def _ready(self, memory_required: int) -> tuple[torch.nn.Module, torch.device]:
        """Load through the memory manager, keeping memory_required bytes free for the activations (core's VAE
        passes its estimate the same way; it is also the minimum, as the work cannot be split further here)."""
        comfy.model_management.load_models_gpu([self.patcher], memory_required=memory_required)
        return self.model, self.patcher.load_device

    def encode(self, pixels: torch.Tensor, sample_posterior: bool = True, noise=None) -> torch.Tensor:
        """[B,3,T,H,W] in [-1,1] -> normalised latent (float32, intermediate device). The DC-AE encoder is
        deterministic, so sample_posterior / noise only matter for 1.x."""
        model, device = self._ready(encode_memory(self.model, pixels.shape, self.dtype))
        if self.autoencoder == "dc_ae":
            z = model.encode(pixels.to(device, self.dtype))
        else:
            z = model.encode(pixels.to(device, self.dtype), sample_posterior=sample_posterior, noise=noise)
        return z.float().to(comfy.model_management.intermediate_device())

    def decode(
        self, latent: torch.Tensor, num_frames: int | None, tile_size: int = 0, tile_overlap: int = 0
    ) -> torch.Tensor:
        """Normalised latent -> [B,3,T,H,W] in [-1,1]. tile_size / tile_overlap are pixels (0: untiled, exact)."""
        if self.autoencoder == "dc_ae" and tile_size:
            raise ValueError(
                f"Open-Sora Decode: tile_size {tile_size} is for the 1.x VAEs; the Video DC-AE always decodes with its "
                "official tiles (256 px, 32 frames, overlap 1/4). Set tile_size to 0."
            )
        model, device = self._ready(decode_memory(self.model, latent.shape, self.dtype, tile_size, num_frames))
        z = latent.to(device, self.dtype)
        if self.autoencoder == "dc_ae":
            frames = model.decode(z)  # 4 frames per latent frame (1 for a one-frame latent); callers cut
        elif self.version == "1.2":
            num_frames = num_frames or model.longest_video(z.shape[2])  # a latent without Open-Sora info
            if tile_size:
                model.enable_tiling(tile_size, tile_overlap)
            try:
                frames = model.decode(z, num_frames=num_frames)
            finally:
                model.disable_tiling()
        else:
            tiles = (
                {"spatial_tile_size": tile_size // 8, "spatial_tile_overlap": tile_overlap // 8} if tile_size else {}
            )
            frames = model.decode(z, num_frames, **tiles)
        return frames.float().to(comfy.model_management.intermediate_device())


def read_folder_config(path: str) -> dict:
    config_file = os.path.join(path, "config.json") if os.path.isdir(path) else None
    if config_file and os.path.isfile(config_file):
        with open(config_file) as f:
            return json.load(f)
    return {}


def build_vae(info, sd: dict, dtype: torch.dtype, path: str | None = None) -> OpenSoraVAE:
    version, config_class, model_class = BUILDERS[info.family]
    config = config_class.from_dict({**(info.config or {}), **(read_folder_config(path) if path else {})})
    model = model_class(config, dtype=dtype, device="cpu", operations=comfy.ops.disable_weight_init)
    return _loaded(model, sd, f"the Open-Sora {version} VAE", version, dtype)


def build_dcae(info, sd: dict, dtype: torch.dtype, scaling_factor: float | None) -> OpenSoraVAE:
    """The Video DC-AE from a detected "dc_ae" state dict: config from the shapes (family_configs, with the official
    tiling of high_compression.py), the chosen scaling, weights loaded strictly."""
    config = DCAEConfig.from_dict({**info.config, "scaling_factor": scaling_factor})
    model = DCAE(config, dtype=dtype, device="cpu", operations=comfy.ops.disable_weight_init)
    return _loaded(model, sd, "the Video DC-AE", "2.0", dtype, autoencoder="dc_ae")


def _loaded(model, sd: dict, what: str, version: str, dtype: torch.dtype, **kwargs) -> OpenSoraVAE:
    """Load the weights strictly (worded as the DiT loader) and put the VAE under the memory manager."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"The checkpoint does not match {what}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.to(dtype).eval()
    return OpenSoraVAE(version, model, wrap_module(model, "vae"), dtype, **kwargs)


# ---------------------------------------------------------------- activation memory of encode / decode
#
# Peak bytes one OpenSoraVAE.encode / decode allocates on the device besides the weights: the input copy, the
# largest piece of work the model does at once, what it keeps meanwhile, and the output with its float32 copy.
# Measured with the meta-device allocation tracker (benchmarks/bench_comfy_memory.py peak_activation_bytes,
# each storage counted once; attention as the CUDA kernels allocate) on the released architectures; the work of
# every stage is linear in its pixels, and in its frames plus the causal padding. GiB, bf16, measured -> estimate
# (tests/test_memory_estimates.py keeps every estimate within 1.0x-1.5x of the measurement; fp32 is 2x):
#   1.3 decode  360p 17 f 7.91 -> 7.98; 720p 113 f 32.20 -> 32.47; one 360p frame 1.76 -> 1.78
#               256 px tiles: 720p 113 f 3.54 -> 3.65, 360p 17 f 2.44 -> 2.47; 128 px tiles, 720p 17 f 2.86 -> 2.99
#               (below ~256 px the un-tiled head (2x latent size) is the peak: smaller tiles save nothing)
#   1.3 encode  360p 17 f 4.80 -> 4.85; 720p 113 f 19.72 -> 19.96; one 720p frame 1.54 -> 1.61
#   1.2 decode  360p 17 f 1.35 -> 1.36; 720p 102 f 5.85 -> 5.91; 512 px tiles, 720p 102 f 2.13 -> 2.21;
#               256 px tiles, 720p 17 f 0.71 -> 0.72 (the temporal VAE on whole latent frames is then the peak)
#   1.2 encode  360p 17 f 1.12 -> 1.13; 720p 102 f 4.93 -> 4.98
#   DC-AE decode one 256 px x 32 f tile 3.75 -> 3.77 (larger videos add the tiles kept: 768 px 16:9 128 f
#               4.71 -> 5.26); 768 px 16:9 image 0.124 -> 0.130
#   DC-AE encode 256 px 32 f 4.01 -> 4.07; 256 px 128 f 4.05 -> 4.11; 768 px 16:9 image 0.131 -> 0.133
# Elements per output pixel per frame of the work (x the element size), and the frames the causal padding adds:
V13_DECODE = (900, 0.6)  # per decoded chunk: 4 x latent frames + 0.6 (17 frames -> 20.6)
V13_DECODE_HEAD = (81, 0.8)  # tiled: the stages up to 2x latent size, on the whole chunk
V13_DECODE_TILE_CARRY = 21  # tiled: the head's output and the float32 blend buffers of the chunk, per pixel
V13_ENCODE = (645, 0.45)  # per 17-frame chunk: frames + 0.45
V12_SPATIAL_DECODE = 775  # the 2-D VAE, per frame of its micro batch
V12_SPATIAL_ENCODE = 645
V12_TEMPORAL = (1300, 0.45)  # per latent pixel: 4 x latent frames + 0.45 (decode), frames padded to 4k (encode)
DCAE_DECODE = (706, 127)  # per tile pixel-frame: 706 elements in the dtype + 127 float32 (the RMSNorms)
DCAE_ENCODE = (785, 127)
FLOAT32 = 4


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _output_bytes(elements: int, size: int) -> int:
    """The output and its float32 copy (the caller's .float()), or for float32 the pieces and their concatenation."""
    return elements * (2 * size if size == FLOAT32 else size + FLOAT32)


def decode_memory(
    model: torch.nn.Module, latent_shape, dtype: torch.dtype, tile_size: int = 0, num_frames: int | None = None
) -> int:
    """Peak activation bytes of OpenSoraVAE.decode for a latent [B, C, T', h, w] (tile_size in pixels, 0 = untiled;
    1.x only: the DC-AE tiles as its config says)."""
    batch, channels, frames, height, width = (int(d) for d in latent_shape)
    size = _element_size(dtype)
    latent = batch * channels * frames * height * width * (2 * size + FLOAT32)  # device copy, float32 statistics
    if isinstance(model, OpenSoraVAEv13):
        return latent + _v13_decode(model, batch, frames, height, width, size, tile_size)
    if isinstance(model, OpenSoraVAEv12):
        return latent + _v12_decode(model, batch, frames, height, width, size, tile_size, num_frames)
    if isinstance(model, DCAE):
        return latent + _dcae_decode(model, batch, frames, height, width, size)
    raise TypeError(f"no memory estimate for {type(model).__name__}; expected OpenSoraVAEv12, OpenSoraVAEv13 or DCAE")


def encode_memory(model: torch.nn.Module, pixel_shape, dtype: torch.dtype) -> int:
    """Peak activation bytes of OpenSoraVAE.encode for pixels [B, 3, T, H, W] (the 1.x encoders never tile)."""
    batch, channels, frames, height, width = (int(d) for d in pixel_shape)
    size = _element_size(dtype)
    pixels = batch * channels * frames * height * width * size  # the device copy
    if isinstance(model, OpenSoraVAEv13):
        return pixels + _v13_encode(model, batch, frames, height, width, size)
    if isinstance(model, OpenSoraVAEv12):
        copy = pixels if batch > 1 else 0  # [B, 3, T] -> [B*T, 3] frames is a copy unless B == 1
        return pixels + copy + _v12_encode(model, batch, frames, height, width, size)
    if isinstance(model, DCAE):
        return pixels + _dcae_encode(model, batch, frames, height, width, size)
    raise TypeError(f"no memory estimate for {type(model).__name__}; expected OpenSoraVAEv12, OpenSoraVAEv13 or DCAE")


def _v13_decode(model: OpenSoraVAEv13, batch: int, frames: int, height: int, width: int, size: int, tile_size: int):
    config = model.config
    scale = config.spatial_compression
    pixels = height * width * scale * scale
    items, chunk = batch, frames  # micro_batch_size None: the whole clip at once (official)
    if config.micro_batch_size:
        items, chunk = min(batch, config.micro_batch_size), min(frames, config.micro_z_frame_size or frames)
    chunks = [min(chunk, frames - start) for start in range(0, frames, chunk)]
    shared = len(chunks) - 1 if config.temporal_overlap else 0  # chunks share their boundary frame
    output = batch * 3 * (sum(4 * c - 3 for c in chunks) - shared) * pixels
    per_pixel, padding = V13_DECODE
    tile = tile_size // scale if tile_size else 0
    if tile and (height > tile or width > tile):
        tile_pixels = min(tile, height) * min(tile, width) * scale * scale
        head_per_pixel, head_padding = V13_DECODE_HEAD
        head = items * pixels * head_per_pixel * (4 * chunk + head_padding)
        tail = items * (tile_pixels * per_pixel + pixels * V13_DECODE_TILE_CARRY) * (4 * chunk + padding)
        work = size * max(head, tail)
    else:
        work = size * items * pixels * per_pixel * (4 * chunk + padding)
    return int(max(work + output * size, _output_bytes(output, size)))  # the finished chunks stay meanwhile


def _v13_encode(model: OpenSoraVAEv13, batch: int, frames: int, height: int, width: int, size: int):
    config = model.config
    items, chunk = batch, frames
    if config.micro_batch_size:
        items, chunk = min(batch, config.micro_batch_size), min(frames, config.micro_frame_size or frames)
    per_pixel, padding = V13_ENCODE
    work = size * items * height * width * per_pixel * (chunk + padding)
    latent_frames = 5 * ceil((frames - 1) / 16) if frames > 1 else 1  # at most; the posterior moments twice
    moments = 2 * batch * 2 * model.z_channels * latent_frames * (height // 8) * (width // 8) * size
    return int(work + moments)


def _v12_decode(
    model: OpenSoraVAEv12, batch: int, frames: int, height: int, width: int, size: int, tile_size: int, num_frames
):
    spatial = model.spatial_vae
    scale = spatial.factor
    pixels = height * width * scale * scale
    step = model.micro_latent_frames or frames
    num_frames = num_frames or model.longest_video(frames)  # as decode does for a latent without its frame count
    per_pixel, padding = V12_TEMPORAL
    temporal = size * batch * height * width * per_pixel * (4 * min(frames, step) + padding)
    count = batch * num_frames
    micro = min(count, spatial.micro_batch_size or count)
    tile = tile_size // scale if tile_size else 0
    if tile and (height > tile or width > tile):
        tile_pixels = min(tile, height) * min(tile, width) * scale * scale
        blend = FLOAT32 * ((2 * micro * 3 + 1) * pixels + 2 * micro * 3 * tile_pixels)  # float32 sums and weights
        work = size * micro * tile_pixels * V12_SPATIAL_DECODE + blend
    else:
        work = size * micro * pixels * V12_SPATIAL_DECODE
    previous = size * micro * 3 * pixels  # the last micro batch's frames, alive while the next one decodes
    latents_2d = 2 * size * batch * 4 * 4 * frames * height * width  # temporal VAE output: chunks + concatenation
    output = count * 3 * pixels
    return int(latents_2d + max(temporal, work + previous + output * size, _output_bytes(output, size)))


def _v12_encode(model: OpenSoraVAEv12, batch: int, frames: int, height: int, width: int, size: int):
    spatial = model.spatial_vae
    latent_pixels = (height // spatial.factor) * (width // spatial.factor)
    count = batch * frames
    work = size * min(count, spatial.micro_batch_size or count) * height * width * V12_SPATIAL_ENCODE
    chunk = min(frames, model.micro_frame_size or frames)
    per_pixel, padding = V12_TEMPORAL
    temporal = size * batch * latent_pixels * per_pixel * (4 * ceil(chunk / 4) + padding)
    latents_2d = size * count * 8 * latent_pixels  # the 2-D latents and the temporal moments
    return int(latents_2d + max(work, temporal))


def _dcae_tile(model: DCAE, frames: int, height: int, width: int, temporal_tile: int, spatial_tile: int):
    """(frames, height, width) of the largest piece the DC-AE encodes / decodes at once, in the given units."""
    if model.use_temporal_tiling and frames > temporal_tile:
        frames = temporal_tile
    if model.use_spatial_tiling and (height > spatial_tile or width > spatial_tile):
        height, width = min(height, spatial_tile), min(width, spatial_tile)
    return frames, height, width


def _dcae_decode(model: DCAE, batch: int, frames: int, height: int, width: int, size: int):
    config = model.config
    scale, ratio = config.spatial_compression_ratio, config.time_compression_ratio
    tile_frames, tile_h, tile_w = _dcae_tile(
        model, frames, height, width, model.temporal_tile_latent_size, model.spatial_tile_latent_size
    )
    in_dtype, in_float32 = DCAE_DECODE
    tile_pixels = (1 if tile_frames == 1 else ratio * tile_frames) * tile_h * tile_w * scale * scale
    work = tile_pixels * (in_dtype * size + in_float32 * FLOAT32)  # items decode one at a time
    output = batch * 3 * (1 if frames == 1 else ratio * frames) * height * width * scale * scale
    kept = 2 * output * size  # the decoded tiles, overlaps included, until they are blended and concatenated
    return int(max(work + kept, _output_bytes(output, size)))


def _dcae_encode(model: DCAE, batch: int, frames: int, height: int, width: int, size: int):
    config = model.config
    tile = _dcae_tile(model, frames, height, width, config.temporal_tile_size, config.spatial_tile_size)
    in_dtype, in_float32 = DCAE_ENCODE
    work = tile[0] * tile[1] * tile[2] * (in_dtype * size + in_float32 * FLOAT32)
    scale, ratio = config.spatial_compression_ratio, config.time_compression_ratio
    latent = batch * config.latent_channels * ceil(frames / ratio) * (height // scale) * (width // scale) * size
    return int(work + 2 * latent)
