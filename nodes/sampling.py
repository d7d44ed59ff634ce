"""Sampling nodes: the reference samplers as one node, plus GUIDER and SIGMAS for core's SamplerCustomAdvanced."""

from __future__ import annotations

import logging
from collections.abc import Callable

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import torch

from ..opensora_lib import rflow
from ..opensora_lib.conditioning_v1 import (
    V12_ALIGN,
    apply_mask_strategy,
    cond_type_placements,
    image_strategies,
    mask_strategies_for,
    place_references,
)
from ..opensora_lib.schedules import rflow_timesteps
from .common import (
    CATEGORY,
    Progress,
    check_choices,
    check_v1_text,
    compute_dtype,
    conditioning_entry,
    hooks_of,
    load_for_sampling,
)
from .latent import latent_label, video_info
from .previews import previewer_for

# The key under which core's TorchCompileModel (comfy_api.torch_helpers.set_torch_compile_wrapper) registers its
# APPLY_MODEL wrapper, which swaps the compiled module(s) into the BaseModel around each call.
try:
    from comfy_api.torch_helpers.torch_compile import COMPILE_KEY
except ImportError:  # a host without the helper has no TorchCompileModel either
    COMPILE_KEY = "torch.compile"

log = logging.getLogger("OpenSora")


def model_version(model) -> str:
    version = getattr(model.model, "opensora_version", None)
    if version is None:
        raise ValueError("This MODEL is not an Open-Sora DiT: load it with Load Open-Sora DiT.")
    return version


def check_versions(model, latent: dict) -> dict:
    info = video_info(latent)
    version = model_version(model)
    if info["version"] != version:
        raise ValueError(
            f"The latent was made for Open-Sora {latent_label(info)} but the model is Open-Sora {version}."
        )
    return info


def text_of(conditioning: list, what: str, version: str) -> tuple[torch.Tensor | None, dict]:
    """(T5 states, meta) of a 1.x CONDITIONING for a `version` model; (None, meta) for the null-caption marker,
    which only a negative may be."""
    tensor, meta = conditioning_entry(conditioning, what, version)
    if meta.get("opensora_null_caption"):
        if what == "positive":
            raise ValueError("The positive conditioning is the null caption; connect the positive output.")
        return None, meta
    if "attention_mask" not in meta:
        raise ValueError(f"The {what} conditioning has no T5 attention mask: encode it with Open-Sora Encode Prompt.")
    check_v1_text(tensor, meta["attention_mask"], f"The {what} conditioning")
    return tensor, meta


def v1_text(model, positive: list, negative: list, device, dtype) -> rflow.RFlowText:
    """Positive T5 states + mask; negative prompt, or the learned null caption (masked by the positive, Q1)."""
    version = model_version(model)
    y, meta = text_of(positive, "positive", version)
    y_null = model.model.diffusion_model.null_caption().to(device, dtype)[None]
    text = rflow.RFlowText(y=y.to(device, dtype)[:, None], mask=meta["attention_mask"].to(device), y_null=y_null)
    negative_y, negative_meta = text_of(negative, "negative", version)
    if negative_y is not None:
        text.negative_y = negative_y.to(device, dtype)[:, None]
        text.negative_mask = negative_meta["attention_mask"].to(device)
    return text


def check_reference_fits(reference: dict, z: torch.Tensor) -> None:
    """Encode Reference made its entry for the latent as it was then: a core latent node after it (LatentUpscaleBy,
    TrimVideoLatent) changes the samples but not the entry."""
    ref, index = reference["latent"], list(reference["mask_index"])
    check_reference_rows(ref, z)
    if tuple(ref.shape[3:]) != tuple(z.shape[3:]) or not all(0 <= frame < z.shape[2] for frame in index):
        raise ValueError(
            f"The Open-Sora Encode Reference (reference latent {list(ref.shape)} for latent frames {index}) does not "
            f"fit this latent {list(z.shape)}: a node after Encode Reference (e.g. LatentUpscaleBy, TrimVideoLatent) "
            "changed the latent. Run Encode Reference after that node."
        )


def check_reference_rows(ref: torch.Tensor, z: torch.Tensor) -> None:
    """A reference shared by the batch (1 row) or one per video: a node after Encode Reference that changed the
    batch (RepeatLatentBatch, LatentFromBatch) leaves one per video of the old batch."""
    if ref.shape[0] not in (1, z.shape[0]):
        raise ValueError(
            f"The Open-Sora Encode Reference holds {ref.shape[0]} references, one per video of its latent, but this "
            f"latent has a batch of {z.shape[0]}: a node after Encode Reference changed the batch (e.g. "
            "RepeatLatentBatch, LatentFromBatch). Run Encode Reference after that node."
        )


