"""Resolutions, aspect ratios, frame counts and latent sizes for Open-Sora: validation and lookups.

Versions are the strings "1.2", "1.3" and "2.0". Aspect strings are **H:W in 1.x** ("9:16" is the
landscape 720x1280 at 720p) and **W:H in 2.0** ("16:9" is landscape) -- the official quirk Q10.
Every size is (height, width). The official tables are in aspect_tables.py; size_rules.py describes all
rules as JSON for the web page; reference_image.py resizes reference images to a video size.
"""

from __future__ import annotations

from typing import Any

from .aspect_tables import PRESETS_V2, RATIO_KEYS_V1, RATIOS_V2, SIZE_STEP_V2, V1_TABLES, pixels_v2, v2_table

VERSIONS = ("1.2", "1.3", "2.0")
AUTOENCODERS_V2 = ("hunyuan", "dc_ae")
MIN_SIDE = 16
MAX_SIDE = 8192

# Named frame counts of the 1.x scripts (NUM_FRAMES_MAP).
NAMED_FRAME_COUNTS_V1 = {
    "1x": 51,
    "2x": 102,
    "4x": 204,
    "8x": 408,
    "16x": 816,
    "2s": 51,
    "4s": 102,
    "8s": 204,
    "16s": 408,
    "32s": 816,
}

# Defaults of the official inference configs (1.2 sample.py, 1.3 t2v.py, 2.0 256px.py / high_compression.py).
DEFAULTS = {
    "1.2": {"resolution": "240p", "aspect_ratio": "9:16", "num_frames": 51, "fps": 24},
    "1.3": {"resolution": "720p", "aspect_ratio": "9:16", "num_frames": 113, "fps": 24},
    "2.0": {"resolution": "256px", "aspect_ratio": "16:9", "num_frames": 129, "fps": 24, "dc_ae_num_frames": 128},
}
# high_compression.py: 768px (from 768px.py), 16:9 and fps 24 (from 256px.py), 128 frames.
DEFAULTS_DC_AE = {"resolution": "768px", "aspect_ratio": "16:9", "num_frames": 128, "fps": 24}

# The Empty Latent Video node's version choices -> (Open-Sora version, 2.0 autoencoder). "2.0" stays the
# HunyuanVideo path; "2.0 DC-AE" is the high-compression one (its LATENT says "autoencoder": "dc_ae").
LATENT_CHOICES = {
    "1.3": ("1.3", "hunyuan"),
    "1.2": ("1.2", "hunyuan"),
    "2.0": ("2.0", "hunyuan"),
    "2.0 DC-AE": ("2.0", "dc_ae"),
}
# Latent channels of each choice's VAE (1.2 VAE, 1.3 VAE, HunyuanVideo VAE, Video DC-AE).
LATENT_CHANNELS = {"1.2": 4, "1.3": 16, "2.0": 16, "2.0 DC-AE": 128}

# Frame limits: (image allowed, step, first count, largest count, trained maximum or None).
# 1.2: 816 is the longest official named count; 1.3: 801 is the largest 16k+1 within it.
_FRAME_RULES = {
    "1.2": (True, 1, 17, 816, None),
    "1.3": (True, 16, 17, 801, 113),
    "2.0": (True, 4, 5, 129, 129),
    "2.0/dc_ae": (True, 4, 8, 128, 128),  # not 4: one latent frame, which the DC-AE decodes as one image
}


def check_version(version: str) -> str:
    """The version itself if it is one of VERSIONS, else a ValueError naming them."""
    if version not in VERSIONS:
        raise ValueError(f"unknown Open-Sora version {version!r}; choose one of {', '.join(VERSIONS)}")
    return version


def check_autoencoder(autoencoder: str) -> str:
    """The 2.0 autoencoder name itself if it is one of AUTOENCODERS_V2, else a ValueError naming them."""
    if autoencoder not in AUTOENCODERS_V2:
        raise ValueError(f"unknown 2.0 autoencoder {autoencoder!r}; choose one of {', '.join(AUTOENCODERS_V2)}")
    return autoencoder


def parse_latent_choice(choice: str) -> tuple[str, str]:
    """(version, autoencoder) of an Empty Latent Video version choice, else a ValueError naming the choices."""
    if choice not in LATENT_CHOICES:
        raise ValueError(f"unknown Open-Sora latent version {choice!r}; choose one of {', '.join(LATENT_CHOICES)}")
    return LATENT_CHOICES[choice]


