"""Latent nodes: empty video latents, reference (image/video) conditioning, decoding to frames."""

from __future__ import annotations

import torch

from ..opensora_lib import reference_image, sizes
from .common import CATEGORY

VERSIONS = ["1.3", "1.2", "2.0"]
LATENT_CHANNELS = {"1.2": 4, "1.3": 16, "2.0": 16}
COND_TYPES = ["i2v_head", "i2v_tail", "i2v_loop", "v2v_head", "frame_index"]


def _union(getter) -> list[str]:
    seen: list[str] = []
    for version in VERSIONS:
        for item in getter(version):
            if item not in seen:
                seen.append(item)
    return seen


def resolve_size(version: str, resolution: str, aspect_ratio: str, width: int, height: int) -> tuple[int, int]:
    if width and height:
        sizes.validate_size(version, height, width)
        return height, width
    if width or height:
        raise ValueError("Set both width and height for an exact size, or leave both at 0 to use the preset.")
    return sizes.image_size(version, resolution, aspect_ratio)


def video_info(latent: dict) -> dict:
    info = latent.get("opensora")
    if info is None:
        raise ValueError("This LATENT has no Open-Sora size information: make it with Open-Sora Empty Latent Video.")
    return info


class OpenSoraEmptyLatentVideo:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "version": (
                    VERSIONS,
                    {
                        "default": "1.3",
                        "tooltip": "The Open-Sora generation the latent is for (sets channels, frame rules and aspect convention).",
                    },
                ),
                "resolution": (
                    _union(sizes.resolutions),
                    {
                        "default": "360p",
                        "tooltip": "Resolution preset of the chosen version (1.x: 360p, 720p, ...; 2.0: 256px, 768px).",
                    },
                ),
                "aspect_ratio": (
                    _union(sizes.aspect_ratios),
                    {
                        "default": "9:16",
                        "tooltip": "Aspect ratio string in the version's own convention: H:W for 1.x ('9:16' is landscape 360x640), W:H for 2.0 ('16:9' is landscape).",
                    },
                ),
                "num_frames": (
                    "INT",
                    {
                        "default": 49,
                        "min": 1,
                        "max": 1024,
                        "tooltip": "Pixel frames. 1.3: 16k+1 (17..113 trained); 2.0: 4k+1 up to 129; 1.2: 1 or 17 and more.",
                    },
                ),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip": "Videos generated at once."}),
            },
            "optional": {
                "width": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 4096,
                        "step": 8,
                        "tooltip": "Exact width in pixels (with height); 0 uses the preset.",
                    },
                ),
                "height": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 4096,
                        "step": 8,
                        "tooltip": "Exact height in pixels (with width); 0 uses the preset.",
                    },
                ),
                "fps": (
                    "INT",
                    {
                        "default": 24,
                        "min": 1,
                        "max": 120,
                        "tooltip": "Frame rate the model is conditioned on and the video is meant to play at (official: 24).",
                    },
                ),
            },
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    CATEGORY = f"{CATEGORY}/latent"
    DESCRIPTION = "An empty video latent with Open-Sora's size, frame-count and aspect rules."

    @classmethod
    def VALIDATE_INPUTS(cls, version, resolution, aspect_ratio, num_frames, batch_size=1, width=0, height=0, fps=24):
        try:
            resolve_size(version, resolution, aspect_ratio, width, height)
            sizes.validate_num_frames(version, num_frames)
        except ValueError as e:
            return str(e)
        return True

    def generate(self, version, resolution, aspect_ratio, num_frames, batch_size=1, width=0, height=0, fps=24):
        height, width = resolve_size(version, resolution, aspect_ratio, width, height)
        sizes.validate_num_frames(version, num_frames)
        frames, latent_h, latent_w = sizes.latent_shape(version, num_frames, height, width)
        samples = torch.zeros(batch_size, LATENT_CHANNELS[version], frames, latent_h, latent_w)
        info = {"version": version, "height": height, "width": width, "num_frames": num_frames, "fps": fps}
        return ({"samples": samples, "opensora": info},)


def mask_index_for(cond_type: str, latent_frames: int, reference_frames: int, frame_index: int) -> list[int]:
    """Latent frames that the reference conditions (official cond types, plus any single frame)."""
    if cond_type == "i2v_head":
        return [0]
    if cond_type == "i2v_tail":
        return [latent_frames - 1]
    if cond_type == "i2v_loop":
        return [0, latent_frames - 1]
    if cond_type == "v2v_head":
        return list(range(min(5, reference_frames, latent_frames)))
    if not 0 <= frame_index < latent_frames:
        raise ValueError(
            f"frame_index {frame_index} is outside the latent's {latent_frames} frames (0..{latent_frames - 1})"
        )
    return [frame_index]


