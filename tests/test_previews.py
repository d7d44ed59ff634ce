"""The principal-component preview (opensora_lib.previews): the picture core's previewers show for latents with no
published latent->RGB factors."""

from __future__ import annotations

import torch

from opensora_lib.previews import PREVIEW_ELEMENTS, principal_components


def test_the_picture_is_in_channels_0_to_2_and_spans_minus_one_to_one():
    latent = torch.randn(2, 16, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    picture = principal_components(latent)
    scale = 256 // 12
    assert picture.shape == (1, 16, 1, 8 * scale, 12 * scale)  # scaled up nearest-neighbour
    for channel in range(3):
        assert picture[0, channel].min() == -1 and picture[0, channel].max() == 1
    assert not picture[0, 3:].any()
    small = principal_components(latent[:1, :, :1])  # the first frame of the first sample only
    torch.testing.assert_close(small, picture)


def test_few_channels_a_4d_latent_and_non_finite_values():
    picture = principal_components(torch.randn(1, 2, 6, 6))  # [B, C, H, W]; 2 channels: a zero third component
    assert picture.shape[:3] == (1, 3, 1) and torch.isfinite(picture).all()
    latent = torch.randn(1, 4, 1, 5, 5)
    latent[0, 0, 0, 0, 0] = float("nan")
    assert torch.isfinite(principal_components(latent)).all()


def test_large_latents_stay_within_the_element_budget():
    picture = principal_components(torch.randn(1, 128, 1, 24, 40))  # DC-AE: 128 channels, a few pixels a side
    assert 24 < picture.shape[-2] and picture.numel() <= PREVIEW_ELEMENTS
