"""Open-Sora 1.3 VAE decode benchmark: seconds, peak memory and TFLOP/s of decoding a video latent.

Default (GPU): the full-size 1.3 VAE with random weights in bf16 decoding 113 frames at 720p (latent
[1, 16, 35, 90, 160]) with the released settings (17-frame chunks, micro batch 1), untiled unless
--spatial-tile is given. FLOPs (convolutions and the mid attention) are counted by tracing the same decode on
the meta device. --tiny --device cpu: a tiny config.

    python benchmarks/bench_vae.py --out vae.json
    python benchmarks/bench_vae.py --tiny --device cpu --out /tmp/vae.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: opensora_lib and benchmarks

import torch

from benchmarks.common import (
    DTYPES,
    VideoSize,
    add_common_arguments,
    counted_flops,
    environment,
    measure,
    parameter_count,
    parse_videos,
    peak_tflops,
    report,
    setup,
    throughput,
)
from opensora_lib.sizes import latent_shape
from opensora_lib.vae_v13 import OpenSoraVAEv13, VAEv13Config, VideoDecoderConfig, VideoEncoderConfig

VERSION = "1.3"
ASPECT_RATIO = "9:16"  # 1.x aspect strings are H:W, so 720p 9:16 is 720x1280
DEFAULTS = {"full": ["720p:113"], "tiny": ["32x32:33"]}


def model_config(tiny: bool) -> VAEv13Config:
    if not tiny:
        return VAEv13Config()
    # Like the vae_v13_roundtrip fixture: same structure, small widths.
    small = {"ch": 32, "ch_mult": (1, 2, 1, 1), "num_res_blocks": 1}
    return VAEv13Config(encoder=VideoEncoderConfig(**small), decoder=VideoDecoderConfig(**small))


def decode_flops(config: VAEv13Config, latent: tuple[int, ...], tile: int | None, overlap: int | None) -> int:
    """Conv + attention FLOPs of the decode, traced on the meta device (no memory, no compute)."""
    vae = OpenSoraVAEv13(config, device="meta")
    z = torch.empty(latent, device="meta")
    return counted_flops(lambda: vae.decode(z, spatial_tile_size=tile, spatial_tile_overlap=overlap))


def bench_decode(vae, config, size: VideoSize, args, device, dtype, peak) -> dict:
    latent = (size.batch, vae.z_channels, *latent_shape(VERSION, size.num_frames, size.height, size.width))
    z = torch.randn(latent, device=device, dtype=dtype)
    tile, overlap = args.spatial_tile, args.spatial_overlap

    def decode(latent_frames: slice = slice(None)) -> torch.Tensor:
        return vae.decode(z[:, :, latent_frames], spatial_tile_size=tile, spatial_tile_overlap=overlap)

    # Untimed warm-up on one temporal chunk (cuDNN algorithm choice); then whole decodes are timed.
    chunk = config.micro_z_frame_size or latent[2]
    for _ in range(args.warmup):
        decode(slice(0, chunk))
    timing, out = measure(decode, device, args.repeats, warmup=0, max_seconds=args.max_seconds)
    flops = decode_flops(config, latent, tile, overlap)
    tiling = f" tile {tile}/{overlap if overlap is not None else tile // 4}" if tile else ""
    return {
        "name": f"decode {size.name}{tiling}",
        "kind": "decode",
        **dataclasses.asdict(size),
        "latent_shape": list(latent),
        "output_shape": list(out.shape),
        "spatial_tile_size": tile,
        "spatial_tile_overlap": overlap,
        **dataclasses.asdict(timing),
        **throughput(flops, timing.seconds, peak),
        "finite": bool(torch.isfinite(out).all()),
        "official_quoted": None,  # the issues quote no figure for the decode alone
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.set_defaults(repeats=1)  # one 720p decode is long enough to time on its own
    parser.add_argument("--decode", nargs="*", default=None, help="RES:FRAMES[:BATCH], e.g. 720p:113 or 64x64:33")
    parser.add_argument("--spatial-tile", type=int, default=None, help="tiled decode: tile size in latent pixels")
    parser.add_argument("--spatial-overlap", type=int, default=None, help="tile overlap (default tile // 4)")
    args = parser.parse_args(argv)
    device = setup(args)
    dtype = DTYPES[args.dtype]
    mode = "tiny" if args.tiny else "full"
    sizes = parse_videos(args.decode, DEFAULTS[mode], VERSION, ASPECT_RATIO)
    peak = peak_tflops(device, dtype, args.peak_tflops)

    config = model_config(args.tiny)
    torch.manual_seed(args.seed)
    vae = OpenSoraVAEv13(config, dtype=dtype, device=device).eval()
    results = [bench_decode(vae, config, size, args, device, dtype, peak) for size in sizes]

    payload = {
        "benchmark": "vae v1.3 decode",
        "environment": environment(device, dtype, peak, args.tiny),
        "model": {"config": dataclasses.asdict(config), "parameters": parameter_count(vae)},
        "results": results,
        "notes": [
            "random weights; FLOPs: convolutions + attention matmuls traced with FlopCounterMode on the meta device",
            "the causal mid attention is counted as computed: query blocks over the keys up to the block end",
        ],
    }
    report(payload, args.out)
    return payload


if __name__ == "__main__":
    main()
