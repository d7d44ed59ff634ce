"""Core's sampling hooks inside the Open-Sora Guiders.

Core's CFGGuider runs a MODEL's calc-cond-batch function, pre-CFG and post-CFG functions around its
[cond, uncond] passes (comfy/samplers.py sampling_function and cfg_function); nodes such as
SkipLayerGuidanceDiT / SkipLayerGuidanceDiTSimple are built from them. The Open-Sora Guiders run up to three
passes (positive, negative text, negative image) and their own guidance formula, so the hooks see the text pair
[positive, negative] exactly as core gives them [cond, uncond]: a skipped negative pass is None in "conds" and
zeros in the outputs, as core's cfg-1 optimisation leaves it (unless the MODEL sets disable_cfg1_optimization: then
it runs, see with_negative). The image-unconditional pass runs as usual. A
sampler_cfg_function replaces core's CFG formula, which Open-Sora's guidance replaces already: not applied, with
one warning.
"""

from __future__ import annotations

import comfy.samplers
import torch

from .common import sampling_memory, warn_once
from .context_windows import check_context_windows, window_length


def check_sampler_latent(guider_shape: tuple, latent_image: torch.Tensor) -> None:
    """SamplerCustomAdvanced's latent_image must be the LATENT the Open-Sora Guider was made for: its size, length and
    reference conditioning come from that one. The batch may differ (e.g. RepeatLatentBatch on the sampler's latent
    only): core repeats the conditioning over it."""
    if tuple(latent_image.shape[1:]) != tuple(guider_shape[1:]):
        raise ValueError(
            f"Open-Sora Guider was made for a latent of shape {list(guider_shape)} but SamplerCustomAdvanced got "
            f"latent_image {list(latent_image.shape)}: connect the same LATENT to the Guider, Open-Sora Sigmas and "
            "SamplerCustomAdvanced."
        )


class ScheduledGuider(comfy.samplers.CFGGuider):
    """What the 1.x and 2.0 Open-Sora Guiders share: before sampling, the latent and context-window checks, and the
    sigma schedule kept so that predict_noise knows its step (oscillation guidance)."""

    sigma_list: torch.Tensor | None = None

    def start(self, latent_shape: tuple, latent_image: torch.Tensor, sigmas: torch.Tensor, has_reference: bool):
        check_sampler_latent(latent_shape, latent_image)
        # refuses a run RAM cannot hold (one pass at a time, one context window)
        sampling_memory(self.model_patcher, latent_image.shape, window=window_length(self.model_options))
        check_context_windows(self.model_options, latent_image, has_reference)
        self.sigma_list = sigmas.detach().float().cpu()

    def step_index(self, sigma: torch.Tensor) -> int:
        return int((self.sigma_list[:-1] - float(sigma.flatten()[0])).abs().argmin())


def with_negative(names: list[str], model_options: dict) -> list[str]:
    """The passes to run: `names` plus the negative text pass when the MODEL sets disable_cfg1_optimization (core
    then computes uncond even at scale 1, for hooks that read it, e.g. the CFG++ samplers and SAG). The guidance
    itself still uses only `names` (they come first), so its result does not change."""
    if model_options.get("disable_cfg1_optimization", False) and "negative" not in names:
        return [*names, "negative"]
    return names


def run_passes(
    guider, names: list[str], x: torch.Tensor, timestep, model_options: dict, text_scale: float
) -> list[torch.Tensor]:
    """Denoised output of each named cond ("positive", "negative", "negative_image"), through the MODEL's
    sampler_calc_cond_batch_function and sampler_pre_cfg_functions when it has them."""
    handler = model_options.get("sampler_calc_cond_batch_function")
    pre_cfg = model_options.get("sampler_pre_cfg_function", [])
    if "sampler_cfg_function" in model_options:
        warn_once(
            "guider cfg_function",
            "OpenSora: the Open-Sora Guider does not apply the MODEL's sampler_cfg_function (Open-Sora guidance replaces it)",
        )
    model = guider.inner_model
    if handler is None and not pre_cfg:
        return comfy.samplers.calc_cond_batch(model, [guider.conds[n] for n in names], x, timestep, model_options)

    text = [guider.conds["positive"], guider.conds["negative"] if "negative" in names else None]
    if handler is None:
        out = comfy.samplers.calc_cond_batch(model, text, x, timestep, model_options)
    else:
        args = {"conds": text, "input": x, "sigma": timestep, "model": model, "model_options": model_options}
        out = handler(args)
    for fn in pre_cfg:
        args = {
            "conds": text,
            "conds_out": out,
            "cond_scale": text_scale,
            "timestep": timestep,
            "input": x,
            "sigma": timestep,
            "model": model,
            "model_options": model_options,
        }
        out = fn(args)
    outputs = {"positive": out[0], "negative": out[1]}
    if "negative_image" in names:
        image_cond = [guider.conds["negative_image"]]
        outputs["negative_image"] = comfy.samplers.calc_cond_batch(model, image_cond, x, timestep, model_options)[0]
    return [outputs[n] for n in names]


def post_cfg(
    guider,
    names: list[str],
    denoised: list[torch.Tensor],
    guided: torch.Tensor,
    x,
    timestep,
    model_options: dict,
    text_scale: float,
) -> torch.Tensor:
    """The MODEL's sampler_post_cfg_functions on the guided denoised, with the positive / negative passes as
    core's cond / uncond (SkipLayerGuidanceDiT adds its skip-layer term here)."""
    functions = model_options.get("sampler_post_cfg_function", [])
    if not functions:
        return guided
    outputs = dict(zip(names, denoised))
    cond_pred = outputs["positive"]
    uncond_pred = outputs.get("negative", torch.zeros_like(cond_pred))
    uncond = guider.conds["negative"] if "negative" in names else None
    for fn in functions:
        args = {
            "denoised": guided,
            "cond": guider.conds["positive"],
            "uncond": uncond,
            "cond_scale": text_scale,
            "model": guider.inner_model,
            "uncond_denoised": uncond_pred,
            "cond_denoised": cond_pred,
            "sigma": timestep,
            "model_options": model_options,
            "input": x,
        }
        guided = fn(args)
    return guided
