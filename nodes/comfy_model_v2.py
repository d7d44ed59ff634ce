"""The seam between the Open-Sora 2.0 MMDiT and ComfyUI's model machinery.

The MMDiT becomes a `comfy.model_base.BaseModel` (ModelType.FLOW) with the HunyuanVideo latent format:
LATENT holds raw VAE latents and the model works on latent x 0.476986, exactly the official scaling.
2.0 predicts v = noise - x0 on t in [0, 1], which is core's CONST convention with sigma = t, so the
wrapper returns the raw prediction and the sampling multiplier is 1.0. Core samplers (KSampler,
SamplerCustomAdvanced with the Open-Sora guider) call `ComfyMMDiT.forward`, which packs the latent into
2 x 2 patch tokens, builds the (t, h, w) position ids and unpacks the velocity again.

The Video DC-AE variant (Open_Sora_v2_Video_DC_AE.safetensors: in_channels 128, patch 1) is told apart by its
patch size and gets its own latent format: 128 channels, scale 1. Its LATENT already holds what the DiT works
on, because the pack's DC-AE (Load Open-Sora VAE) applies the chosen scaling itself.
"""

from __future__ import annotations

import dataclasses

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.ops
import comfy.supported_models_base
import torch

from ..opensora_lib import sizes
from ..opensora_lib.memory import forward_memory
from ..opensora_lib.mmdit import MMDiT, MMDiTConfig
from ..opensora_lib.sampling_v2 import image_ids, pack, text_ids, unpack
from . import core_attention
from .comfy_model import OpenSoraBaseModel, OpenSoraBaseModelConfig, build_patcher, run_diffusion_model_wrappers
from .common import compute_dtype
from .previews import PrincipalComponentPreview

CONFIG_FIELDS = {f.name for f in dataclasses.fields(MMDiTConfig)}
OFFICIAL_TEXT_TOKENS = 512  # the official T5 length (max_length 512, padded)


