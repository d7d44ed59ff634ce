"""Resolutions, aspect ratios, frame counts, latent sizes and the reference-image resize for Open-Sora.

Versions are the strings "1.2", "1.3" and "2.0". Aspect strings are **H:W in 1.x** ("9:16" is the
landscape 720x1280 at 720p) and **W:H in 2.0** ("16:9" is landscape) -- the official quirk Q10.
Every size is (height, width). `size_rules(version)` describes all rules as JSON for the web page.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F

VERSIONS = ("1.2", "1.3", "2.0")
AUTOENCODERS_V2 = ("hunyuan", "dc_ae")
MIN_SIDE = 16
MAX_SIDE = 8192

# ---------------------------------------------------------------------------------------------
# 1.x tables (official opensora/datasets/aspect.py, identical in v1.2.0 and v1.3)
# ---------------------------------------------------------------------------------------------

# H:W strings and the table key each one selects.
_RATIO_KEYS_V1 = {
    "3:8": "0.38",
    "9:21": "0.43",
    "12:25": "0.48",
    "1:2": "0.50",
    "9:17": "0.53",
    "27:50": "0.54",
    "9:16": "0.56",
    "5:8": "0.62",
    "2:3": "0.67",
    "3:4": "0.75",
    "1:1": "1.00",
    "4:3": "1.33",
    "3:2": "1.50",
    "16:9": "1.78",
    "17:9": "1.89",
    "2:1": "2.00",
    "50:27": "2.08",
}

# "p" presets: name, total pixels, then HxW for each key of _RATIO_KEYS_V1 in order.
_P_TABLES_TEXT = """
144p 36864 117x312 125x291 133x277 135x270 139x262 141x260 144x256 151x241 156x234 166x221 192x192 221x165 235x156 256x144 263x139 271x135 277x132
240p 102240 196x522 210x490 222x462 226x452 232x438 236x436 240x426 252x404 262x393 276x368 320x320 370x278 392x262 426x240 440x232 452x226 462x222
360p 230400 294x784 314x732 332x692 340x680 350x662 352x652 360x640 380x608 392x588 416x554 480x480 554x416 588x392 640x360 660x350 678x340 692x332
480p 409920 392x1046 420x980 444x925 452x904 466x880 470x870 480x854 506x810 522x784 554x738 640x640 740x555 784x522 854x480 880x466 906x454 924x444
720p 921600 588x1568 628x1466 666x1388 678x1356 698x1318 706x1306 720x1280 758x1212 784x1176 832x1110 960x960 1108x832 1176x784 1280x720 1320x698 1358x680 1386x666
1080p 2073600 882x2352 942x2198 998x2080 1018x2036 1048x1980 1058x1958 1080x1920 1138x1820 1176x1764 1248x1664 1440x1440 1662x1246 1764x1176 1920x1080 1980x1048 2036x1018 2078x998
2k 3686400 1176x3136 1256x2930 1330x2770 1358x2716 1398x2640 1412x2612 1440x2560 1518x2428 1568x2352 1662x2216 1920x1920 2218x1664 2352x1568 2560x1440 2638x1396 2716x1358 2772x1330
4k 8294400 1764x4704 1886x4400 1996x4158 2036x4072 2096x3960 2118x3918 2160x3840 2276x3642 2352x3528 2494x3326 2880x2880 3326x2494 3528x2352 3840x2160 3958x2096 4072x2036 4156x1994
"""
_P_TABLES = {
    name: (int(pixels), sizes)
    for name, pixels, sizes in (line.split(" ", 2) for line in _P_TABLES_TEXT.split("\n") if line)
}

# PixArt presets: "ratio=HxW". 512, 1024 and 2048 are the 256 table scaled by 2, 4 and 8.
_PIXART_256 = (
    "0.25=128x512 0.26=128x496 0.27=128x480 0.28=128x464 0.32=144x448 0.33=144x432 0.35=144x416 0.40=160x400 "
    "0.42=160x384 0.48=176x368 0.50=176x352 0.52=176x336 0.57=192x336 0.60=192x320 0.68=208x304 0.72=208x288 "
    "0.78=224x288 0.82=224x272 0.88=240x272 0.94=240x256 1.00=256x256 1.07=256x240 1.13=272x240 1.21=272x224 "
    "1.29=288x224 1.38=288x208 1.46=304x208 1.67=320x192 1.75=336x192 2.00=352x176 2.09=368x176 2.40=384x160 "
    "2.50=400x160 2.89=416x144 3.00=432x144 3.11=448x144 3.62=464x128 3.75=480x128 3.88=496x128 4.00=512x128"
)
_PIXART_2880 = (
    "0.25=1408x5760 0.26=1408x5568 0.27=1408x5376 0.28=1408x5184 0.32=1600x4992 0.33=1600x4800 0.34=1600x4672 "
    "0.40=1792x4480 0.42=1792x4288 0.47=1920x4096 0.49=1920x3904 0.51=1920x3776 0.55=2112x3840 0.59=2112x3584 "
    "0.68=2304x3392 0.72=2304x3200 0.78=2496x3200 0.83=2496x3008 0.89=2688x3008 0.93=2688x2880 1.00=2880x2880 "
    "1.07=2880x2688 1.12=3008x2688 1.21=3008x2496 1.28=3200x2496 1.39=3200x2304 1.47=3392x2304 1.70=3584x2112 "
    "1.82=3840x2112 2.03=3904x1920 2.13=4096x1920 2.39=4288x1792 2.50=4480x1792 2.92=4672x1600 3.00=4800x1600 "
    "3.12=4992x1600 3.68=5184x1408 3.82=5376x1408 3.95=5568x1408 4.00=5760x1408"
)
_RESOLUTIONS_V1 = ("144p", "256", "240p", "360p", "512", "480p", "720p", "1024", "1080p", "2k", "2048", "2880", "4k")
_TRAINED_V1 = {"1.2": ["144p", "240p", "360p", "480p", "720p"], "1.3": ["360p", "720p"]}

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


def _hw(text: str) -> tuple[int, int]:
    height, width = text.split("x")
    return int(height), int(width)


def _pixart_table(spec: str, scale: int, key_format) -> dict[str, tuple[int, int]]:
    table = {}
    for item in spec.split():
        ratio, size = item.split("=")
        height, width = _hw(size)
        table[key_format(float(ratio))] = (height * scale, width * scale)
    return table


def _build_v1_tables(version: str) -> dict[str, tuple[int, dict[str, tuple[int, int]]]]:
    # Official quirk: the v1.2.0 PixArt tables are keyed "0.4", "1.0" ... (so "1:2" -> "0.50" misses
    # them), v1.3 rewrote those keys with two decimals.
    pixart_key = str if version == "1.2" else (lambda ratio: f"{ratio:.2f}")
    tables: dict[str, tuple[int, dict[str, tuple[int, int]]]] = {}
    for name in _RESOLUTIONS_V1:
        if name in _P_TABLES:
            pixels, sizes = _P_TABLES[name]
            tables[name] = (pixels, dict(zip(_RATIO_KEYS_V1.values(), map(_hw, sizes.split()))))
        elif name == "2880":
            tables[name] = (8294400, _pixart_table(_PIXART_2880, 1, pixart_key))
        else:
            scale = int(name) // 256
            tables[name] = (int(name) ** 2, _pixart_table(_PIXART_256, scale, pixart_key))
    if version == "1.3":
        # 1.3 adds "<name>_16d": every size rounded down to a multiple of 16.
        for name in _RESOLUTIONS_V1:
            pixels, table = tables[name]
            tables[f"{name}_16d"] = (pixels, {k: (h // 16 * 16, w // 16 * 16) for k, (h, w) in table.items()})
    return tables


_V1_TABLES = {version: _build_v1_tables(version) for version in ("1.2", "1.3")}

# ---------------------------------------------------------------------------------------------
# 2.0 rules (official opensora/datasets/aspect.py on main): sizes are computed, not tabulated
# ---------------------------------------------------------------------------------------------

# W:H strings in the official order; each also gets its transposed twin ("9:16" <-> "16:9").
_RATIOS_V2 = ("2.39:1", "2:1", "16:9", "1.85:1", "9:16", "5:8", "3:2", "4:3", "1:1")
_PRESETS_V2 = ("256px", "768px", "512px", "1024px", "360p", "480p", "720p", "1080p")
_TRAINED_V2 = ["256px", "768px"]
# Spatial factor the size grid snaps to (official AE_SPATIAL_COMPRESSION: 16, or 32 for the DC-AE config).
_SIZE_STEP_V2 = {"hunyuan": 16, "dc_ae": 32}

# Defaults of the official inference configs (1.2 sample.py, 1.3 t2v.py, 2.0 256px.py / high_compression.py).
_DEFAULTS = {
    "1.2": {"resolution": "240p", "aspect_ratio": "9:16", "num_frames": 51, "fps": 24},
    "1.3": {"resolution": "720p", "aspect_ratio": "9:16", "num_frames": 113, "fps": 24},
    "2.0": {"resolution": "256px", "aspect_ratio": "16:9", "num_frames": 129, "fps": 24, "dc_ae_num_frames": 128},
}

# Frame limits: (image allowed, step, first count, largest count, trained maximum or None).
# 1.2: 816 is the longest official named count; 1.3: 801 is the largest 16k+1 within it.
_FRAME_RULES = {
    "1.2": (True, 1, 17, 816, None),
    "1.3": (True, 16, 17, 801, 113),
    "2.0": (True, 4, 5, 129, 129),
    "2.0/dc_ae": (True, 4, 4, 128, 128),
}


def _check_version(version: str) -> str:
    if version not in VERSIONS:
        raise ValueError(f"unknown Open-Sora version {version!r}; choose one of {', '.join(VERSIONS)}")
    return version


def _check_autoencoder(autoencoder: str) -> str:
    if autoencoder not in AUTOENCODERS_V2:
        raise ValueError(f"unknown 2.0 autoencoder {autoencoder!r}; choose one of {', '.join(AUTOENCODERS_V2)}")
    return autoencoder


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def pixels_v2(resolution: str) -> int:
    """Total pixels of a 2.0 resolution name: "NNNpx" is NNN^2, "NNNp" is NNN^2 * 16/9 (truncated)."""
    match = re.fullmatch(r"([1-9][0-9]*)(px|p)", resolution) if isinstance(resolution, str) else None
    if match is None:
        raise ValueError(
            f"invalid Open-Sora 2.0 resolution {resolution!r}: use 'NNNpx' (NNN x NNN pixels, e.g. 256px, 768px) "
            "or 'NNNp' (NNN^2 * 16/9 pixels, e.g. 720p)"
        )
    size = int(match.group(1))
    # Same float expression as the official code, so the truncation matches.
    return size * size if match.group(2) == "px" else int(size * size / 9 * 16)


def _v2_table(resolution: str, training: bool, step: int) -> dict[str, tuple[int, int]]:
    pixels = pixels_v2(resolution)
    table: dict[str, tuple[int, int]] = {}
    transposed: dict[str, tuple[int, int]] = {}
    for ratio in _RATIOS_V2:
        ratio_w, ratio_h = (float(part) for part in ratio.split(":"))
        width = int(math.sqrt(pixels * (ratio_w / ratio_h)) // step) * step
        if width == 0:
            raise ValueError(f"resolution {resolution!r} is too small: ratio {ratio} gives a zero width")
        height = int((pixels / width) // step) * step
        if height == 0:
            raise ValueError(f"resolution {resolution!r} is too small: ratio {ratio} gives a zero height")
        if training:
            # training=True nudges one side by a step towards the pixel budget
            best = abs(height * width - pixels)
            for h, w in (
                (height - step, width),
                (height + step, width),
                (height, width - step),
                (height, width + step),
            ):
                if abs(h * w - pixels) < best:
                    height, width, best = h, w, abs(h * w - pixels)
        # Official: training=True drops a ratio whose size repeats an earlier one (checked among the
        # listed ratios only, before the transposed twins are merged in).
        if not training or (height, width) not in table.values():
            table[ratio] = (height, width)
            transposed[":".join(reversed(ratio.split(":")))] = (width, height)
    # The twins overwrite: W:H "9:16" ends up as the transpose of the "16:9" computation and vice versa.
    table.update(transposed)
    return table


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def num_pixels(version: str, resolution: str) -> int:
    """The pixel budget behind a resolution name (1.x table value, 2.0 computed from the name)."""
    if _check_version(version) == "2.0":
        return pixels_v2(resolution)
    _v1_table(version, resolution)
    return _V1_TABLES[version][resolution][0]


def resolutions(version: str) -> list[str]:
    """Resolution names for a version (2.0 also accepts any other 'NNNpx' / 'NNNp' name)."""
    if _check_version(version) == "2.0":
        return list(_PRESETS_V2)
    return list(_V1_TABLES[version])


def aspect_ratios(version: str, resolution: str | None = None) -> list[str]:
    """Aspect strings: H:W for 1.x, W:H for 2.0. With `resolution`, only those defined for it."""
    if _check_version(version) == "2.0":
        names = [*_RATIOS_V2, *(":".join(reversed(r.split(":"))) for r in _RATIOS_V2)]
        return list(dict.fromkeys(names))
    if resolution is None:
        return list(_RATIO_KEYS_V1)
    table = _v1_table(version, resolution)
    return [ratio for ratio, key in _RATIO_KEYS_V1.items() if key in table]


def raw_ratio_keys(version: str, resolution: str) -> list[str]:
    """The decimal table keys 1.3 also accepts as aspect strings ("0.56", ...); 1.2 accepts none."""
    if _check_version(version) != "1.3":
        return []
    return list(_v1_table(version, resolution))


def _v1_table(version: str, resolution: str) -> dict[str, tuple[int, int]]:
    tables = _V1_TABLES[version]
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
    if _check_version(version) == "2.0":
        table = _v2_table(resolution, training, _SIZE_STEP_V2[_check_autoencoder(autoencoder)])
        if aspect_ratio not in table:
            raise ValueError(
                f"aspect ratio {aspect_ratio!r} is not available for Open-Sora 2.0 {resolution}"
                f"{' (training=True drops ratios that repeat a size)' if training else ''}; "
                f"2.0 aspect strings are W:H, choose one of {', '.join(table)}"
            )
        height, width = table[aspect_ratio]
        return round_size(version, height, width)
    table = _v1_table(version, resolution)
    if aspect_ratio in _RATIO_KEYS_V1:
        key = _RATIO_KEYS_V1[aspect_ratio]
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
    if _check_version(version) == "2.0":
        return -(-height // 16) * 16, -(-width // 16) * 16
    return height, width


def validate_size(version: str, height: int, width: int, *, autoencoder: str = "hunyuan") -> None:
    """Raise ValueError unless (height, width) is usable: 16..8192 px; 2.0 needs multiples of 16 (DC-AE 32)."""
    _check_version(version)
    for name, value in (("height", height), ("width", width)):
        _check_int(name, value)
        if not MIN_SIDE <= value <= MAX_SIDE:
            raise ValueError(f"{name} must be between {MIN_SIDE} and {MAX_SIDE} pixels, got {value}")
    if version == "2.0":
        step = 32 if _check_autoencoder(autoencoder) == "dc_ae" else 16
        if height % step or width % step:
            suggestion = (-(-height // step) * step, -(-width // step) * step)
            raise ValueError(
                f"Open-Sora 2.0 ({autoencoder}) needs height and width that are multiples of {step}, got "
                f"{height}x{width}; the official sampler rounds up to {suggestion[0]}x{suggestion[1]}"
            )


def parse_num_frames(version: str, value: int | str) -> int:
    """A frame count from an int, a digit string or (1.x) a named length such as "4s" -> 102."""
    _check_version(version)
    if isinstance(value, str) and version != "2.0" and value in NAMED_FRAME_COUNTS_V1:
        return NAMED_FRAME_COUNTS_V1[value]
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    names = f" or one of {', '.join(NAMED_FRAME_COUNTS_V1)}" if version != "2.0" else ""
    raise ValueError(f"invalid frame count {value!r} for Open-Sora {version}: give an integer{names}")


def _frame_rule(version: str, autoencoder: str) -> tuple[bool, int, int, int, int | None]:
    if version == "2.0" and _check_autoencoder(autoencoder) == "dc_ae":
        return _FRAME_RULES["2.0/dc_ae"]
    return _FRAME_RULES[version]


def allowed_num_frames(version: str, *, autoencoder: str = "hunyuan") -> list[int]:
    """Every frame count validate_num_frames accepts (1.2: 1 and 17..816)."""
    image, step, first, last, _trained = _frame_rule(_check_version(version), autoencoder)
    return ([1] if image else []) + list(range(first, last + 1, step))


def validate_num_frames(version: str, num_frames: int, *, autoencoder: str = "hunyuan") -> None:
    """Raise ValueError naming the allowed counts unless `num_frames` is valid for the version."""
    _check_version(version)
    _check_int("num_frames", num_frames)
    image, step, first, last, trained = _frame_rule(version, autoencoder)
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
        raise ValueError(f"Open-Sora 2.0 with the DC-AE takes 1 or 4k frames from 4 to 128, got {num_frames}")
    raise ValueError(
        f"Open-Sora 2.0 takes 1 (an image) or 4k+1 frames from 5 to 129 (5, 9, 13, ..., 125, 129), got {num_frames}"
    )


def num_frames_warning(version: str, num_frames: int) -> str | None:
    """A warning for valid counts beyond what the model was trained on (1.3 above 113), else None."""
    _check_version(version)
    trained = _FRAME_RULES[version][4]
    if version == "1.3" and trained is not None and num_frames > trained:
        return f"Open-Sora 1.3 was trained on at most {trained} frames; {num_frames} frames may lose quality"
    return None


def latent_frames(version: str, num_frames: int, *, autoencoder: str = "hunyuan") -> int:
    """Latent T by the official helper formulas (no frame-count validation; 1.3 gives 0 below 17)."""
    _check_version(version)
    _check_int("num_frames", num_frames)
    if version == "1.2":
        # VideoAutoencoderPipeline: 5 latents per full 17-frame chunk, the rest padded to a multiple of 4
        chunks, rest = divmod(num_frames, 17)
        return chunks * 5 + -(-rest // 4)
    if num_frames == 1:
        return 1
    if version == "1.3":
        return (num_frames - 1) // 16 * 5  # micro_frame_size 17 with temporal overlap
    if _check_autoencoder(autoencoder) == "hunyuan":
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
    _check_int("num_frames", num_frames)
    return num_frames


def latent_shape(
    version: str, num_frames: int, height: int, width: int, *, autoencoder: str = "hunyuan"
) -> tuple[int, int, int]:
    """(T, H, W) of the latent for a validated request (1.2 floors H/8, 1.3 and 2.0 round up)."""
    validate_num_frames(version, num_frames, autoencoder=autoencoder)
    validate_size(version, height, width, autoencoder=autoencoder)
    frames = latent_frames(version, num_frames, autoencoder=autoencoder)
    if version == "1.2":
        return frames, height // 8, width // 8
    if version == "1.3":
        return frames, (height - 1) // 8 + 1, (width - 1) // 8 + 1
    if autoencoder == "dc_ae":
        return frames, -(-height // 32), -(-width // 32)
    return frames, 2 * -(-height // 16), 2 * -(-width // 16)  # noise is drawn as 2*ceil(H/16)


def tokens_per_frame(version: str, height: int, width: int, *, autoencoder: str = "hunyuan") -> int:
    """Transformer tokens per latent frame (1.x: latent / patch 2, padded up; 2.0: ceil(H/16)*ceil(W/16))."""
    _check_version(version)
    _check_int("height", height)
    _check_int("width", width)
    if version == "1.2":
        latent_h, latent_w = height // 8, width // 8
    elif version == "1.3":
        latent_h, latent_w = (height - 1) // 8 + 1, (width - 1) // 8 + 1
    else:
        step = 32 if _check_autoencoder(autoencoder) == "dc_ae" else 16
        return -(-height // step) * -(-width // step)
    return -(-latent_h // 2) * -(-latent_w // 2)


def size_rules(version: str) -> dict:
    """Every size / frame / latent rule of a version as plain JSON data (the web page's single source)."""
    _check_version(version)
    if version == "2.0":
        sizes, first_frame_sizes = {}, {}
        for resolution in _PRESETS_V2:
            first_frame = _v2_table(resolution, True, 16)
            sizes[resolution] = {
                ratio: list(image_size(version, resolution, ratio)) for ratio in aspect_ratios(version)
            }
            # The T2I2V first frame uses the training=True sizes; null where that drops the ratio.
            first_frame_sizes[resolution] = {
                r: list(first_frame[r]) if r in first_frame else None for r in sizes[resolution]
            }
        return {
            "version": version,
            "defaults": _DEFAULTS[version],
            "aspect_ratio_order": "W:H",
            "resolutions": resolutions(version),
            "trained_resolutions": list(_TRAINED_V2),
            "resolution_pattern": {"px": "NNNpx = NNN*NNN pixels", "p": "NNNp = floor(NNN*NNN/9*16) pixels"},
            "aspect_ratios": aspect_ratios(version),
            "size_algorithm": {
                "ratios_w_to_h": list(_RATIOS_V2),
                "step": 16,
                "width": "floor(sqrt(pixels * w/h) / step) * step",
                "height": "floor(pixels / width / step) * step",
                "transposed_ratios": "the H:W twin of each ratio gets (width, height) and overrides",
            },
            "sizes": sizes,
            "first_frame_sizes": first_frame_sizes,
            "round_up_to": 16,
            "size_limits": {"min": MIN_SIDE, "max": MAX_SIDE, "multiple_of": 16},
            "autoencoders": {
                "hunyuan": {
                    "default": True,
                    "causal": True,
                    "channels": 16,
                    "spatial_compression": 8,
                    "patch_size": 2,
                    "latent_frames": "1 if n == 1 else (n - 1) // 4 + 1",
                    "latent_hw": "2*ceil(H/16), 2*ceil(W/16)",
                    "tokens_per_frame": "ceil(H/16) * ceil(W/16)",
                    "frames": _frames_json("2.0", "hunyuan"),
                },
                "dc_ae": {
                    "default": False,
                    "causal": False,
                    "channels": 128,
                    "spatial_compression": 32,
                    "patch_size": 1,
                    "size_step": 32,
                    "latent_frames": "1 if n == 1 else n // 4",
                    "latent_hw": "ceil(H/32), ceil(W/32)",
                    "tokens_per_frame": "ceil(H/32) * ceil(W/32)",
                    "frames": _frames_json("2.0", "dc_ae"),
                },
            },
            "frames": _frames_json("2.0", "hunyuan"),
            "decode": "the decoder output is cut to num_frames",
        }
    tables = _V1_TABLES[version]
    sizes = {
        name: {ratio: list(image_size(version, name, ratio)) for ratio in aspect_ratios(version, name)}
        for name in tables
    }
    rules: dict[str, Any] = {
        "version": version,
        "defaults": _DEFAULTS[version],
        "aspect_ratio_order": "H:W",
        "resolutions": resolutions(version),
        "trained_resolutions": list(_TRAINED_V1[version]),
        "aspect_ratios": aspect_ratios(version),
        "ratio_keys": dict(_RATIO_KEYS_V1),
        "raw_ratio_keys_allowed": version == "1.3",
        "sizes": sizes,
        "size_limits": {"min": MIN_SIDE, "max": MAX_SIDE, "multiple_of": 1},
        "frames": _frames_json(version, "hunyuan"),
        "named_frame_counts": dict(NAMED_FRAME_COUNTS_V1),
    }
    if version == "1.3":
        rules["raw_sizes"] = {name: {k: list(v) for k, v in table.items()} for name, (_pixels, table) in tables.items()}
        rules["latent"] = {
            "channels": 16,
            "latent_frames": "1 if n == 1 else (n - 1) // 16 * 5",
            "latent_hw": "(H - 1) // 8 + 1, (W - 1) // 8 + 1",
            "patch_size": [1, 2, 2],
            "tokens_per_frame": "ceil(latent_h / 2) * ceil(latent_w / 2)",
        }
        rules["decode"] = {
            "latent_frames": "latent_T // 5 * 5",
            "pixel_frames": "decode_latent_T * 17 // 5 (113 -> 119); an image is decoded as one frame",
            "pixel_size": "latent * 8 (never cropped back: 832x1110 -> 832x1112)",
        }
    else:
        rules["latent"] = {
            "channels": 4,
            "latent_frames": "n // 17 * 5 + ceil((n % 17) / 4)",
            "latent_hw": "H // 8, W // 8",
            "patch_size": [1, 2, 2],
            "tokens_per_frame": "ceil(latent_h / 2) * ceil(latent_w / 2)",
        }
        rules["decode"] = {"pixel_frames": "num_frames"}
    return rules


def _frames_json(version: str, autoencoder: str) -> dict:
    image, step, first, last, trained = _frame_rule(version, autoencoder)
    rule = {"1.2": "1 or 17..816", "1.3": "1 or 16k+1", "2.0": "1 or 4k+1" if autoencoder == "hunyuan" else "1 or 4k"}
    return {
        "rule": rule[version],
        "image": image,
        "step": step,
        "min": first,
        "max": last,
        "trained_max": trained,
    }


# ---------------------------------------------------------------------------------------------
# Reference images
# ---------------------------------------------------------------------------------------------


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
    _check_int("height", height)
    _check_int("width", width)
    if method not in ("pil", "torch"):
        raise ValueError(f"unknown resize method {method!r}; choose 'pil' or 'torch'")
    if not isinstance(image, torch.Tensor):
        return _resize_crop_pil_image(image, height, width)
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[-1] not in (3, 4) or image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"expected an IMAGE tensor [B, H, W, 3] with values 0..1, got shape {tuple(image.shape)}")
    pixels = (image[..., :3].detach().float().clamp(0, 1) * 255).round()  # the 8-bit image PIL would see
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
