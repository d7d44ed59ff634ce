"""Per-family config builders: the key shapes of a detected checkpoint -> a config dict with OFFICIAL field names.

Each builder takes a ShapeView of one model (prefix removed) and returns (version or None, config, description).
Values that the shapes cannot show (norm groups, runtime options) are the official ones, said so where set.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from .checkpoint import CheckpointError
from .dcae import INFERENCE_OPTIONS


class ShapeView:
    """Key -> shape view of one model (prefix already removed), with helpers for the builders."""

    def __init__(self, family: str, shapes: dict[str, tuple[int, ...]]):
        self.family, self.shapes = family, shapes

    def has(self, key: str) -> bool:
        return key in self.shapes

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.shapes:
            raise CheckpointError(f"this {self.family} checkpoint is incomplete: it has no {key!r}")
        return self.shapes[key]

    def count(self, stem: str) -> int:
        """Number of indexed children `stem{i}.` (max index + 1)."""
        pattern = re.compile(re.escape(stem) + r"(\d+)\.")
        found = {int(m.group(1)) for k in self.shapes if (m := pattern.match(k))}
        return max(found) + 1 if found else 0


def _stdit3(s: ShapeView) -> tuple[str | None, dict, str]:
    embedding = s.shape("x_embedder.proj.weight")
    if len(embedding) != 5:  # e.g. a GGUF converted without ComfyUI-GGUF's comfy.gguf.orig_shape record
        raise CheckpointError(
            f"this STDiT3 checkpoint's patch embedding x_embedder.proj.weight has shape {tuple(embedding)}, not the "
            "5-D Conv3d weight [hidden, channels, t, h, w]: a GGUF converter flattened it without recording the "
            "shape (comfy.gguf.orig_shape); convert the file again with a converter that records it"
        )
    hidden, in_channels, *patch = embedding
    head_dim = s.shape("spatial_blocks.0.attn.q_norm.weight")[0] if s.has("spatial_blocks.0.attn.q_norm.weight") else 72
    out_channels = s.shape("final_layer.linear.weight")[0] // math.prod(patch)
    if s.has("x_embedder_cond.proj.weight"):  # 1.3 always builds the i2v embedders
        version = "1.3"
    elif s.has("rope.freqs"):  # 1.2 rotates the full head (dim/2 freqs); 1.3 rotates head/3 chunks (dim/6)
        version = "1.3" if s.shape("rope.freqs")[0] * 6 == head_dim else "1.2"
    else:
        version = "1.2" if in_channels == 4 else "1.3"
    config = dict(
        in_channels=in_channels,
        patch_size=tuple(patch),
        hidden_size=hidden,
        depth=s.count("spatial_blocks."),
        num_heads=hidden // head_dim,
        mlp_ratio=s.shape("spatial_blocks.0.mlp.fc1.weight")[0] / hidden,
        pred_sigma=out_channels == 2 * in_channels,
        caption_channels=s.shape("y_embedder.y_proj.fc1.weight")[1],
        model_max_length=s.shape("y_embedder.y_embedding")[0] if s.has("y_embedder.y_embedding") else 300,
        qk_norm=s.has("spatial_blocks.0.attn.q_norm.weight"),
        input_sq_size=512,
        class_dropout_prob=0.1,
    )
    if version == "1.3":
        config.update(kernel_size=(8, 8, -1), use_spatial_rope=True)  # OPENSORA.md Q8: not in the 1.3 config.json
    extra = ", with i2v embedders" if s.has("x_embedder_cond.proj.weight") else ""
    text = (
        f"Open-Sora {version} STDiT3 (hidden {hidden}, depth {config['depth']}, {in_channels} latent channels{extra})"
    )
    return version, config, text


def _flux_like(s: ShapeView, open_sora: bool) -> tuple[str | None, dict, str]:
    hidden, in_channels = s.shape("img_in.weight")
    head_dim = s.shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    fused = s.has("double_blocks.0.img_attn.qkv.weight")
    cond_embed = s.has("cond_in.weight")
    patch_size = 2
    if cond_embed:  # cond_in takes in_channels + patch_size**2 features (the mask channel per sub-pixel)
        patch_size = math.isqrt(s.shape("cond_in.weight")[1] - in_channels)
    bias_key = "double_blocks.0.img_attn." + ("qkv.bias" if fused else "q_proj.bias")
    time_axis = head_dim // 8  # official split of 128 is [16, 56, 56]; scaled the same way for other head sizes
    config = dict(
        in_channels=in_channels,
        vec_in_dim=s.shape("vector_in.in_layer.weight")[1],
        context_in_dim=s.shape("txt_in.weight")[1],
        hidden_size=hidden,
        mlp_ratio=s.shape("double_blocks.0.img_mlp.0.weight")[0] / hidden,
        num_heads=hidden // head_dim,
        depth=s.count("double_blocks."),
        depth_single_blocks=s.count("single_blocks."),
        axes_dim=[time_axis, (head_dim - time_axis) // 2, (head_dim - time_axis) // 2],
        theta=10_000,
        qkv_bias=s.has(bias_key),
        guidance_embed=s.has("guidance_in.in_layer.weight"),
        cond_embed=cond_embed,
        fused_qkv=fused,
        use_liger_rope=open_sora,  # Open-Sora 2.0 was trained with half-split RoPE; Flux is interleaved (Q25)
        patch_size=patch_size,
    )
    size = f"hidden {hidden}, {config['depth']} double + {config['depth_single_blocks']} single blocks"
    if open_sora:
        latent = " for the Video DC-AE latent" if in_channels == 128 else ""
        text = f"Open-Sora 2.0 MMDiT{latent} ({size}, in_channels {in_channels}, patch {patch_size})"
    else:
        kind = "dev (guidance-distilled)" if config["guidance_embed"] else "schnell-type (no guidance input)"
        text = f"FLUX.1 {kind} transformer, BFL layout ({size})"
    return "2.0", config, text


def _vae_v12(s: ShapeView) -> tuple[str | None, dict, str]:
    sp, tp = "spatial_vae.module.", "temporal_vae."
    levels = s.count(sp + "encoder.down_blocks.")
    filters, in_out = s.shape(tp + "encoder.conv_in.conv.weight")[:2]
    blocks = s.count(tp + "encoder.block_res_blocks.")
    vae_2d = dict(
        block_out_channels=[s.shape(f"{sp}encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels)],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        latent_channels=s.shape(sp + "post_quant_conv.weight")[0],
        layers_per_block=s.count(sp + "encoder.down_blocks.0.resnets."),
        norm_num_groups=32,  # not visible in shapes; the official SDXL-type VAE uses 32
        in_channels=s.shape(sp + "encoder.conv_in.weight")[1],
        out_channels=s.shape(sp + "decoder.conv_out.weight")[0],
        act_fn="silu",
        micro_batch_size=4,
    )
    vae_temporal = dict(
        type="VAE_Temporal_SD",
        in_out_channels=in_out,
        latent_embed_dim=s.shape(tp + "post_quant_conv.conv.weight")[0],
        embed_dim=s.shape(tp + "post_quant_conv.conv.weight")[1],
        filters=filters,
        num_res_blocks=s.count(tp + "encoder.block_res_blocks.0."),
        channel_multipliers=[
            s.shape(f"{tp}encoder.block_res_blocks.{i}.0.conv1.conv.weight")[0] // filters for i in range(blocks)
        ],
        # a level without temporal downsampling has an Identity (no weights) in conv_blocks
        temporal_downsample=[s.has(f"{tp}encoder.conv_blocks.{i}.conv.weight") for i in range(blocks - 1)],
        num_groups=32,  # not visible in shapes; official value
        activation_fn="swish",
    )
    config = dict(
        vae_2d=vae_2d,
        vae_temporal=vae_temporal,
        micro_frame_size=17,
        shift=[-0.10, 0.34, 0.27, 0.98],  # official values; the checkpoint's own buffers are loaded over them
        scale=[3.85, 2.32, 2.33, 3.06],
    )
    return "1.2", config, f"Open-Sora 1.2 VAE (2-D KL-VAE + temporal VAE, {vae_2d['latent_channels']} latent channels)"


def _vae_v13(s: ShapeView) -> tuple[str | None, dict, str]:
    ch, in_channels = s.shape("encoder.conv_in.conv.weight")[:2]
    z_channels = s.shape("decoder.conv_in.conv.weight")[1]
    levels = s.count("encoder.down.")
    out_ch = s.shape("decoder.conv_out.weight")[0]
    encoder = dict(
        type="VideoEncoder",
        double_z=s.shape("encoder.conv_out.conv.weight")[0] == 2 * z_channels,
        z_channels=z_channels,
        in_channels=in_channels,
        out_ch=out_ch,
        ch=ch,
        ch_mult=[s.shape(f"encoder.down.{i}.block.0.conv1.conv.weight")[0] // ch for i in range(levels)],
        num_res_blocks=s.count("encoder.down.0.block."),
        down_sampling_layer=[i for i in range(levels) if s.has(f"encoder.down.{i}.downsample.conv.conv.weight")],
        micro_batch_size_2d=4,
    )
    decoder = dict(
        type="VideoDecoder",
        z_channels=z_channels,
        in_channels=in_channels,
        out_ch=out_ch,
        ch=ch,
        ch_mult=[s.shape(f"decoder.up.{i}.block.0.conv1.conv.weight")[0] // ch for i in range(levels)],
        num_res_blocks=s.count("decoder.up.0.block.") - 1,  # the decoder has num_res_blocks + 1 per level
        temporal_up_layers=[i for i in range(levels) if s.has(f"decoder.up.{i}.upsample.conv3d.conv1.conv.weight")],
        micro_batch_size_2d=4,
    )
    # runtime options of the released inference configs (configs/opensora-v1-3/inference/*.py)
    config = dict(encoder=encoder, decoder=decoder, micro_batch_size=1, micro_batch_size_2d=4, micro_frame_size=17)
    config.update(use_tiled_conv3d=True, tile_size=4, temporal_overlap=True, normalization="video")
    return "1.3", config, f"Open-Sora 1.3 VAE ({z_channels} latent channels, ch {ch})"


def _hunyuan_vae(s: ShapeView) -> tuple[str | None, dict, str]:
    levels = s.count("encoder.down_blocks.")
    latent = s.shape("post_quant_conv.weight")[0]
    config = dict(
        act_fn="silu",
        in_channels=s.shape("encoder.conv_in.conv.weight")[1],
        out_channels=s.shape("decoder.conv_out.conv.weight")[0],
        latent_channels=latent,
        layers_per_block=s.count("encoder.down_blocks.0.resnets."),
        norm_num_groups=32,  # not visible in shapes; official value
        scale_factor=0.476986,
        shift_factor=0.0,
        time_compression_ratio=4,
        spatial_compression_ratio=2
        ** sum(s.has(f"encoder.down_blocks.{i}.downsamplers.0.conv.conv.weight") for i in range(levels)),
        mid_block_add_attention=s.has("encoder.mid_block.attentions.0.to_q.weight"),
        block_out_channels=[s.shape(f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight")[0] for i in range(levels)],
        sample_size=256,
        sample_tsize=64,
        use_spatial_tiling=True,  # configs/diffusion/inference/256px.py
        use_temporal_tiling=False,
        tile_overlap_factor=0.25,
    )
    return "2.0", config, f"HunyuanVideo causal 3-D VAE ({latent} latent channels), as used by Open-Sora 2.0"


def _flux_ae(s: ShapeView) -> tuple[str | None, dict, str]:
    ch, in_channels = s.shape("encoder.conv_in.weight")[:2]
    levels = s.count("encoder.down.")
    config = dict(
        resolution=256,
        in_channels=in_channels,
        ch=ch,
        out_ch=s.shape("decoder.conv_out.weight")[0],
        ch_mult=[s.shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(levels)],
        num_res_blocks=s.count("encoder.down.0.block."),
        z_channels=s.shape("decoder.conv_in.weight")[1],
        scale_factor=0.3611,
        shift_factor=0.1159,
    )
    return "2.0", config, f"FLUX.1 2-D autoencoder ({config['z_channels']} latent channels)"


def _dc_ae(s: ShapeView) -> tuple[str | None, dict, str]:
    def stages(part: str) -> tuple[list[int], list[int], list[str]]:
        widths, depths, kinds = [], [], []
        for i in range(s.count(f"{part}.stages.")):
            ops = range(s.count(f"{part}.stages.{i}.op_list."))
            res = [j for j in ops if s.has(f"{part}.stages.{i}.op_list.{j}.main.conv1.conv.weight")]
            vit = [j for j in ops if s.has(f"{part}.stages.{i}.op_list.{j}.context_module.main.qkv.conv.weight")]
            if res:
                widths.append(s.shape(f"{part}.stages.{i}.op_list.{res[0]}.main.conv1.conv.weight")[0])
            else:
                widths.append(s.shape(f"{part}.stages.{i}.op_list.{vit[0]}.context_module.main.qkv.conv.weight")[1])
            depths.append(len(res) + len(vit))
            kinds.append("ResBlock" if res else "EViTS5_GLU")
        return widths, depths, kinds

    enc_w, enc_d, enc_k = stages("encoder")
    dec_w, dec_d, dec_k = stages("decoder")
    latent = s.shape("decoder.project_in.main.conv.weight")[1]
    down = [False, False, False, True, True, False]  # temporal x4 is not visible in shapes; official layout

    def listed(values: list) -> str:
        return "[" + ",".join(map(str, values)) + "]"

    dotlist = [  # same order as the official dc_ae_f32; norms/activations are not visible in shapes
        "time_compression_ratio=4",
        f"spatial_compression_ratio={2 ** (len(enc_w) - 1)}",
        f"encoder.block_type={listed(enc_k)}",
        f"encoder.width_list={listed(enc_w)}",
        f"encoder.depth_list={listed(enc_d)}",
        "encoder.downsample_block_type=Conv",
        "encoder.norm=rms3d",
        "encoder.is_video=True",
        f"decoder.block_type={listed(dec_k)}",
        f"decoder.width_list={listed(dec_w)}",
        f"decoder.depth_list={listed(dec_d)}",
        "decoder.upsample_block_type=InterpolateConv",
        "decoder.norm=rms3d",
        "decoder.act=silu",
        "decoder.out_norm=rms3d",
        "decoder.is_video=True",
        f"encoder.temporal_downsample={listed(down)}",
        f"decoder.temporal_upsample={listed(down)}",
        f"latent_channels={latent}",
    ]
    config = dict(
        model_name="dc-ae-f32t4c128",
        dotlist=dotlist,
        width_list=enc_w,
        depth_list=enc_d,
        decoder_depth_list=dec_d,
        latent_channels=latent,
        **INFERENCE_OPTIONS,  # runtime options of high_compression.py (scaling unset there, see Q12)
    )
    return "2.0", config, f"Video DC-AE (x{2 ** (len(enc_w) - 1)} spatial, {latent} latent channels)"


def _t5(s: ShapeView) -> tuple[str | None, dict, str]:
    vocab, d_model = s.shape("shared.weight" if s.has("shared.weight") else "encoder.embed_tokens.weight")
    buckets, heads = s.shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    gated = s.has("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    ff_key = "encoder.block.0.layer.1.DenseReluDense." + ("wi_0.weight" if gated else "wi.weight")
    config = dict(  # transformers T5Config field names
        vocab_size=vocab,
        d_model=d_model,
        d_kv=s.shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0] // heads,
        d_ff=s.shape(ff_key)[0],
        num_layers=s.count("encoder.block."),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu" if gated else "relu",  # t5 v1.1 is gated-gelu
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
    )
    name = "T5 v1.1 XXL encoder" if (d_model, config["num_layers"]) == (4096, 24) else "T5 encoder"
    return None, config, f"{name} (d_model {d_model}, {config['num_layers']} layers, {heads} heads)"


def _clip_l(s: ShapeView) -> tuple[str | None, dict, str]:
    vocab, hidden = s.shape("embeddings.token_embedding.weight")
    config = dict(  # transformers CLIPTextConfig field names
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=s.shape("encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=s.count("encoder.layers."),
        num_attention_heads=hidden // 64,  # not visible in shapes; CLIP text towers use 64-dim heads
        max_position_embeddings=s.shape("embeddings.position_embedding.weight")[0],
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=768,
    )
    name = "CLIP ViT-L/14 text encoder" if hidden == 768 else f"CLIP text encoder (hidden {hidden}, not ViT-L/14)"
    return "2.0", config, f"{name}, {config['num_hidden_layers']} layers"


# family -> builder; detection.py calls the one of the signature that matched
CONFIG_BUILDERS: dict[str, Callable[[ShapeView], tuple[str | None, dict, str]]] = {
    "stdit3": _stdit3,
    "mmdit": lambda s: _flux_like(s, open_sora=True),
    "flux": lambda s: _flux_like(s, open_sora=False),
    "vae_v12": _vae_v12,
    "vae_v13": _vae_v13,
    "hunyuan_vae": _hunyuan_vae,
    "flux_ae": _flux_ae,
    "dc_ae": _dc_ae,
    "t5": _t5,
    "clip_l": _clip_l,
}
