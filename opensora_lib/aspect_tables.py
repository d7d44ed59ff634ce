"""The official resolution and aspect-ratio tables (opensora/datasets/aspect.py): 1.x tables, the 2.0 formula.

Keys and sizes are the official ones; sizes.py is the API that validates requests and looks sizes up here.
1.x aspect strings are H:W, 2.0 aspect strings W:H (the official quirk Q10). Every size is (height, width).
"""

from __future__ import annotations

import math
import re

# ---------------------------------------------------------------------------------------------
# 1.x tables (official opensora/datasets/aspect.py, identical in v1.2.0 and v1.3)
# ---------------------------------------------------------------------------------------------

# H:W strings and the table key each one selects.
RATIO_KEYS_V1 = {
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

# "p" presets: name, total pixels, then HxW for each key of RATIO_KEYS_V1 in order.
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
RESOLUTIONS_V1 = ("144p", "256", "240p", "360p", "512", "480p", "720p", "1024", "1080p", "2k", "2048", "2880", "4k")
TRAINED_V1 = {"1.2": ["144p", "240p", "360p", "480p", "720p"], "1.3": ["360p", "720p"]}


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
    for name in RESOLUTIONS_V1:
        if name in _P_TABLES:
            pixels, sizes = _P_TABLES[name]
            tables[name] = (pixels, dict(zip(RATIO_KEYS_V1.values(), map(_hw, sizes.split()))))
        elif name == "2880":
            tables[name] = (8294400, _pixart_table(_PIXART_2880, 1, pixart_key))
        else:
            scale = int(name) // 256
            tables[name] = (int(name) ** 2, _pixart_table(_PIXART_256, scale, pixart_key))
    if version == "1.3":
        # 1.3 adds "<name>_16d": every size rounded down to a multiple of 16.
        for name in RESOLUTIONS_V1:
            pixels, table = tables[name]
            tables[f"{name}_16d"] = (pixels, {k: (h // 16 * 16, w // 16 * 16) for k, (h, w) in table.items()})
    return tables


V1_TABLES = {version: _build_v1_tables(version) for version in ("1.2", "1.3")}

# ---------------------------------------------------------------------------------------------
# 2.0 rules (official opensora/datasets/aspect.py on main): sizes are computed, not tabulated
# ---------------------------------------------------------------------------------------------

# W:H strings in the official order; each also gets its transposed twin ("9:16" <-> "16:9").
RATIOS_V2 = ("2.39:1", "2:1", "16:9", "1.85:1", "9:16", "5:8", "3:2", "4:3", "1:1")
PRESETS_V2 = ("256px", "768px", "512px", "1024px", "360p", "480p", "720p", "1080p")
TRAINED_V2 = ["256px", "768px"]
# Spatial factor the size grid snaps to (official AE_SPATIAL_COMPRESSION: 16, or 32 for the DC-AE config).
SIZE_STEP_V2 = {"hunyuan": 16, "dc_ae": 32}


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


def v2_table(resolution: str, training: bool, step: int) -> dict[str, tuple[int, int]]:
    """{W:H ratio: (height, width)} of a 2.0 resolution on a grid of `step` pixels (official get_image_size)."""
    pixels = pixels_v2(resolution)
    table: dict[str, tuple[int, int]] = {}
    transposed: dict[str, tuple[int, int]] = {}
    for ratio in RATIOS_V2:
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
