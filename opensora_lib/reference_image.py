"""Reference images for image/video conditioning: resize-to-fill and center-crop to the video size.

The official code reads an image file and a video file differently (datasets/utils.py read_from_path):
- image: 8-bit RGB, PIL BICUBIC resize so the image covers the target, center crop with Python rounding, /255,
  then (x - 0.5) / 0.5 (resize_crop);
- video (the v2v_* references): 8-bit frames /255, bilinear F.interpolate without antialiasing, a crop offset of
  int(round(diff) / 2), then (x - 0.5) / 0.5 (resize_crop_video).

It also holds which images of a batch an image condition uses (IMAGE_PICKS, encode_image_condition: every version),
the start + end images of a first-last-frame video (with_end_image) and the latent frames a 1.x reference conditions
(mask_index_for).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .conditioning_v1 import cond_type_placements
from .sizes import check_int

log = logging.getLogger("OpenSora")


def _fill_geometry(src_h: int, src_w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(resized_h, resized_w, top, left) of the official resize_crop_to_fill (Python round, half to even)."""
    scale_h, scale_w = height / src_h, width / src_w
    if scale_h > scale_w:
        resized_h, resized_w = height, round(src_w * scale_h)
        return resized_h, resized_w, 0, int(round((resized_w - width) / 2.0))
    resized_h, resized_w = round(src_h * scale_w), width
    return resized_h, resized_w, int(round((resized_h - height) / 2.0)), 0


def resize_crop(image: Any, height: int, width: int, *, method: str = "pil") -> torch.Tensor:
    """Resize-to-fill and center-crop reference images to (height, width), returned as [B, 3, H, W] in [-1, 1].

    `image`: a ComfyUI IMAGE tensor [B, H, W, 3] (or [H, W, 3]) with values 0..1, or a PIL image.
    Both methods follow the official path: 8-bit RGB, BICUBIC resize so the image covers the target,
    center crop (Python rounding), /255, then (x - 0.5) / 0.5.
    method="pil" (default) uses PIL itself: bit-exact with the official for images from 8-bit files.
    method="torch" stays on the tensor's device: antialiased bicubic per axis (width, then height, as
    PIL does) rounded to 8 bits after each pass; it differs from PIL by one 8-bit level on up to
    ~0.2% of pixels (PIL's fixed-point weights), never more.
    """
    check_int("height", height)
    check_int("width", width)
    if method not in ("pil", "torch"):
        raise ValueError(f"unknown resize method {method!r}; choose 'pil' or 'torch'")
    if not isinstance(image, torch.Tensor):
        return _resize_crop_pil_image(image, height, width)
    pixels = _eight_bit(image)
    if method == "pil":
        frames = []
        for frame in pixels.to(torch.uint8).cpu().numpy():
            frames.append(_resize_crop_pil_image(_pil().fromarray(frame, "RGB"), height, width)[0])
        return torch.stack(frames).to(image.device)
    src_h, src_w = pixels.shape[1:3]
    resized_h, resized_w, top, left = _fill_geometry(src_h, src_w, height, width)
    x = pixels.permute(0, 3, 1, 2)
    if resized_w != src_w:
        x = F.interpolate(x, size=(src_h, resized_w), mode="bicubic", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255)
    if resized_h != src_h:
        x = F.interpolate(x, size=(resized_h, resized_w), mode="bicubic", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255)
    x = x[:, :, top : top + height, left : left + width].div(255)
    return (x - 0.5) / 0.5


def resize_crop_video(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize-to-fill and center-crop video frames (an IMAGE batch [T, H, W, 3], values 0..1) to (height, width) as
    the official video transform (video_transforms.resize_crop_to_fill) reads a video file: [T, 3, H, W] in [-1, 1].
    The frames are 8-bit as decoded from a file; the bilinear resize output is not rounded again."""
    check_int("height", height)
    check_int("width", width)
    pixels = _eight_bit(image)
    src_h, src_w = pixels.shape[1:3]
    size = _fill_geometry(src_h, src_w, height, width)[:2]  # the scale's rounding as the official w * (th / h)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2  # int(round(diff) / 2.0) of a whole diff >= 0
    x = F.interpolate(pixels.permute(0, 3, 1, 2).div(255), size=size, mode="bilinear", align_corners=False)
    return (x[:, :, top : top + height, left : left + width] - 0.5) / 0.5


def resize_crop_reference(image: torch.Tensor, height: int, width: int, cond_type: str) -> torch.Tensor:
    """A reference as the official code reads it for `cond_type`: the v2v_* ones from a video file, the others from
    image files."""
    if cond_type.startswith("v2v"):
        return resize_crop_video(image, height, width)
    return resize_crop(image, height, width)


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


def with_end_image(
    image: torch.Tensor, end_image: torch.Tensor, height: int, width: int, rows: int = 1
) -> torch.Tensor:
    """image's frames then end_image's last, each fitted to (height, width) (so they batch whatever their sizes),
    back in the IMAGE layout: i2v_loop takes the first and the last. With one start and one end image per video of
    the latent's `rows` (> 1), all the end images: each video gets its own pair (encode_image_condition).
    The fit is 8-bit, so fitting again is exact."""
    ends = end_image if rows > 1 and image.shape[0] == end_image.shape[0] == rows else end_image[-1:]
    pixels = torch.cat([resize_crop(x, height, width) for x in (image, ends)])
    return ((pixels + 1) / 2).movedim(1, -1)


def _eight_bit(image: torch.Tensor) -> torch.Tensor:
    """An IMAGE tensor [B, H, W, 3] (or [H, W, 3]) with values 0..1 as the 8-bit pixels (0..255, float) of a file."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[-1] not in (3, 4) or image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"expected an IMAGE tensor [B, H, W, 3] with values 0..1, got shape {tuple(image.shape)}")
    if image.shape[0] == 0:
        raise ValueError("the reference IMAGE batch is empty (0 images): give at least one image")
    return (image[..., :3].detach().float().clamp(0, 1) * 255).round()


def _pil():
    from PIL import Image

    return Image


def _resize_crop_pil_image(image: Any, height: int, width: int) -> torch.Tensor:
    pil = _pil()
    if not isinstance(image, pil.Image):
        raise ValueError(f"expected an IMAGE tensor or a PIL image, got {type(image).__name__}")
    image = image.convert("RGB")
    src_w, src_h = image.size
    resized_h, resized_w, top, left = _fill_geometry(src_h, src_w, height, width)
    resized = image.resize((resized_w, resized_h), pil.BICUBIC)
    cropped = resized.crop((left, top, left + width, top + height))
    import numpy as np

    x = torch.from_numpy(np.array(cropped, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    return ((x - 0.5) / 0.5).unsqueeze(0)
