"""The shipped Open-Sora 2.0 workflows in API format: text-to-video, image-to-video, text-to-image-to-video.

They follow configs/diffusion/inference/256px.py (256px 16:9, 129 frames, 50 steps, guidance 7.5 / 3.0,
all oscillations on, motion score 4, 24 fps) and plugins/t2i2v.py for the first frame: FLUX.1-dev through
core nodes at 768px with the same aspect ratio, 50 steps, one pass per step (cfg 1) with guidance 4.0,
Open-Sora's own shift (ModelSamplingFlux with max_shift = base_shift = ln(alpha), alpha from the 2.0 rule
for one latent frame), decoded by the FLUX AE and fed to the i2v_head path. Decoding uses core's tiled VAE
decode with the official 256 px tiles and 1/4 overlap, no temporal tiling.

The HunyuanVideo VAE from core VAELoader goes through Open-Sora HunyuanVideo VAE (causal fix) before any use
(decode and reference encode): it gives core's VAE the official frame-causal mid-block attention
(nodes/hunyuan_vae.py). The FLUX AE is used as core loads it.

The Video DC-AE ("high compression") workflows follow configs/diffusion/inference/high_compression.py: the
DC-AE DiT (patch 1) on a "2.0 DC-AE" latent at 768px 16:9, 128 frames, the sampler settings of 256px.py, and
the pack's DC-AE (Load Open-Sora VAE, F32T4C128_AE.safetensors, official tiles) for the reference and the
decode. That config's base is t2i2v_768px.py, so the official run is text-to-image-to-video; the t2v one is
the same graph without the plugin. Two deliberate differences: the DC-AE scaling is the trained 0.493 (Load
Open-Sora VAE's default; the config sets none, Q12) and the FLUX first frame is made at its full 768px size.
Officially AE_SPATIAL_COMPRESSION=32 also reaches the FLUX call (get_noise / unpack read it while patch_size
stays 2), which makes the FLUX image half as wide and high and resizes it up afterwards (found by reading
opensora/utils/sampling.py; not run).

The official files, use_models() and tiny_settings() are shipped_workflows.py's, shared with the 1.x workflows.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from shipped_workflows import OFFICIAL, PROMPT  # noqa: E402

from opensora_lib.schedules import v2_shift_alpha  # noqa: E402
from opensora_lib.sizes import image_size, tokens_per_frame  # noqa: E402

SETTINGS = {
    "resolution": "256px",
    "aspect_ratio": "16:9",
    "num_frames": 129,
    "steps": 50,
    "cfg": 7.5,
    "image_cfg": 3.0,
    "seed": 42,
    "fps": 24,
    "motion_score": 4,
}
SETTINGS_DC_AE = {**SETTINGS, "resolution": "768px", "num_frames": 128}  # high_compression.py
IMAGE_RESOLUTION = "768px"  # the t2i2v plugin's img_resolution
FLUX_GUIDANCE = 4.0  # modify_option_to_t2i


def t2v_v2() -> dict:
    s = SETTINGS
    return {
        "1": {
            "class_type": "OpenSoraLoadDiT",
            "inputs": {"dit_name": OFFICIAL["dit_2.0"], "weight_dtype": "default", "attention": "sdpa"},
        },
        "2": {
            "class_type": "OpenSoraLoadTextEncoder",
            "inputs": {
                "t5_name": OFFICIAL["t5"],
                "precision": "default",
                "version": "2.0",
                "clip_name": OFFICIAL["clip_l_2.0"],
            },
        },
        "3": {
            "class_type": "OpenSoraEncodePrompt",
            "inputs": {
                "text_encoder": ["2", 0],
                "prompt": PROMPT,
                "negative_prompt": "",
                "motion_score_v2": s["motion_score"],
                "fps": s["fps"],
            },
        },
        "4": {
            "class_type": "OpenSoraEmptyLatentVideo",
            "inputs": {
                "version": "2.0",
                "resolution": s["resolution"],
                "aspect_ratio": s["aspect_ratio"],
                "num_frames": s["num_frames"],
                "batch_size": 1,
                "fps": s["fps"],
            },
        },
        "5": {
            "class_type": "OpenSoraSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["3", 0],
                "negative": ["3", 1],
                "latent": ["4", 0],
                "seed": s["seed"],
                "steps": s["steps"],
                "cfg": s["cfg"],
                "image_cfg": s["image_cfg"],
                "oscillation": True,
                "image_oscillation": True,
                "scale_image_weight": True,
                "timestep_transform": True,
            },
        },
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": OFFICIAL["vae_2.0"]}},
        "12": {"class_type": "OpenSoraHunyuanVAE", "inputs": {"vae": ["6", 0]}},  # official frame-causal mid attention
        "7": {
            "class_type": "VAEDecodeTiled",
            "inputs": {
                "samples": ["5", 0],
                "vae": ["12", 0],
                "tile_size": 256,
                "overlap": 64,
                "temporal_size": 4096,
                "temporal_overlap": 8,
            },
        },
        "8": {"class_type": "CreateVideo", "inputs": {"images": ["7", 0], "fps": float(s["fps"])}},
        "9": {
            "class_type": "SaveVideo",
            "inputs": {"video": ["8", 0], "filename_prefix": "opensora/v20_t2v", "format": "auto", "codec": "auto"},
        },
    }


def i2v_v2() -> dict:
    prompt = t2v_v2()
    prompt["10"] = {"class_type": "LoadImage", "inputs": {"image": "opensora_reference.png"}}
    prompt["11"] = {
        "class_type": "OpenSoraEncodeReference",
        "inputs": {"image": ["10", 0], "latent": ["4", 0], "cond_type": "i2v_head", "core_vae": ["12", 0]},
    }
    prompt["5"]["inputs"]["latent"] = ["11", 0]
    prompt["9"]["inputs"]["filename_prefix"] = "opensora/v20_i2v"
    return prompt


def flf2v_v2() -> dict:
    """First-last-frame video: i2v_loop, the start frame from one Load Image and the end frame from another (the
    official two-image reference "a.png;b.png")."""
    prompt = i2v_v2()
    prompt["13"] = {"class_type": "LoadImage", "inputs": {"image": "opensora_reference_end.png"}}
    prompt["11"]["inputs"].update(cond_type="i2v_loop", end_image=["13", 0])
    prompt["9"]["inputs"]["filename_prefix"] = "opensora/v20_flf2v"
    return prompt


def first_frame_size(autoencoder: str = "hunyuan") -> tuple[int, int]:
    """(height, width) of the T2I first frame: img_resolution with training=True, on the AE's size grid."""
    return image_size("2.0", IMAGE_RESOLUTION, SETTINGS["aspect_ratio"], training=True, autoencoder=autoencoder)