def v1_references(reference: dict, z: torch.Tensor) -> list[torch.Tensor]:
    """The reference latents of an Encode Reference entry: one video (v2v_head), else one per image (the official
    "a.png;b.png" references; i2v_loop: start, end)."""
    ref = reference["latent"].to(z.device, z.dtype)
    if reference["cond_type"] == "v2v_head":
        return [ref]
    return [ref[:, :, k : k + 1] for k in range(ref.shape[2])]


def v1_reference(latent: dict, z: torch.Tensor) -> rflow.ReferenceConditioning | None:
    """1.3: the DiT's reference input, placed as the official cond types (conditioning_v1.cond_type_placements)."""
    reference = latent.get("opensora_reference")
    if reference is None:
        return None
    check_reference_fits(reference, z)
    references = v1_references(reference, z)
    if reference["cond_type"] == "frame_index":
        placements = [(0, 0, reference["mask_index"][0])]
    else:
        lengths = [r.shape[2] for r in references]
        placements = cond_type_placements(reference["cond_type"], z.shape[2], lengths)
    return place_references(z.shape, references, placements)


def v1_conditioning(version: str, latent: dict, z: torch.Tensor):
    """(z, sampler conditioning) for a 1.x latent. 1.3 conditions the DiT on the reference (cond channels); 1.2
    has no such input and, as its official inference, writes the reference frames into z with a mask strategy
    (edit ratio 0: those latent frames are kept) aligned to multiples of 5 latent frames (official align = 5:
    i2v_tail on 15 latent frames lands on frame 10)."""
    if version != "1.2":
        return z, v1_reference(latent, z)
    reference = latent.get("opensora_reference")
    if reference is None:
        return z, None
    check_reference_fits(reference, z)
    references = v1_references(reference, z)  # no z-sized placed copy: the strategies place them
    if reference["cond_type"] == "v2v_head":  # one video: consecutive frames in one group
        strategies = mask_strategies_for(reference["mask_index"], references[0].shape[2])
    else:  # each image its own reference id, so aligning moves only its target
        strategies = image_strategies(reference["mask_index"], len(references))
    z, mask = apply_mask_strategy(z, references, strategies, align=V12_ALIGN)
    asked = sorted(index % z.shape[2] for index in reference["mask_index"])
    kept = [] if mask is None else (mask.frame_mask[0] == 0).nonzero().flatten().tolist()
    if kept != asked:
        log.info("OpenSora: 1.2 reference at latent frame(s) %s, aligned from %s (official align = 5)", kept, asked)
    return z, mask


def without_diffusion_model_wrappers(transformer_options: dict) -> list[str]:
    """Drop the DIFFUSION_MODEL wrappers from the Sampler node's transformer_options (a clone) and warn once.

    ComfySTDiT3 / ComfyMMDiT run them, but wrappers such as EasyCache rely on state that core's samplers put into
    transformer_options (its OUTER_SAMPLE wrapper's holder, calc_cond_batch's "sigmas" and "uuids"), which the
    reference samplers do not provide: they would crash or cache across the wrong passes. Without them the output
    is the one without the wrapper. Returns the dropped wrappers' keys."""
    wrappers = transformer_options.get("wrappers", {}).pop(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {})
    names = [str(key) for key, functions in wrappers.items() if functions]
    if names:
        log.warning(
            "OpenSora: the Open-Sora Sampler node ignores this MODEL's diffusion-model wrappers (%s): they need core's "
            "sampler context. To use them, sample with the Open-Sora Guider + Open-Sora Sigmas in core's "
            "SamplerCustomAdvanced (or with KSampler).",
            ", ".join(names),
        )
    return names


SAMPLING_HOOKS = (
    "sampler_calc_cond_batch_function",
    "sampler_pre_cfg_function",
    "sampler_cfg_function",
    "sampler_post_cfg_function",
    "model_function_wrapper",
    "context_handler",
)


