"""Latent nodes: empty video latents, reference (image/video) conditioning, decoding to frames."""

from __future__ import annotations

import logging
import math

import torch

from ..opensora_lib import conditioning_v1, reference_image, sizes
from .common import CATEGORY, SMALLER_VIDEO, check_host_memory, input_range_error, warn_once
from .reference import encode_reference_v1
from .reference_v2 import COND_TYPES_V2, encode_reference_dcae, encode_reference_v2

log = logging.getLogger("OpenSora")

# Version choices of Empty Latent Video; "2.0 DC-AE" makes a Video DC-AE latent (its LATENT info keeps version
# "2.0" and adds "autoencoder": "dc_ae"; a 2.0 latent without that key is a HunyuanVideo one).
VERSIONS = list(sizes.LATENT_CHOICES)
V1_COND_TYPES = [*conditioning_v1.COND_TYPES, "frame_index"]
COND_TYPES = [*V1_COND_TYPES, *(t for t in COND_TYPES_V2 if t not in V1_COND_TYPES)]  # 2.0 only after frame_index


def _union(getter) -> list[str]:
    seen: list[str] = []
    for version in dict.fromkeys(version for version, _autoencoder in sizes.LATENT_CHOICES.values()):
        for item in getter(version):
            if item not in seen:
                seen.append(item)
    return seen


def video_info(latent: dict) -> dict:
    info = latent.get("opensora")
    if info is None:
        raise ValueError(
            "This LATENT has no Open-Sora size information: make it with Open-Sora Empty Latent Video (optionally "
            "through Open-Sora Encode Reference). If it was made there, a core node in between rebuilt the LATENT "
            "without it and without any reference (RebatchLatents keeps only the samples, mask and batch index): "
            "connect the Open-Sora nodes to that latent directly (core KSampler samples the bare samples as they are)."
        )
    return info_for_samples(info, latent["samples"])


def info_for_samples(info: dict, samples: torch.Tensor) -> dict:
    """Core latent nodes (LatentUpscaleBy, TrimVideoLatent, LatentCut, ...) pass a LATENT on with its Open-Sora info
    unchanged. Where the samples no longer have the shape that info makes, the size or the length comes from the
    samples (a 1.x latent size: its one official table size, else x8; a length: the longest that many latent
    frames hold), with a warning; a shape no Open-Sora video has is refused."""
    if samples.ndim != 5:
        return info
    version, autoencoder = info["version"], latent_autoencoder(info) or "hunyuan"
    made = sizes.latent_shape(version, info["num_frames"], info["height"], info["width"], autoencoder=autoencoder)
    given = tuple(samples.shape[2:])
    if given == made:
        return info
    updated = dict(info)
    try:
        if given[0] != made[0]:
            updated["num_frames"] = sizes.frames_for_latent(version, given[0], autoencoder=autoencoder)
        if given[1:] != made[1:]:
            updated["height"], updated["width"] = sizes.size_for_latent(version, *given[1:], autoencoder=autoencoder)
    except ValueError as e:
        raise ValueError(
            f"This {latent_label(info)} LATENT was made as {info['num_frames']} frames at {info['height']} x "
            f"{info['width']} (latent T, H, W {made}) but its samples are now {given}, which no Open-Sora video has "
            f"({e}): a node between Empty Latent Video and here changed it."
        ) from e
    warn_once(
        f"latent info {made} -> {given}",
        f"OpenSora: a LATENT made as {info['num_frames']} frames at {info['height']} x {info['width']} now has latent "
        f"(T, H, W) {given} (a core latent node changed it): using {updated['num_frames']} frames at "
        f"{updated['height']} x {updated['width']}.",
    )
    return updated


def latent_autoencoder(info: dict) -> str | None:
    """The 2.0 autoencoder a LATENT is for ("hunyuan" when a 2.0 latent says nothing: the older format); None for 1.x."""
    if info.get("version") != "2.0":
        return None
    return info.get("autoencoder", "hunyuan")


def latent_label(info: dict) -> str:
    """How errors name a LATENT: its Empty Latent Video version choice."""
    return sizes.latent_choice(info.get("version"), latent_autoencoder(info))


