"""Sizes, frame counts, latent shapes (opensora_lib.sizes) and their JSON description (size_rules)."""

from __future__ import annotations

import json

import pytest
from helpers_tables import run_table

from opensora_lib import sizes
from opensora_lib.fixtures.size_tables import _is_sizes_table, run_sizes_table
from opensora_lib.size_rules import size_rules

# ----------------------------------------------------------------------------- golden table


def _run_table() -> list:
    return run_table("sizes.json", _is_sizes_table, run_sizes_table)


def test_sizes_table_matches_official():
    comparisons = _run_table()
    failed = [f"{c.name}: {c.detail}" for c in comparisons if not c.passed]
    assert not failed, failed
    names = {c.name for c in comparisons}
    # every version and every kind of entry was recomputed
    assert len(comparisons) >= 170
    for name in (
        "v1.2/256/by_ratio_string_H_to_W",
        "v1.3/720p_16d/by_raw_ratio_key",
        "v1.3/latent_frames/decoded_frames",
    ):
        assert name in names
    for name in ("v2.0/768px/training_true", "v2.0/latent_frames/non_causal_latent_T", "v1.2/named_frame_counts"):
        assert name in names


def test_sizes_table_runner_detects_a_wrong_value(monkeypatch):
    real = sizes.latent_frames
    monkeypatch.setattr(sizes, "latent_frames", lambda v, n, **kw: real(v, n, **kw) + (n == 113))
    failed = [c for c in _run_table() if not c.passed]
    assert {c.name for c in failed} >= {"v1.2/latent_frames/latent_T", "v1.3/latent_frames/latent_T"}
    assert "113" in failed[0].detail


# ----------------------------------------------------------------------------- image sizes


@pytest.mark.parametrize(
    ("version", "resolution", "ratio", "expected"),
    [
        ("1.2", "720p", "9:16", (720, 1280)),  # 1.x strings are H:W: "9:16" is landscape
        ("1.2", "720p", "16:9", (1280, 720)),
        ("1.3", "720p", "3:4", (832, 1110)),
        ("1.3", "720p_16d", "3:4", (832, 1104)),
        ("1.3", "360p", "0.56", (360, 640)),  # raw key, 1.3 only
        ("1.3", "256", "1:2", (176, 352)),
        ("1.2", "256", "12:25", (176, 368)),
        ("2.0", "256px", "16:9", (192, 336)),  # 2.0 strings are W:H
        ("2.0", "256px", "9:16", (336, 192)),
        ("2.0", "768px", "2.39:1", (496, 1184)),
        ("2.0", "768px", "1.85:1", (560, 1040)),
        ("2.0", "720p", "9:16", (1280, 720)),
    ],
)
def test_image_size(version, resolution, ratio, expected):
    assert sizes.image_size(version, resolution, ratio) == expected


def test_v2_sizes_at_768px_match_the_reference_table():
    table = {
        "16:9": (576, 1024),
        "9:16": (1024, 576),
        "1:1": (768, 768),
        "2:1": (544, 1072),
        "4:3": (656, 880),
        "3:2": (624, 928),
    }
    for ratio, size in table.items():
        assert sizes.image_size("2.0", "768px", ratio) == size


def test_v2_any_px_name_and_training_variant():
    height, width = sizes.image_size("2.0", "384px", "1:1")
    assert (height, width) == (384, 384)
    assert sizes.num_pixels("2.0", "720p") == 921600
    # training=True (the T2I first-frame path) nudges sizes and drops ratios that repeat a size
    assert sizes.image_size("2.0", "256px", "2.39:1", training=True) == (160, 400)
    with pytest.raises(ValueError, match="repeat a size"):
        sizes.image_size("2.0", "256px", "1.85:1", training=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("1.2", "720p", "0.56"), "H:W"),  # 1.2 rejects raw keys
        (("1.2", "256", "1:2"), "not defined"),  # official 1.2 key "0.5" vs map "0.50"
        (("1.3", "720p", "7:3"), "choose one of"),
        (("1.3", "900p", "9:16"), "unknown resolution"),
        (("2.0", "256px", "1:3"), "W:H"),
        (("2.0", "abc", "16:9"), "NNNpx"),
        (("2.0", "0px", "16:9"), "NNNpx"),
        (("2.0", "8px", "16:9"), "too small"),
        (("1.4", "720p", "9:16"), "1.2, 1.3, 2.0"),
    ],
)
def test_image_size_errors(args, message):
    with pytest.raises(ValueError, match=message):
        sizes.image_size(*args)


def test_listings():
    assert len(sizes.aspect_ratios("1.2")) == 17
    assert sizes.aspect_ratios("1.3", "256") == ["12:25", "1:2", "1:1", "2:1"]
    assert sizes.aspect_ratios("1.2", "256") == ["12:25"]
    assert len(sizes.aspect_ratios("2.0")) == 15 and "1:2.39" in sizes.aspect_ratios("2.0")
    assert "720p_16d" in sizes.resolutions("1.3") and "720p_16d" not in sizes.resolutions("1.2")
    assert sizes.resolutions("2.0")[:2] == ["256px", "768px"]


