"""Open-Sora 2.0 sampler (the reference I2VDenoiser, method "i2v", used for t2v and i2v alike).

Flux-style flow: t runs 1 -> 0 on a resolution / length shifted schedule, the model predicts
v ~ noise - x0 and each step does x += (t_next - t) * v. Guidance per step:
    v = v_u2 + g_img * (v_u - v_u2) + g_txt * (v_c - v_u)
with the passes  cond = (prompt, reference),  uncond_text = (negative, reference),
uncond_all = (negative, no reference). g_txt / g_img oscillate (1.0 on odd steps from step 10) and,
for i2v, g_img becomes a per-latent-frame ramp. Passes whose result cannot change v are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from .schedules import oscillation_scale, v2_timesteps

COND_TYPES = ("t2v", "i2v_head", "i2v_tail", "i2v_loop", "v2v_head", "v2v_tail", "v2v_head_easy", "v2v_tail_easy")
PASSES = ("cond", "uncond_text", "uncond_all")
PASTE_MODES = ("all", "first", "none")


@dataclass
class V2SamplingOptions:
    num_steps: int = 50
    guidance: float = 7.5  # text guidance (the shipped config; SamplingOption's class default is 4.0, Q15)
    guidance_img: float = 3.0
    text_osci: bool = True
    image_osci: bool = True
    scale_temporal_osci: bool = True  # only applied to i2v_* cond types, as the reference
    shift: bool = True
    flow_shift: float | None = None  # a fixed shift alpha instead of the resolution / length rule
    patch_size: int = 2
    is_causal_vae: bool = True  # v2v conditions 8 + 1 (causal) or 8 latent frames
    state_dtype: torch.dtype | None = None  # latent state + Euler updates; None = float32, bfloat16 = official
    model_dtype: torch.dtype | None = None  # dtype of the model inputs; None = model.dtype, else state dtype
    skip_redundant_passes: bool = True
    batch_passes: bool = True  # run a step's passes as one batch (False: one model call per pass)
    paste_reference: str = "all"  # "first" = batch item 0 only, as the reference (Q17); "none"

    def validate(self) -> None:
        if int(self.num_steps) != self.num_steps or self.num_steps < 1:
            raise ValueError(f"num_steps must be a whole number >= 1, got {self.num_steps}")
        if self.guidance is None or self.guidance_img is None:
            raise ValueError("guidance and guidance_img must be numbers (1.0 disables that guidance)")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.paste_reference not in PASTE_MODES:
            raise ValueError(f"paste_reference must be one of {PASTE_MODES}, got {self.paste_reference!r}")
        if self.flow_shift is not None and not self.flow_shift > 0:
            raise ValueError(f"flow_shift must be > 0 or None, got {self.flow_shift}")


# ---------------------------------------------------------------- packing and positions


def pack(x: Tensor, patch_size: int = 2) -> Tensor:
    """[B, C, T, H, W] latent -> [B, T*(H/p)*(W/p), C*p*p] tokens ("b c t (h p) (w p) -> b (t h w) (c p p)")."""
    if x.ndim != 5 or x.shape[-1] % patch_size or x.shape[-2] % patch_size:
        raise ValueError(f"pack needs [B, C, T, H, W] with H and W divisible by {patch_size}, got {tuple(x.shape)}")
    return rearrange(x, "b c t (h ph) (w pw) -> b (t h w) (c ph pw)", ph=patch_size, pw=patch_size)


def unpack(x: Tensor, frames: int, height: int, width: int, patch_size: int = 2) -> Tensor:
    """Inverse of pack; frames / height / width are the LATENT sizes."""
    return rearrange(
        x,
        "b (t h w) (c ph pw) -> b c t (h ph) (w pw)",
        t=frames,
        h=height // patch_size,
        w=width // patch_size,
        ph=patch_size,
        pw=patch_size,
    )


def image_ids(frames: int, height: int, width: int, patch_size: int = 2, device=None) -> Tensor:
    """[1, T*h*w, 3] float (t, h, w) index of each packed token (h, w counted in patches)."""
    grid = torch.meshgrid(
        torch.arange(frames, device=device),
        torch.arange(height // patch_size, device=device),
        torch.arange(width // patch_size, device=device),
        indexing="ij",
    )
    return torch.stack(grid, dim=-1).reshape(1, -1, 3).float()


def text_ids(length: int, device=None) -> Tensor:
    """Text tokens all sit at position 0 on every axis."""
    return torch.zeros(1, length, 3, device=device)


def v2_noise(shape: Sequence[int], seed: int, device="cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """The reference's initial noise: randn from torch.Generator(device).manual_seed(seed) (get_noise)."""
    generator = torch.Generator(device=device).manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


