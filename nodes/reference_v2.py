"""Open-Sora 2.0 reference images / videos for Encode Reference: core's HunyuanVideo VAE, or the Video DC-AE.

As the reference: resize-to-fill + center crop to the video size (reference_image.resize_crop_reference: images as
the official PIL path, v2v_* videos as its video transform), then VAE-encode. One difference: core VAE.encode returns the posterior MEAN, while
the official code samples the posterior (with its own seed); the `seed` input therefore has no effect
for 2.0. The LATENT keeps raw VAE latents; the sampler scales them into model space.

With the Video DC-AE (a "2.0 DC-AE" latent and Load Open-Sora VAE's DC-AE) each image is encoded on its own,
one image -> one latent frame, as collect_references_batch does; the DC-AE returns the latent in the DiT's
space already (its chosen scaling applied), and its encoder is deterministic. Only the i2v types: with the
inherited is_causal_vae=True (Q12) the official v2v path reads 32 + 1 frames and conditions 8 + 1 latent
frames, counts made for the causal HunyuanVideo VAE; the pack does not guess a DC-AE equivalent.
"""

from __future__ import annotations

import torch

from ..opensora_lib import reference_image, sampling_v2, sizes
from ..opensora_lib.reference_image import IMAGE_PICKS, encode_image_condition
from ..opensora_lib.sampling_v2 import conditioned_frames

COND_TYPES_V2 = tuple(t for t in sampling_v2.COND_TYPES if t != "t2v")
COND_TYPES_DC_AE = tuple(t for t in COND_TYPES_V2 if t.startswith("i2v"))


def _encode(core_vae, images: torch.Tensor) -> torch.Tensor:
    """[T, H, W, 3] in 0..1 -> raw latent [1, C, T', H/8, W/8] (T frames as one video)."""
    return core_vae.encode(images).float().cpu()


def _conditioned_frames(cond_type: str, info: dict, latent_frames: int, autoencoder: str = "hunyuan") -> list[int]:
    """conditioned_frames, refusing a latent too short for the condition with the num_frames to set: the shortest
    2.0 length whose latent holds the conditioned frames and one more."""
    try:
        return conditioned_frames(cond_type, latent_frames)
    except ValueError as e:
        raise ValueError(f"{e} ({info['num_frames']} frames). {_longer_video_hint(cond_type, autoencoder)}") from None


def _longer_video_hint(cond_type: str, autoencoder: str) -> str:
    for frames in sizes.allowed_num_frames("2.0", autoencoder=autoencoder):
        latent = sizes.latent_frames("2.0", frames, autoencoder=autoencoder)
        try:
            conditioned_frames(cond_type, latent)
        except ValueError:
            continue
        return f"Set Open-Sora Empty Latent Video's num_frames to {frames} or more."
    return ""


def encode_reference_v2(core_vae, image: torch.Tensor, latent: dict, info: dict, cond_type: str) -> dict:
    """Attach latent["opensora_reference"] = {latent (raw), cond_type, mask_index, version "2.0"}."""
    if cond_type not in COND_TYPES_V2:
        raise ValueError(
            f"cond_type {cond_type!r} is not an Open-Sora 2.0 condition; 2.0 accepts {', '.join(COND_TYPES_V2)} "
            "(frame_index exists for 1.x only)."
        )
    samples = latent["samples"]
    latent_frames = samples.shape[2]
    frames = _conditioned_frames(cond_type, info, latent_frames)  # raises for a single latent frame / a short video
    pixels = reference_image.resize_crop_reference(image, info["height"], info["width"], cond_type)  # [N, 3, H, W]
    images = ((pixels + 1) / 2).movedim(1, -1)  # back to the 0..1 IMAGE layout core's VAE takes
    if cond_type in IMAGE_PICKS:
        # one frame per conditioned end: head from the first image, tail from the last (official ref_path[0/-1])
        reference = encode_image_condition(
            lambda i: _encode(core_vae, images[i : i + 1]), len(images), cond_type, "2.0", samples.shape[0]
        )
    else:
        needed = (len(frames) - 1) * 4 + 1  # the causal VAE turns 4k + 1 frames into k + 1 latent frames
        if images.shape[0] < needed:
            raise ValueError(
                f"{cond_type} conditions {len(frames)} latent frames, so the reference video needs at least "
                f"{needed} frames; got {images.shape[0]}"
            )
        reference = _encode(core_vae, images)
    if reference.ndim != 5 or reference.shape[1] != samples.shape[1] or reference.shape[-2:] != samples.shape[-2:]:
        raise ValueError(
            f"the VAE encoded the reference to {tuple(reference.shape)}, which does not fit the video latent "
            f"{tuple(samples.shape)}: connect the HunyuanVideo VAE (hunyuan_vae.safetensors) as core_vae"
        )
    out = dict(latent)
    out["opensora_reference"] = {"latent": reference, "cond_type": cond_type, "mask_index": frames, "version": "2.0"}
    return out


def encode_reference_dcae(vae, image: torch.Tensor, latent: dict, info: dict, cond_type: str) -> dict:
    """Attach latent["opensora_reference"] for a "2.0 DC-AE" latent, encoded with the pack's DC-AE (OPENSORA_VAE)."""
    if cond_type not in COND_TYPES_DC_AE:
        raise ValueError(
            f"cond_type {cond_type!r} is not available with the Video DC-AE; choose {', '.join(COND_TYPES_DC_AE)} "
            "(the DC-AE DiT was trained on t2v and i2v_head; video references are offered with the HunyuanVideo "
            "VAE only)."
        )
    samples = latent["samples"]
    frames = _conditioned_frames(cond_type, info, samples.shape[2], "dc_ae")  # raises for a single latent frame
    pixels = reference_image.resize_crop(image, info["height"], info["width"])  # [N, 3, H, W] in [-1, 1]
    # One image -> one latent frame (official collect_references_batch: r[:, :1] -> model_ae.encode).
    reference = encode_image_condition(
        lambda i: vae.encode(pixels[i : i + 1].unsqueeze(2)).float().cpu(),
        len(pixels),
        cond_type,
        sizes.latent_choice("2.0", "dc_ae"),
        samples.shape[0],
    )
    if reference.shape[1] != samples.shape[1] or reference.shape[-2:] != samples.shape[-2:]:
        raise ValueError(
            f"the DC-AE encoded the reference to {tuple(reference.shape)}, which does not fit the video latent "
            f"{tuple(samples.shape)}"
        )
    out = dict(latent)
    out["opensora_reference"] = {
        "latent": reference,
        "cond_type": cond_type,
        "mask_index": frames,
        "version": "2.0",
        "autoencoder": "dc_ae",
    }
    return out
