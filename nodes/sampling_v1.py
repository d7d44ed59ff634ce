"""Open-Sora 1.2 / 1.3 sampling for the Sampler node and the Guider: the text and reference conditioning of a 1.x
LATENT, the STDiT3 caller and the node switches as RFlowOptions (the 2.0 counterpart is sampling_v2.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import torch

from ..opensora_lib import rflow
from ..opensora_lib.conditioning_v1 import (
    CONDITION_FRAME_LENGTH,
    V12_ALIGN,
    chunk_conditioning,
    image_strategies,
    loop_placements,
    mask_strategies_for,
    snap_to_alignment,
)
from ..opensora_lib.schedules import rflow_timesteps
from .comfy_model import TIMESTEP_MULTIPLIER
from .common import check_v1_text, compute_dtype, conditioning_entry, warn_once
from .sampling_common import check_reference_rows, diffusion_model_runner, flow_sigmas, model_version

log = logging.getLogger("OpenSora")


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


def v1_texts(model, positive: list, negative: list, device, dtype, loops: int = 1) -> list[rflow.RFlowText]:
    """One RFlowText per generation loop: the positive T5 states + mask of that loop (Encode Prompt's "|k|"
    segments); the negative prompt, or the learned null caption (masked by the positive, Q1), for all of them."""
    version = model_version(model)
    y, meta = text_of(positive, "positive", version)
    loop_texts = current_loop_texts(y, meta) or [{"cond": y, "attention_mask": meta["attention_mask"]}]
    if len(loop_texts) > loops:
        log.info(
            "OpenSora: the prompt has texts for %d loops; the Sampler runs %d (the rest unused)", len(loop_texts), loops
        )
    y_null = model.model.diffusion_model.null_caption().to(device, dtype)[None]
    negative_y, negative_meta = text_of(negative, "negative", version)
    texts = []
    for loop in range(loops):
        entry = loop_texts[min(loop, len(loop_texts) - 1)]
        if loop > 0:
            check_v1_text(entry["cond"], entry["attention_mask"], f"The positive conditioning's loop {loop} text")
        text = rflow.RFlowText(
            y=entry["cond"].to(device, dtype)[:, None], mask=entry["attention_mask"].to(device), y_null=y_null
        )
        if negative_y is not None:
            text.negative_y = negative_y.to(device, dtype)[:, None]
            text.negative_mask = negative_meta["attention_mask"].to(device)
        texts.append(text)
    return texts


def current_loop_texts(y: torch.Tensor, meta: dict) -> list[dict]:
    """Encode Prompt's per-loop texts ("|k|" segments), unless a core node changed the conditioning since (its loop 0
    is no longer Encode Prompt's: ConditioningZeroOut, ConditioningAverage, ...): then every loop uses it as given."""
    loop_texts = meta.get("opensora_loop_texts") or []
    if loop_texts and not torch.equal(y.cpu(), loop_texts[0]["cond"].cpu()):
        warn_once(
            "stale loop texts",
            "OpenSora: the positive conditioning was changed after Encode Prompt, so its |k| loop segments no longer "
            "apply: every loop uses the conditioning as given",
        )
        return []
    return loop_texts


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


def v1_references(reference: dict, z: torch.Tensor) -> list[torch.Tensor]:
    """The reference latents of an Encode Reference entry: one video (v2v_head), else one per image (the official
    "a.png;b.png" references; i2v_loop: start, end)."""
    ref = reference["latent"].to(z.device, z.dtype)
    if reference["cond_type"] == "v2v_head":
        return [ref]
    return [ref[:, :, k : k + 1] for k in range(ref.shape[2])]


def v1_chaining(
    version: str,
    latent: dict,
    z: torch.Tensor,
    loops: int = 1,
    condition_frame_length: int = CONDITION_FRAME_LENGTH,
    condition_frame_edit: float = 0.0,
) -> dict:
    """chunk_conditioning's keyword arguments for a 1.x latent over `loops` chunks. 1.3 conditions the DiT on an
    Encode Reference entry (cond channels, placed as the official cond types); 1.2 has no such input and, as its
    official inference, writes the reference frames into z with a mask strategy (edit ratio 0: those latent frames
    are kept) aligned to multiples of 5 latent frames (official align = 5: i2v_tail on 15 latent frames lands on frame
    10). Without a reference both chain later chunks by mask strategy."""
    chaining = {
        "align": V12_ALIGN if version == "1.2" else None,
        "condition_frame_length": condition_frame_length,
        "condition_frame_edit": condition_frame_edit,
    }
    reference = latent.get("opensora_reference")
    if reference is None:
        return chaining
    check_reference_fits(reference, z)
    references = v1_references(reference, z)
    chaining["references"] = references
    index, cond_type = reference["mask_index"], reference["cond_type"]
    if version == "1.2":
        if cond_type == "v2v_head":  # one video: consecutive frames in one group
            chaining["mask_strategy"] = mask_strategies_for(index, references[0].shape[2])
        else:  # each image its own reference id, so aligning moves only its target
            chaining["mask_strategy"] = image_strategies(index, len(references))
        log_v12_alignment(chaining["mask_strategy"], index, z.shape[2])
        if loops > 1:  # an end frame (i2v_tail, i2v_loop) belongs to the last chunk, as the 1.3 way places it
            chaining["mask_strategy"] = [
                replace(s, loop=loops - 1) if s.target_start % z.shape[2] == z.shape[2] - 1 else s
                for s in chaining["mask_strategy"]
            ]
    elif cond_type == "frame_index":  # one frame of the first chunk
        chaining["placements"] = [(0, 0, index[0])]
    else:
        lengths = [r.shape[2] for r in references]
        chaining["placements"], chaining["end_placements"] = loop_placements(
            cond_type, z.shape[2], lengths, loops, condition_frame_length
        )
    return chaining


