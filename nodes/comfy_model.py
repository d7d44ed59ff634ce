"""The seam between opensora_lib's DiTs and ComfyUI's model machinery.

An Open-Sora DiT becomes a `comfy.model_base.BaseModel` (ModelType.FLOW) whose `diffusion_model` is the
library model built with `comfy.ops`, wrapped in a (Core)ModelPatcher. That gives the memory manager,
weight casting, fp8 storage, low-VRAM streaming, LoRA patching and core samplers to the pack for free.

Core's FLOW sampling is x_t = sigma*noise + (1-sigma)*x0 with the model returning v = noise - x0 (CONST).
Open-Sora 2.0 predicts exactly that; 1.x predicts x0 - noise on t = 1000*sigma, so its wrapper negates.
"""

from __future__ import annotations

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.supported_models_base
import comfy.utils
import torch

from ..opensora_lib import checkpoint, packed_linear, rflow, sizes
from ..opensora_lib.memory import forward_memory
from ..opensora_lib.stdit3 import STDiT3, STDiT3Config, read_step_values, reads_tensor_values
from . import core_attention, packed_layers
from .common import (
    check_conditioning_version,
    check_v1_text,
    compute_dtype,
    match_timestep_scale,
    warn_once,
)
from .context_windows import resize_reference_cond
from .previews import PrincipalComponentPreview

PatcherClass = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


class OpenSoraLatent12(PrincipalComponentPreview, comfy.latent_formats.LatentFormat):
    """1.2 VAE latents are already normalised by the VAE (shift/scale), so no further scaling here."""

    latent_channels = sizes.LATENT_CHANNELS["1.2"]
    latent_dimensions = 3


class OpenSoraLatent13(PrincipalComponentPreview, comfy.latent_formats.LatentFormat):
    latent_channels = sizes.LATENT_CHANNELS["1.3"]
    latent_dimensions = 3


LATENT_FORMATS = {"1.2": OpenSoraLatent12, "1.3": OpenSoraLatent13}
TIMESTEP_MULTIPLIER = 1000.0  # the STDiT3 takes t x 1000 (the official rectified flow's timesteps)


class ComfySTDiT3(STDiT3):
    """STDiT3 called the way BaseModel calls a diffusion model; returns core's velocity convention."""

    attention_backend = "sdpa"  # Load Open-Sora DiT sets the one chosen there

    def __init__(self, config: STDiT3Config, dtype=None, device=None, operations=None, **_ignored):
        super().__init__(config, dtype=dtype, device=device, operations=operations or comfy.ops.disable_weight_init)
        self.dtype = dtype  # BaseModel.get_dtype() reads it

    def null_caption(self) -> torch.Tensor:
        """The learned null caption (the 1.x negative without a negative prompt), [1, tokens, width] fp32 on CPU."""
        return self.y_embedder.y_embedding.to("cpu", torch.float32)[None]  # only a move: the weight may be offloaded

    def forward(self, x, timesteps, context=None, control=None, transformer_options=None, **kwargs):
        """Runs the MODEL's DIFFUSION_MODEL wrappers (e.g. EasyCache) around _forward, as core's DiTs do; with
        none registered the executor calls _forward directly. transformer_options goes last positionally because
        core's wrappers read it from args[-1].

        The tensor values the forward needs as numbers (pixel height / width, caption lengths) are read here first,
        in one eager call: under core's TorchCompileModel this is the outermost frame, so the rest of the forward is
        one graph (a read deeper down would split every frame above it)."""
        if (transformer_options or {}).get("patches_replace", {}).get("dit"):
            warn_block_patches_ignored()
        height, width, mask = kwargs.get("height"), kwargs.get("width"), kwargs.get("attention_mask")
        if reads_tensor_values(height, width, mask, kwargs.get("caption_lengths")):
            values = read_step_values(context, mask, height, width, len(x))
            kwargs["height"], kwargs["width"], kwargs["caption_lengths"] = values
        return run_diffusion_model_wrappers(self, x, timesteps, context, control, transformer_options, **kwargs)

    def _forward(self, x, timesteps, context=None, control=None, transformer_options=None, **kwargs):
        mask = kwargs.pop("attention_mask", None)
        out = STDiT3.forward(
            self, x, timesteps, context.unsqueeze(1) if context.ndim == 3 else context, mask=mask, **kwargs
        )
        channels = x.shape[1]
        return -out[:, :channels]  # 1.x predicts x0 - noise; core's CONST expects noise - x0


def warn_block_patches_ignored() -> None:
    """Core's "dit" block patches (e.g. from SkipLayerGuidanceDiT) name Flux-style double / single blocks; the
    STDiT3 has spatial / temporal block pairs, so they are not applied: say so once instead of silently."""
    warn_once(
        "stdit3 dit patches",
        "OpenSora: block patches (patches_replace 'dit', e.g. SkipLayerGuidanceDiT) are not applied to the "
        "Open-Sora 1.x STDiT3; they work with the 2.0 MMDiT",
    )


