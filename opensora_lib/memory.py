"""Peak activation memory of the Open-Sora models, for ComfyUI's memory manager: one DiT forward, and one VAE encode
or decode. Pure arithmetic over the configs (measured formulas, see the notes below); nodes pass the results to
comfy.model_management.load_models_gpu and BaseModel.memory_required."""

from __future__ import annotations

from math import ceil

import torch

from .dcae import DCAE
from .vae_v12 import OpenSoraVAEv12
from .vae_v13 import OpenSoraVAEv13

# ---------------------------------------------------------------- activation memory of a DiT forward
#
# Peak activation bytes per token of one DiT forward, in units of (compute dtype size x hidden size H), with
# M = H x mlp_ratio. Measured by tracking every tensor allocation of a forward on the meta device, each storage
# counted once (a reshape's copy included), attention counted as the CUDA flash / memory-efficient kernels
# allocate (the output only, no L x L scores) (benchmarks/bench_comfy_memory.py peak_activation_bytes;
# tests/test_benchmarks_memory.py and test_memory_estimates.py keep these formulas between 1.0x and 1.25x of that
# measurement at the real model sizes):
# - MMDiT (2.0): 13.12 H per token in bf16 at mlp_ratio 4 (11.1 / 17.1 H at mlp_ratio 2 / 8), 11.04 H in float32:
#   5 H + M in the compute dtype plus ~2.1 H in float32 (the float32 temporaries of q / k's RMSNorm, whatever the
#   compute dtype), the same for any image / text token count and batch. The traced peak is at the q / k RMSNorm in a
#   single-stream block (x, the v + MLP projection [L, H + M], q, k and the norm's float32 upcast); RoPE's float32
#   products come next (12.08 H with the norm's temporaries removed, 11.08 H with RoPE's removed too, as CUDA runs
#   both: F.rms_norm is one fused kernel there and the Triton RoPE of opensora_lib/fused_ops.py has no
#   temporaries; measured on the meta device with output-only replacements). Eagerly a single block
#   writes linear2's input over that projection and the MLPs run their GELU in place, so no 4x-wide activation is
#   held twice. 6 H + M + 3 H float32 bounds it: 1.22x in bf16, 1.18x in float32 (1.17x - 1.26x for mlp_ratio 8 - 2),
#   the same ~3 H per token (bf16) of headroom as before, for the caching allocator's rounding and block reuse on a
#   GPU (the workspace margin below adds what a GPU run showed on top). The estimate keeps the bound of the form
#   every device can run. Per batch row, full 11B model:
#     size (latent)                     tokens  dtype  measured GiB  estimate GiB  ratio
#     256px 16:9 129f (33x24x42)          8828  bf16         0.662         0.808  1.221  (0.660 / row at 2-3 rows)
#     256px 16:9 33f (9x24x42)            2780  bf16         0.209         0.255  1.218
#     256px 16:9 129f                     8828  fp32         1.116         1.313  1.177
#     768px 16:9 129f (33x96x168)       133568  bf16        10.023        12.229  1.220
#     768px 16:9 33f (9x96x168)          36800  bf16         2.762         3.369  1.220  (fp32: 4.650 / 5.475)
#     DC-AE 768px 128f (32x24x42, p1)    32768  bf16         2.459         3.000  1.220
#   Flux-layout files (fused qkv / linear1, `fused_qkv`) keep the plain concatenation in single blocks (linear1's
#   [v | mlp] is a strided view there), so they hold linear1's output, the GELU and the concatenation: 6.1 H + 3 M
#   (18.1 H in bf16 and float32 at mlp_ratio 4, 12.1 / 30.1 H at 2 / 8), bounded by 9 H + 3 M (1.16x; 1.10x - 1.24x).
#   So a 3-pass 256px step needs ~2.0 GiB (estimate 2.4) on top of the weights. Core's formula with
#   memory_usage_factor 1.8 scales with the latent only and ignores the 512 text tokens: 1.17 GiB per row at 256px
#   129f (1.77x), 0.319 at 33f (1.53x), 0.035 for one frame (0.61x of 0.057): no single per-latent-element factor
#   fits.
# - STDiT3 (1.x): 13.2 - 15.6 H per token (most for one frame), independent of mlp_ratio: the peak is in the
#   attention (qkv, normalised and rotated q / k, window reordering copies), not in the MLP. 16 H bounds it
#   (1.03x - 1.21x); 8 H + 2 M takes over for MLPs wider than 4 H. 720p 113 frames (126000 tokens) peaks at 3.9 GiB
#   per row in bf16; core's formula with memory_usage_factor 2.0 gave 19.7 GiB (5x too high).
# These formulas drive the pack's Sampler node (load_for_sampling) and, through the BaseModel.memory_required
# overrides in comfy_model.py / comfy_model_v2.py, core's samplers (KSampler, the Open-Sora Guider) too.
MMDIT_BYTES_PER_TOKEN = (6, 1, 3)  # (x H, x M) in compute-dtype elements + x H in float32 (q / k norm temporaries)
MMDIT_FUSED_BYTES_PER_TOKEN = (9, 3, 0)  # the fused (Flux) layout: the same terms, no float32 one
STDIT3_BYTES_PER_TOKEN = (16, 8, 2)  # max(16 H, 8 H + 2 M)
# What a forward takes on the GPU besides its tensors: cuBLAS / cuDNN workspaces and plans (0.24 GiB grew outside
# PyTorch's allocator during a 256px 2.0 run on an H200) and the blocks the caching allocator holds over the tensor
# peak (reserved - allocated: 0.68 GiB there). Without it that 24 GiB run (10 steps, ComfyUI 0.3.75 partial
# loading) needed 24.16 GiB; ComfyUI's own 0.4 GiB reserve did not cover both. Added once per forward estimate.
FORWARD_WORKSPACE_BYTES = 512 * 2**20


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def activation_memory(
    diffusion_model: torch.nn.Module, latent_shape, text_tokens: int = 0, dtype: torch.dtype | None = None
) -> int:
    """Peak activation bytes of one forward of an Open-Sora DiT on a latent batch [B, C, T, H, W] (B = every row
    the forward sees, e.g. latent batch x guidance passes); text_tokens: T5 tokens in the joint sequence (2.0)."""
    config = diffusion_model.config
    batch, _channels, frames, height, width = (int(d) for d in latent_shape)
    element = torch.empty((), dtype=dtype or torch.float32).element_size()
    hidden = config.hidden_size
    mlp = int(hidden * config.mlp_ratio)
    if isinstance(config.patch_size, int):  # MMDiT: image tokens (latent padded to the patch) + text tokens
        patch = config.patch_size
        tokens = frames * _ceil_div(height, patch) * _ceil_div(width, patch) + text_tokens
        terms = MMDIT_FUSED_BYTES_PER_TOKEN if config.fused_qkv else MMDIT_BYTES_PER_TOKEN
        per_hidden, per_mlp, float32_per_hidden = terms
        per_token_bytes = (per_hidden * hidden + per_mlp * mlp) * element + float32_per_hidden * hidden * 4
        return batch * tokens * per_token_bytes
    # STDiT3: (t, h, w) patches; the caption is only cross-attention keys
    pt, ph, pw = config.patch_size
    tokens = _ceil_div(frames, pt) * _ceil_div(height, ph) * _ceil_div(width, pw)
    flat, base, wide = STDIT3_BYTES_PER_TOKEN
    return batch * tokens * max(flat * hidden, base * hidden + wide * mlp) * element