def latent_choice(version: str, autoencoder: str | None = None) -> str:
    """The Empty Latent Video version choice of a (version, 2.0 autoencoder) pair, the inverse of LATENT_CHOICES
    (autoencoder None: a 1.x latent, or a 2.0 one that names none, the HunyuanVideo VAE); an unknown version is
    returned as it is."""
    for choice, pair in LATENT_CHOICES.items():
        if pair == (version, autoencoder or "hunyuan"):
            return choice
    return str(version)


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """The value itself if it is an int (not a bool) >= minimum, else a ValueError saying which rule failed."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def num_pixels(version: str, resolution: str) -> int:
    """The pixel budget behind a resolution name (1.x table value, 2.0 computed from the name)."""
    if check_version(version) == "2.0":
        return pixels_v2(resolution)
    _v1_table(version, resolution)
    return V1_TABLES[version][resolution][0]


def resolutions(version: str) -> list[str]:
    """Resolution names for a version (2.0 also accepts any other 'NNNpx' / 'NNNp' name)."""
    if check_version(version) == "2.0":
        return list(PRESETS_V2)
    return list(V1_TABLES[version])


def aspect_ratios(version: str, resolution: str | None = None) -> list[str]:
    """Aspect strings: H:W for 1.x, W:H for 2.0. With `resolution`, only those defined for it."""
    if check_version(version) == "2.0":
        names = [*RATIOS_V2, *(":".join(reversed(r.split(":"))) for r in RATIOS_V2)]
        return list(dict.fromkeys(names))
    if resolution is None:
        return list(RATIO_KEYS_V1)
    table = _v1_table(version, resolution)
    return [ratio for ratio, key in RATIO_KEYS_V1.items() if key in table]


def _v1_table(version: str, resolution: str) -> dict[str, tuple[int, int]]:
    tables = V1_TABLES[version]
    if resolution not in tables:
        raise ValueError(
            f"unknown resolution {resolution!r} for Open-Sora {version}; choose one of {', '.join(tables)}"
        )
    return tables[resolution][1]


def image_size(
    version: str, resolution: str, aspect_ratio: str, *, training: bool = False, autoencoder: str = "hunyuan"
) -> tuple[int, int]:
    """(height, width) for a resolution name and aspect string, as the official get_image_size.

    2.0 only: `training=True` is the variant the T2I2V first-frame path uses (official default
    training=True there); `autoencoder="dc_ae"` snaps to 32 like the DC-AE config. The 2.0 result is
    already a multiple of 16 (the sampler's round-up changes nothing).
    """
    if check_version(version) == "2.0":
        table = v2_table(resolution, training, SIZE_STEP_V2[check_autoencoder(autoencoder)])
        if aspect_ratio not in table:
            raise ValueError(
                f"aspect ratio {aspect_ratio!r} is not available for Open-Sora 2.0 {resolution}"
                f"{' (training=True drops ratios that repeat a size)' if training else ''}; "
                f"2.0 aspect strings are W:H, choose one of {', '.join(table)}"
            )
        height, width = table[aspect_ratio]
        return round_size(version, height, width)
    table = _v1_table(version, resolution)
    if aspect_ratio in RATIO_KEYS_V1:
        key = RATIO_KEYS_V1[aspect_ratio]
    elif version == "1.3" and aspect_ratio in table:
        key = aspect_ratio  # 1.3 also takes the raw decimal keys
    else:
        allowed = ", ".join(aspect_ratios(version, resolution))
        extra = f"; 1.3 also takes the keys {', '.join(table)}" if version == "1.3" else ""
        raise ValueError(
            f"aspect ratio {aspect_ratio!r} is not available for Open-Sora {version} {resolution}; 1.x aspect strings "
            f"are H:W ('9:16' is landscape), choose one of {allowed or '(none)'}{extra}"
        )
    if key not in table:
        allowed = ", ".join(aspect_ratios(version, resolution)) or "(none of the H:W strings)"
        raise ValueError(
            f"aspect ratio {aspect_ratio!r} (key {key}) is not defined for Open-Sora {version} resolution "
            f"{resolution!r}; it has {allowed}"
        )
    return table[key]


def round_size(version: str, height: int, width: int) -> tuple[int, int]:
    """The size the sampler really uses: 2.0 rounds each side up to a multiple of 16; 1.x keeps it."""
    if check_version(version) == "2.0":
        return -(-height // 16) * 16, -(-width // 16) * 16
    return height, width


def validate_size(version: str, height: int, width: int, *, autoencoder: str = "hunyuan") -> None:
    """Raise ValueError unless (height, width) is usable: 16..8192 px; 2.0 needs multiples of 16 (DC-AE 32)."""
    check_version(version)
    for name, value in (("height", height), ("width", width)):
        check_int(name, value)
        if not MIN_SIDE <= value <= MAX_SIDE:
            raise ValueError(f"{name} must be between {MIN_SIDE} and {MAX_SIDE} pixels, got {value}")
    if version == "2.0":
        step = 32 if check_autoencoder(autoencoder) == "dc_ae" else 16
        if height % step or width % step:
            suggestion = (-(-height // step) * step, -(-width // step) * step)
            if autoencoder == "dc_ae":
                raise ValueError(
                    f"Open-Sora 2.0 with the DC-AE needs height and width that are multiples of 32 (its spatial "
                    f"compression), got {height}x{width}; try {suggestion[0]}x{suggestion[1]}"
                )
            raise ValueError(
                f"Open-Sora 2.0 needs height and width that are multiples of {step}, got "
                f"{height}x{width}; the official sampler rounds up to {suggestion[0]}x{suggestion[1]}"
            )


def parse_num_frames(version: str, value: int | str) -> int:
    """A frame count from an int, a digit string or (1.x) a named length such as "4s" -> 102."""
    check_version(version)
    if isinstance(value, str) and version != "2.0" and value in NAMED_FRAME_COUNTS_V1:
        return NAMED_FRAME_COUNTS_V1[value]
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    names = f" or one of {', '.join(NAMED_FRAME_COUNTS_V1)}" if version != "2.0" else ""
    raise ValueError(f"invalid frame count {value!r} for Open-Sora {version}: give an integer{names}")


def frame_rule(version: str, autoencoder: str) -> tuple[bool, int, int, int, int | None]:
    """(image allowed, step, first count, largest count, trained maximum or None) for a version."""
    if version == "2.0" and check_autoencoder(autoencoder) == "dc_ae":
        return _FRAME_RULES["2.0/dc_ae"]
    return _FRAME_RULES[version]


def allowed_num_frames(version: str, *, autoencoder: str = "hunyuan") -> list[int]:
    """Every frame count validate_num_frames accepts (1.2: 1 and 17..816)."""
    image, step, first, last, _trained = frame_rule(check_version(version), autoencoder)
    return ([1] if image else []) + list(range(first, last + 1, step))


def validate_num_frames(version: str, num_frames: int, *, autoencoder: str = "hunyuan") -> None:
    """Raise ValueError naming the allowed counts unless `num_frames` is valid for the version."""
    check_version(version)
    check_int("num_frames", num_frames)
    image, step, first, last, trained = frame_rule(version, autoencoder)
    if num_frames == 1 and image:
        return
    if first <= num_frames <= last and (num_frames - first) % step == 0:
        return
    if version == "1.2":
        if num_frames < 17:
            raise ValueError(
                f"Open-Sora 1.2 cannot make {num_frames} frames: its timestep shift uses num_frames // 17 * 5, which "
                "is 0 below 17 frames (the official schedule becomes NaN); use 1 (an image) or 17 to 816 frames "
                "(presets 2s=51, 4s=102, 8s=204, 16s=408)"
            )
        raise ValueError(f"Open-Sora 1.2 takes 1 or 17 to 816 frames, got {num_frames}")
    if version == "1.3":
        counts = ", ".join(str(n) for n in range(17, 114, 16))
        raise ValueError(
            f"Open-Sora 1.3 takes 1 (an image) or 16k+1 frames: {counts} (trained up to 113), or more up to {last}; "
            f"got {num_frames}"
        )
    if autoencoder == "dc_ae":
        why = " (4 frames make one latent frame, which the Video DC-AE decodes as one image)" if num_frames == 4 else ""
        raise ValueError(f"Open-Sora 2.0 with the DC-AE takes 1 or 4k frames from 8 to 128, got {num_frames}{why}")
    raise ValueError(
        f"Open-Sora 2.0 takes 1 (an image) or 4k+1 frames from 5 to 129 (5, 9, 13, ..., 125, 129), got {num_frames}"
    )


def latent_frames(version: str, num_frames: int, *, autoencoder: str = "hunyuan") -> int:
    """Latent T by the official helper formulas (no frame-count validation; 1.3 gives 0 below 17)."""
    check_version(version)
    check_int("num_frames", num_frames)
    if version == "1.2":
        # VideoAutoencoderPipeline: 5 latents per full 17-frame chunk, the rest padded to a multiple of 4
        chunks, rest = divmod(num_frames, 17)
        return chunks * 5 + -(-rest // 4)
    if num_frames == 1:
        return 1
    if version == "1.3":
        return (num_frames - 1) // 16 * 5  # micro_frame_size 17 with temporal overlap
    if check_autoencoder(autoencoder) == "hunyuan":
        return (num_frames - 1) // 4 + 1  # causal
    return num_frames // 4  # non-causal DC-AE


def decode_latent_frames(version: str, num_frames: int) -> int:
    """Latent frames the official decode step consumes: 1.3 cuts latent T to a multiple of 5 (Q6)."""
    latent = latent_frames(version, num_frames)
    return latent // 5 * 5 if version == "1.3" else latent


def decoded_frames(version: str, num_frames: int) -> int:
    """Pixel frames the official decode returns. 1.2 and 2.0 give num_frames back; 1.3 gives 17 per 5
    latents (113 -> 119) and 0 for an image -- callers must decode a single-frame latent as an image."""
    if version == "1.3":
        return decode_latent_frames(version, num_frames) * 17 // 5
    check_int("num_frames", num_frames)
    return num_frames


def latent_shape(
    version: str, num_frames: int, height: int, width: int, *, autoencoder: str = "hunyuan"
) -> tuple[int, int, int]:
    """(T, H, W) of the latent for a validated request (1.2 floors H/8, 1.3 and 2.0 round up)."""
    validate_num_frames(version, num_frames, autoencoder=autoencoder)
    validate_size(version, height, width, autoencoder=autoencoder)
    frames = latent_frames(version, num_frames, autoencoder=autoencoder)
    if version in ("1.2", "1.3"):
        return frames, *v1_latent_hw(version, height, width)
    if autoencoder == "dc_ae":
        return frames, -(-height // 32), -(-width // 32)
    return frames, 2 * -(-height // 16), 2 * -(-width // 16)  # noise is drawn as 2*ceil(H/16)


def resolve_size(choice: str, resolution: str, aspect_ratio: str, width: int, height: int) -> tuple[int, int]:
    """(height, width) for Empty Latent Video's inputs: an Empty Latent version choice's preset, or the exact size
    (both sides, validated for the choice); exactly one side set is an error."""
    version, autoencoder = parse_latent_choice(choice)
    if width and height:
        validate_size(version, height, width, autoencoder=autoencoder)
        return height, width
    if width or height:
        raise ValueError("Set both width and height for an exact size, or leave both at 0 to use the preset.")
    return image_size(version, resolution, aspect_ratio, autoencoder=autoencoder)


def v1_latent_hw(version: str, height: int, width: int) -> tuple[int, int]:
    """(H, W) of a 1.x latent for a pixel size (1.2 floors H/8, 1.3 rounds up)."""
    if version == "1.2":
        return height // 8, width // 8
    return (height - 1) // 8 + 1, (width - 1) // 8 + 1


def v1_size_for_latent(version: str, latent_height: int, latent_width: int) -> tuple[int, int]:
    """The pixel (height, width) a 1.x latent stands for, for samplers that see only the latent (core KSampler):
    the official table size with that latent size when exactly one has it (1.3 480p 9:16 is 480 x 854, latent 60 x 107),
    else the latent x 8."""
    found = {
        size
        for _, table in V1_TABLES[check_version(version)].values()
        for size in table.values()
        if v1_latent_hw(version, *size) == (latent_height, latent_width)
    }
    return found.pop() if len(found) == 1 else (latent_height * 8, latent_width * 8)


def size_for_latent(
    version: str, latent_height: int, latent_width: int, *, autoencoder: str = "hunyuan"
) -> tuple[int, int]:
    """The pixel (height, width) a latent of that size stands for: 1.x as v1_size_for_latent, 2.0 the latent x8
    (x32 for the DC-AE). Raises ValueError when no valid size gives it (e.g. an odd 2.0 latent side)."""
    if check_version(version) == "2.0":
        scale = 32 if check_autoencoder(autoencoder) == "dc_ae" else 8
        height, width = latent_height * scale, latent_width * scale
    else:
        height, width = v1_size_for_latent(version, latent_height, latent_width)
    validate_size(version, height, width, autoencoder=autoencoder)
    return height, width


def frames_for_latent(version: str, frames: int, *, autoencoder: str = "hunyuan") -> int:
    """The longest valid frame count with `frames` latent frames (one latent frame: an image). Raises ValueError
    when none has it (1.3 makes latent lengths in multiples of 5)."""
    found = [
        n
        for n in allowed_num_frames(version, autoencoder=autoencoder)
        if latent_frames(version, n, autoencoder=autoencoder) == frames
    ]
    if not found:
        raise ValueError(f"no Open-Sora {version} frame count gives {frames} latent frames")
    return max(found)


def tokens_per_frame(version: str, height: int, width: int, *, autoencoder: str = "hunyuan") -> int:
    """Transformer tokens per latent frame (1.x: latent / patch 2, padded up; 2.0: ceil(H/16)*ceil(W/16))."""
    check_version(version)
    check_int("height", height)
    check_int("width", width)
    if version in ("1.2", "1.3"):
        latent_h, latent_w = v1_latent_hw(version, height, width)
    else:
        step = 32 if check_autoencoder(autoencoder) == "dc_ae" else 16
        return -(-height // step) * -(-width // step)
    return -(-latent_h // 2) * -(-latent_w // 2)
