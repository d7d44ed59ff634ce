"""Open-Sora 2.0 sampling for the Sampler node, the Sigmas node and a GUIDER for SamplerCustomAdvanced.

The Sampler node runs `opensora_lib.sampling_v2.sample_v2` (the reference I2VDenoiser: three-way text /
image guidance with oscillation and the per-frame image ramp, redundant passes skipped) on ComfyUI's
noise, in float32 state with the model in its compute dtype. The guider runs the same guidance from
core's denoised outputs, so GUIDER + Open-Sora Sigmas + euler in SamplerCustomAdvanced gives the same
latent. Deliberate differences from the reference: float32 state and Euler updates (official: bf16),
the i2v reference pasted back into every batch item (official: item 0 only, Q17), and the noise drawn
as ComfyUI draws it (CPU generator; official: a generator on the GPU) so core samplers match.

The Video DC-AE DiT (patch 1) runs the same way on a "2.0 DC-AE" latent: 128 channels, tokens per frame
(H/32)(W/32), so the schedule shift uses that count, as high_compression.py with AE_SPATIAL_COMPRESSION=32.
The sampler keeps is_causal_vae=True, which that config inherits from 256px.py (quirk Q12; training used False).
It changes nothing here: latent T is n // 4 either way for the DC-AE's 1 or 4k frames, and it only sets the
number of v2v frames, which the pack does not offer with the DC-AE.

Text conditioning: Open-Sora Encode Prompt (2.0) gives T5 [1, 512, 4096] + CLIP-L pooled [1, 768] with
the official rules. Core DualCLIPLoader(type="flux") + CLIPTextEncode gives the same pair and is accepted,
but its text path is not the official one: its T5 pads to at least 256 tokens instead of exactly 512 (no
mask on either side, so pad tokens are attended and every state differs), it tokenises with ComfyUI's fast
T5 tokenizer instead of T5Tokenizer(legacy=True), applies its (word:1.2) weighting syntax, computes in
ComfyUI's text-encoder dtype (official: bf16), and adds no " 24 FPS. 4 motion score." suffix (type it into
the prompt). The CLIP-L pooled vector is the same kind (unprojected EOS state, 77 tokens).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import comfy.model_management
import comfy.sample
import torch

from ..opensora_lib import prompts, sizes
from ..opensora_lib.memory import activation_memory
from ..opensora_lib.sampling_v2 import (
    COND_TYPES,
    V2SamplingOptions,
    guided_velocity,
    needed_passes,
    pack,
    prepare_condition,
    sample_v2,
    step_scales,
    unpack,
)
from ..opensora_lib.schedules import v2_timesteps
from .common import Progress, conditioning_entry, hooks_of, load_for_sampling
from .guider_hooks import ScheduledGuider, post_cfg, run_passes, with_negative
from .latent import latent_autoencoder, video_info
from .previews import previewer_for
from .sampling_common import check_reference_rows, diffusion_model_runner, flow_sigmas

log = logging.getLogger("OpenSora")

GUIDER_CONDS = {"cond": "positive", "uncond_text": "negative", "uncond_all": "negative_image"}


# ---------------------------------------------------------------------------------------------- inputs


def text_of_v2(conditioning: list, what: str, config) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 states [B, L, context_in_dim], CLIP pooled [B, vec_in_dim]) of a CONDITIONING, checked against the model."""
    tensor, meta = conditioning_entry(conditioning, what, "2.0")
    if tensor.ndim == 4 and tensor.shape[1] == 1:
        tensor = tensor[:, 0]
    if tensor.ndim != 3 or tensor.shape[-1] != config.context_in_dim:
        raise ValueError(
            f"The {what} conditioning holds text states of shape {tuple(tensor.shape)}; this Open-Sora 2.0 model "
            f"needs T5 states [batch, tokens, {config.context_in_dim}] (wrong text encoder?)."
        )
    pooled = meta.get("pooled_output")
    if pooled is None:
        raise ValueError(
            f"The {what} conditioning has no pooled_output: Open-Sora 2.0 adds the CLIP-L pooled vector to its "
            "timestep vector. Encode with Open-Sora Encode Prompt (2.0) or core DualCLIPLoader(type=flux)."
        )
    if pooled.ndim != 2 or pooled.shape[-1] != config.vec_in_dim:
        raise ValueError(
            f"The {what} conditioning's pooled_output has shape {tuple(pooled.shape)}; this model needs "
            f"[batch, {config.vec_in_dim}] (CLIP-L)."
        )
    return tensor.float(), pooled.float()