def forward_memory(
    diffusion_model: torch.nn.Module, latent_shape, text_tokens: int = 0, dtype: torch.dtype | None = None
) -> int:
    """VRAM to keep free for one forward (what ComfyUI's memory manager is told): the activation estimate, the
    workspace margin, and the largest expansion of a layer that keeps its weight packed (GGUF blocks,
    scaled fp8 rows: `expanded_bytes`; they expand one at a time)."""
    packed = max((m.expanded_bytes() for m in diffusion_model.modules() if hasattr(m, "expanded_bytes")), default=0)
    return activation_memory(diffusion_model, latent_shape, text_tokens, dtype) + FORWARD_WORKSPACE_BYTES + packed


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


def decoded_elements(model: torch.nn.Module, latent_shape, num_frames: int | None = None) -> int:
    """Elements of the frames OpenSoraVAE.decode returns for a latent [B, C, T', h, w], before the caller cuts
    them to the video's length: what a decode leaves in RAM (as float32) wherever it ran."""
    batch, _channels, frames, height, width = (int(d) for d in latent_shape)
    if isinstance(model, OpenSoraVAEv13):
        scale, count = model.config.spatial_compression, _v13_frames(model, frames)
    elif isinstance(model, OpenSoraVAEv12):
        scale, count = model.spatial_vae.factor, num_frames or model.longest_video(frames)
    elif isinstance(model, DCAE):
        scale, count = model.config.spatial_compression_ratio, _dcae_frames(model, frames)
    else:
        raise TypeError(f"no output size for {type(model).__name__}; expected OpenSoraVAEv12, OpenSoraVAEv13 or DCAE")
    return batch * 3 * count * height * width * scale * scale


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
    output = batch * 3 * _v13_frames(model, frames) * pixels
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


def _v13_frames(model: OpenSoraVAEv13, frames: int) -> int:
    """Frames decoded from `frames` latent frames: each chunk gives 4 c - 3, and chunks share their boundary frame."""
    config = model.config
    chunk = min(frames, config.micro_z_frame_size or frames) if config.micro_batch_size else frames
    chunks = [min(chunk, frames - start) for start in range(0, frames, chunk)]
    shared = len(chunks) - 1 if config.temporal_overlap else 0
    return sum(4 * c - 3 for c in chunks) - shared


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


def _dcae_frames(model: DCAE, frames: int) -> int:
    return 1 if frames == 1 else model.config.time_compression_ratio * frames


def _dcae_decode(model: DCAE, batch: int, frames: int, height: int, width: int, size: int):
    config = model.config
    scale, ratio = config.spatial_compression_ratio, config.time_compression_ratio
    tile_frames, tile_h, tile_w = _dcae_tile(
        model, frames, height, width, model.temporal_tile_latent_size, model.spatial_tile_latent_size
    )
    in_dtype, in_float32 = DCAE_DECODE
    tile_pixels = (1 if tile_frames == 1 else ratio * tile_frames) * tile_h * tile_w * scale * scale
    work = tile_pixels * (in_dtype * size + in_float32 * FLOAT32)  # items decode one at a time
    output = batch * 3 * _dcae_frames(model, frames) * height * width * scale * scale
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
