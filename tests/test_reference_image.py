"""The reference-image resize-to-fill and center crop (opensora_lib.reference_image)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from opensora_lib.reference_image import resize_crop


def _to_unit(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).float() / 255.0


def test_resize_crop_crops_centre_without_resizing():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(4, 8, 3), dtype=np.uint8)
    out = resize_crop(_to_unit(pixels), 4, 4)
    assert out.shape == (1, 3, 4, 4)
    expected = torch.from_numpy(pixels[:, 2:6]).permute(2, 0, 1).float() / 255 * 2 - 1
    assert torch.allclose(out[0], expected, atol=1e-6)
    # round-half-to-even offset: 5 -> 4 columns starts at column 0 (round(0.5) == 0)
    odd = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    out = resize_crop(_to_unit(odd), 4, 4)
    assert torch.allclose(out[0], torch.from_numpy(odd[:, :4]).permute(2, 0, 1).float() / 255 * 2 - 1, atol=1e-6)


def test_resize_crop_follows_pil_bicubic_fill():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    # 30x50 -> fill 64x64: scale 64/30 on H, width round(50 * 64/30) = 107, left offset round(21.5) = 22
    resized = np.array(Image.fromarray(pixels).resize((107, 64), Image.BICUBIC))[:, 22:86]
    expected = (torch.from_numpy(resized).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    out = resize_crop(_to_unit(pixels), 64, 64)
    assert torch.equal(out[0], expected)
    assert torch.equal(resize_crop(Image.fromarray(pixels), 64, 64)[0], expected)
    torch_path = resize_crop(_to_unit(pixels), 64, 64, method="torch")
    diff = (torch_path - out).abs() * 127.5
    assert diff.max() <= 1.0 + 1e-4
    assert (diff > 0.01).float().mean() < 0.01


def test_resize_crop_batch_and_errors():
    torch.manual_seed(0)
    batch = torch.rand(3, 20, 30, 3)
    out = resize_crop(batch, 16, 16)
    assert out.shape == (3, 3, 16, 16) and out.min() >= -1 and out.max() <= 1
    with pytest.raises(ValueError, match="IMAGE tensor"):
        resize_crop(torch.rand(3, 20, 30), 16, 16)
    with pytest.raises(ValueError, match="method"):
        resize_crop(batch, 16, 16, method="nearest")
    with pytest.raises(ValueError, match="height"):
        resize_crop(batch, 0, 16)


def test_video_references_follow_the_official_video_transform():
    """v2v_* references are read as the official code reads a video file: bilinear F.interpolate (no antialias) on
    the 8-bit frames /255, crop offset int(round(diff) / 2) (floor), no 8-bit rounding after the resize."""
    from opensora_lib.reference_image import resize_crop_reference, resize_crop_video

    torch.manual_seed(0)
    frames = torch.randint(0, 256, (3, 20, 37, 3), dtype=torch.uint8)
    image = frames.float() / 255
    out = resize_crop_video(image, 8, 12)  # 8/20 > 12/37: the height fills, 8 x round(37 * 0.4) = 8 x 15
    expected = F.interpolate(frames.permute(0, 3, 1, 2).float() / 255, size=(8, 15), mode="bilinear")
    expected = (expected[:, :, :, 1:13] - 0.5) / 0.5  # diff 3: offset 1 (the image path rounds 1.5 to 2)
    assert out.shape == (3, 3, 8, 12)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert not torch.equal(out, resize_crop(image, 8, 12))  # the image path: PIL bicubic, another offset
    assert torch.equal(resize_crop_reference(image, 8, 12, "v2v_head"), out)
    assert torch.equal(resize_crop_reference(image, 8, 12, "i2v_head"), resize_crop(image, 8, 12))
    # the covering size rounds src * (target / src) as the official code: 720 x 1280 into 452 x 904 is 509 high
    # (720 * 904 / 1280 would round to 508)
    tall = resize_crop_video(torch.zeros(1, 720, 1280, 3), 452, 904)
    assert tall.shape == (1, 3, 452, 904)
    from opensora_lib.reference_image import _fill_geometry

    assert _fill_geometry(720, 1280, 452, 904)[:2] == (509, 904) and round(720 * 904 / 1280) == 508
    same = resize_crop_video(image, 20, 37)  # no resize, no crop: the frames themselves
    torch.testing.assert_close(same, (image.permute(0, 3, 1, 2) - 0.5) / 0.5, rtol=0, atol=1e-6)