def text_v2(model, positive: list, negative: list) -> dict[str, torch.Tensor]:
    """The sample_v2 text dict: prompt and negative (the official negative is the empty prompt)."""
    config = model.model.diffusion_model.config
    t5, pooled = text_of_v2(positive, "positive", config)
    neg_t5, neg_pooled = text_of_v2(negative, "negative", config)
    return {"t5": t5, "pooled": pooled, "neg_t5": neg_t5, "neg_pooled": neg_pooled}


def reference_v2(model, latent: dict) -> tuple[str, torch.Tensor | None, torch.Tensor | None]:
    """(cond_type, reference in model space, raw reference) of a LATENT; ("t2v", None, None) without one."""
    reference = latent.get("opensora_reference")
    if reference is None:
        return "t2v", None, None
    cond_type = reference.get("cond_type")
    if reference.get("version") != "2.0" or cond_type not in COND_TYPES:
        raise ValueError(
            f"The latent's reference ({cond_type}) was not encoded for Open-Sora 2.0: run Open-Sora Encode Reference "
            "on a 2.0 latent with the HunyuanVideo VAE (core Load VAE)."
        )
    expected = model_autoencoder(model)
    if reference.get("autoencoder", "hunyuan") != expected:
        raise ValueError(
            f"The latent's reference was encoded with the {AUTOENCODER_LABELS[reference.get('autoencoder', 'hunyuan')]} "
            f"but this DiT works with the {AUTOENCODER_LABELS[expected]}: encode it again on the matching latent."
        )
    raw = reference["latent"].float()
    check_reference_rows(raw, latent["samples"])
    return cond_type, model.model.process_latent_in(raw), raw


AUTOENCODER_LABELS = {"hunyuan": "HunyuanVideo VAE", "dc_ae": "Video DC-AE"}
DIT_FILES = {"hunyuan": "Open_Sora_v2.safetensors", "dc_ae": "Open_Sora_v2_Video_DC_AE.safetensors"}
DIT_LABELS = {
    "hunyuan": "the Open-Sora 2.0 DiT for the HunyuanVideo VAE (patch 2, 16 channels)",
    "dc_ae": "the Open-Sora 2.0 Video DC-AE DiT (patch 1, 128 channels)",
}


def model_autoencoder(model) -> str:
    return getattr(model.model, "opensora_autoencoder", "hunyuan")


def check_latent(model, latent: dict) -> torch.Tensor:
    samples = latent["samples"]
    config = model.model.diffusion_model.config
    wanted = model_autoencoder(model)
    given = latent_autoencoder(video_info(latent))
    if given != wanted:
        raise ValueError(
            f"The model is {DIT_LABELS[wanted]} but the latent was made for the {AUTOENCODER_LABELS[given]} "
            f"(Empty Latent Video version {sizes.latent_choice('2.0', given)!r}): set the version to "
            f"{sizes.latent_choice('2.0', wanted)!r} for this model, or load {DIT_FILES[given]} for this latent."
        )
    channels = config.in_channels // config.patch_size**2
    if samples.ndim != 5 or samples.shape[1] != channels:
        raise ValueError(
            f"Open-Sora 2.0 samples video latents [batch, {channels}, frames, height, width]; got {tuple(samples.shape)}"
        )
    return samples


