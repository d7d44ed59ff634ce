"""Small Open-Sora 2.0 test models from a fixed seed, in the official key layouts.

What is written (names are relative to the ComfyUI model folder of each):
- diffusion_models/opensora-tiny-v2.safetensors: an MMDiT in the Open_Sora_v2.safetensors layout (split q/k/v,
  cond_in), hidden 64, 1 + 1 blocks, one file without config like the official one (the loader infers the
  config from the shapes). Its text widths fit the tiny T5 (d_model 64) and the tiny CLIP below.
- text_encoders/opensora-tiny-t5/: the tiny T5 of demo_models.py (shared with 1.x).
- text_encoders/opensora-tiny-clip-l.safetensors: a CLIP text model (hidden 64, 2 layers) in clip_l.safetensors'
  `text_model.` key layout; tokenizer = ComfyUI's bundled sd1_tokenizer.
- vae/opensora-test-hunyuan-vae.safetensors: random weights in the hunyuan_vae.safetensors layout.
- diffusion_models/opensora-test-flux.safetensors: a FLUX.1-dev-type model in the BFL layout (guidance_in,
  fused qkv) with one double block and no single blocks, text widths of the tiny T5 / CLIP.
- vae/opensora-test-flux-ae.safetensors: random weights in the BFL `ae` layout.
- diffusion_models/opensora-tiny-v2-dcae.safetensors: the tiny MMDiT above in the Video DC-AE variant's layout
  (Open_Sora_v2_Video_DC_AE.safetensors: in_channels 128, patch 1, cond_in 129), config inferred from the shapes.
- vae/opensora-tiny-dcae.safetensors: a Video DC-AE in the F32T4C128_AE.safetensors key layout (6 stages, x32
  spatial, x4 temporal, 128 latent channels) with widths 8..128 and one block per stage; family_configs infers its
  config from the shapes. 128 latent channels (not fewer) because Empty Latent Video's "2.0 DC-AE" makes 128, and
  the averaging / duplicating shortcuts then need a last width that 128 divides.

Core's loaders do not infer everything from shapes, which is why the last three are not tiny:
- core VAELoader builds both the 3-D (Hunyuan) and the 2-D (Flux) VAE from a FIXED ddconfig (ch 128, ch_mult
  1/2/4/4, 2 res blocks); only the latent channels are read from the weights. So the VAEs have the real sizes
  (246.5M / 83.8M parameters); the tests keep them cheap by decoding 64 x 64 pixels.
- core UNETLoader's Flux detection fixes 24 heads and axes_dim [16, 56, 56] (head dim 128), so hidden must be
  3072; depth and the text / pooled widths are read from the weights (~390M parameters with one block).
- core DualCLIPLoader builds T5 from its fixed t5-v1.1-XXL config: no small T5 loads there (size mismatch),
  so the test variant of the text-to-image-to-video workflow feeds Flux from Open-Sora Encode Prompt instead.
The three large files are made once into a cache folder and linked into each models folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO / "scripts"))

from demo_models import CAPTION_CHANNELS, T5_NAME, make_t5, randomize  # noqa: E402

from opensora_lib.dcae import DC_AE_F32T4C128_DOTLIST  # noqa: E402
from opensora_lib.mmdit import mmdit_v2_config  # noqa: E402

SEED = 20250312
CLIP_HIDDEN = 64
CACHE = REPO / ".cache" / "tiny-models-v2"
LAYOUT_VERSION = 1  # bump when a generator changes, so cached files are remade

NAMES = {
    "dit_2.0": "opensora-tiny-v2.safetensors",
    "t5": T5_NAME + "/",
    "clip_l_2.0": "opensora-tiny-clip-l.safetensors",
    "vae_2.0": "opensora-test-hunyuan-vae.safetensors",
    "flux": "opensora-test-flux.safetensors",
    "flux_ae": "opensora-test-flux-ae.safetensors",
    "dit_dcae": "opensora-tiny-v2-dcae.safetensors",
    "vae_dcae": "opensora-tiny-dcae.safetensors",
}

# The official MMDiT config with only sizes shrunk (out_channels is derived, not a constructor field here).
OFFICIAL_MMDIT = {k: v for k, v in dataclasses.asdict(mmdit_v2_config()).items() if k != "out_channels"}
TINY_SIZES = {"vec_in_dim": CLIP_HIDDEN, "context_in_dim": CAPTION_CHANNELS, "depth": 1}
# head dim 32 split [4, 14, 14]: the same 1/8 time share the loader infers from the shapes
MMDIT_CONFIG = {
    **OFFICIAL_MMDIT,
    **TINY_SIZES,
    "hidden_size": 64,
    "num_heads": 2,
    "depth_single_blocks": 1,
    "axes_dim": [4, 14, 14],
}
# The DC-AE variant: official high_compression.py sizes (in 128, patch 1), widths as the tiny MMDiT.
MMDIT_DCAE_CONFIG = {**MMDIT_CONFIG, "in_channels": 128, "patch_size": 1}
DC_AE_WIDTHS = (8, 16, 16, 32, 32, 128)
DC_AE_DEPTHS = (1, 1, 1, 1, 1, 1)
# Core's Flux detection fixes 24 heads x 128, so the Flux keeps the real width; BFL layout (fused qkv, guidance_in).
FLUX_CONFIG = {
    **OFFICIAL_MMDIT,
    **TINY_SIZES,
    "depth_single_blocks": 0,
    "guidance_embed": True,
    "cond_embed": False,
    "fused_qkv": True,
    "use_liger_rope": False,
}


# ---------------------------------------------------------------------------------------------- layouts


def _conv(out_ch: int, in_ch: int, kernel: int, dims: int) -> dict[str, tuple[int, ...]]:
    return {"weight": (out_ch, in_ch, *([kernel] * dims)), "bias": (out_ch,)}


def _add(layout: dict, prefix: str, params: dict) -> None:
    for name, shape in params.items():
        layout[f"{prefix}.{name}"] = shape


def _norm(channels: int) -> dict:
    return {"weight": (channels,), "bias": (channels,)}


def hunyuan_vae_layout(latent: int = 16) -> dict[str, tuple[int, ...]]:
    """hunyuan_vae.safetensors keys (diffusers names, causal convs under `.conv`), official sizes."""
    widths, layers = (128, 256, 512, 512), 2
    layout: dict[str, tuple[int, ...]] = {}

    def resnet(prefix: str, in_ch: int, out_ch: int) -> None:
        _add(layout, f"{prefix}.norm1", _norm(in_ch))
        _add(layout, f"{prefix}.conv1.conv", _conv(out_ch, in_ch, 3, 3))
        _add(layout, f"{prefix}.norm2", _norm(out_ch))
        _add(layout, f"{prefix}.conv2.conv", _conv(out_ch, out_ch, 3, 3))
        if in_ch != out_ch:
            _add(layout, f"{prefix}.conv_shortcut.conv", _conv(out_ch, in_ch, 1, 3))

    def mid(prefix: str, ch: int) -> None:
        _add(layout, f"{prefix}.attentions.0.group_norm", _norm(ch))
        for name in ("to_q", "to_k", "to_v", "to_out.0"):
            _add(layout, f"{prefix}.attentions.0.{name}", {"weight": (ch, ch), "bias": (ch,)})
        for i in range(2):
            resnet(f"{prefix}.resnets.{i}", ch, ch)

    _add(layout, "encoder.conv_in.conv", _conv(widths[0], 3, 3, 3))
    in_ch = widths[0]
    for i, out_ch in enumerate(widths):
        for j in range(layers):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", in_ch if j == 0 else out_ch, out_ch)
        if i < len(widths) - 1:
            _add(layout, f"encoder.down_blocks.{i}.downsamplers.0.conv.conv", _conv(out_ch, out_ch, 3, 3))
        in_ch = out_ch
    mid("encoder.mid_block", widths[-1])
    _add(layout, "encoder.conv_norm_out", _norm(widths[-1]))
    _add(layout, "encoder.conv_out.conv", _conv(2 * latent, widths[-1], 3, 3))
    _add(layout, "decoder.conv_in.conv", _conv(widths[-1], latent, 3, 3))
    mid("decoder.mid_block", widths[-1])
    in_ch = widths[-1]
    for i, out_ch in enumerate(reversed(widths)):
        for j in range(layers + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", in_ch if j == 0 else out_ch, out_ch)
        if i < len(widths) - 1:
            _add(layout, f"decoder.up_blocks.{i}.upsamplers.0.conv.conv", _conv(out_ch, out_ch, 3, 3))
        in_ch = out_ch
    _add(layout, "decoder.conv_norm_out", _norm(widths[0]))
    _add(layout, "decoder.conv_out.conv", _conv(3, widths[0], 3, 3))
    _add(layout, "quant_conv", _conv(2 * latent, 2 * latent, 1, 3))
    _add(layout, "post_quant_conv", _conv(latent, latent, 1, 3))
    return layout


def flux_ae_layout(latent: int = 16) -> dict[str, tuple[int, ...]]:
    """flux1-dev-ae.safetensors / ae.safetensors keys (BFL names), official sizes."""
    ch, mult, blocks = 128, (1, 2, 4, 4), 2
    layout: dict[str, tuple[int, ...]] = {}

    def block(prefix: str, in_ch: int, out_ch: int) -> None:
        _add(layout, f"{prefix}.norm1", _norm(in_ch))
        _add(layout, f"{prefix}.conv1", _conv(out_ch, in_ch, 3, 2))
        _add(layout, f"{prefix}.norm2", _norm(out_ch))
        _add(layout, f"{prefix}.conv2", _conv(out_ch, out_ch, 3, 2))
        if in_ch != out_ch:
            _add(layout, f"{prefix}.nin_shortcut", _conv(out_ch, in_ch, 1, 2))

    def mid(prefix: str, width: int) -> None:
        block(f"{prefix}.block_1", width, width)
        _add(layout, f"{prefix}.attn_1.norm", _norm(width))
        for name in ("q", "k", "v", "proj_out"):
            _add(layout, f"{prefix}.attn_1.{name}", _conv(width, width, 1, 2))
        block(f"{prefix}.block_2", width, width)

    _add(layout, "encoder.conv_in", _conv(ch, 3, 3, 2))
    in_ch = ch
    for i, m in enumerate(mult):
        for j in range(blocks):
            block(f"encoder.down.{i}.block.{j}", in_ch, ch * m)
            in_ch = ch * m
        if i < len(mult) - 1:
            _add(layout, f"encoder.down.{i}.downsample.conv", _conv(in_ch, in_ch, 3, 2))
    mid("encoder.mid", in_ch)
    _add(layout, "encoder.norm_out", _norm(in_ch))
    _add(layout, "encoder.conv_out", _conv(2 * latent, in_ch, 3, 2))
    _add(layout, "decoder.conv_in", _conv(in_ch, latent, 3, 2))
    mid("decoder.mid", in_ch)
    for i in reversed(range(len(mult))):  # BFL numbers up blocks by output level: up.3 runs first
        for j in range(blocks + 1):
            block(f"decoder.up.{i}.block.{j}", in_ch, ch * mult[i])
            in_ch = ch * mult[i]
        if i > 0:
            _add(layout, f"decoder.up.{i}.upsample.conv", _conv(in_ch, in_ch, 3, 2))
    _add(layout, "decoder.norm_out", _norm(ch))
    _add(layout, "decoder.conv_out", _conv(3, ch, 3, 2))
    return layout


def mmdit_layout(config: dict) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the library MMDiT (Open-Sora v2 layout, or BFL Flux with fused_qkv / guidance_in)."""
    from opensora_lib.mmdit import MMDiT

    model = MMDiT(config, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- weights


def random_weights(layout: dict[str, tuple[int, ...]], seed: int, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Finite, non-degenerate values: matrices / kernels ~ N(0, 1/fan_in), norm gains ~ 1, small biases."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(layout):
        shape = layout[key]
        leaf = key.rsplit(".", 1)[-1]
        if len(shape) >= 2:
            value = torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))
        elif leaf in ("scale", "weight"):
            value = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:
            value = 0.05 * torch.randn(shape, generator=generator)
        out[key] = value.to(dtype)
    return out


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial))
    os.replace(partial, path)  # never leave a truncated file under the final name


