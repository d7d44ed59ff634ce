"""What the Sampler, the Guider and both versions' sampling share: the guidance inputs, the model / latent version
checks, the reference-row check, the hook warnings and the runner that calls the DiT as core's apply_model does, and
SIGMAS for core's samplers."""

from __future__ import annotations

import logging
from collections.abc import Callable

import comfy.model_patcher
import comfy.patcher_extension
import torch

from .latent import latent_label, video_info

# The key under which core's TorchCompileModel (comfy_api.torch_helpers.set_torch_compile_wrapper) registers its
# APPLY_MODEL wrapper, which swaps the compiled module(s) into the BaseModel around each call.
try:
    from comfy_api.torch_helpers.torch_compile import COMPILE_KEY
except ImportError:  # a host without the helper has no TorchCompileModel either
    COMPILE_KEY = "torch.compile"

log = logging.getLogger("OpenSora")


def bool_input(tooltip: str) -> tuple:
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
    "oscillation": bool_input(
        "Oscillation guidance for text: full scale for the first 10 steps and on even steps, 1.0 (one pass) on odd steps. "
        "1.3 and 2.0; 1.2 has none (ignored, as the official 1.2)."
    ),
    "image_oscillation": bool_input("Oscillation guidance for the image scale (1.3 and 2.0; 1.2 ignores it)."),
    "scale_image_weight": bool_input(
        "i2v: image guidance ramps up along the video and down over the steps (1.3 and 2.0; 1.2 ignores it)."
    ),
}
FLAW_FIX_INPUT = bool_input(
    "1.3 t2v: rescale the guided velocity toward the conditional one's spread (official on; 1.2 and 2.0 ignore it)."
)


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


def check_reference_rows(ref: torch.Tensor, z: torch.Tensor) -> None:
    """A reference shared by the batch (1 row) or one per video: a node after Encode Reference that changed the
    batch (RepeatLatentBatch, LatentFromBatch) leaves one per video of the old batch."""
    if ref.shape[0] not in (1, z.shape[0]):
        raise ValueError(
            f"The Open-Sora Encode Reference holds {ref.shape[0]} references, one per video of its latent, but this "
            f"latent has a batch of {z.shape[0]}: a node after Encode Reference changed the batch (e.g. "
            "RepeatLatentBatch, LatentFromBatch). Run Encode Reference after that node."
        )


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


def diffusion_model_runner(
    model, sample_sigmas: torch.Tensor | None = None, multiplier: float = 1.0
) -> Callable[..., torch.Tensor]:
    """A function calling `model.model.diffusion_model(*args, **kwargs)` as core's BaseModel.apply_model reaches it,
    so that core's MODEL patches apply to the Sampler node:

    - object patches (e.g. "diffusion_model" replaced by a wrapper module) are in place once the patcher is loaded;
      the module is looked up at every call, never held;
    - TorchCompileModel's APPLY_MODEL wrapper (key "torch.compile") runs around every call and swaps the compiled
      module in, as it does around apply_model;
    - the forward gets the MODEL's transformer_options with its wrappers merged in, as core's prepare_model_patcher
      builds them, and each call's "sigmas" (timestep / multiplier) and the run's "sample_sigmas" (the schedule,
      ending at 0), as core's samplers give them: patches and attention overrides read them (not "cond_or_uncond":
      the reference samplers batch their passes in their own way).

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

    if sample_sigmas is not None:
        transformer_options["sample_sigmas"] = sample_sigmas

    def forward(x, timestep, *args, **kwargs):
        options = {**transformer_options, "sigmas": timestep.float() / multiplier}
        return base.diffusion_model(x, timestep, *args, transformer_options=options, **kwargs)

    def run(*args, **kwargs):
        executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(forward, base, wrappers)
        return executor.execute(*args, **kwargs)

    return run


def flow_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """SIGMAS for core's samplers: the shifted schedule's first value can round to 1.0000001 in float32, and core's
    half-log-SNR samplers (CFG++, dpmpp_*_sde, res_multistep) take logit(sigma), NaN above 1; clamp it to 1."""
    return sigmas.clamp(max=1.0)