def options_v2(
    steps: int,
    cfg: float,
    image_cfg: float,
    oscillation: bool,
    image_oscillation: bool,
    scale_image_weight: bool,
    timestep_transform: bool = True,
    patch_size: int = 2,
    model_dtype: torch.dtype | None = None,
) -> V2SamplingOptions:
    options = V2SamplingOptions(
        num_steps=steps,
        guidance=cfg,
        guidance_img=image_cfg,
        text_osci=oscillation,
        image_osci=image_oscillation,
        scale_temporal_osci=scale_image_weight,
        shift=timestep_transform,
        patch_size=patch_size,
        model_dtype=model_dtype,
        is_causal_vae=True,  # for the DC-AE as well: the official inference config (Q12)
    )
    options.validate()
    return options


# ---------------------------------------------------------------------------------------------- Sampler node


def mmdit_caller(
    model, latent_shape: tuple[int, ...], sample_sigmas: torch.Tensor | None = None
) -> Callable[..., torch.Tensor]:
    """sample_v2's model: MMDiT.forward's keyword signature (packed tokens) in and out, for latents of latent_shape
    [B, C, T, H, W]. It calls ComfyMMDiT's latent interface (what core calls, and what object patches and
    torch.compile wrap) through diffusion_model_runner: the tokens are unpacked to the latent it packs again (pure
    rearranges, exact), and it builds the same img_ids / txt_ids from the shapes as sample_v2 does.
    sample_sigmas: the run's schedule as SIGMAS (the timesteps are sigmas), for the forward's transformer_options."""
    frames, height, width = (int(size) for size in latent_shape[2:])
    patch = model.model.diffusion_model.config.patch_size
    run = diffusion_model_runner(model, sample_sigmas)

    def call(img, img_ids, txt, txt_ids, timesteps, y_vec, cond=None, guidance=None):
        x = unpack(img, frames, height, width, patch)
        cond = None if cond is None else unpack(cond, frames, height, width, patch)
        return pack(run(x, timesteps, context=txt, y_vec=y_vec, cond=cond, guidance=guidance), patch)

    return call


def warn_fps_mismatch(positive: list, latent: dict) -> None:
    """2.0 is conditioned on the " N FPS." Encode Prompt writes into the prompt, not on the latent's fps: say so when
    the two differ (the latent's fps then only sets the duration shown and, by habit, the saved video's rate)."""
    prompt_fps = prompts.fps_of_v2(positive[0][1].get("opensora_text") if positive else None)
    latent_fps = latent.get("opensora", {}).get("fps")
    if prompt_fps is not None and latent_fps is not None and prompt_fps != int(latent_fps):
        log.warning(
            "OpenSora: the prompt says %s FPS but Empty Latent Video's fps is %s; Open-Sora 2.0 reads the prompt's "
            "(Encode Prompt's fps): set both to the rate the video is saved at",
            prompt_fps,
            latent_fps,
        )