def make_mmdit(path: Path, config: dict | None = None, seed: int = SEED + 1) -> None:
    from opensora_lib.mmdit import MMDiT

    model = MMDiT(config or MMDIT_CONFIG)
    with torch.no_grad():
        randomize(model, torch.Generator().manual_seed(seed))
    _save(path, model.state_dict())


def make_mmdit_dcae(path: Path) -> None:
    make_mmdit(path, MMDIT_DCAE_CONFIG, SEED + 6)


def dcae_dotlist() -> list[str]:
    """The official dc-ae-f32t4c128 dot-list with the tiny widths and depths."""
    lists = {"width_list": DC_AE_WIDTHS, "depth_list": DC_AE_DEPTHS}
    out = []
    for item in DC_AE_F32T4C128_DOTLIST:
        key = item.partition("=")[0]
        field = key.rpartition(".")[2]
        out.append(f"{key}=[{','.join(map(str, lists[field]))}]" if field in lists else item)
    return out


def make_dcae(path: Path) -> None:
    from opensora_lib.dcae import DCAE, DCAEConfig

    model = DCAE(DCAEConfig.from_dotlist(dcae_dotlist()))
    with torch.no_grad():
        randomize(model, torch.Generator().manual_seed(SEED + 7))
    _save(path, model.state_dict())