def log_v12_alignment(strategies: list, asked: list[int], frames: int) -> None:
    """Say where official align = 5 moved a 1.2 reference."""
    kept = sorted(
        {snap_to_alignment(s.target_start % frames, V12_ALIGN, frames) + k for s in strategies for k in range(s.length)}
    )
    asked = sorted(index % frames for index in asked)
    if kept != asked:
        log.info("OpenSora: 1.2 reference at latent frame(s) %s, aligned from %s (official align = 5)", kept, asked)


def v1_reference(latent: dict, z: torch.Tensor) -> rflow.ReferenceConditioning | None:
    """1.3: the DiT's reference input for one generation (the Guider)."""
    return chunk_conditioning(z, 0, 1, **v1_chaining("1.3", latent, z))[1]


def schedule_v1(info: dict, steps: int, timestep_transform: bool, bf16_inputs: bool) -> torch.Tensor:
    """The times (0..1000, float32) the 1.x reference sampler steps through for a latent's info."""
    return rflow_timesteps(
        steps,
        info["height"],
        info["width"],
        info["num_frames"],
        info["version"],
        use_timestep_transform=timestep_transform,
        bf16_inputs=bf16_inputs,
    )


def sigmas_v1(info: dict, steps: int, timestep_transform: bool, bf16_inputs: bool) -> torch.Tensor:
    """The 1.x schedule as SIGMAS (Open-Sora Sigmas): t / 1000, ending at 0."""
    t = schedule_v1(info, steps, timestep_transform, bf16_inputs)
    return flow_sigmas(torch.cat([t.double() / 1000.0, t.new_zeros(1, dtype=torch.float64)]).float())


def warn_float32_schedule(model, info: dict, sigmas: torch.Tensor) -> None:
    """A 1.x DiT that computes in bf16 sees bf16 sizes (quirk Q2), so its schedule is the bf16 one: say so when the
    sigmas are Open-Sora Sigmas' float32 schedule (made without the MODEL)."""
    if compute_dtype(model.model) != torch.bfloat16 or sigmas.ndim != 1 or len(sigmas) < 2:
        return
    steps, given = len(sigmas) - 1, sigmas.detach().float().cpu()
    for transform in (True, False):
        float32 = sigmas_v1(info, steps, transform, bf16_inputs=False)
        if torch.equal(given, float32) and not torch.equal(float32, sigmas_v1(info, steps, transform, True)):
            warn_once(
                "float32 schedule",
                "OpenSora: the DiT computes in bf16, which the official code feeds bf16 sizes (quirk Q2), but these "
                "sigmas are Open-Sora Sigmas' float32 schedule: connect the MODEL to Open-Sora Sigmas",
            )


def v1_sample_sigmas(info: dict, options: rflow.RFlowOptions) -> torch.Tensor:
    """The times sample_rflow steps through as the DiT's sigmas (t / 1000 in float32, as the forward divides them),
    ending at 0."""
    t = schedule_v1(info, options.num_steps, options.use_timestep_transform, options.bf16_inputs)
    return torch.cat([t, t.new_zeros(1)]) / TIMESTEP_MULTIPLIER


def dit_caller(model, sample_sigmas: torch.Tensor | None = None) -> Callable[..., torch.Tensor]:
    """sample_rflow's model: the official STDiT3 signature in, the official prediction out, fed in the model's compute
    dtype. It calls ComfySTDiT3's latent interface (what core calls, and what object patches and torch.compile wrap)
    through diffusion_model_runner; the renames (y -> context, mask -> attention_mask) and the sign are exact.
    sample_sigmas: the run's schedule as SIGMAS, for the forward's transformer_options."""
    dtype = compute_dtype(model.model)
    run = diffusion_model_runner(model, sample_sigmas, TIMESTEP_MULTIPLIER)

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
