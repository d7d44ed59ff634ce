"""Encode Reference: which images of an IMAGE batch a condition uses (every version), and the 1.x encoding.

As the official collect_references_batch: resize-to-fill + center crop to the video size, each image encoded on its
own (one latent frame), a video as one clip (1.3: cut to 16k + 1 frames); the posterior is sampled with the node's
seed. The LATENT keeps the raw reference latent and the latent frames it conditions; the Sampler places it
(nodes/sampling.v1_conditioning).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..opensora_lib import reference_image
from ..opensora_lib.conditioning_v1 import cond_type_placements

log = logging.getLogger("OpenSora")

# Which images of an IMAGE batch an image condition encodes: head = the first, tail = the last, loop = both ends
# (official "a.png;b.png" references: the second is the loop's last frame). frame_index takes the first.
IMAGE_PICKS = {"i2v_head": (0,), "i2v_tail": (-1,), "i2v_loop": (0, -1), "frame_index": (0,)}


def encode_image_condition(
    encode_one: Callable[[int], torch.Tensor], count: int, cond_type: str, version: str, rows: int = 1
) -> torch.Tensor:
    """The reference latent of an image condition: encode_one(i) ([1, C, 1, h, w]) for the images it picks from a
    batch of `count`, concatenated in latent-frame order (i2v_loop: [start, end]; one image is encoded once and
    used at both ends), shared by the latent's `rows` videos. Given one image per video (count == rows > 1; i2v_loop:
    the rows' start images, then their end images, count == 2 rows) each video gets its own: [rows, C, 1 or 2, h, w].
    Says which images were used when the batch holds more than the condition takes."""
    ends = len(IMAGE_PICKS[cond_type])
    if rows > 1 and count == rows * ends:
        return torch.cat([torch.cat([encode_one(i + k * rows) for k in range(ends)], dim=2) for i in range(rows)])
    order = [i % count for i in IMAGE_PICKS[cond_type]]
    picks = list(dict.fromkeys(order))
    if count > len(picks):
        which = "the last" if picks == [count - 1] else "the first and the last" if len(picks) == 2 else "the first"
        per_row = (
            f"; give {rows * ends} images (the latent's batch_size{' x 2' if ends == 2 else ''}) for one per video"
        )
        log.warning(
            "OpenSora: Encode Reference %s uses %s of the %d images it was given (Open-Sora %s conditions on %s%s)",
            cond_type,
            which,
            count,
            version,
            "a start and an end image" if cond_type == "i2v_loop" else "one image here",
            per_row if rows > 1 else "",
        )
    encoded = {i: encode_one(i) for i in picks}  # in pick order: the 1.x posterior noise is drawn first, then last
    return torch.cat([encoded[i] for i in order], dim=2)


def mask_index_for(cond_type: str, latent_frames: int, reference_frames: int, frame_index: int) -> list[int]:
    """Latent frames a 1.x reference conditions: the official cond types' targets, or the one frame_index."""
    if cond_type != "frame_index":
        placements = cond_type_placements(cond_type, latent_frames, [reference_frames])
        return sorted({target % latent_frames for _ref, _frame, target in placements})
    if not 0 <= frame_index < latent_frames:
        raise ValueError(
            f"frame_index {frame_index} is outside the latent's {latent_frames} frames (0..{latent_frames - 1})"
        )
    return [frame_index]


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