def warn_sampling_hooks(model_options: dict) -> list[str]:
    """Warn once per run about the MODEL's sampling hooks (e.g. SkipLayerGuidanceDiT's post-CFG function), which
    belong to core's samplers and which the Sampler node's reference loop does not run. Returns their names."""
    names = [name for name in SAMPLING_HOOKS if model_options.get(name)]
    if names:
        log.warning(
            "OpenSora: the Open-Sora Sampler node does not run this MODEL's sampling hooks (%s, e.g. from "
            "SkipLayerGuidanceDiT or Context Windows): sample with the Open-Sora Guider + Open-Sora Sigmas in core's "
            "SamplerCustomAdvanced, which runs them (all but a sampler_cfg_function: Open-Sora's guidance replaces "
            "the CFG formula).",
            ", ".join(names),
        )
    return names


def diffusion_model_runner(model) -> Callable[..., torch.Tensor]:
    """A function calling `model.model.diffusion_model(*args, **kwargs)` as core's BaseModel.apply_model reaches it,
    so that core's MODEL patches apply to the Sampler node:

    - object patches (e.g. "diffusion_model" replaced by a wrapper module) are in place once the patcher is loaded;
      the module is looked up at every call, never held;
    - TorchCompileModel's APPLY_MODEL wrapper (key "torch.compile") runs around every call and swaps the compiled
      module in, as it does around apply_model;
    - the forward gets the MODEL's transformer_options with its wrappers merged in, as core's prepare_model_patcher
      builds them.

    Other APPLY_MODEL wrappers are not run: they are written for apply_model's contract (sigma in, denoised out,
    core's argument order), which the reference samplers do not use (their exact timesteps and velocities are not
    reachable through it bit for bit). Sampler-level hooks (model_function_wrapper, cfg functions, PREDICT_NOISE /
    SAMPLER_SAMPLE / OUTER_SAMPLE wrappers) belong to core's samplers: use the Guider with SamplerCustomAdvanced.
    DIFFUSION_MODEL wrappers are removed (see without_diffusion_model_wrappers).
    """
    options = comfy.model_patcher.create_model_options_clone(model.model_options)
    warn_sampling_hooks(options)
    if "model_sampling" in model.object_patches:
        log.warning(
            "OpenSora: the Open-Sora Sampler node samples on Open-Sora's own schedule (its timestep_transform), so "
            "this MODEL's model sampling node (e.g. ModelSamplingSD3 / ModelSamplingFlux shift) is ignored; for that "
            "schedule use the Open-Sora Guider with core's BasicScheduler in SamplerCustomAdvanced, or KSampler."
        )
    transformer_options = options.setdefault("transformer_options", {})
    comfy.patcher_extension.merge_nested_dicts(
        transformer_options.setdefault("wrappers", {}), model.wrappers, copy_dict1=False
    )
    without_diffusion_model_wrappers(transformer_options)
    apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    wrappers = comfy.patcher_extension.get_wrappers_with_key(apply_model, COMPILE_KEY, transformer_options)
    base = model.model

    def forward(*args, **kwargs):
        return base.diffusion_model(*args, transformer_options=transformer_options, **kwargs)

    def run(*args, **kwargs):
        executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(forward, base, wrappers)
        return executor.execute(*args, **kwargs)

    return run


def dit_caller(model) -> Callable[..., torch.Tensor]:
    """sample_rflow's model: the official STDiT3 signature in, the official prediction out, fed in the model's compute
    dtype. It calls ComfySTDiT3's latent interface (what core calls, and what object patches and torch.compile wrap)
    through diffusion_model_runner; the renames (y -> context, mask -> attention_mask) and the sign are exact."""
    dtype = compute_dtype(model.model)
    run = diffusion_model_runner(model)

    def call(x, timestep, **kwargs):
        cast = {
            k: (
                v.to(dtype)
                if torch.is_tensor(v) and v.is_floating_point() and k not in ("height", "width", "fps")
                else v
            )
            for k, v in kwargs.items()
        }
        context, mask = cast.pop("y"), cast.pop("mask", None)
        # ComfySTDiT3 returns -prediction[:, :C] (core's CONST sign); negating it back is exact
        return -run(x.to(dtype), timestep, context=context, attention_mask=mask, **cast)

    return call


def _bool(tooltip: str) -> tuple:
    return ("BOOLEAN", {"default": True, "tooltip": tooltip})


def _scale(default: float, tooltip: str) -> tuple:
    return ("FLOAT", {"default": default, "min": 1.0, "max": 30.0, "step": 0.1, "tooltip": tooltip})