class ComfyMMDiT(MMDiT):
    """MMDiT called the way BaseModel calls a diffusion model: latent [B, C, T, H, W] in, velocity out."""

    attention_backend = "sdpa"  # Load Open-Sora DiT sets the one chosen there

    def __init__(self, config: MMDiTConfig, dtype=None, device=None, operations=None, **_ignored):
        super().__init__(config, dtype=dtype, device=device, operations=operations or comfy.ops.disable_weight_init)

    @property
    def dtype(self) -> torch.dtype:
        """BaseModel.__init__ reads this (get_dtype) before loading; under newer ComfyUI's DynamicVRAM the
        comfy.ops Linear weights are None until then, so answer with the constructor's dtype."""
        if self.img_in.weight is None:
            return self._dtype
        return MMDiT.dtype.fget(self)

    def forward(
        self,
        x,
        timesteps,
        context=None,
        y_vec=None,
        cond=None,
        control=None,
        transformer_options=None,
        guidance=None,
        **kwargs,
    ):
        """Runs the MODEL's DIFFUSION_MODEL wrappers (e.g. EasyCache) around _forward, as core's DiTs do; with
        none registered the executor calls _forward directly. transformer_options goes last positionally because
        core's wrappers read it from args[-1]."""
        return run_diffusion_model_wrappers(
            self, x, timesteps, context, y_vec, cond, guidance, control, transformer_options, **kwargs
        )

    def _forward(
        self,
        x,
        timesteps,
        context=None,
        y_vec=None,
        cond=None,
        guidance=None,
        control=None,
        transformer_options=None,
        **kwargs,
    ):
        config = self.config
        patch = config.patch_size
        batch, _channels, frames, height, width = x.shape
        pad_h, pad_w = (-height) % patch, (-width) % patch
        if pad_h or pad_w:  # core's empty latents need not be patch-aligned; Flux pads the same way
            x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h, 0, 0), mode="replicate")
        if context is None:
            raise ValueError("Open-Sora 2.0 needs T5 text states: connect positive / negative CONDITIONING")
        if context.ndim == 4:  # [B, 1, L, D] from an encoder that keeps the 1.x layout
            context = context[:, 0]
        if y_vec is None:
            raise ValueError(
                "Open-Sora 2.0 needs the CLIP-L pooled vector (pooled_output) in the conditioning: encode with "
                "Open-Sora Encode Prompt (version 2.0) or core DualCLIPLoader(type=flux) + CLIPTextEncode"
            )
        if cond is None:  # text-to-video: mask and reference are all zero
            cond = x.new_zeros(batch, 1 + config.in_channels // patch**2, frames, *x.shape[-2:])
        elif pad_h or pad_w:
            cond = torch.nn.functional.pad(cond, (0, pad_w, 0, pad_h, 0, 0), mode="replicate")
        if config.guidance_embed and guidance is None:
            raise ValueError("this MMDiT has a guidance embedding: add guidance to the conditioning (FluxGuidance)")
        padded_h, padded_w = x.shape[-2:]
        img = pack(x, patch)
        block_replace = dit_block_patches(
            transformer_options,
            len(self.double_blocks),
            len(self.single_blocks),
            context.shape[1],
            img.shape[1],
            self.attention_backend,
        )
        out = MMDiT.forward(
            self,
            img=img,
            img_ids=image_ids(frames, padded_h, padded_w, patch, device=x.device).to(x.dtype),
            txt=context.to(x.dtype),
            txt_ids=text_ids(context.shape[1], device=x.device).to(x.dtype),
            timesteps=timesteps.float(),
            y_vec=y_vec.to(x.dtype),
            cond=pack(cond.to(x.dtype), patch),
            guidance=None if guidance is None else guidance.float(),
            block_replace=block_replace,
        )
        return unpack(out, frames, padded_h, padded_w, patch)[..., :height, :width]


BLOCK_TYPES = {"double_block": "double", "single_block": "single"}


def dit_block_patches(
    transformer_options: dict | None,
    double_blocks: int,
    single_blocks: int,
    text_tokens: int,
    image_tokens: int,
    attention_backend: str = "sdpa",
) -> dict:
    """Core's "dit" block replacements (transformer_options["patches_replace"]["dit"][("double_block", i)] or
    ("single_block", i), as set by set_model_patch_replace / SkipLayerGuidanceDiT) for MMDiT.forward. Each patch gets
    the args core's Flux gives it: also "attn_mask" (None: the MMDiT attends to every token) and its own copy of
    transformer_options with block_type / block_index / total_blocks (and img_slice, where the image tokens sit in a
    single block's joint sequence); the original block it calls attends with those options, so an attention override
    the patch puts there applies to that block (core_attention). Other keys are for other models: ignored."""
    options = transformer_options or {}
    patches = options.get("patches_replace", {}).get("dit", {})
    totals = {"double_block": double_blocks, "single_block": single_blocks}
    replace = {}
    for key, patch in patches.items():
        if isinstance(key, tuple) and len(key) == 2 and key[0] in BLOCK_TYPES and 0 <= key[1] < totals[key[0]]:
            block_options = {
                **options,
                "block_type": BLOCK_TYPES[key[0]],
                "block_index": key[1],
                "total_blocks": totals[key[0]],
            }
            if key[0] == "single_block":
                block_options["img_slice"] = [text_tokens, text_tokens + image_tokens]
            replace[key] = _with_core_args(patch, block_options, options, attention_backend)
    return replace


def _with_core_args(patch, block_options: dict, forward_options: dict, attention_backend: str):
    def call(args: dict, extra: dict) -> dict:
        original_block = extra["original_block"]

        def checked_original(block_args: dict) -> dict:
            if block_args.get("attn_mask") is not None:
                raise ValueError(
                    "A block patch passed an attention mask to the Open-Sora 2.0 MMDiT block, which attends to every "
                    "token and takes no mask (the official model has none); this patch is not supported here."
                )
            core_attention.select(attention_backend, block_args.get("transformer_options", block_options))
            try:
                return original_block(block_args)
            finally:
                core_attention.select(attention_backend, forward_options)

        core_args = {**args, "attn_mask": None, "transformer_options": block_options}
        return patch(core_args, {**extra, "original_block": checked_original})

    return call


class OpenSoraDCAELatent(PrincipalComponentPreview, comfy.latent_formats.LatentFormat):
    """Video DC-AE latents as Load Open-Sora VAE's DC-AE returns them (already scaled as chosen there)."""

    latent_channels = sizes.LATENT_CHANNELS["2.0 DC-AE"]
    latent_dimensions = 3
    scale_factor = 1.0


def autoencoder_of(config: MMDiTConfig) -> str:
    """The autoencoder an MMDiT works with: "dc_ae" for patch 1 (official high_compression.py), else "hunyuan"."""
    return "dc_ae" if config.patch_size == 1 else "hunyuan"


class OpenSoraV2ModelConfig(OpenSoraBaseModelConfig):
    sampling_settings = {"multiplier": 1.0, "shift": 1.0}  # MMDiT embeds 1000 * t itself
    latent_format = comfy.latent_formats.HunyuanVideo

    def get_model(self, state_dict=None, prefix="", device=None):
        return OpenSoraV2Model(self, device=device)


class OpenSoraV2DCAEModelConfig(OpenSoraV2ModelConfig):
    latent_format = OpenSoraDCAELatent


class OpenSoraV2Model(OpenSoraBaseModel):
    """BaseModel around the MMDiT; extra_conds routes the CLIP pooled vector and the reference condition."""

    def __init__(self, model_config, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.FLOW, device=device, unet_model=ComfyMMDiT)
        self.opensora_version = "2.0"
        self.opensora_autoencoder = autoencoder_of(model_config.unet_config["config"])

    def memory_required(self, input_shape, cond_shapes=None) -> int:
        """Bytes of one forward on a latent batch [B, C, T, H, W] (see OpenSoraModel.memory_required), image
        tokens (patch 2, or 1 for the DC-AE variant) plus the T5 tokens of the conditioning."""
        return forward_memory(self.diffusion_model, input_shape, text_tokens(cond_shapes), compute_dtype(self))

    def extra_conds_shapes(self, **kwargs):
        """The T5 states' shape for core's estimate_memory (prepare_sampling), which passes these as cond_shapes."""
        cross = kwargs.get("cross_attn")
        return {} if cross is None else {"c_crossattn": list(cross.shape)}

    def extra_conds(self, **kwargs):
        self.check_conds(kwargs, 1.0)  # sampling_settings' multiplier
        out = {}
        cross = kwargs.get("cross_attn")
        if cross is not None:
            # CONDRegular, not CONDCrossAttn: core pads different text lengths by repeating the tokens, which
            # changes an unmasked joint attention; texts of different length run as separate batches instead.
            out["c_crossattn"] = comfy.conds.CONDRegular(cross)
        pooled = kwargs.get("pooled_output")
        if pooled is not None:
            out["y_vec"] = comfy.conds.CONDRegular(pooled)
        cond = kwargs.get("opensora_cond")
        if cond is not None:
            out["cond"] = comfy.conds.CONDRegular(cond)
        guidance = kwargs.get("guidance")
        if guidance is not None and self.diffusion_model.config.guidance_embed:
            out["guidance"] = comfy.conds.CONDRegular(torch.FloatTensor([guidance]))
        return out


def text_tokens(cond_shapes: dict | None) -> int:
    """T5 tokens per row from core's cond_shapes: the "c_crossattn" shapes [B, L, D] ([B, 1, L, D] for an encoder
    with the 1.x layout). calc_cond_batch lists the batched conds' shapes and prepare_sampling those of
    extra_conds_shapes; without any (e.g. a DynamicVRAM patcher asks with the shape alone), the official 512."""
    shapes = (cond_shapes or {}).get("c_crossattn") or []
    lengths = [int(shape[-2]) for shape in shapes if len(shape) >= 3]
    return max(lengths) if lengths else OFFICIAL_TEXT_TOKENS


def mmdit_config(config_values: dict) -> MMDiTConfig:
    """MMDiTConfig from detected + folder config values; keys that are not MMDiT fields (e.g. an HF
    config.json's "architectures") are dropped."""
    return MMDiTConfig.from_dict({k: v for k, v in config_values.items() if k in CONFIG_FIELDS})


def build_mmdit_patcher(
    sd: dict, info, config_values: dict, weight_dtype: torch.dtype | None, fp8_matmul: bool = False
):
    """Build the ComfyUI MODEL for an Open-Sora 2.0 MMDiT state dict (already detected as "mmdit"); the DC-AE
    variant gets the DC-AE latent format, the others the HunyuanVideo one."""
    config = mmdit_config(config_values)
    model_config = OpenSoraV2DCAEModelConfig if autoencoder_of(config) == "dc_ae" else OpenSoraV2ModelConfig
    return build_patcher(model_config, {"config": config}, sd, weight_dtype, info.description, fp8_matmul=fp8_matmul)
