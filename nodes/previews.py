"""Latent previews during sampling, sent through ComfyUI's progress hook (canvas + websocket).

2.0 latents use the HunyuanVideo latent->RGB factors core ships. The 1.x VAEs and the 2.0 Video DC-AE (128
channels, one latent pixel per 32 x 32 pixels) have no published factors, so their preview projects the latent
channels of the first frame onto their three principal components: cheap, and it shows the layout of the
video as it forms (small DC-AE frames are scaled up to about 256 px). Honours --preview-method none.
"""

from __future__ import annotations

import torch
from PIL import Image


def previews_enabled() -> bool:
    try:
        from comfy.cli_args import LatentPreviewMethod, args
    except ImportError:
        return False
    return args.preview_method != LatentPreviewMethod.NoPreviews


def max_preview_size() -> int:
    """--preview-size (default 512), the largest side the server sends, as core's samplers pass it."""
    from comfy.cli_args import args

    return args.preview_size


def to_rgb(frame: torch.Tensor, factors=None, bias=None) -> torch.Tensor:
    """[C, H, W] latent frame -> [H, W, 3] in 0..1."""
    channels = frame.shape[0]
    flat = torch.nan_to_num(frame.reshape(channels, -1).T.float())  # [HW, C]; a NaN would stop the SVD
    if factors is not None and len(factors) == channels:
        rgb = flat @ torch.tensor(factors, dtype=torch.float32)
        if bias is not None:
            rgb = rgb + torch.tensor(bias, dtype=torch.float32)
        rgb = (rgb + 1) / 2
    else:
        centered = flat - flat.mean(0, keepdim=True)
        _, _, vh = torch.linalg.svd(centered, full_matrices=False)
        rgb = centered @ vh[: min(3, channels)].T
        if rgb.shape[1] < 3:
            rgb = torch.cat([rgb, rgb.new_zeros(rgb.shape[0], 3 - rgb.shape[1])], dim=1)
        low, high = rgb.min(0).values, rgb.max(0).values
        rgb = (rgb - low) / (high - low).clamp_min(1e-6)
    return rgb.clamp(0, 1).reshape(*frame.shape[1:], 3)


def previewer_for(model):
    """A callable latent [B,C,T,H,W] -> ("JPEG", PIL image, max size) for ProgressBar, or None."""
    if not previews_enabled():
        return None
    latent_format = model.model.latent_format
    factors = getattr(latent_format, "latent_rgb_factors", None)
    bias = getattr(latent_format, "latent_rgb_factors_bias", None)

    def preview(latent: torch.Tensor):
        rgb = to_rgb(latent[0, :, 0].detach().float().cpu(), factors, bias)
        image = Image.fromarray((rgb * 255).round().to(torch.uint8).numpy())
        scale = max(1, 256 // max(image.size))
        if scale > 1:
            image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        return ("JPEG", image, size)

    size = max_preview_size()
    return preview