def sample_v2_node(
    model,
    positive,
    negative,
    latent,
    seed,
    steps,
    cfg,
    image_cfg,
    oscillation,
    image_oscillation,
    scale_image_weight,
    timestep_transform,
    guidance_passes="batched",
    **_v1_only,  # sdedit, flaw_fix: 1.x options the Sampler node also has
) -> tuple[dict]:
    """The Open-Sora Sampler node for 2.0: returns a LATENT in raw VAE space (reference dropped).
    guidance_passes "one at a time" runs each guidance pass as its own model call, so ComfyUI only has to keep
    one pass's activations free (partial loading can keep more weights resident)."""
    batched = guidance_passes == "batched"
    samples = check_latent(model, latent)
    text = text_v2(model, positive, negative)
    warn_fps_mismatch(positive, latent)
    cond_type, reference, _ = reference_v2(model, latent)
    # the rows one model call runs: every needed pass when batched, else one
    passes = len(needed_passes(cond_type, float(cfg), float(image_cfg))) if batched else 1
    text_tokens = max(text["t5"].shape[1], text["neg_t5"].shape[1])
    device, dtype = load_for_sampling(model, samples.shape, passes, text_tokens)
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))  # as core samplers draw it
    options = options_v2(
        steps,
        cfg,
        image_cfg,
        oscillation,
        image_oscillation,
        scale_image_weight,
        timestep_transform,
        model.model.diffusion_model.config.patch_size,
        dtype,
    )
    options.batch_passes = batched
    try:
        out = sample_v2(
            mmdit_caller(model, samples.shape, schedule_v2(video_info(latent), steps, timestep_transform).to(device)),
            noise.to(device, torch.float32),
            {k: v.to(device) for k, v in text.items()},
            options,
            cond=None if reference is None else reference.to(device),
            cond_type=cond_type,
            callback=Progress(steps, previewer_for(model)),
        )
    except torch.OutOfMemoryError as e:  # same type, so ComfyUI still frees its models; a message that says what to do
        raise type(e)(
            out_of_memory_advice(model, samples.shape, passes, text_tokens, dtype, batched) + f" ({e})"
        ) from e
    result = {k: v for k, v in latent.items() if k != "opensora_reference"}
    result["samples"] = model.model.process_latent_out(out.float()).to(comfy.model_management.intermediate_device())
    return (result,)


def out_of_memory_advice(model, latent_shape, passes: int, text_tokens: int, dtype, batched: bool) -> str:
    """What ran out and what to change, with the activation estimate of this size."""
    per_pass = activation_memory(model.model.diffusion_model, (1, *latent_shape[1:]), text_tokens, dtype) / 2**30
    batch, _, frames, height, width = latent_shape
    one_at_a_time = "guidance_passes 'one at a time' on the Sampler (one pass's activations instead of the whole step)"
    tips = [one_at_a_time] if batched else []
    tips += [
        "weight_dtype fp8_e4m3fn on Load Open-Sora DiT (halves the weights)",
        "fewer frames, a smaller resolution or batch_size 1 on Open-Sora Empty Latent Video",
    ]
    return (
        f"Open-Sora 2.0 ran out of GPU memory sampling {batch} video(s) of {frames} latent frames at {height} x "
        f"{width} latent pixels: one guidance pass needs about {per_pass * batch:.3g} GiB of activations besides the "
        f"weights, and this run puts {passes} pass(es) in one model call. Try: " + "; ".join(tips) + "."
    )


# ---------------------------------------------------------------------------------------------- SIGMAS


def schedule_v2(info: dict, steps: int, shift: bool) -> torch.Tensor:
    """The 2.0 times sample_v2 steps through, float32: N + 1 values from 1 (or a rounding above it) to 0.
    A DC-AE latent counts (H/32)(W/32) tokens per frame and n // 4 latent frames."""
    autoencoder = latent_autoencoder(info)
    frames, _, _ = sizes.latent_shape("2.0", info["num_frames"], info["height"], info["width"], autoencoder=autoencoder)
    tokens = sizes.tokens_per_frame("2.0", info["height"], info["width"], autoencoder=autoencoder)
    return v2_timesteps(steps, tokens, frames, shift=bool(shift)).float()


def sigmas_v2(info: dict, steps: int, shift: bool) -> torch.Tensor:
    """The 2.0 schedule as SIGMAS: sigma = t (the model takes t in [0, 1])."""
    return flow_sigmas(schedule_v2(info, steps, shift))


# ---------------------------------------------------------------------------------------------- GUIDER