def make_clip(path: Path) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    # ComfyUI's sd1_tokenizer ids: 49406 start, 49407 end (also the pad).
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=CLIP_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=CLIP_HIDDEN // 64,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    model = CLIPTextModel(config).eval()
    with torch.no_grad():
        randomize(model, torch.Generator().manual_seed(SEED + 2))
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    _save(path, state)  # keys already carry the `text_model.` prefix of clip_l.safetensors


LARGE = {
    "vae_2.0": (lambda: hunyuan_vae_layout(), SEED + 3),
    "flux": (lambda: mmdit_layout(FLUX_CONFIG), SEED + 4),
    "flux_ae": (lambda: flux_ae_layout(), SEED + 5),
}
FOLDERS = {
    "dit_2.0": "diffusion_models",
    "t5": "text_encoders",
    "clip_l_2.0": "text_encoders",
    "vae_2.0": "vae",
    "flux": "diffusion_models",
    "flux_ae": "vae",
    "dit_dcae": "diffusion_models",
    "vae_dcae": "vae",
}
SMALL = {"dit_dcae": make_mmdit_dcae, "vae_dcae": make_dcae}  # made in place, like the tiny MMDiT


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def install_tiny_models_v2(models_dir: Path, cache_dir: Path | None = None) -> dict[str, str]:
    """Write the 2.0 test models into a ComfyUI models/ folder (skips what is already there).

    Returns {role (as in shipped_workflows.OFFICIAL): name as the loaders list it}: dit_2.0, t5 (the 1.x tiny T5),
    clip_l_2.0, vae_2.0, flux, flux_ae, dit_dcae, vae_dcae.
    """
    models_dir = Path(models_dir)
    cache_dir = Path(cache_dir or os.environ.get("OPENSORA_TINY_CACHE", CACHE))
    dit = models_dir / FOLDERS["dit_2.0"] / NAMES["dit_2.0"]
    if not dit.is_file():
        make_mmdit(dit)
    t5 = models_dir / FOLDERS["t5"] / T5_NAME
    if not (t5 / "model.safetensors").is_file():
        make_t5(t5)
    clip = models_dir / FOLDERS["clip_l_2.0"] / NAMES["clip_l_2.0"]
    if not clip.is_file():
        make_clip(clip)
    for role, make in SMALL.items():
        target = models_dir / FOLDERS[role] / NAMES[role]
        if not target.is_file():
            make(target)
    for role, (layout, seed) in LARGE.items():
        name = NAMES[role]
        cached = cache_dir / f"v{LAYOUT_VERSION}-{name}"
        if not cached.is_file():
            _save(cached, random_weights(layout(), seed))
        target = models_dir / FOLDERS[role] / name
        if not target.is_file():
            _link(cached.resolve(), target)
    return dict(NAMES)


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / ".cache" / "demo-base" / "models")
    for role, name in install_tiny_models_v2(folder).items():
        print(f"{role}: {name}")