def flux_shift(autoencoder: str = "hunyuan") -> float:
    """ln(alpha) of Open-Sora's T2I schedule at 768px (one latent frame); ModelSamplingFlux uses exp(shift).
    FLUX counts 16 px per token whatever the video's AE (the official DC-AE run differs here, see the top)."""
    height, width = first_frame_size(autoencoder)
    return round(math.log(v2_shift_alpha(tokens_per_frame("2.0", height, width), 1)), 6)


def add_flux_first_frame(prompt: dict, autoencoder: str, prefix: str) -> None:
    """Nodes 20-29: FLUX.1-dev through core nodes makes the first frame (plugins/t2i2v.py), which feeds node 11."""
    height, width = first_frame_size(autoencoder)
    shift = flux_shift(autoencoder)
    prompt.update(
        {
            "20": {"class_type": "UNETLoader", "inputs": {"unet_name": OFFICIAL["flux"], "weight_dtype": "default"}},
            "21": {
                "class_type": "DualCLIPLoader",
                "inputs": {
                    "clip_name1": OFFICIAL["t5"],
                    "clip_name2": OFFICIAL["clip_l_2.0"],
                    "type": "flux",
                },
            },
            "22": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["21", 0]}},  # T2I: no suffixes
            "23": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["22", 0], "guidance": FLUX_GUIDANCE}},
            "24": {
                "class_type": "ModelSamplingFlux",
                "inputs": {
                    "model": ["20", 0],
                    "max_shift": shift,
                    "base_shift": shift,
                    "width": width,
                    "height": height,
                },
            },
            "25": {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
            "26": {
                "class_type": "KSampler",
                "inputs": {
                    "model": ["24", 0],
                    "seed": SETTINGS["seed"],
                    "steps": SETTINGS["steps"],
                    "cfg": 1.0,
                    "sampler_name": "euler",
                    "scheduler": "simple",
                    "positive": ["23", 0],
                    "negative": ["23", 0],
                    "latent_image": ["25", 0],
                    "denoise": 1.0,
                },
            },
            "27": {"class_type": "VAELoader", "inputs": {"vae_name": OFFICIAL["flux_ae"]}},
            "28": {"class_type": "VAEDecode", "inputs": {"samples": ["26", 0], "vae": ["27", 0]}},
            "29": {
                "class_type": "SaveImage",
                "inputs": {"images": ["28", 0], "filename_prefix": f"{prefix}_first_frame"},
            },
        }
    )
    prompt["11"]["inputs"]["image"] = ["28", 0]
    prompt["9"]["inputs"]["filename_prefix"] = prefix