# ---------------------------------------------------------------- conditioning


def conditioned_frames(cond_type: str, latent_frames: int, causal: bool = True) -> list[int]:
    """Latent frames given by the reference for cond_type (prepare_inference_condition)."""
    if cond_type not in COND_TYPES:
        raise ValueError(f"unknown cond_type {cond_type!r}; allowed: {', '.join(COND_TYPES)}")
    if cond_type == "t2v":
        return []
    if latent_frames < 2:
        # The reference silently drops the condition for a single latent frame.
        raise ValueError(f"cond_type {cond_type!r} needs a video (>= 2 latent frames), got {latent_frames}")
    last = latent_frames - 1
    if cond_type.startswith("i2v"):
        return {"i2v_head": [0], "i2v_tail": [last], "i2v_loop": [0, last]}[cond_type]
    count = (16 if cond_type.endswith("_easy") else 8) + int(causal)
    if latent_frames <= count:
        where = "first" if "head" in cond_type else "last"
        raise ValueError(
            f"cond_type {cond_type!r} conditions the {where} {count} latent frames, so the video to generate needs at "
            f"least {count + 1} latent frames; it has {latent_frames}"
        )
    return list(range(count)) if "head" in cond_type else list(range(latent_frames - count, latent_frames))


def _reference_list(references: Tensor | Sequence[Tensor] | None) -> list[Tensor]:
    if references is None:
        return []
    refs = [references] if isinstance(references, Tensor) else list(references)
    out = []
    for ref in refs:
        if ref.ndim == 4:
            ref = ref[None]
        if ref.ndim != 5:
            raise ValueError(f"a reference latent must be [C, T, H, W] or [B, C, T, H, W], got {tuple(ref.shape)}")
        out.append(ref)
    return out