# Inputs shared by the Sampler and the Guider (one definition, so the two nodes cannot drift apart).
GUIDANCE_INPUTS = {
    "model": ("MODEL", {"tooltip": "From Load Open-Sora DiT."}),
    "positive": ("CONDITIONING", {"tooltip": "From Open-Sora Encode Prompt."}),
    "negative": ("CONDITIONING", {"tooltip": "From Open-Sora Encode Prompt (null caption or negative prompt)."}),
    "latent": ("LATENT", {"tooltip": "From Open-Sora Empty Latent Video (optionally through Encode Reference)."}),
}
CFG_INPUT = _scale(7.5, "Text guidance scale (official: 7.0 for 1.2, 7.5 for 1.3 and 2.0). 1.0 runs one pass per step.")
GUIDANCE_OPTIONS = {
    "image_cfg": _scale(5.0, "Image guidance scale for i2v / v2v (official: 5.0 for 1.3, 3.0 for 2.0)."),
    "oscillation": _bool(
        "Oscillation guidance for text: full scale for the first 10 steps and on even steps, 1.0 (one pass) on odd steps."
    ),
    "image_oscillation": _bool("Oscillation guidance for the image scale."),
    "scale_image_weight": _bool("i2v: image guidance ramps up along the video and down over the steps."),
}
FLAW_FIX_INPUT = _bool("1.3 t2v: rescale the guided velocity toward the conditional one's spread (official on).")


def v1_options(
    info: dict,
    cfg: float,
    image_cfg: float,
    oscillation: bool,
    image_oscillation: bool,
    scale_image_weight: bool,
    flaw_fix: bool,
    sdedit: bool,
    timestep_transform: bool = True,
    **extra,
) -> rflow.RFlowOptions:
    """The node switches as RFlowOptions; 1.3-only features stay off for 1.2, as the official configs."""
    v13 = info["version"] == "1.3"
    return rflow.RFlowOptions(
        cfg_scale=cfg,
        version=info["version"],
        use_timestep_transform=timestep_transform,
        use_oscillation_guidance=oscillation and v13,
        use_flaw_fix=flaw_fix and v13,
        image_cfg_scale=image_cfg,
        use_oscillation_guidance_for_image=image_oscillation and v13,
        scale_image_weight=scale_image_weight and v13,
        use_sdedit=sdedit and v13,
        **extra,
    )


GUIDANCE_PASS_MODES = ["batched", "one at a time"]


class OpenSoraSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **GUIDANCE_INPUTS,
                "seed": (
                    "INT",
                    {
                        "default": 1024,
                        "min": 0,
                        "max": 0xFFFFFFFFFFFFFFFF,
                        "control_after_generate": True,
                        "tooltip": "Seed of the initial noise (drawn as ComfyUI draws it, so core samplers with the same seed start from the same noise).",
                    },
                ),
                "steps": (
                    "INT",
                    {
                        "default": 30,
                        "min": 1,
                        "max": 200,
                        "tooltip": "Sampling steps (official: 30 for 1.x, 50 for 2.0).",
                    },
                ),
                "cfg": CFG_INPUT,
            },
            "optional": {
                **GUIDANCE_OPTIONS,
                "sdedit": _bool("1.3 i2v: re-noise the conditioned frames from the reference at every step."),
                "flaw_fix": FLAW_FIX_INPUT,
                "timestep_transform": _bool("Resolution- and length-dependent timestep shift (official on)."),
                "guidance_passes": (
                    GUIDANCE_PASS_MODES,
                    {
                        "default": "batched",
                        "tooltip": "2.0: run a step's guidance passes (up to 3) as one batch (faster, as the official) "
                        "or one at a time, so only one pass's activations are in memory (768px: ~12.2 GiB per pass in "
                        "bf16); results differ from batched by float rounding only. 1.x always batches.",
                    },
                ),
            },
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = f"{CATEGORY}/sampling"
    DESCRIPTION = (
        "Open-Sora's reference rectified-flow sampler with every official option, progress, previews and interruption."
    )

    def sample(
        self,
        model,
        positive,
        negative,
        latent,
        seed,
        steps,
        cfg,
        image_cfg=5.0,
        oscillation=True,
        image_oscillation=True,
        scale_image_weight=True,
        sdedit=True,
        flaw_fix=True,
        timestep_transform=True,
        guidance_passes="batched",
    ):
        check_choices(type(self), {"guidance_passes": guidance_passes})
        options = {
            "image_cfg": image_cfg,
            "oscillation": oscillation,
            "image_oscillation": image_oscillation,
            "scale_image_weight": scale_image_weight,
            "sdedit": sdedit,
            "flaw_fix": flaw_fix,
            "timestep_transform": timestep_transform,
        }
        info = check_versions(model, latent)
        mask = latent.get("noise_mask")
        if mask is not None and not bool((mask == 1).all()):  # an all-ones mask masks nothing
            raise ValueError(
                "The latent has a noise mask (SetLatentNoiseMask): the Open-Sora Sampler regenerates the whole video. "
                "For masked sampling use core KSampler or the Open-Sora Guider with SamplerCustomAdvanced, which "
                "honour it; for image / video conditioning use Open-Sora Encode Reference."
            )
        if hooks_of(positive) or hooks_of(negative):
            from .guider import sample_with_hooks

            return (sample_with_hooks(model, positive, negative, latent, seed, steps, cfg, options),)
        if info["version"] == "2.0":
            from .sampling_v2 import sample_v2_node

            return sample_v2_node(
                model, positive, negative, latent, seed, steps, cfg, **options, guidance_passes=guidance_passes
            )
        # cond, uncond (, image uncond for a 1.3 reference) batched
        passes = rflow.max_passes(latent.get("opensora_reference") is not None and info["version"] == "1.3")
        device, dtype = load_for_sampling(model, latent["samples"].shape, passes)
        z = comfy.sample.prepare_noise(latent["samples"], seed, latent.get("batch_index")).to(device)
        z, cond = v1_conditioning(info["version"], latent, z)
        rflow_options = v1_options(info, cfg, **options, num_steps=steps, bf16_inputs=dtype == torch.bfloat16)
        generator = torch.Generator().manual_seed((seed + 1) % 2**64)  # the widget allows seed 2**64 - 1

        def noise(shape, noise_dtype, noise_device):
            return torch.randn(shape, generator=generator, dtype=torch.float32).to(noise_device, noise_dtype)

        out = rflow.sample_rflow(
            dit_caller(model),
            z,
            v1_text(model, positive, negative, device, dtype),
            rflow_options,
            height=info["height"],
            width=info["width"],
            num_frames=info["num_frames"],
            fps=info.get("fps"),
            cond=cond,
            noise=noise,
            callback=Progress(steps, previewer_for(model)),
        )
        result = {k: v for k, v in latent.items() if k != "opensora_reference"}
        result["samples"] = out.float().to(comfy.model_management.intermediate_device())
        return (result,)