class OpenSoraEncodeReference:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": (
                    "IMAGE",
                    {
                        "tooltip": "A reference image, or several frames (a video) for v2v_head. Resized to fill and center-cropped to the latent's size, as the official code does."
                    },
                ),
                "latent": ("LATENT", {"tooltip": "The latent to condition, from Open-Sora Empty Latent Video."}),
                "cond_type": (
                    COND_TYPES,
                    {
                        "default": "i2v_head",
                        "tooltip": "Where the reference goes: first frame, last frame, both (loop), the first latent frames of a video (v2v_head), or one latent frame (frame_index).",
                    },
                ),
            },
            "optional": {
                "vae": ("OPENSORA_VAE", {"tooltip": "1.x: the Open-Sora VAE that matches the DiT."}),
                "core_vae": (
                    "VAE",
                    {"tooltip": "2.0: the HunyuanVideo VAE from core Load VAE (hunyuan_vae.safetensors)."},
                ),
                "frame_index": (
                    "INT",
                    {"default": 0, "min": 0, "max": 1024, "tooltip": "Latent frame for cond_type frame_index."},
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 0xFFFFFFFFFFFFFFFF,
                        "tooltip": "Seed of the VAE posterior sample (the official code samples the posterior).",
                    },
                ),
            },
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = f"{CATEGORY}/latent"
    DESCRIPTION = "VAE-encode a reference image or video and attach it to the latent for image/video-to-video."

    def encode(self, image, latent, cond_type, vae=None, core_vae=None, frame_index=0, seed=0):
        info = video_info(latent)
        if info["version"] == "2.0":
            if core_vae is None:
                raise ValueError(
                    "Open-Sora 2.0 references are encoded with the HunyuanVideo VAE: connect core_vae (core Load VAE)."
                )
            from .reference_v2 import encode_reference_v2

            return (encode_reference_v2(core_vae, image, latent, cond_type, frame_index, seed),)
        if vae is None:
            raise ValueError(
                f"Open-Sora {info['version']} references need the Open-Sora VAE: connect vae (Load Open-Sora VAE)."
            )
        if info["version"] != vae.version:
            raise ValueError(f"The latent is for Open-Sora {info['version']} but the VAE is {vae.version}.")
        pixels = reference_image.resize_crop(image, info["height"], info["width"])  # [B,3,H,W] in [-1,1]
        frames = pixels.movedim(0, 1).unsqueeze(0) if cond_type == "v2v_head" else pixels[:1].unsqueeze(2)
        generator = torch.Generator().manual_seed(seed)

        def noise(shape, dtype, device):
            return torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)

        reference = vae.encode(frames, sample_posterior=True, noise=noise)
        latent_frames = latent["samples"].shape[2]
        index = mask_index_for(cond_type, latent_frames, reference.shape[2], frame_index)
        out = dict(latent)
        out["opensora_reference"] = {"latent": reference, "mask_index": index, "cond_type": cond_type}
        return (out,)


class OpenSoraDecode:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": ("OPENSORA_VAE", {"tooltip": "The 1.x VAE that matches the DiT."}),
                "latent": ("LATENT", {"tooltip": "Sampled video latent."}),
            },
            "optional": {
                "tile_size": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 2048,
                        "step": 32,
                        "tooltip": "Spatial tile size in pixels for decoding with less memory; 0 decodes in one piece (exact official numbers).",
                    },
                ),
                "tile_overlap": (
                    "INT",
                    {
                        "default": 64,
                        "min": 0,
                        "max": 512,
                        "step": 8,
                        "tooltip": "Overlap between tiles in pixels, blended linearly.",
                    },
                ),
            },
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = f"{CATEGORY}/latent"
    DESCRIPTION = "Decode a video latent into frames (IMAGE batch, one image per frame)."

    def decode(self, vae, latent, tile_size=0, tile_overlap=64):
        info = latent.get("opensora", {})
        frames = vae.decode(latent["samples"], info.get("num_frames"), tile_size, tile_overlap if tile_size else 0)
        if info:
            # The 1.3 decoder returns 8 x latent size and never crops (Q5); give the size that was asked for.
            frames = frames[:, :, : info["num_frames"], : info["height"], : info["width"]]
        images = ((frames.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)  # [B,T,H,W,3]
        return (images.reshape(-1, *images.shape[2:]).contiguous(),)


NODE_CLASS_MAPPINGS = {
    "OpenSoraEmptyLatentVideo": OpenSoraEmptyLatentVideo,
    "OpenSoraEncodeReference": OpenSoraEncodeReference,
    "OpenSoraDecode": OpenSoraDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "OpenSoraEmptyLatentVideo": "Open-Sora Empty Latent Video",
    "OpenSoraEncodeReference": "Open-Sora Encode Reference",
    "OpenSoraDecode": "Open-Sora Decode",
}
