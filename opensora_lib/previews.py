"""The principal-component preview of a latent that has no published latent->RGB factors (the 1.x VAEs, the 2.0
Video DC-AE): the first frame's latent channels projected onto their three principal components, a false-colour
picture of the video's layout as it forms (nodes/previews.py hands it to core's previewers)."""

from __future__ import annotations

import torch

PREVIEW_SIDE = 256  # small latents (a DC-AE frame is a few pixels) are scaled up to about this, nearest-neighbour,
PREVIEW_ELEMENTS = 2**20  # within this many elements of the C-channel picture (4 MiB; DC-AE: 128 channels, 88 px)


def principal_components(x0: torch.Tensor) -> torch.Tensor:
    """[B, C, (T,) H, W] latent -> [1, C, 1, h, w]: the first frame of the first sample, its C channels projected
    onto their 3 principal components, each stretched to -1..1, in channels 0-2 (the others zero)."""
    frame = x0[0, :, 0] if x0.ndim == 5 else x0[0]
    channels, height, width = frame.shape
    flat = torch.nan_to_num(frame.detach().reshape(channels, -1).T.float())  # [HW, C]; a NaN would stop the SVD
    centered = flat - flat.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centered, full_matrices=False)
    rgb = centered @ vh[: min(3, channels)].T
    if rgb.shape[1] < 3:
        rgb = torch.cat([rgb, rgb.new_zeros(rgb.shape[0], 3 - rgb.shape[1])], dim=1)
    low, high = rgb.min(0).values, rgb.max(0).values
    rgb = (rgb - low) / (high - low).clamp_min(1e-6) * 2 - 1
    picture = torch.cat([rgb.T, rgb.new_zeros(channels - 3, rgb.shape[0])]) if channels > 3 else rgb.T
    picture = picture.reshape(1, -1, 1, height, width)
    scale = max(1, min(PREVIEW_SIDE // max(height, width), int((PREVIEW_ELEMENTS / picture.numel()) ** 0.5)))
    if scale > 1:
        picture = picture.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    return picture
