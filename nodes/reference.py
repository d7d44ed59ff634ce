"""Encode Reference's 1.x encoding (which images of an IMAGE batch a condition uses, for every version, and where a
1.x reference lands: opensora_lib.reference_image).

As the official collect_references_batch: resize-to-fill + center crop to the video size, each image encoded on its
own (one latent frame), a video as one clip (1.3: cut to 16k + 1 frames); the posterior is sampled with the node's
seed. The LATENT keeps the raw reference latent and the latent frames it conditions; the Sampler places it
(nodes/sampling_v1.v1_chaining).
"""

from __future__ import annotations

import logging

import torch

from ..opensora_lib import reference_image
from ..opensora_lib.reference_image import encode_image_condition, mask_index_for

log = logging.getLogger("OpenSora")


def encode_reference_v1(
    vae, image: torch.Tensor, latent: dict, info: dict, cond_type: str, frame_index: int, seed: int
):
    """LATENT with opensora_reference = {latent (raw, [1 or B, C, N, h, w]), mask_index, cond_type} for a 1.x
    latent (B: one image per video of the batch)."""
    pixels = reference_image.resize_crop_reference(image, info["height"], info["width"], cond_type)  # in [-1, 1]
    generator = torch.Generator().manual_seed(seed)

    def noise(shape, dtype, device):
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)

    if cond_type == "v2v_head":
        frames = pixels.movedim(0, 1).unsqueeze(0)
        kept = vae.model.reference_frames(frames.shape[2])  # 1.3: the official 16k + 1 cut; 1.2: all
        if kept < frames.shape[2]:
            log.warning(  # a 3-frame video keeps 1 frame (then it conditions like one image): easy to miss
                "OpenSora: Encode Reference v2v_head: %d of %d video frames kept: the official 1.3 trims a reference "
                "video to a length its VAE encodes whole (1, 17, 33, ... frames with the released settings)",
                kept,
                frames.shape[2],
            )
        reference = vae.encode(frames[:, :, :kept], noise=noise)
    else:
        reference = encode_image_condition(
            lambda i: vae.encode(pixels[i : i + 1].unsqueeze(2), noise=noise),
            pixels.shape[0],
            cond_type,
            info["version"],
            latent["samples"].shape[0],
        )
    index = mask_index_for(cond_type, latent["samples"].shape[2], reference.shape[2], frame_index)
    out = dict(latent)
    out["opensora_reference"] = {"latent": reference, "mask_index": index, "cond_type": cond_type}
    return out
