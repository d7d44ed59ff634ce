"""Sampling nodes: the reference samplers as one node (1.x: sampling_v1, 2.0: sampling_v2; conditioning with hooks
through the Guider), and SIGMAS for core's SamplerCustomAdvanced (the GUIDER is in guider.py)."""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from ..opensora_lib import rflow, sizes
from ..opensora_lib.conditioning_v1 import (
    MAX_LOOPS,
    check_condition_frame_length,
    check_latent_windows,
    sample_long_video,
)
from .common import CATEGORY, Progress, check_choices, compute_dtype, hooks_of, load_for_sampling
from .guider import OpenSoraGuider
from .latent import video_info
from .previews import previewer_for
from .sampling_common import (
    CFG_INPUT,
    FLAW_FIX_INPUT,
    GUIDANCE_INPUTS,
    GUIDANCE_OPTIONS,
    SAMPLING_HOOKS,
    bool_input,
    check_versions,
)
from .sampling_v1 import dit_caller, sigmas_v1, v1_chaining, v1_options, v1_sample_sigmas, v1_texts
from .sampling_v2 import sample_v2_node, sigmas_v2

log = logging.getLogger("OpenSora")

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
                "sdedit": bool_input("1.3 i2v: re-noise the conditioned frames from the reference at every step."),
                "flaw_fix": FLAW_FIX_INPUT,
                "timestep_transform": bool_input("Resolution- and length-dependent timestep shift (official on)."),
                "guidance_passes": (
                    GUIDANCE_PASS_MODES,
                    {
                        "default": "batched",
                        "tooltip": "2.0: run a step's guidance passes (up to 3) as one batch (faster, as the official) "
                        "or one at a time, so only one pass's activations are in memory (768px: ~12.2 GiB per pass in "
                        "bf16); results differ from batched by float rounding only. 1.x always batches.",
                    },
                ),
                "loops": (
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": MAX_LOOPS,
                        "tooltip": "1.x long video (official --loop): generate this many chunks of the latent's "
                        "length, each starting from the last condition_frame_length latent frames of the one before, "
                        "joined without the repeats. Loop k takes Encode Prompt's |k| prompt segment.",
                    },
                ),
                "condition_frame_length": (
                    "INT",
                    {
                        "default": 5,
                        "min": 1,
                        "max": 64,
                        "tooltip": "1.x: latent frames each later loop continues from (official 5; with loops a "
                        "multiple of 5, one VAE window each); a 1.3 v2v_head reference also conditions this many of "
                        "its latent frames.",
                    },
                ),
                "condition_frame_edit": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.05,
                        "tooltip": "1.x loops without a 1.3 reference: how far later loops may change the frames they "
                        "continue from (0 = kept, 1 = regenerated; official 0). 1.3 references keep them.",
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
        loops=1,
        condition_frame_length=5,
        condition_frame_edit=0.0,
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
        if loops > 1 and info["version"] == "2.0":
            raise ValueError(
                "loops (official 1.x --loop) are for Open-Sora 1.2 / 1.3; 2.0 has no official loop: continue a 2.0 "
                "video with Encode Reference v2v_head on its last frames, or use core's context windows. Set loops to 1."
            )
        if hooks_of(positive) or hooks_of(negative):
            if loops > 1:
                raise ValueError(
                    "loops run in the Open-Sora Sampler's own loop, which does not apply conditioning hooks "
                    "(CreateHookLora & co.): apply the LoRA to the MODEL (LoraLoaderModelOnly), or set loops to 1."
                )
            return (sample_with_hooks(model, positive, negative, latent, seed, steps, cfg, options),)
        if info["version"] == "2.0":
            return sample_v2_node(
                model, positive, negative, latent, seed, steps, cfg, **options, guidance_passes=guidance_passes
            )
        loop = {"loops": loops, "condition_frame_length": condition_frame_length, "edit": condition_frame_edit}
        return (sample_v1_node(model, positive, negative, latent, info, seed, steps, cfg, options, **loop),)


def sample_v1_node(
    model, positive, negative, latent: dict, info: dict, seed: int, steps: int, cfg: float, options: dict, *,
    loops: int, condition_frame_length: int, edit: float
) -> dict:  # fmt: skip
    """The Open-Sora Sampler on a 1.x latent: `loops` chained chunks (official --loop; one is a plain run) joined into
    one LATENT. Chunk k starts from the next draw of ComfyUI's seeded noise (chunk 0's is core samplers' draw)."""
    samples = latent["samples"]
    if loops > 1:  # chunks that would not decode right, or a length no video has, are refused before sampling
        num_frames = looped_num_frames(info, samples.shape[2], loops, condition_frame_length)
    # cond, uncond (, image uncond for a 1.3 reference) batched
    passes = rflow.max_passes(latent.get("opensora_reference") is not None and info["version"] == "1.3")
    device, dtype = load_for_sampling(model, samples.shape, passes)
    start = torch.Generator().manual_seed(seed)  # the stream comfy.sample.prepare_noise draws from

    def draw() -> torch.Tensor:  # the next chunk's starting noise
        return comfy.sample.prepare_noise_inner(samples, start, latent.get("batch_index")).to(device)

    first = draw()
    chaining = v1_chaining(info["version"], latent, first, loops, condition_frame_length, edit)
    rflow_options = v1_options(info, cfg, **options, num_steps=steps, bf16_inputs=dtype == torch.bfloat16)
    generator = torch.Generator().manual_seed((seed + 1) % 2**64)  # the widget allows seed 2**64 - 1

    def noise(shape, noise_dtype, noise_device):
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(noise_device, noise_dtype)

    progress = Progress(steps * loops, previewer_for(model))
    out = sample_long_video(
        dit_caller(model, v1_sample_sigmas(info, rflow_options).to(device)),
        v1_texts(model, positive, negative, device, dtype, loops),
        rflow_options,
        latent_shape=samples.shape,
        num_loops=loops,
        height=info["height"],
        width=info["width"],
        num_frames=info["num_frames"],
        fps=info.get("fps"),
        noise=noise,
        start_noise=lambda loop: first if loop == 0 else draw(),
        callback=lambda step: progress({**step, "i": step["loop"] * steps + step["i"]}),
        **chaining,
    )
    result = {k: v for k, v in latent.items() if k != "opensora_reference"}
    if loops > 1:
        result["opensora"] = {**info, "num_frames": num_frames}
    result["samples"] = out.float().to(comfy.model_management.intermediate_device())
    return result