def run_diffusion_model_wrappers(module: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
    """module._forward(*args, **kwargs) inside the DIFFUSION_MODEL wrappers of transformer_options (args[-1]),
    the way core's comfy/ldm models split forward -> WrapperExecutor -> _forward, with the module's attention
    (its loader's backend, or ComfyUI's where the MODEL asks for it: core_attention)."""
    transformer_options = args[-1] if args[-1] is not None else {}
    wrappers = comfy.patcher_extension.get_all_wrappers(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, transformer_options
    )
    executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(module._forward, module, wrappers)
    core_attention.select(module.attention_backend, transformer_options)
    try:
        return executor.execute(*args[:-1], transformer_options, **kwargs)
    finally:
        core_attention.select(module.attention_backend, None)  # lets go of the options


class OpenSoraBaseModelConfig(comfy.supported_models_base.BASE):
    """What the 1.x and 2.0 model configs share."""

    unet_extra_config = {}
    supported_inference_dtypes = [torch.bfloat16, torch.float32]
    # No memory_usage_factor: core reads it only in BaseModel.memory_required (0.3.75 and 0.33.0), which
    # OpenSoraBaseModel's subclasses replace with opensora_lib/memory.forward_memory (core's area x factor 2.0
    # was ~5x too high for STDiT3).


class OpenSoraBaseModel(comfy.model_base.BaseModel):
    """What the 1.x and 2.0 BaseModels share: the checks that open extra_conds, and the reference conds cut to
    a context window. Subclasses set opensora_version."""

    opensora_version: str

    def check_conds(self, kwargs: dict, multiplier: float) -> None:
        """A conditioning of this model's version, and core's sampling multiplier left as the model's config set it."""
        check_conditioning_version(kwargs.get("opensora_version"), self.opensora_version, "A conditioning")
        match_timestep_scale(self.model_sampling, multiplier, self.opensora_version)

    def resize_cond_for_context_window(self, cond_key, cond_value, window, x_in, device, retain_index_list=[]):  # noqa: B006 (core's signature)
        return resize_reference_cond(cond_key, cond_value, window, x_in, device, retain_index_list)


class OpenSoraModelConfig(OpenSoraBaseModelConfig):
    sampling_settings = {"multiplier": TIMESTEP_MULTIPLIER, "shift": 1.0}

    def __init__(self, unet_config: dict, latent_format):
        self.latent_format = latent_format
        super().__init__(unet_config)

    def get_model(self, state_dict=None, prefix="", device=None):
        return OpenSoraModel(self, device=device)


class OpenSoraModel(OpenSoraBaseModel):
    """BaseModel around STDiT3; extra_conds forwards Open-Sora's conditioning as DiT kwargs."""

    def __init__(self, model_config, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.FLOW, device=device, unet_model=ComfySTDiT3)
        self.opensora_version = model_config.unet_config["version"]

    def memory_required(self, input_shape, cond_shapes=None) -> int:
        """Bytes of one forward on a latent batch [B, C, T, H, W], for core's prepare_sampling (KSampler,
        SamplerCustomAdvanced) and calc_cond_batch, which batches conds only while 1.5x this fits; the same
        opensora_lib.memory.forward_memory the pack's Sampler node passes. The caption is cross-attention only."""
        return forward_memory(self.diffusion_model, input_shape, 0, compute_dtype(self))

    def extra_conds(self, **kwargs):
        import comfy.conds

        self.check_conds(kwargs, TIMESTEP_MULTIPLIER)
        kwargs = {**kwargs, **self.core_sampler_defaults(kwargs)}
        out = {}
        cross = kwargs.get("cross_attn")
        if cross is not None:
            channels = self.diffusion_model.config.caption_channels
            check_v1_text(cross, kwargs.get("attention_mask"), "A conditioning", channels)
            out["c_crossattn"] = comfy.conds.CONDRegular(cross)
        bf16 = compute_dtype(self) == torch.bfloat16
        for name in ("attention_mask", "fps", "height", "width", "cond", "cond_mask", "y_null", "x_mask"):
            value = kwargs.get(name)
            if value is not None and bf16 and name in ("fps", "height", "width"):
                value = rflow.bf16_size(value)  # as the official bf16 inference hands them to the DiT (quirk Q2)
            if value is not None:
                out[name] = (
                    comfy.conds.CONDRegular(value) if torch.is_tensor(value) else comfy.conds.CONDConstant(value)
                )
        mask_index = kwargs.get("mask_index")
        if mask_index is not None:
            out["mask_index"] = comfy.conds.CONDConstant(tuple(mask_index))
        return out

    def core_sampler_defaults(self, kwargs: dict) -> dict:
        """What core's samplers (KSampler, CFGGuider) do not give, for Encode Prompt's conditioning: fps 24 (120
        for one latent frame, as the reference for an image) and the pixel size from the latent (the official table
        size with that latent size, else the latent x8; core's own default reads a 4D image latent's dims, wrong for
        [B, C, T, H, W]), and for the null-caption negative the learned null caption with all its tokens. The pack's
        Sampler and Guiders set fps and sizes themselves (the latent's exact size and fps) and mask the null caption
        by the prompt (Q1)."""
        noise, defaults = kwargs.get("noise"), {}
        if kwargs.get("fps") is None and noise is not None and noise.ndim == 5:
            frames, height, width = noise.shape[2:]
            height, width = sizes.v1_size_for_latent(self.opensora_version, height, width)
            defaults = {"height": height, "width": width}
            defaults["fps"] = rflow.conditioning_fps(None, frames)  # one latent frame is one image
        if kwargs.get("opensora_null_caption"):
            y_null = self.diffusion_model.null_caption()
            defaults.update(cross_attn=y_null, attention_mask=torch.ones(y_null.shape[:2], dtype=torch.long))
        return defaults


def build_patcher(
    model_config_class,
    unet_config: dict,
    sd: dict,
    weight_dtype: torch.dtype | None,
    what: str,
    *args,
    fp8_matmul: bool = False,
):
    """Build a ComfyUI MODEL: pick the weight/compute dtypes as core's loaders do, build the BaseModel on the
    offload device with comfy.ops layers, load the weights strictly, wrap it in the (Core)ModelPatcher.
    fp8_matmul: core's "fp8_e4m3fn_fast" (UNETLoader sets the same model_config optimization), fp8 matrix
    multiplication where the GPU supports it (comfy.ops.pick_operations), plain fp8 storage elsewhere."""
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    supported = model_config_class.supported_inference_dtypes
    if weight_dtype is None:  # the file's dtype counts as in core's loader: an fp8 file may stay fp8
        params = sum(v.numel() for v in sd.values())
        stored = comfy.utils.weight_dtype(sd)
        weight_dtype = comfy.model_management.unet_dtype(
            model_params=params, supported_dtypes=supported, weight_dtype=stored
        )
    manual_cast = comfy.model_management.unet_manual_cast(weight_dtype, load_device, supported)
    model_config = model_config_class(unet_config, *args)
    model_config.set_inference_dtype(weight_dtype, manual_cast)
    model_config.unet_config["dtype"] = weight_dtype
    model_config.optimizations["fp8"] = fp8_matmul
    model = model_config.get_model(device=offload_device)
    load_weights(model.diffusion_model, sd, weight_dtype, manual_cast or weight_dtype, what)
    if packed_linear.packed_layers(model.diffusion_model):  # packed weights: their own patcher and saving
        packed_layers.save_expanded(model.model_config, model.diffusion_model)
        return packed_layers.PackedModelPatcher(model, load_device=load_device, offload_device=offload_device)
    return PatcherClass(model, load_device=load_device, offload_device=offload_device)


def build_stdit3_patcher(
    sd: dict, info, config_values: dict, weight_dtype: torch.dtype | None, fp8_matmul: bool = False
) -> comfy.model_patcher.ModelPatcher:
    """The ComfyUI MODEL for an STDiT3 state dict (already detected as "stdit3")."""
    version = info.version
    unet_config = {"config": STDiT3Config.from_dict(config_values), "version": version}
    what = f"the {version} STDiT3"
    return build_patcher(
        OpenSoraModelConfig, unet_config, sd, weight_dtype, what, LATENT_FORMATS[version], fp8_matmul=fp8_matmul
    )


def expected_shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    """Key -> shape the module loads. Newer ComfyUI's DynamicVRAM builds comfy.ops Linear layers with
    weight and bias None until load_state_dict, so state_dict() lacks them; they are added from the layer."""
    shapes = {key: value.shape for key, value in module.state_dict().items()}
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear) and layer.weight is None:
            prefix = f"{name}." if name else ""
            shapes[prefix + "weight"] = torch.Size((layer.out_features, layer.in_features))
            if getattr(layer, "comfy_need_lazy_init_bias", False):
                shapes[prefix + "bias"] = torch.Size((layer.out_features,))
    return shapes