def prepare_condition(
    latent_shape: Sequence[int],
    cond_type: str,
    references: Tensor | Sequence[Tensor] | None = None,
    causal: bool = True,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> tuple[Tensor, Tensor, list[int]]:
    """masks [B,1,T,H,W], masked reference [B,C,T,H,W] and the conditioned frame indices.

    i2v_head: frame 0 of references[0]; i2v_tail: last frame of references[-1]; i2v_loop: both;
    v2v_*: the first / last k frames of references[0]. References are latents (scaled, as the AE
    encode returns them), batch 1 (shared) or B.
    """
    batch, channels, frames, height, width = latent_shape
    frames_given = conditioned_frames(cond_type, frames, causal)
    masks = torch.zeros(batch, 1, frames, height, width, dtype=dtype, device=device)
    masked = torch.zeros(batch, channels, frames, height, width, dtype=dtype, device=device)
    if not frames_given:
        return masks, masked, frames_given
    refs = _reference_list(references)
    if not refs:
        raise ValueError(f"cond_type {cond_type!r} needs a reference latent (cond=...)")
    for ref in refs:
        if ref.shape[0] not in (1, batch) or ref.shape[1] != channels or ref.shape[-2:] != (height, width):
            raise ValueError(
                f"reference latent {tuple(ref.shape)} does not fit the latent {tuple(latent_shape)}: "
                f"need batch 1 or {batch}, {channels} channels and {height} x {width}"
            )
    if cond_type == "i2v_head":
        sources = [refs[0][:, :, :1]]
    elif cond_type == "i2v_tail":
        sources = [refs[-1][:, :, -1:]]
    elif cond_type == "i2v_loop":
        sources = [refs[0][:, :, :1], refs[-1][:, :, -1:]]
    else:
        count = len(frames_given)
        if refs[0].shape[2] < count:
            raise ValueError(f"{cond_type} needs a reference of >= {count} latent frames, got {refs[0].shape[2]}")
        sources = [refs[0][:, :, :count] if "head" in cond_type else refs[0][:, :, -count:]]
    values = torch.cat(sources, dim=2).to(device=device, dtype=dtype)
    masks[:, :, frames_given] = 1
    masked[:, :, frames_given] = values.expand(batch, -1, -1, -1, -1)
    return masks, masked, frames_given


def pack_condition(masks: Tensor, masked_ref: Tensor, patch_size: int = 2) -> Tensor:
    """cond_in input: pack(cat(mask, masked reference)), mask channel first -> [B, L, (1 + C) p^2]."""
    return pack(torch.cat((masks, masked_ref), dim=1), patch_size)


# ---------------------------------------------------------------- guidance


def step_scales(
    step: int, options: V2SamplingOptions, cond_type: str, latent_frames: int
) -> tuple[float, float | Tensor]:
    """(text scale, image scale) of a step; the image scale is a float or a float32 ramp [latent_frames]."""
    text_scale = oscillation_scale(options.guidance, step) if options.text_osci else options.guidance
    image_scale = oscillation_scale(options.guidance_img, step) if options.image_osci else options.guidance_img
    if options.scale_temporal_osci and cond_type.startswith("i2v") and image_scale > 1.0:
        # Decreases over the steps (N + 1 points, unlike 1.3's N) and rises along latent time.
        upper = torch.linspace(image_scale, 1.0, options.num_steps + 1)[step].item()
        return float(text_scale), torch.linspace(1.0, upper, latent_frames)
    return float(text_scale), float(image_scale)


def needed_passes(cond_type: str, text_scale: float, image_scale: float | Tensor) -> tuple[str, ...]:
    """Passes the guided velocity depends on.

    The image term g_img (v_u - v_u2) is exactly zero for t2v (both passes see an all-zero cond and the
    same negative text, so v_u2 == v_u) and when g_img == 1 it folds into v_u. Without it,
    v = v_u + g_txt (v_c - v_u), which is v_c when g_txt == 1.
    """
    image_term = cond_type != "t2v" and not (isinstance(image_scale, float) and image_scale == 1.0)
    if image_term:
        return PASSES
    return ("cond",) if text_scale == 1.0 else ("cond", "uncond_text")


def guided_velocity(
    outputs: dict[str, Tensor], passes: tuple[str, ...], text_scale: float, image_scale: float | Tensor
) -> Tensor:
    """v = v_u2 + g_img (v_u - v_u2) + g_txt (v_c - v_u) over the `passes` that needed_passes kept."""
    v_cond = outputs["cond"]
    if passes == ("cond",):
        return v_cond
    v_uncond = outputs["uncond_text"]
    base = v_uncond
    if "uncond_all" in passes:
        v_uncond_all = outputs["uncond_all"]
        base = v_uncond_all + image_scale * (v_uncond - v_uncond_all)
    return base + text_scale * (v_cond - v_uncond)


def pass_plan(options: V2SamplingOptions, cond_type: str, latent_frames: int = 2) -> list[tuple[str, ...]]:
    """The passes each step runs (all three every step when skip_redundant_passes is off)."""
    plan = []
    for step in range(options.num_steps):
        text_scale, image_scale = step_scales(step, options, cond_type, latent_frames)
        plan.append(needed_passes(cond_type, text_scale, image_scale) if options.skip_redundant_passes else PASSES)
    return plan


# ---------------------------------------------------------------- sampler


def _text_batch(text: dict, batch: int) -> dict[str, Tensor]:
    keys = ("t5", "pooled", "neg_t5", "neg_pooled")
    missing = [k for k in keys if k not in text]
    if missing:
        raise ValueError(
            f"text needs {keys} (T5 states [B, L, D] and CLIP pooled [B, D] for the prompt and the negative, "
            f"the official negative being the empty string); missing {missing}"
        )
    out = {}
    for key in keys:
        value = text[key]
        expected_ndim = 3 if key.endswith("t5") else 2
        if value.ndim != expected_ndim or value.shape[0] not in (1, batch):
            raise ValueError(
                f"text[{key!r}] must be {expected_ndim}-D with batch 1 or {batch}, got {tuple(value.shape)}"
            )
        out[key] = value.expand(batch, *value.shape[1:])
    return out


def _model_inputs(name: str, text: dict[str, Tensor], cond: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if name == "cond":
        return text["t5"], text["pooled"], cond
    if name == "uncond_text":
        return text["neg_t5"], text["neg_pooled"], cond
    return text["neg_t5"], text["neg_pooled"], torch.zeros_like(cond)


def _run_passes(model, passes, x, text, cond, img_ids, t_value, options, model_dtype, state_dtype) -> dict:
    """Model outputs per pass name, in the state dtype."""
    batch = x.shape[0]
    inputs = {name: _model_inputs(name, text, cond) for name in passes}
    same_text_length = len({inputs[name][0].shape[1] for name in passes}) == 1
    groups = [list(passes)] if options.batch_passes and same_text_length else [[name] for name in passes]
    outputs = {}
    for group in groups:
        n = len(group) * batch
        txt = torch.cat([inputs[name][0] for name in group]).to(model_dtype)
        # Times stay in the state dtype: the model casts the embedding, not t. A bf16 state rounds t to
        # bf16 before the x1000 of the embedding, as the reference does (t_seen_by_bf16_model).
        timesteps = torch.full((n,), t_value, dtype=state_dtype, device=x.device)
        guidance = torch.full((n,), options.guidance, dtype=state_dtype, device=x.device)
        out = model(
            img=x.to(model_dtype).repeat(len(group), 1, 1),
            img_ids=img_ids,
            txt=txt,
            txt_ids=text_ids(txt.shape[1], device=x.device).to(model_dtype),
            timesteps=timesteps,
            y_vec=torch.cat([inputs[name][1] for name in group]).to(model_dtype),
            cond=torch.cat([inputs[name][2] for name in group]).to(model_dtype),
            guidance=guidance,
        )
        for name, value in zip(group, out.to(state_dtype).chunk(len(group))):
            outputs[name] = value
    return outputs


def sample_v2(
    model: Callable[..., Tensor],
    x: Tensor,
    text: dict[str, Tensor],
    options: V2SamplingOptions | None = None,
    *,
    cond: Tensor | Sequence[Tensor] | None = None,
    cond_type: str = "t2v",
    callback: Callable[[dict], None] | None = None,
) -> Tensor:
    """Sample from the initial noise x [B, C, T, H, W] (latent); returns the final latent in the state dtype.

    model: any callable with MMDiT.forward's keyword signature. text: {"t5", "pooled", "neg_t5",
    "neg_pooled"} (batch 1 or B). cond: the reference latent(s) for i2v / v2v (see prepare_condition);
    the conditioned frames are pasted back into the result (every batch item unless paste_reference says
    otherwise). callback(info) runs after each step's model passes with i, num_steps, t, t_next, x
    (latent before the step), denoised (x0 estimate), v (packed guided velocity), outputs (packed
    per-pass velocities of the passes run) and passes (the passes the guidance used).
    """
    options = options or V2SamplingOptions()
    options.validate()
    if x.ndim != 5:
        raise ValueError(f"x must be the latent noise [B, C, T, H, W], got {tuple(x.shape)}")
    state_dtype = options.state_dtype or torch.float32
    model_dtype = options.model_dtype or getattr(model, "dtype", None) or state_dtype
    patch = options.patch_size
    batch, _channels, frames, height, width = x.shape
    if height % patch or width % patch:
        raise ValueError(f"latent H and W must be divisible by patch_size {patch}, got {height} x {width}")
    text = _text_batch(text, batch)
    tokens_per_frame = (height // patch) * (width // patch)

    masks, masked_ref, frames_given = prepare_condition(
        x.shape, cond_type, cond, causal=options.is_causal_vae, dtype=state_dtype, device=x.device
    )
    cond_tokens = pack_condition(masks, masked_ref, patch)
    img_ids = image_ids(frames, height, width, patch, device=x.device).to(model_dtype)
    times = v2_timesteps(
        options.num_steps, tokens_per_frame, frames, shift=options.shift, shift_alpha=options.flow_shift
    ).tolist()

    state = pack(x.to(state_dtype), patch)
    for step in range(options.num_steps):
        t_curr, t_next = times[step], times[step + 1]
        text_scale, image_scale = step_scales(step, options, cond_type, frames)
        passes = needed_passes(cond_type, text_scale, image_scale)
        run = passes if options.skip_redundant_passes else PASSES
        outputs = _run_passes(model, run, state, text, cond_tokens, img_ids, t_curr, options, model_dtype, state_dtype)
        if isinstance(image_scale, Tensor):  # per latent frame -> per token
            image_scale = image_scale.repeat_interleave(tokens_per_frame)[None, :, None].to(state.device, state_dtype)
        velocity = guided_velocity(outputs, passes, text_scale, image_scale)
        if callback is not None:
            callback(
                {
                    "i": step,
                    "num_steps": options.num_steps,
                    "t": t_curr,
                    "t_next": t_next,
                    "x": unpack(state, frames, height, width, patch),
                    "denoised": unpack(state - t_curr * velocity, frames, height, width, patch),
                    "v": velocity,
                    "outputs": outputs,
                    "passes": passes,
                }
            )
        state = state + (t_next - t_curr) * velocity

    result = unpack(state, frames, height, width, patch)
    # The reference pastes the reference latent back for i2v only, and only into batch item 0 (Q17).
    if cond_type.startswith("i2v") and options.paste_reference != "none":
        items = slice(0, 1) if options.paste_reference == "first" else slice(None)
        result[items, :, frames_given] = masked_ref[items, :, frames_given]
    return result
