"""Every size / frame / latent rule of a version as plain JSON data: the web page's single source of truth.

Built from the official tables (aspect_tables.py) and the rules in sizes.py, so the page never holds its own.
The page does not read `ratio_keys`, `named_frame_counts` (1.x) and `first_frame_sizes` (2.0): they are kept as
documentation of the official tables for whoever reads the JSON (the fixture checks compare ratio_keys with the
recorded official map), like the `decode` notes.
"""

from __future__ import annotations

from typing import Any

from .aspect_tables import (
    PRESETS_V2,
    RATIO_KEYS_V1,
    SIZE_STEP_V2,
    TRAINED_V1,
    TRAINED_V2,
    V1_TABLES,
    v2_table,
)
from .sizes import (
    DEFAULTS,
    DEFAULTS_DC_AE,
    LATENT_CHANNELS,
    MAX_SIDE,
    MIN_SIDE,
    NAMED_FRAME_COUNTS_V1,
    aspect_ratios,
    check_autoencoder,
    check_version,
    frame_rule,
    image_size,
    resolutions,
)


def size_rules(version: str, autoencoder: str = "hunyuan") -> dict:
    """Every size / frame / latent rule of a version as plain JSON data (the web page's single source).

    autoencoder="dc_ae" (2.0 only) gives the rules of the "2.0 DC-AE" latent: the same shape as the 2.0 rules,
    with the DC-AE's 32-pixel grid, frames and latent formulas at the top level where the page reads them.
    """
    check_version(version)
    if check_autoencoder(autoencoder) == "dc_ae":
        if version != "2.0":
            raise ValueError(f"the DC-AE exists for Open-Sora 2.0 only, not {version}")
        return _dc_ae_rules()
    if version == "2.0":
        sizes, first_frame_sizes = {}, {}
        for resolution in PRESETS_V2:
            first_frame = v2_table(resolution, True, 16)
            sizes[resolution] = {
                ratio: list(image_size(version, resolution, ratio)) for ratio in aspect_ratios(version)
            }
            # The T2I2V first frame uses the training=True sizes; null where that drops the ratio.
            first_frame_sizes[resolution] = {
                r: list(first_frame[r]) if r in first_frame else None for r in sizes[resolution]
            }
        return {
            "version": version,
            "defaults": DEFAULTS[version],
            "aspect_ratio_order": "W:H",
            "resolutions": resolutions(version),
            "trained_resolutions": list(TRAINED_V2),
            "aspect_ratios": aspect_ratios(version),
            "sizes": sizes,
            "first_frame_sizes": first_frame_sizes,
            "size_limits": {"min": MIN_SIDE, "max": MAX_SIDE, "multiple_of": 16},
            "latent": {  # the HunyuanVideo VAE (causal: 4k + 1 frames)
                "channels": LATENT_CHANNELS["2.0"],
                "latent_frames": "1 if n == 1 else (n - 1) // 4 + 1",
                "latent_hw": "2*ceil(H/16), 2*ceil(W/16)",
                "tokens_per_frame": "ceil(H/16) * ceil(W/16)",
            },
            "frames": _frames_json("2.0", "hunyuan"),
            "decode": "the decoder output is cut to num_frames",
        }
    tables = V1_TABLES[version]
    sizes = {
        name: {ratio: list(image_size(version, name, ratio)) for ratio in aspect_ratios(version, name)}
        for name in tables
    }
    rules: dict[str, Any] = {
        "version": version,
        "defaults": DEFAULTS[version],
        "aspect_ratio_order": "H:W",
        "resolutions": resolutions(version),
        "trained_resolutions": list(TRAINED_V1[version]),
        "aspect_ratios": aspect_ratios(version),
        "ratio_keys": dict(RATIO_KEYS_V1),
        "raw_ratio_keys_allowed": version == "1.3",
        "sizes": sizes,
        "size_limits": {"min": MIN_SIDE, "max": MAX_SIDE, "multiple_of": 1},
        "frames": _frames_json(version, "hunyuan"),
        "named_frame_counts": dict(NAMED_FRAME_COUNTS_V1),
    }
    if version == "1.3":
        rules["raw_sizes"] = {name: {k: list(v) for k, v in table.items()} for name, (_pixels, table) in tables.items()}
        rules["latent"] = {
            "channels": LATENT_CHANNELS["1.3"],
            "latent_frames": "1 if n == 1 else (n - 1) // 16 * 5",
            "latent_hw": "(H - 1) // 8 + 1, (W - 1) // 8 + 1",
            "tokens_per_frame": "ceil(latent_h / 2) * ceil(latent_w / 2)",
        }
        rules["decode"] = {
            "latent_frames": "latent_T // 5 * 5",
            "pixel_frames": "decode_latent_T * 17 // 5 (113 -> 119); an image is decoded as one frame",
            "pixel_size": "latent * 8 (never cropped back: 832x1110 -> 832x1112)",
        }
    else:
        rules["latent"] = {
            "channels": LATENT_CHANNELS["1.2"],
            "latent_frames": "n // 17 * 5 + ceil((n % 17) / 4)",
            "latent_hw": "H // 8, W // 8",
            "tokens_per_frame": "ceil(latent_h / 2) * ceil(latent_w / 2)",
        }
        rules["decode"] = {"pixel_frames": "num_frames"}
    return rules


def _dc_ae_rules() -> dict:
    step = SIZE_STEP_V2["dc_ae"]
    rules = size_rules("2.0")
    sizes = {
        resolution: {ratio: list(image_size("2.0", resolution, ratio, autoencoder="dc_ae")) for ratio in table}
        for resolution, table in rules["sizes"].items()
    }
    first_frame_sizes = {}
    for resolution, table in sizes.items():
        first_frame = v2_table(resolution, True, step)  # official: AE_SPATIAL_COMPRESSION=32 reaches this too
        first_frame_sizes[resolution] = {r: list(first_frame[r]) if r in first_frame else None for r in table}
    latent = {  # the Video DC-AE (not causal: 4k frames), one latent pixel per 32 x 32, patch 1
        "channels": LATENT_CHANNELS["2.0 DC-AE"],
        "latent_frames": "1 if n == 1 else n // 4",
        "latent_hw": "ceil(H/32), ceil(W/32)",
        "tokens_per_frame": "ceil(H/32) * ceil(W/32)",
    }
    rules.update(
        autoencoder="dc_ae",
        defaults=dict(DEFAULTS_DC_AE),
        trained_resolutions=["768px"],  # configs/diffusion/train/high_compression.py buckets
        sizes=sizes,
        first_frame_sizes=first_frame_sizes,
        size_limits={**rules["size_limits"], "multiple_of": step},
        frames=_frames_json("2.0", "dc_ae"),
        latent=latent,
    )
    return rules


def _frames_json(version: str, autoencoder: str) -> dict:
    image, step, first, last, trained = frame_rule(version, autoencoder)
    rule = {"1.2": "1 or 17..816", "1.3": "1 or 16k+1", "2.0": "1 or 4k+1" if autoencoder == "hunyuan" else "1 or 4k"}
    return {
        "rule": rule[version],
        "image": image,
        "step": step,
        "min": first,
        "max": last,
        "trained_max": trained,
    }
