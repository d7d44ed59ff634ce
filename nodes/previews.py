"""Latent previews during sampling, the same on the pack's Sampler and on core's samplers.

2.0 latents use the HunyuanVideo latent->RGB factors core ships. The 1.x VAEs and the 2.0 Video DC-AE (128
channels, one latent pixel per 32 x 32 pixels) have no published factors, so their latent formats carry a
principal-component preview instead: the first frame's latent channels projected onto their three principal
components, a false-colour picture that shows the layout of the video as it forms. It rides on core's
`latent_rgb_factors_reshape` hook, so core KSampler / SamplerCustomAdvanced preview these latents too: the reshape
puts the picture in the first 3 of the C channels, and the factors pick those 3. Code that applies the factors
without the reshape (VideoHelperSuite's animated previews) gets the first 3 latent channels as RGB instead of a shape
error. The pack's samplers take core's previewer for the model's latent format, so --preview-method (none, latent2rgb,
taesd with a models/vae_approx decoder) applies alike.
"""

from __future__ import annotations

from ..opensora_lib.previews import principal_components


class PrincipalComponentPreview:
    """Mixed into a latent format: core's Latent2RGB previewer applies the reshape, then factors that take channels
    0-2 as RGB (a [latent_channels, 3] list, as core's factors are)."""

    latent_rgb_factors_bias = None
    latent_rgb_factors_reshape = staticmethod(principal_components)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.latent_rgb_factors = [[float(row == rgb) for rgb in range(3)] for row in range(cls.latent_channels)]


def previewer_for(model):
    """A callable latent -> ("JPEG", PIL image, max size) for Progress, or None: core's previewer for the model's
    latent format, on the model's device, as core's samplers build it (None under --preview-method none)."""
    import latent_preview

    previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
    if previewer is None:
        return None
    return lambda latent: previewer.decode_latent_to_preview_image("JPEG", latent)