def load_weights(
    module: torch.nn.Module, sd: dict, weight_dtype: torch.dtype, compute_dtype: torch.dtype, what: str
) -> None:
    """Strict load that stores matrices in weight_dtype (fp8 too) and the rest in the compute dtype; packed matrices
    (QuantizedWeight) of Linear layers stay in their blocks (packed_layers.ComfyPackedLinear).

    assign=True because under newer ComfyUI's DynamicVRAM the comfy.ops layers allocate no weights.
    """
    expected = expected_shapes(module)
    missing = [k for k in expected if k not in sd and k != "rope.freqs"]  # a constant the file may omit
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise ValueError(f"The checkpoint does not match {what}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(expected[k])}" for k in sd if sd[k].shape != expected[k]]
    if wrong:  # the lazy comfy.ops loader assigns any shape, so check here
        raise ValueError(f"The checkpoint does not match {what}: wrong shapes {wrong[:5]}")
    converted = {}
    # packed matrices (QuantizedWeight: GGUF blocks, scaled fp8 rows) stay packed where they are a Linear's weight
    for key, tensor in packed_linear.install_all(module, sd, weight_dtype, packed_layers.ComfyPackedLinear).items():
        if tensor.is_floating_point():
            tensor = tensor.to(weight_dtype if checkpoint.is_matrix(key, tensor.ndim) else compute_dtype)
        converted[key] = tensor
    module.load_state_dict(converted, strict=False, assign=True)
