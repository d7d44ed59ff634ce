"""A GUIDER that runs Open-Sora's guidance inside core's SamplerCustomAdvanced.

Core's flow sampling (CONST) gives every pass as denoised = x - sigma * v_core. Open-Sora 1.x works on
v = -v_core (x0 - noise); the guider turns the passes back into velocities, combines them with the
library's `guided_velocity` (oscillation, image ramp, flaw fix: the same code as the Sampler node) and
returns the guided denoised. With core's `euler` sampler and the Open-Sora Sigmas node that is the
reference update z += v * (t_i - t_{i+1}) / 1000, so the result matches the Open-Sora Sampler node.
"""

from __future__ import annotations

import torch

from ..opensora_lib import rflow
from .common import CATEGORY, hooks_of
from .guider_hooks import ScheduledGuider, post_cfg, run_passes, with_negative
from .latent import video_info
from .sampling_common import CFG_INPUT, FLAW_FIX_INPUT, GUIDANCE_INPUTS, GUIDANCE_OPTIONS, check_versions
from .sampling_v1 import text_of, v1_options, v1_reference, warn_float32_schedule
from .sampling_v2 import guider_v2


class OpenSoraV1Guider(ScheduledGuider):
    def __init__(self, model_patcher, latent: dict, options: rflow.RFlowOptions):
        super().__init__(model_patcher)
        self.info = video_info(latent)
        self.latent = latent
        self.options = options

    def set_conds(self, positive, negative):
        y, meta = text_of(positive, "positive", self.info["version"])
        fps = rflow.conditioning_fps(self.info.get("fps"), self.info.get("num_frames"))
        extras = {"height": self.info["height"], "width": self.info["width"], "fps": fps}
        y_null = self.model_patcher.model.diffusion_model.null_caption()
        pos = {"attention_mask": meta["attention_mask"], **extras, **hooks_of(positive)}  # core applies the hooks
        negative_y, negative_meta = text_of(negative, "negative", self.info["version"])
        if negative_y is None:  # learned null caption, masked by the positive prompt (Q1)
            negative_y, neg = y_null, {"attention_mask": meta["attention_mask"], **extras}
        else:
            neg = {"attention_mask": negative_meta["attention_mask"], **extras}
        neg.update(hooks_of(negative))
        conds = {"positive": [[y, pos]], "negative": [[negative_y, neg]]}
        reference = v1_reference(self.latent, self.latent["samples"].float())
        if reference is not None and self.info["version"] == "1.2":
            raise ValueError(
                "Open-Sora 1.2 references (official mask strategy: the reference frames written into the latent) run "
                "in the Open-Sora Sampler node; the Guider takes 1.2 text-to-video and 1.3 references."
            )
        if reference is not None:
            cond_mask = torch.zeros_like(reference.latent)
            cond_mask[:, :, reference.mask_index] = 1.0
            ref = {"cond_mask": cond_mask, "mask_index": reference.mask_index, "y_null": y_null[None]}
            pos.update(ref, cond=reference.latent * cond_mask)
            neg.update(ref, cond=reference.latent * cond_mask)
            conds["negative_image"] = [[negative_y, {**neg, "cond": torch.zeros_like(cond_mask)}]]
        self.has_reference = reference is not None
        self.inner_set_conds(conds)

    def sample(self, noise, latent_image, sampler, sigmas, *args, **kwargs):
        warn_float32_schedule(self.model_patcher, self.info, sigmas)
        self.start(self.latent["samples"].shape, latent_image, sigmas, self.has_reference)
        return super().sample(noise, latent_image, sampler, sigmas, *args, **kwargs)

    def predict_noise(self, x, timestep, model_options=None, seed=None):
        model_options = model_options or {}
        i = self.step_index(timestep)
        steps, frames = len(self.sigma_list) - 1, x.shape[2]
        text_scale, image_scale = rflow.step_scales(self.options, i, steps, frames, self.has_reference)
        if torch.is_tensor(image_scale):
            image_scale = image_scale.to(x.device, torch.float32)
        names = ["positive", "negative", "negative_image"][
            : rflow.needed_passes(self.has_reference, text_scale, image_scale)
        ]
        run = with_negative(names, model_options)
        denoised = run_passes(self, run, x, timestep, model_options, text_scale)
        sigma = timestep.reshape(-1, *([1] * (x.ndim - 1))).float()
        velocities = [(d.float() - x.float()) / sigma for d in denoised[: len(names)]]  # 1.x: x0 - noise
        v = rflow.guided_velocity(
            velocities, text_scale, image_scale, self.options.use_flaw_fix and not self.has_reference
        )
        return post_cfg(self, run, denoised, x.float() + sigma * v, x, timestep, model_options, text_scale)


class OpenSoraGuider:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {**GUIDANCE_INPUTS, "cfg": CFG_INPUT},
            "optional": {**GUIDANCE_OPTIONS, "flaw_fix": FLAW_FIX_INPUT},
        }

    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    CATEGORY = f"{CATEGORY}/sampling"
    DESCRIPTION = "Open-Sora guidance (text + image CFG with oscillation) as a GUIDER for SamplerCustomAdvanced; use with Open-Sora Sigmas and the euler sampler."

    def get_guider(
        self,
        model,
        positive,
        negative,
        latent,
        cfg,
        image_cfg=5.0,
        oscillation=True,
        image_oscillation=True,
        scale_image_weight=True,
        flaw_fix=True,
    ):
        info = check_versions(model, latent)
        if info["version"] == "2.0":
            return (
                guider_v2(
                    model,
                    positive,
                    negative,
                    latent,
                    cfg,
                    image_cfg,
                    oscillation,
                    image_oscillation,
                    scale_image_weight,
                ),
            )
        # no SDEdit: core's samplers re-noise the latent themselves (the Sampler node's sdedit input is its own)
        options = v1_options(
            info, cfg, image_cfg, oscillation, image_oscillation, scale_image_weight, flaw_fix, sdedit=False
        )
        guider = OpenSoraV1Guider(model, latent, options)
        guider.set_conds(positive, negative)
        return (guider,)


NODE_CLASS_MAPPINGS = {"OpenSoraGuider": OpenSoraGuider}
NODE_DISPLAY_NAME_MAPPINGS = {"OpenSoraGuider": "Open-Sora Guider"}