def check_vae_fits(vae, info: dict, what: str) -> None:
    """An OPENSORA_VAE must be the one the latent was made for (1.2 / 1.3 VAE, or the DC-AE for 2.0 DC-AE)."""
    label = latent_label(info)
    if latent_autoencoder(info) == "hunyuan":
        raise ValueError(
            f"{what}: this is an Open-Sora 2.0 (HunyuanVideo) latent, which Load Open-Sora VAE does not handle: "
            "use core Load VAE with hunyuan_vae.safetensors (through Open-Sora HunyuanVideo VAE (causal fix))."
        )
    vae_label = sizes.latent_choice(vae.version, vae.autoencoder)
    if vae_label != label:
        hint = (
            "Load Open-Sora VAE with F32T4C128_AE.safetensors"
            if label == "2.0 DC-AE"
            else f"the Open-Sora {label} VAE in Load Open-Sora VAE"
        )
        raise ValueError(
            f"{what}: the latent was made for Open-Sora {label} but the VAE is the {vae_label} one; use {hint}."
        )


class OpenSoraEmptyLatentVideo:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "version": (
                    VERSIONS,
                    {
                        "default": "1.3",
                        "tooltip": "The Open-Sora generation the latent is for (sets channels, frame rules and aspect convention). 2.0 DC-AE: the high-compression 2.0 variant (Open_Sora_v2_Video_DC_AE + F32T4C128_AE: 128 channels, x32 spatial, 1 or 4k frames from 8 to 128, sizes in multiples of 32; official 768px, 128 frames).",
                    },
                ),
                "resolution": (
                    _union(sizes.resolutions),
                    {
                        "default": "360p",
                        "tooltip": "Resolution preset of the chosen version (1.x: the official tables, 144p to 4k; 1.3 '<name>_16d': the same sizes rounded down to multiples of 16; 2.0: 256px and 768px as trained, plus the official code's other tables; 2.0 DC-AE: 768px, snapped to 32).",
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
                        "tooltip": "Pixel frames. 1.3: 1 or 16k+1 up to 801 (17..113 trained); 2.0: 4k+1 up to 129; 2.0 DC-AE: 1 or 4k from 8 to 128 (official 128); 1.2: 1 or 17 to 816. Longer 1.x videos: the Sampler's loops.",
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
                        "tooltip": "Exact width in pixels (with height); 0 uses the preset. 2.0: multiples of 16, 2.0 DC-AE: of 32. 1.2 floors it to a multiple of 8 (its latent is size // 8, as the official code); 1.3 decodes to the exact size.",
                    },
                ),
                "height": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 4096,
                        "step": 8,
                        "tooltip": "Exact height in pixels (with width); 0 uses the preset. 2.0: multiples of 16, 2.0 DC-AE: of 32. 1.2 floors it to a multiple of 8 (its latent is size // 8, as the official code); 1.3 decodes to the exact size.",
                    },
                ),
                "fps": (
                    "INT",
                    {
                        "default": 24,
                        "min": 1,
                        "max": 120,
                        "tooltip": "Frame rate the video is meant to play at (official: 24). 1.x: the DiT is conditioned on it. 2.0: only the duration shown here; the model reads the fps written into the prompt (Open-Sora Encode Prompt's fps): keep the two equal.",
                    },
                ),
            },
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    CATEGORY = f"{CATEGORY}/latent"
    DESCRIPTION = "An empty video latent with Open-Sora's size, frame-count and aspect rules."

    @classmethod
    def VALIDATE_INPUTS(cls, version=None, resolution=None, aspect_ratio=None, num_frames=None, width=0, height=0):
        """batch_size and fps are not named here, so core checks their ranges itself. An input linked from another
        node is None here (its value comes at run time, where generate checks it): check what is known. A missing
        input is None too (defaults), so that core reports it as missing instead of a TypeError."""
        error = input_range_error(cls, {"num_frames": num_frames, "width": width, "height": height})
        if error or version is None:
            return error or True
        try:
            lib_version, autoencoder = sizes.parse_latent_choice(version)
            if None not in (resolution, aspect_ratio, width, height):
                sizes.resolve_size(version, resolution, aspect_ratio, width, height)
            if num_frames is not None:
                sizes.validate_num_frames(lib_version, num_frames, autoencoder=autoencoder)
        except ValueError as e:
            return str(e)
        return True

    def generate(self, version, resolution, aspect_ratio, num_frames, batch_size=1, width=0, height=0, fps=24):
        values = {"num_frames": num_frames, "width": width, "height": height, "batch_size": batch_size, "fps": fps}
        error = input_range_error(self, values)  # linked inputs were not range-checked when queued
        if error:
            raise ValueError(f"Open-Sora Empty Latent Video: {error}")
        lib_version, autoencoder = sizes.parse_latent_choice(version)
        exact = bool(width and height)
        height, width = sizes.resolve_size(version, resolution, aspect_ratio, width, height)
        frames, latent_h, latent_w = sizes.latent_shape(lib_version, num_frames, height, width, autoencoder=autoencoder)
        if exact and lib_version == "1.2" and (height % 8 or width % 8):
            log.warning(
                "OpenSora: Open-Sora 1.2 makes %d x %d frames for the %d x %d asked: its latent is the size // 8, as "
                "the official code (1.3 decodes to the exact size)",
                latent_w * 8,
                latent_h * 8,
                width,
                height,
            )
        shape = (batch_size, sizes.LATENT_CHANNELS[version], frames, latent_h, latent_w)
        check_host_memory(math.prod(shape) * 4, f"Open-Sora Empty Latent Video's latent of {shape}", SMALLER_VIDEO)
        samples = torch.zeros(shape)
        info = {"version": lib_version, "height": height, "width": width, "num_frames": num_frames, "fps": fps}
        if autoencoder == "dc_ae":
            info["autoencoder"] = "dc_ae"  # older 2.0 latents carry no key and mean the HunyuanVideo VAE
        return ({"samples": samples, "opensora": info},)


