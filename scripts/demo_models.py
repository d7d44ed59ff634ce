"""The small embedded default models: tiny Open-Sora 1.3 / 1.2 configurations made from a fixed seed.

They have the official architecture and key layout (only widths and depths shrunk) and are written the
way the official files are published (Hugging Face folders: config.json + model.safetensors), so the
demo and the integration tests exercise the same loading path as the real checkpoints. The T5 uses the
tokenizer bundled with ComfyUI.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

SEED = 20240618
CAPTION_CHANNELS = 64
DIT_NAMES = {"1.3": "opensora-tiny-v13", "1.2": "opensora-tiny-v12"}
VAE_NAMES = {"1.3": "opensora-tiny-vae-v13", "1.2": "opensora-tiny-vae-v12"}
T5_NAME = "opensora-tiny-t5"

DIT_CONFIGS = {
    "1.3": {
        "depth": 2,
        "hidden_size": 96,
        "num_heads": 4,
        "in_channels": 16,
        "caption_channels": CAPTION_CHANNELS,
        "model_max_length": 300,
        "kernel_size": [8, 8, -1],
        "use_spatial_rope": True,
    },
    "1.2": {
        "depth": 2,
        "hidden_size": 96,
        "num_heads": 4,
        "in_channels": 4,
        "caption_channels": CAPTION_CHANNELS,
        "model_max_length": 300,
    },
}
VAE_CONFIGS = {
    "1.3": {
        "encoder": {
            "type": "VideoEncoder",
            "double_z": True,
            "z_channels": 16,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 32,
            "ch_mult": [1, 2, 1, 1],
            "num_res_blocks": 1,
            "down_sampling_layer": [1, 2],
        },
        "decoder": {
            "type": "VideoDecoder",
            "z_channels": 16,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 32,
            "ch_mult": [1, 2, 1, 1],
            "num_res_blocks": 1,
            "temporal_up_layers": [2, 3],
        },
        "micro_frame_size": 17,
        "temporal_overlap": True,
        "normalization": "video",
    },
    "1.2": {
        "vae_2d": {
            "block_out_channels": [32, 32, 32, 32],
            "latent_channels": 4,
            "layers_per_block": 1,
            "norm_num_groups": 32,
            "in_channels": 3,
            "out_channels": 3,
        },
        "vae_temporal": {
            "in_out_channels": 4,
            "latent_embed_dim": 4,
            "embed_dim": 4,
            "filters": 8,
            "num_res_blocks": 1,
            "channel_multipliers": [1, 2, 2, 4],
            "temporal_downsample": [False, True, True],
            "num_groups": 8,
        },
        "micro_frame_size": 17,
    },
}


def randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-degenerate weights (the official init zeroes some layers, which would make a blank demo)."""
    for name, tensor in list(module.state_dict().items()):
        if not tensor.is_floating_point():
            continue
        leaf = name.rsplit(".", 1)[-1]
        if tensor.ndim >= 2 and leaf == "weight":
            fan_in = math.prod(tensor.shape[1:])
            value = torch.randn(tensor.shape, generator=generator) / math.sqrt(fan_in)
        elif leaf in ("weight", "scale") and ("norm" in name):
            value = 1 + 0.1 * torch.randn(tensor.shape, generator=generator)
        elif leaf == "bias":
            value = 0.05 * torch.randn(tensor.shape, generator=generator)
        else:
            continue  # buffers with meaning (rope freqs, shift/scale) keep their constructed values
        tensor.copy_(value.to(tensor.dtype))


def write_folder(folder: Path, config: dict, state_dict: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / "model.safetensors"))


def make_dit(version: str, folder: Path) -> None:
    from opensora_lib.stdit3 import STDiT3, STDiT3Config

    generator = torch.Generator().manual_seed(SEED + (13 if version == "1.3" else 12))
    torch.manual_seed(SEED)  # the constructor's own random init (e.g. scale_shift_table) is kept
    model = STDiT3(STDiT3Config.from_dict(DIT_CONFIGS[version]))
    with torch.no_grad():
        randomize(model, generator)
        model.y_embedder.y_embedding.copy_(torch.randn(model.y_embedder.y_embedding.shape, generator=generator))
    write_folder(
        folder, {"architectures": ["STDiT3"], "model_type": "STDiT3", **DIT_CONFIGS[version]}, model.state_dict()
    )


def make_vae(version: str, folder: Path) -> None:
    if version == "1.3":
        from opensora_lib.vae_v13 import OpenSoraVAEv13 as Model
        from opensora_lib.vae_v13 import VAEv13Config as Config
    else:
        from opensora_lib.vae_v12 import OpenSoraVAEv12 as Model
        from opensora_lib.vae_v12 import VAEv12Config as Config
    generator = torch.Generator().manual_seed(SEED + (23 if version == "1.3" else 22))
    torch.manual_seed(SEED)
    model = Model(Config.from_dict(VAE_CONFIGS[version]))
    with torch.no_grad():
        randomize(model, generator)
    write_folder(folder, VAE_CONFIGS[version], model.state_dict())


def make_t5(folder: Path) -> None:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=32128,
        d_model=CAPTION_CHANNELS,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        dense_act_fn="gelu_new",
        is_gated_act=True,
    )
    torch.manual_seed(SEED + 5)
    model = T5EncoderModel(config).eval()
    state = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied to shared
    write_folder(folder, config.to_dict(), state)


def write_reference_image(path: Path, seed: int = 0) -> Path:
    """A 320 x 200 horizontal gradient with seeded noise: the stand-in reference image of the demo and the tests."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 255, 320, dtype=np.float32)[None, :, None]
    pixels = (gradient + rng.normal(0, 20, (200, 320, 3))).clip(0, 255).astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return Path(path)


def install_tiny_models(models_dir: Path, versions: tuple[str, ...] = ("1.3", "1.2")) -> dict[str, str]:
    """Write the tiny models into a ComfyUI models/ folder (skips what is already there). Returns {role (as in
    shipped_workflows.OFFICIAL): name as the loaders list it}: dit_<version>, vae_<version>, t5."""
    models_dir = Path(models_dir)
    names = {}
    for version in versions:
        dit = models_dir / "diffusion_models" / DIT_NAMES[version]
        if not (dit / "model.safetensors").is_file():
            make_dit(version, dit)
        vae = models_dir / "vae" / VAE_NAMES[version]
        if not (vae / "model.safetensors").is_file():
            make_vae(version, vae)
        names[f"dit_{version}"], names[f"vae_{version}"] = DIT_NAMES[version] + "/", VAE_NAMES[version] + "/"
    t5 = models_dir / "text_encoders" / T5_NAME
    if not (t5 / "model.safetensors").is_file():
        make_t5(t5)
    names["t5"] = T5_NAME + "/"
    return names
