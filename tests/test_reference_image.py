"""The reference-image resize-to-fill and center crop, and which images a condition uses and where a 1.x reference
lands (opensora_lib.reference_image)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from opensora_lib.reference_image import (
    encode_image_condition,
    mask_index_for,
    resize_crop,
    with_end_image,
)


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


def _encoder(calls: list[int]):
    """encode_one for encode_image_condition: image i -> a [1, 2, 1, 1, 1] latent holding i; records the calls."""

    def encode_one(i: int) -> torch.Tensor:
        calls.append(i)
        return torch.full((1, 2, 1, 1, 1), float(i))

    return encode_one


def _frames(reference: torch.Tensor) -> list[list[int]]:
    """Which image each latent frame of each row came from."""
    return [[int(v) for v in row[0, :, 0, 0]] for row in reference]


@pytest.mark.parametrize(
    "cond_type, count, picked, calls",
    [
        ("i2v_head", 1, [0], [0]),
        ("i2v_head", 3, [0], [0]),
        ("frame_index", 3, [0], [0]),
        ("i2v_tail", 3, [2], [2]),
        ("i2v_loop", 3, [0, 2], [0, 2]),  # start, end: the posterior noise is drawn for the first, then the last
        ("i2v_loop", 1, [0, 0], [0]),  # one image at both ends, encoded once
    ],
)
def test_an_image_condition_picks_its_images_for_every_video(cond_type, count, picked, calls, caplog):
    made: list[int] = []
    with caplog.at_level(logging.WARNING, logger="OpenSora"):
        reference = encode_image_condition(_encoder(made), count, cond_type, "1.3", rows=2)
    assert reference.shape == (1, 2, len(picked), 1, 1)  # one row, shared by the batch
    assert _frames(reference) == [picked] and made == calls
    warned = [r.getMessage() for r in caplog.records if "Encode Reference" in r.getMessage()]
    assert bool(warned) == (count > len(set(picked)))
    if warned:
        assert f"of the {count} images" in warned[0] and "give " in warned[0], warned  # how to give one per video


def test_one_image_per_video_gives_each_video_its_own():
    assert _frames(encode_image_condition(_encoder([]), 3, "i2v_head", "2.0", rows=3)) == [[0], [1], [2]]
    assert _frames(encode_image_condition(_encoder([]), 3, "i2v_tail", "2.0", rows=3)) == [[0], [1], [2]]
    # i2v_loop: the rows' start images, then their end images
    assert _frames(encode_image_condition(_encoder([]), 4, "i2v_loop", "1.3", rows=2)) == [[0, 2], [1, 3]]
    # not one per video (3 images, 2 videos): the shared pick
    assert _frames(encode_image_condition(_encoder([]), 3, "i2v_loop", "1.3", rows=2)) == [[0, 2]]


def test_a_1x_reference_lands_on_the_official_frames():
    assert mask_index_for("i2v_head", 10, 1, 0) == [0]
    assert mask_index_for("i2v_tail", 10, 1, 0) == [9]
    assert mask_index_for("i2v_loop", 10, 2, 0) == [0, 9]
    assert mask_index_for("v2v_head", 10, 3, 0) == [0, 1, 2]
    assert mask_index_for("v2v_head", 10, 8, 0) == [0, 1, 2, 3, 4]  # at most 5 latent frames (official)
    assert mask_index_for("frame_index", 10, 1, 7) == [7]
    with pytest.raises(ValueError, match="frame_index 10 is outside the latent's 10 frames"):
        mask_index_for("frame_index", 10, 1, 10)


def test_with_end_image_fits_the_start_and_end_images():
    start = torch.rand(1, 12, 20, 3)
    ends = torch.rand(2, 30, 10, 3)  # another size: each is fitted on its own
    pair = with_end_image(start, ends, 8, 8)
    assert pair.shape == (2, 8, 8, 3)  # the IMAGE layout, the last end image only
    torch.testing.assert_close(pair[1:], (resize_crop(ends[-1:], 8, 8) + 1).div(2).movedim(1, -1))
    torch.testing.assert_close(with_end_image(pair[:1], pair[1:], 8, 8), pair, rtol=0, atol=1e-6)  # refit: exact
    per_video = with_end_image(torch.rand(2, 12, 20, 3), ends, 8, 8, rows=2)
    assert per_video.shape == (4, 8, 8, 3)  # starts, then every end image: each video its own pair