def test_round_and_validate_size():
    assert sizes.round_size("2.0", 200, 301) == (208, 304)
    assert sizes.round_size("1.3", 201, 301) == (201, 301)
    sizes.validate_size("1.2", 240, 426)
    sizes.validate_size("2.0", 192, 336)
    with pytest.raises(ValueError, match="multiples of 16.*208x304"):
        sizes.validate_size("2.0", 200, 301)
    with pytest.raises(ValueError, match="multiples of 32"):
        sizes.validate_size("2.0", 192, 336, autoencoder="dc_ae")
    with pytest.raises(ValueError, match="between 16 and 8192"):
        sizes.validate_size("1.3", 8, 64)
    with pytest.raises(ValueError, match="integer"):
        sizes.validate_size("1.3", 64.0, 64)


# ----------------------------------------------------------------------------- frames and latents


def test_frame_rules():
    for n in (1, 17, 18, 51, 816):
        sizes.validate_num_frames("1.2", n)
    for n in (1, 17, 113, 129, 801):
        sizes.validate_num_frames("1.3", n)
    for n in (1, 5, 97, 129):
        sizes.validate_num_frames("2.0", n)
    for n in (1, 8, 128):
        sizes.validate_num_frames("2.0", n, autoencoder="dc_ae")
    # 4 frames make one latent frame, which the DC-AE decodes as one image (official too): refused, and why
    with pytest.raises(ValueError, match="decodes as one image"):
        sizes.validate_num_frames("2.0", 4, autoencoder="dc_ae")
    assert sizes.frames_for_latent("2.0", 1, autoencoder="dc_ae") == 1
    assert sizes.allowed_num_frames("1.3")[:8] == [1, 17, 33, 49, 65, 81, 97, 113]
    assert sizes.allowed_num_frames("2.0")[-1] == 129 and 128 not in sizes.allowed_num_frames("2.0")


@pytest.mark.parametrize(
    ("version", "frames", "message"),
    [
        ("1.2", 2, "num_frames // 17"),
        ("1.2", 16, "17 to 816"),
        ("1.2", 817, "17 to 816"),
        ("1.3", 50, "17, 33, 49, 65, 81, 97, 113"),
        ("1.3", 16, "16k\\+1"),
        ("1.3", 817, "up to 801"),
        ("2.0", 8, "4k\\+1"),
        ("2.0", 133, "129"),
        ("2.0", 0, ">= 1"),
    ],
)
def test_frame_errors(version, frames, message):
    with pytest.raises(ValueError, match=message):
        sizes.validate_num_frames(version, frames)


def test_frame_errors_for_types_and_dc_ae():
    with pytest.raises(ValueError, match="integer"):
        sizes.validate_num_frames("1.3", 17.0)
    with pytest.raises(ValueError, match="integer"):
        sizes.validate_num_frames("1.3", True)
    with pytest.raises(ValueError, match="DC-AE"):
        sizes.validate_num_frames("2.0", 129, autoencoder="dc_ae")
    with pytest.raises(ValueError, match="autoencoder"):
        sizes.validate_num_frames("2.0", 129, autoencoder="vae")


def test_named_frame_counts():
    assert sizes.parse_num_frames("1.2", "4s") == 102
    assert sizes.parse_num_frames("1.3", "16x") == 816
    assert sizes.parse_num_frames("2.0", "129") == 129
    with pytest.raises(ValueError, match="or one of 1x, 2x"):
        sizes.parse_num_frames("1.3", "3s")
    with pytest.raises(ValueError, match="integer"):
        sizes.parse_num_frames("2.0", "4s")


def test_latent_shapes_and_tokens():
    # 1.3 720p, 113 frames: 35 latent frames of 90x160, 45x80 = 3600 tokens per frame
    assert sizes.latent_shape("1.3", 113, 720, 1280) == (35, 90, 160)
    assert sizes.tokens_per_frame("1.3", 720, 1280) == 3600
    assert sizes.tokens_per_frame("1.3", 360, 640) == 23 * 40  # odd latent H is padded
    assert sizes.latent_shape("1.3", 17, 832, 1110) == (5, 104, 139)  # 1.3 rounds up
    assert sizes.latent_shape("1.2", 51, 240, 426) == (15, 30, 53)  # 1.2 floors
    assert sizes.tokens_per_frame("1.2", 240, 426) == 15 * 27
    assert sizes.latent_shape("2.0", 129, 192, 336) == (33, 24, 42)
    assert sizes.tokens_per_frame("2.0", 192, 336) == 252
    assert sizes.tokens_per_frame("2.0", 576, 1024) == 2304
    assert sizes.latent_shape("2.0", 128, 256, 256, autoencoder="dc_ae") == (32, 8, 8)
    assert sizes.latent_shape("2.0", 1, 768, 768) == (1, 96, 96)
    with pytest.raises(ValueError, match="16k\\+1"):
        sizes.latent_shape("1.3", 20, 720, 1280)