class OpenSoraEncodeReference:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": (
                    "IMAGE",
                    {
                        "tooltip": "The reference: an image (i2v_head / i2v_tail), start and end images (i2v_loop, or use end_image), or video frames (v2v_*). One image per video of the latent's batch gives each video its own. Resized to fill and center-cropped to the latent's size as the official code reads an image file (v2v_*: a video file)."
                    },
                ),
                "latent": ("LATENT", {"tooltip": "The latent to condition, from Open-Sora Empty Latent Video."}),
                "cond_type": (
                    COND_TYPES,
                    {
                        "default": "i2v_head",
                        "tooltip": "Where the reference goes: first frame, last frame, both (loop), the first latent frames of a video (v2v_head), or one latent frame (frame_index, 1.x). 2.0 (HunyuanVideo VAE) also takes v2v_tail (a video continued backwards from its last frames) and the _easy variants (16 + 1 conditioned latent frames instead of 8 + 1), as the official 2.0 code; the DC-AE takes the i2v types.",
                    },
                ),
            },
            "optional": {
                "vae": (
                    "OPENSORA_VAE",
                    {
                        "tooltip": "1.x: the Open-Sora VAE that matches the DiT. 2.0 DC-AE: the Video DC-AE (Load Open-Sora VAE with F32T4C128_AE.safetensors)."
                    },
                ),
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
                        "tooltip": "Seed of the VAE posterior sample (1.x, as the official code samples the posterior). No effect for 2.0: core's VAE returns the mean and the DC-AE encoder is deterministic.",
                    },
                ),
                "end_image": (
                    "IMAGE",
                    {
                        "tooltip": "First-last-frame video: the last frame for cond_type i2v_loop, whose first frame is image (the official two-image reference); one per video when image and end_image both hold batch_size images. Any size: each image is fitted to the latent on its own."
                    },
                ),
            },
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = f"{CATEGORY}/latent"
    DESCRIPTION = "VAE-encode a reference image or video and attach it to the latent for image/video-to-video."

    def encode(self, image, latent, cond_type, vae=None, core_vae=None, frame_index=0, seed=0, end_image=None):
        if image.shape[0] == 0 or (end_image is not None and end_image.shape[0] == 0):
            raise ValueError(
                "Open-Sora Encode Reference: the image batch is empty (0 images); give at least one image."
            )
        info = video_info(latent)
        if end_image is not None:
            if cond_type != "i2v_loop":
                raise ValueError(
                    f"end_image is the last frame of cond_type i2v_loop (a first-last-frame video); with {cond_type!r} "
                    "disconnect it, or set cond_type to i2v_loop."
                )
            rows = latent["samples"].shape[0]
            image = reference_image.with_end_image(image, end_image, info["height"], info["width"], rows)
        if latent_autoencoder(info) == "dc_ae":
            if vae is None:
                raise ValueError(
                    "Open-Sora 2.0 DC-AE references are encoded with the Video DC-AE: connect vae (Load Open-Sora VAE "
                    "with F32T4C128_AE.safetensors); core_vae (the HunyuanVideo VAE) does not fit this latent."
                )
            check_vae_fits(vae, info, "Encode Reference")
            return (encode_reference_dcae(vae, image, latent, info, cond_type),)
        if info["version"] == "2.0":
            if core_vae is None:
                raise ValueError(
                    "Open-Sora 2.0 references are encoded with the HunyuanVideo VAE: connect core_vae (core Load VAE)."
                )
            return (encode_reference_v2(core_vae, image, latent, info, cond_type),)
        if cond_type not in V1_COND_TYPES:
            raise ValueError(
                f"cond_type {cond_type!r} is an Open-Sora 2.0 condition; Open-Sora {info['version']} takes "
                f"{', '.join(V1_COND_TYPES)}."
            )
        if vae is None:
            raise ValueError(
                f"Open-Sora {info['version']} references need the Open-Sora VAE: connect vae (Load Open-Sora VAE)."
            )
        check_vae_fits(vae, info, "Encode Reference")
        return (encode_reference_v1(vae, image, latent, info, cond_type, frame_index, seed),)