class OpenSoraV2Guider(ScheduledGuider):
    """Core's denoised outputs -> velocities (v = (x - denoised) / sigma), guided as the reference does."""

    def __init__(self, model_patcher, latent: dict, options: V2SamplingOptions):
        super().__init__(model_patcher)
        self.options = options
        samples = check_latent(model_patcher, latent)
        self.latent_shape = tuple(samples.shape)
        self.cond_type, reference, raw = reference_v2(model_patcher, latent)
        self.condition = None  # [1 or B, 1 + C, T, H, W] mask + masked reference, model space (B: one per video)
        self.paste = None  # (frames, raw masked reference) pasted back after sampling, as the Sampler node
        if reference is not None:
            shape = (reference.shape[0], *samples.shape[1:])
            masks, masked, frames = prepare_condition(shape, self.cond_type, reference)
            self.condition = torch.cat((masks, masked), dim=1)
            if self.cond_type.startswith("i2v"):
                self.paste = (frames, prepare_condition(shape, self.cond_type, raw)[1])

    def set_conds(self, positive, negative):
        config = self.model_patcher.model.diffusion_model.config
        t5, pooled = text_of_v2(positive, "positive", config)
        neg_t5, neg_pooled = text_of_v2(negative, "negative", config)
        pos = {"pooled_output": pooled, **hooks_of(positive)}  # core's sampling applies each pass's hooks
        neg = {"pooled_output": neg_pooled, **hooks_of(negative)}
        conds = {"positive": [[t5, pos]], "negative": [[neg_t5, neg]]}
        if self.condition is not None:
            pos["opensora_cond"] = neg["opensora_cond"] = self.condition
            blank = {**neg, "opensora_cond": torch.zeros_like(self.condition)}
            conds["negative_image"] = [[neg_t5, blank]]
        self.inner_set_conds(conds)

    def sample(self, noise, latent_image, sampler, sigmas, *args, **kwargs):
        self.start(self.latent_shape, latent_image, sigmas, self.condition is not None)
        self.options.num_steps = max(1, len(self.sigma_list) - 1)  # the image ramp spans the schedule
        out = super().sample(noise, latent_image, sampler, sigmas, *args, **kwargs)
        if self.paste is not None and float(self.sigma_list[-1]) == 0.0:
            frames, masked = self.paste
            out = out.clone()
            out[:, :, frames] = masked[:, :, frames].to(out.device, out.dtype)
        return out

    def predict_noise(self, x, timestep, model_options=None, seed=None):
        model_options = model_options or {}
        step = self.step_index(timestep)
        text_scale, image_scale = step_scales(step, self.options, self.cond_type, x.shape[2])
        passes = needed_passes(self.cond_type, text_scale, image_scale)
        run = with_negative([GUIDER_CONDS[name] for name in passes], model_options)
        denoised = run_passes(self, run, x, timestep, model_options, text_scale)
        sigma = timestep.reshape(-1, *([1] * (x.ndim - 1))).float()
        outputs = {name: (x.float() - d.float()) / sigma for name, d in zip(passes, denoised)}
        if torch.is_tensor(image_scale):  # per latent frame
            image_scale = image_scale.to(x.device, torch.float32).reshape(1, 1, -1, 1, 1)
        guided = x.float() - sigma * guided_velocity(outputs, passes, text_scale, image_scale)
        return post_cfg(self, run, denoised, guided, x, timestep, model_options, text_scale)


def guider_v2(
    model, positive, negative, latent, cfg, image_cfg, oscillation, image_oscillation, scale_image_weight
) -> OpenSoraV2Guider:
    """The Open-Sora Guider node for 2.0 (use with Open-Sora Sigmas and core's euler sampler)."""
    warn_fps_mismatch(positive, latent)
    patch = model.model.diffusion_model.config.patch_size
    options = options_v2(1, cfg, image_cfg, oscillation, image_oscillation, scale_image_weight, patch_size=patch)
    guider = OpenSoraV2Guider(model, latent, options)
    guider.set_conds(positive, negative)
    return guider


__all__ = ["OpenSoraV2Guider", "guider_v2", "sample_v2_node", "sigmas_v2", "text_of_v2"]