def looped_num_frames(info: dict, frames: int, loops: int, condition_frame_length: int) -> int:
    """The video length of `loops` chained chunks of `frames` latent frames (the longest video their joined latent
    frames hold); refused before sampling when the chunks would not decode right or no Open-Sora video is that
    long."""
    check_condition_frame_length(condition_frame_length, frames)
    check_latent_windows(frames, condition_frame_length)
    joined = frames + (loops - 1) * (frames - condition_frame_length)
    try:
        return sizes.frames_for_latent(info["version"], joined)
    except ValueError:
        longest = sizes.allowed_num_frames(info["version"])[-1]
        raise ValueError(
            f"{loops} loops of {frames} latent frames chained on {condition_frame_length} make {joined} latent frames, "
            f"longer than any Open-Sora {info['version']} video (at most {longest} frames): use fewer loops or a "
            "shorter latent."
        ) from None


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
            return (sigmas_v2(info, steps, timestep_transform),)
        bf16 = model is not None and compute_dtype(model.model) == torch.bfloat16
        return (sigmas_v1(info, steps, timestep_transform, bf16),)


def sample_with_hooks(model, positive, negative, latent: dict, seed: int, steps: int, cfg: float, options: dict):
    """The Open-Sora Sampler on conditioning with hooks (CreateHookLora & co.): core's sampling applies each pass's
    hooks, so the run goes through the Open-Sora Guider, Open-Sora Sigmas and core's euler as SamplerCustomAdvanced
    runs them (the same guidance and starting noise; float rounding apart from the Sampler's direct path). Returns the
    LATENT."""
    version, has_reference = check_versions(model, latent)["version"], latent.get("opensora_reference") is not None
    unsupported = None  # (what core's sampling lacks, what else the user can do)
    if has_reference and version == "1.2":
        unsupported = (
            "cannot take a 1.2 reference (the official mask strategy runs in the Sampler's own loop only)",
            "",
        )
    elif has_reference and version == "1.3" and options["sdedit"]:
        lacks = "has no sdedit (the Sampler's own loop re-noises the reference frames; core's sampling does not)"
        unsupported = (lacks, "turn sdedit off, or ")
    if unsupported:
        raise ValueError(
            "The Open-Sora Sampler runs conditioning with hooks (CreateHookLora & co.) through core's sampling, which "
            f"{unsupported[0]}: {unsupported[1]}apply the LoRA to the MODEL (LoraLoaderModelOnly) instead of the "
            "conditioning."
        )
    applied = [name for name in SAMPLING_HOOKS if model.model_options.get(name)]
    applied += ["model_sampling (e.g. ModelSamplingSD3)"] if "model_sampling" in model.object_patches else []
    if applied:  # the Sampler's own path ignores these (and says so)
        log.warning(
            "OpenSora: the Open-Sora Sampler runs this hooked conditioning through core's sampling (the Open-Sora "
            "Guider, Sigmas and euler), where this MODEL's sampling patches apply as in that graph: %s.",
            ", ".join(applied),
        )
    (guider,) = OpenSoraGuider().get_guider(
        model,
        positive,
        negative,
        latent,
        cfg,
        options["image_cfg"],
        options["oscillation"],
        options["image_oscillation"],
        options["scale_image_weight"],
        options["flaw_fix"],
    )
    (sigmas,) = OpenSoraSigmas().sigmas(latent, steps, options["timestep_transform"], model)
    samples = latent["samples"]
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))  # as SamplerCustomAdvanced draws it
    out = guider.sample(
        noise,
        samples,
        comfy.samplers.sampler_object("euler"),
        sigmas,
        callback=latent_preview.prepare_callback(model, sigmas.shape[-1] - 1),
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
        seed=seed,
    )
    result = {k: v for k, v in latent.items() if k != "opensora_reference"}
    result["samples"] = out.float().to(comfy.model_management.intermediate_device())
    return result


NODE_CLASS_MAPPINGS = {"OpenSoraSampler": OpenSoraSampler, "OpenSoraSigmas": OpenSoraSigmas}
NODE_DISPLAY_NAME_MAPPINGS = {"OpenSoraSampler": "Open-Sora Sampler", "OpenSoraSigmas": "Open-Sora Sigmas"}
