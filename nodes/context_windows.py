"""The reference conditioning under core's context windows (Context Windows (Manual), `dim` 2).

Core slices the latent per window and, from ComfyUI 0.18.0, asks the model to slice its own conditioning
(BaseModel.resize_cond_for_context_window). The Open-Sora references are per latent frame: 1.3's cond / cond_mask
[B, C, T, H, W] and the frames that attend to the null caption (mask_index, frame numbers), 2.0's cond
[B, 1 + C, T, H, W] (mask + masked reference). Each window gets its frames of them, and mask_index is renumbered to
the window's positions: a window that does not hold the reference frame gets an all-zero reference, as the
video's other frames do (the DiT stays in its i2v mode, as within one official i2v call). Older ComfyUI has
no such hook, so a reference with windows shorter than the latent is refused there before sampling.
"""

from __future__ import annotations

import comfy.conds
import comfy.model_base
import torch

FIRST_VERSION = "0.18.0"  # the first ComfyUI release with resize_cond_for_context_window (run: 0.18, 0.23, 0.33)
FRAME_CONDS = {"cond": 2, "cond_mask": 2}  # per-frame reference conds -> their time dimension


def slices_references() -> bool:
    return hasattr(comfy.model_base.BaseModel, "resize_cond_for_context_window")


def window_frames(window, frames: int, retain_index_list: list[int]) -> list[int]:
    """The latent frame at each position of a window's slice, as core's get_tensor picks them (an anchor frame
    first on newer ComfyUI; retain_index_list keeps positions 0..k on frames 0..k)."""
    return window.get_tensor(torch.arange(frames), dim=0, retain_index_list=retain_index_list).tolist()


def resize_reference_cond(cond_key: str, cond_value, window, x_in: torch.Tensor, device, retain_index_list):
    """BaseModel.resize_cond_for_context_window for the Open-Sora MODELs; None leaves the item to core."""
    if cond_key == "mask_index":
        reference_frames = set(cond_value.cond)
        frames = window_frames(window, x_in.shape[window.dim], retain_index_list)
        return comfy.conds.CONDConstant(tuple(p for p, frame in enumerate(frames) if frame in reference_frames))
    dim = FRAME_CONDS.get(cond_key)
    if dim is None or not torch.is_tensor(getattr(cond_value, "cond", None)):
        return None
    cond = cond_value.cond
    if cond.ndim <= dim or cond.shape[dim] != x_in.shape[window.dim]:
        return None
    sliced = window.get_tensor(cond, device, dim=dim, retain_index_list=retain_index_list)
    return cond_value._copy_with(sliced)


def window_length(model_options: dict) -> int | None:
    """The latent frames one forward sees under the MODEL's context windows over the frames (None: no windows)."""
    handler = model_options.get("context_handler")
    if getattr(handler, "dim", None) != 2:
        return None
    return getattr(handler, "context_length", None)


def check_context_windows(model_options: dict, latent: torch.Tensor, has_reference: bool) -> None:
    """Before sampling, what core's windows cannot run: a batch of videos (core slices the per-video timestep with
    the frame indices, 0.3.75 to 0.33.0), and a reference on a ComfyUI without the hook."""
    handler = model_options.get("context_handler")
    length, dim = getattr(handler, "context_length", None), getattr(handler, "dim", None)
    if length is None or dim is None or dim >= latent.ndim or latent.shape[dim] <= length:
        return
    if latent.shape[0] > 1:
        raise ValueError(
            f"Context windows run one video at a time: core slices the timestep (one per video) with the window's "
            f"frame indices, which fails for a batch of {latent.shape[0]}. Set batch_size to 1 and queue the prompt "
            "once per video, or set context_length to at least the latent's frames."
        )
    if not has_reference:
        return
    if dim != 2:
        raise ValueError(
            f"Context windows over latent dim {dim} do not work with a reference (image-to-video / video-to-video): "
            "windows run over the frames, dim 2 of an Open-Sora latent [B, C, T, H, W]."
        )
    if slices_references():
        return
    raise ValueError(
        f"Context windows (context_length {length}: the latent has {latent.shape[dim]} frames) with a reference "
        f"(image-to-video / video-to-video) need ComfyUI {FIRST_VERSION} or newer, which lets the model slice the "
        "reference per window; this ComfyUI slices only the latent. Update ComfyUI, use windows for text-to-video, "
        f"or set context_length to at least {latent.shape[dim]}."
    )
