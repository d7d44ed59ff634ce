"""Latent previews during sampling, the same on the pack's Sampler and on core's samplers.

2.0 latents use the HunyuanVideo latent->RGB factors core ships. The 1.x VAEs and the 2.0 Video DC-AE (128
channels, one latent pixel per 32 x 32 pixels) have no published factors, so their latent formats carry a
principal-component preview instead: the first frame's latent channels projected onto their three principal
components, a false-colour picture that shows the layout of the video as it forms. It rides on core's
`latent_rgb_factors_reshape` hook (identity factors after the projection), so core KSampler /
SamplerCustomAdvanced previews these latents too. The pack's samplers take core's previewer for the model's
latent format, so --preview-method (none, latent2rgb, taesd with a models/vae_approx decoder) applies alike.
"""

from __future__ import annotations

import torch

PREVIEW_SIDE = 256  # small latents (a DC-AE frame is a few pixels) are scaled up to about this, nearest-neighbour


def principal_components(x0: torch.Tensor) -> torch.Tensor:
    """[B, C, (T,) H, W] latent -> [1, 3, 1, h, w] in -1..1: the first frame of the first sample, its C channels
    projected onto their 3 principal components, each stretched to the full range."""
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
    picture = rgb.T.reshape(1, 3, 1, height, width)
    scale = max(1, PREVIEW_SIDE // max(height, width))
    if scale > 1:
        picture = picture.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    return picture


class PrincipalComponentPreview:
    """Mixed into a latent format: core's Latent2RGB previewer applies the reshape, then these identity factors."""

    latent_rgb_factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    latent_rgb_factors_bias = None
    latent_rgb_factors_reshape = staticmethod(principal_components)


def previewer_for(model):
    """A callable latent -> ("JPEG", PIL image, max size) for Progress, or None: core's previewer for the model's
    latent format, on the model's device, as core's samplers build it (None under --preview-method none)."""
    import latent_preview

    previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
    if previewer is None:
        return None
    return lambda latent: previewer.decode_latent_to_preview_image("JPEG", latent)