def t2i2v_v2() -> dict:
    prompt = i2v_v2()
    del prompt["10"]
    add_flux_first_frame(prompt, "hunyuan", "opensora/v20_t2i2v")
    return prompt


def dcae_t2v_v2() -> dict:
    """high_compression.py without the t2i2v plugin: the DC-AE DiT, a 2.0 DC-AE latent, the pack's DC-AE."""
    s = SETTINGS_DC_AE
    prompt = t2v_v2()
    del prompt["12"]  # the HunyuanVideo causal fix has no place here
    prompt["1"]["inputs"]["dit_name"] = OFFICIAL["dit_dcae"]
    prompt["4"]["inputs"].update(version="2.0 DC-AE", resolution=s["resolution"], num_frames=s["num_frames"])
    prompt["6"] = {
        "class_type": "OpenSoraLoadVAE",
        "inputs": {"vae_name": OFFICIAL["vae_dcae"], "dtype": "default", "dc_ae_scaling": "trained 0.493"},
    }
    prompt["7"] = {"class_type": "OpenSoraDecode", "inputs": {"vae": ["6", 0], "latent": ["5", 0], "tile_size": 0}}
    prompt["9"]["inputs"]["filename_prefix"] = "opensora/v20_dcae_t2v"
    return prompt


def dcae_t2i2v_v2() -> dict:
    """high_compression.py as shipped (t2i2v_768px.py base): FLUX first frame -> DC-AE i2v_head."""
    prompt = dcae_t2v_v2()
    prompt["11"] = {
        "class_type": "OpenSoraEncodeReference",
        "inputs": {"image": None, "latent": ["4", 0], "cond_type": "i2v_head", "vae": ["6", 0]},
    }
    prompt["5"]["inputs"]["latent"] = ["11", 0]
    add_flux_first_frame(prompt, "dc_ae", "opensora/v20_dcae_t2i2v")
    return prompt


def definitions_v2() -> dict[str, dict]:
    return {
        "opensora20_t2v": t2v_v2(),
        "opensora20_i2v": i2v_v2(),
        "opensora20_flf2v": flf2v_v2(),
        "opensora20_t2i2v": t2i2v_v2(),
        "opensora20_dcae_t2v": dcae_t2v_v2(),
        "opensora20_dcae_t2i2v": dcae_t2i2v_v2(),
    }


if __name__ == "__main__":
    print(json.dumps(definitions_v2(), indent=1))