def flow_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """SIGMAS for core's samplers: the shifted schedule's first value can round to 1.0000001 in float32, and core's
    half-log-SNR samplers (CFG++, dpmpp_*_sde, res_multistep) take logit(sigma), NaN above 1; clamp it to 1."""
    return sigmas.clamp(max=1.0)


class OpenSoraSigmas:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "latent": (
                    "LATENT",
                    {"tooltip": "From Open-Sora Empty Latent Video: its size and length set the shift."},
                ),
                "steps": ("INT", {"default": 30, "min": 1, "max": 200, "tooltip": "Sampling steps."}),
            },
            "optional": {
                "timestep_transform": (
                    "BOOLEAN",
                    {"default": True, "tooltip": "Apply Open-Sora's resolution- and length-dependent shift."},
                ),
                "model": (
                    "MODEL",
                    {
                        "tooltip": "1.x: the MODEL the Guider samples with. When it computes in bf16 the shift is "
                        "worked out from bf16 sizes, as the official bf16 inference does (the Open-Sora Sampler "
                        "does the same); without it, from float32 sizes."
                    },
                ),
            },
        }

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "sigmas"
    CATEGORY = f"{CATEGORY}/sampling"
    DESCRIPTION = "Open-Sora's timestep schedule as SIGMAS (sigma = t/1000, ending at 0) for core custom samplers."

    def sigmas(self, latent, steps, timestep_transform=True, model=None):
        info = video_info(latent)
        if info["version"] == "2.0":
            from .sampling_v2 import sigmas_v2

            return (sigmas_v2(info, steps, timestep_transform),)
        t = rflow_timesteps(
            steps,
            info["height"],
            info["width"],
            info["num_frames"],
            info["version"],
            use_timestep_transform=timestep_transform,
            bf16_inputs=model is not None and compute_dtype(model.model) == torch.bfloat16,
        )
        return (flow_sigmas(torch.cat([t.double() / 1000.0, t.new_zeros(1, dtype=torch.float64)]).float()),)


NODE_CLASS_MAPPINGS = {"OpenSoraSampler": OpenSoraSampler, "OpenSoraSigmas": OpenSoraSigmas}
NODE_DISPLAY_NAME_MAPPINGS = {"OpenSoraSampler": "Open-Sora Sampler", "OpenSoraSigmas": "Open-Sora Sigmas"}