def test_v1_size_for_latent():
    """The pixel size a 1.x latent stands for (core KSampler sees only the latent): the one official table size."""
    assert sizes.v1_size_for_latent("1.3", 60, 107) == (480, 854)  # not the latent x8 (480 x 856)
    assert sizes.v1_size_for_latent("1.2", 30, 53) == (240, 426)  # 1.2 floors: 426 // 8 = 53
    assert sizes.v1_size_for_latent("1.3", 18, 32) == (144, 256)
    assert sizes.v1_size_for_latent("1.3", 18, 33) == (144, 264)  # 139 x 262 and 141 x 260 share it: x8
    assert sizes.v1_size_for_latent("1.3", 7, 9) == (56, 72)  # no table size: x8
    for version in ("1.2", "1.3"):
        for _, table in sizes.V1_TABLES[version].values():
            for height, width in table.values():
                latent_hw = sizes.v1_latent_hw(version, height, width)
                found = sizes.v1_size_for_latent(version, *latent_hw)
                assert sizes.v1_latent_hw(version, *found) == latent_hw
                assert found in ((height, width), (latent_hw[0] * 8, latent_hw[1] * 8))


def test_size_and_length_for_latent():
    """What a latent changed by a core node stands for: the longest valid length, the size its sides give."""
    assert sizes.frames_for_latent("1.3", 5) == 17 and sizes.frames_for_latent("1.3", 1) == 1
    assert sizes.frames_for_latent("1.2", 15) == 51  # the 2s preset
    assert sizes.frames_for_latent("2.0", 33) == 129
    assert sizes.frames_for_latent("2.0", 32, autoencoder="dc_ae") == 128
    with pytest.raises(ValueError, match="no Open-Sora 1.3 frame count gives 7 latent frames"):
        sizes.frames_for_latent("1.3", 7)
    assert sizes.size_for_latent("2.0", 24, 42) == (192, 336)
    assert sizes.size_for_latent("2.0", 8, 8, autoencoder="dc_ae") == (256, 256)
    assert sizes.size_for_latent("1.3", 36, 64) == (288, 512)
    with pytest.raises(ValueError, match="multiples of 16"):
        sizes.size_for_latent("2.0", 25, 42)  # a HunyuanVideo latent side is even
    for version, autoencoder in sizes.LATENT_CHOICES.values():
        for frames in sizes.allowed_num_frames(version, autoencoder=autoencoder):
            latent = sizes.latent_frames(version, frames, autoencoder=autoencoder)
            longest = sizes.frames_for_latent(version, latent, autoencoder=autoencoder)
            assert longest >= frames and sizes.latent_frames(version, longest, autoencoder=autoencoder) == latent


def test_latent_choice_is_the_inverse_of_latent_choices():
    for choice, (version, autoencoder) in sizes.LATENT_CHOICES.items():
        assert sizes.latent_choice(version, autoencoder) == choice
    assert sizes.latent_choice("1.3") == "1.3" and sizes.latent_choice("2.0") == "2.0"  # no autoencoder: HunyuanVideo
    assert sizes.latent_choice("2.0", "dc_ae") == "2.0 DC-AE"
    assert sorted(sizes.LATENT_CHANNELS) == sorted(sizes.LATENT_CHOICES)


def test_v13_decode_rule():
    assert sizes.decode_latent_frames("1.3", 113) == 35
    assert sizes.decoded_frames("1.3", 113) == 119  # official 1.3 returns 17 frames per 5 latents
    assert sizes.decoded_frames("1.3", 1) == 0  # the official script cannot decode an image
    assert sizes.decoded_frames("1.2", 102) == 102
    assert sizes.decoded_frames("2.0", 129) == 129


def test_size_rules_are_json_and_consistent():
    for version in sizes.VERSIONS:
        rules = json.loads(json.dumps(size_rules(version)))
        assert rules["version"] == version
        frames = rules["frames"]
        sizes.validate_num_frames(version, frames["max"])
        with pytest.raises(ValueError):
            sizes.validate_num_frames(version, frames["max"] + frames["step"])
        for resolution in rules["resolutions"]:
            for ratio, size in rules["sizes"][resolution].items():
                assert tuple(size) == sizes.image_size(version, resolution, ratio)
    assert size_rules("1.3")["aspect_ratio_order"] == "H:W"
    assert size_rules("2.0")["aspect_ratio_order"] == "W:H"
    assert size_rules("1.3")["frames"]["trained_max"] == 113
    assert size_rules("2.0")["first_frame_sizes"]["256px"]["1.85:1"] is None
    assert size_rules("2.0")["first_frame_sizes"]["256px"]["2.39:1"] == [160, 400]
    for version in sizes.VERSIONS:
        defaults = size_rules(version)["defaults"]
        sizes.image_size(version, defaults["resolution"], defaults["aspect_ratio"])
        sizes.validate_num_frames(version, defaults["num_frames"])