def tile_error(node, tile_size: int | None, tile_overlap: int | None) -> str | None:
    """Decode's tile settings: ranges, and an overlap below the tile (None: linked, not known yet)."""
    error = input_range_error(node, {"tile_size": tile_size, "tile_overlap": tile_overlap})
    if error or None in (tile_size, tile_overlap) or not tile_size or tile_overlap < tile_size:
        return error
    return f"tile_overlap ({tile_overlap} px) must be smaller than tile_size ({tile_size} px), or set tile_size 0"


class OpenSoraDecode:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": (
                    "OPENSORA_VAE",
                    {
                        "tooltip": "The VAE that matches the DiT: the 1.2 / 1.3 VAE, or the Video DC-AE for 2.0 DC-AE latents."
                    },
                ),
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
                        "tooltip": "1.x: spatial tile size in pixels for decoding with less memory; 0 decodes in one piece (exact official numbers). The DC-AE always decodes with its official tiles (256 px, 32 frames, 1/4 overlap): leave 0.",
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

    @classmethod
    def VALIDATE_INPUTS(cls, tile_size=0, tile_overlap=64):
        """Checked when the prompt is queued, before any sampling (the VAEs would say it in latent pixels). Core
        skips its own min / max checks for inputs named here, so the ranges are checked here too; a linked input is
        None here and checked in decode."""
        return tile_error(cls, tile_size, tile_overlap) or True

    def decode(self, vae, latent, tile_size=0, tile_overlap=64):
        error = tile_error(self, tile_size, tile_overlap)
        if error:
            raise ValueError(f"Open-Sora Decode: {error}")
        if tile_size and vae.autoencoder == "dc_ae":
            raise ValueError(
                f"Open-Sora Decode: tile_size {tile_size} is for the 1.x VAEs; the Video DC-AE always decodes with its "
                "official tiles (256 px, 32 frames, overlap 1/4). Set tile_size to 0."
            )
        if latent["samples"].ndim != 5:
            raise ValueError(
                f"Open-Sora Decode takes a video LATENT [B, C, T, H, W] (from Open-Sora Empty Latent Video, the Sampler "
                f"or Encode Reference); this one is a {latent['samples'].ndim}-D latent of shape "
                f"{list(latent['samples'].shape)}, e.g. an image latent (core Empty Latent Image, VAE Encode)."
            )
        info = latent.get("opensora") or {}
        if info:
            info = info_for_samples(info, latent["samples"])
            check_vae_fits(vae, info, "Decode")
        else:
            log.info(
                "OpenSora: Open-Sora Decode got a LATENT without Open-Sora info (a core empty latent, or a node such "
                "as RebatchLatents rebuilt it): decoding the latent's whole size and length, not a size asked for"
            )
        frames = vae.decode(latent["samples"], info.get("num_frames"), tile_size, tile_overlap if tile_size else 0)
        if info:
            # The 1.3 decoder returns 8 x latent size and never crops (Q5), the DC-AE 4 x latent T frames: give
            # the size and length that were asked for (official 2.0: x[:, :, :num_frames]).
            frames = frames[:, :, : info["num_frames"], : info["height"], : info["width"]]
        # in place (frames is the decode's own float32 output): the IMAGE batch is the only other copy held, as
        # OpenSoraVAE.decode counts it for the RAM check
        images = frames.clamp_(-1, 1).add_(1).div_(2).permute(0, 2, 3, 4, 1)  # [B,T,H,W,3]
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
