"""Core ComfyUI's HunyuanVideo VAE with the official frame-causal mid-block attention (Open-Sora 2.0).

Core loads hunyuan_vae.safetensors as a 3-D AutoencoderKL whose encoder and decoder mid-block AttnBlock attend
over every latent frame; the official HunyuanVideo VAE masks that attention frame-causally (a token of latent
frame t sees frames <= t). Everything else already matches (scripts/verify_hunyuan_vae.py).

Newer ComfyUI (the 0.3.75 pin does not) also runs this VAE's encoder and decoder in temporal chunks (the first
frame, then 8 frames / 2 latent frames at a time, `carried` causal convolutions) to save memory. Each chunk's
GroupNorm then normalises over that chunk only, while the official VAE (temporal tiling off at inference)
normalises over the whole video: on the tiny golden case that alone moves the encoded latent by 0.24. With
`whole_video` (default) the copy runs the whole video at once, as the official VAE and ComfyUI 0.3.75 do, and
reports the memory that takes.

`frame_causal_vae(vae)` returns a copy of core's VAE object that differs only there. The copy shares every weight
with the original: only the module path down to the two attention blocks is shallow-copied (the copies hold no
tensors of their own), and the copy's patcher is a clone of the original's, so ComfyUI's memory manager sees one
set of weights. The original VAE object (cached by VAELoader) is not changed.
"""

from __future__ import annotations

import copy

import torch

from ..opensora_lib.attention import frame_causal_attention

MID_ATTENTION_PATHS = (("encoder", "mid", "attn_1"), ("decoder", "mid", "attn_1"))


def _own_children(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy with its own child table: swapping a child in it leaves `module` as it was."""
    twin = copy.copy(module)
    twin._modules = type(module._modules)(module._modules)
    return twin


def _find_mid_attentions(model: torch.nn.Module) -> None:
    """Fail loudly when this ComfyUI lays the VAE out differently (rather than silently not patching)."""
    for path in MID_ATTENTION_PATHS:
        node = model
        for depth, name in enumerate(path):
            child = getattr(node, "_modules", {}).get(name)
            if child is None:
                found = ".".join(("first_stage_model",) + path[:depth])
                raise ValueError(
                    f"Open-Sora HunyuanVideo VAE fix: {found} ({type(node).__name__}) has no submodule '{name}'. "
                    f"Expected core's HunyuanVideo VAE (hunyuan_vae.safetensors through Load VAE), whose "
                    f"first_stage_model.{'.'.join(path)} is the mid-block attention; this VAE is "
                    f"{type(model).__name__}, or this ComfyUI version names its modules differently."
                )
            node = child
        if not callable(getattr(node, "optimized_attention", None)):
            raise ValueError(
                f"Open-Sora HunyuanVideo VAE fix: first_stage_model.{'.'.join(path)} ({type(node).__name__}) has no "
                "optimized_attention function to replace; this ComfyUI version computes VAE attention differently."
            )


def _check_patch_is_used(attention: torch.nn.Module) -> None:
    """Run the patched block once on a 2-frame probe: the replacement must actually be called."""
    calls = []

    def counted(q, k, v):
        calls.append(q.shape)
        return frame_causal_attention(q, k, v)

    weight = next(attention.parameters(), None)
    dtype, device = (weight.dtype, weight.device) if weight is not None else (torch.float32, "cpu")
    channels = getattr(attention, "in_channels", None) or (weight.shape[0] if weight is not None else None)
    if channels is None:
        raise ValueError(f"Open-Sora HunyuanVideo VAE fix: cannot tell the width of {type(attention).__name__}")
    attention.optimized_attention = counted
    try:
        with torch.no_grad():
            attention(torch.zeros(1, int(channels), 2, 1, 1, dtype=dtype, device=device))
    finally:
        attention.optimized_attention = frame_causal_attention
    if not calls:
        raise RuntimeError(
            f"Open-Sora HunyuanVideo VAE fix: {type(attention).__name__}.forward did not call optimized_attention; "
            "this ComfyUI version computes VAE attention differently, so the frame-causal mask cannot be applied."
        )


def frame_causal_vae(vae, whole_video: bool = True):
    """A copy of core's HunyuanVideo VAE object whose encoder/decoder mid attention is frame-causal (official);
    with whole_video, a host's temporal chunking is switched off in the copy too (see the module docstring).

    Shares all weights with `vae` and leaves `vae` unchanged. Raises ValueError for a VAE that is not core's 3-D
    HunyuanVideo layout (e.g. the Flux AE) and for a ComfyUI whose VAE modules are laid out differently.
    """
    model = getattr(vae, "first_stage_model", None)
    if model is None:
        raise ValueError("Open-Sora HunyuanVideo VAE fix: this VAE has no weights (first_stage_model is None)")
    latent_dim = getattr(vae, "latent_dim", None)
    if latent_dim != 3:
        raise ValueError(
            f"Open-Sora HunyuanVideo VAE fix expects the HunyuanVideo video VAE (3-D latents, hunyuan_vae.safetensors); "
            f"this VAE has latent_dim {latent_dim} ({type(model).__name__}), e.g. an image VAE such as the Flux AE"
        )
    _find_mid_attentions(model)

    root = _own_children(model)
    for path in MID_ATTENTION_PATHS:
        parent = root
        for name in path:
            child = _own_children(parent._modules[name])
            parent._modules[name] = child
            parent = child
        _check_patch_is_used(parent)

    patched = copy.copy(vae)
    patched.first_stage_model = root
    chunked = [root._modules[name] for name in ("encoder", "decoder") if getattr(root._modules[name], "carried", False)]
    if whole_video and chunked:
        for module in chunked:  # the copies made above: the original keeps its chunks
            module.carried = False
        patched.memory_used_encode, patched.memory_used_decode = whole_video_memory_estimates()
    _refuse_other_latents(patched, getattr(vae, "latent_channels", 16))
    patcher = getattr(vae, "patcher", None)
    if patcher is not None:
        # A clone manages the same weights (the original model tree, whose weight-bearing modules are the ones
        # `root` uses), so ComfyUI loads / offloads them once for both VAE objects.
        patched.patcher = patcher.clone()
    return patched


def _refuse_other_latents(patched, channels: int) -> None:
    """Core's decode raises a bare conv channel error for a latent of another autoencoder (a 128-channel Video
    DC-AE latent from Empty Latent Video "2.0 DC-AE"); say what it is instead."""
    for name in ("decode", "decode_tiled"):
        original = getattr(patched, name, None)
        if original is None:
            continue

        def checked(samples, *args, _original=original, **kwargs):
            if samples.ndim == 5 and samples.shape[1] != channels:
                raise ValueError(
                    f"Open-Sora HunyuanVideo VAE: this latent has {samples.shape[1]} channels, the HunyuanVideo VAE "
                    f"takes {channels}. A 128-channel latent is a 2.0 Video DC-AE one: decode it with Open-Sora Decode "
                    "and Load Open-Sora VAE (F32T4C128_AE.safetensors)."
                )
            return _original(samples, *args, **kwargs)

        setattr(patched, name, checked)


def whole_video_memory_estimates():
    """Core's own estimates for this VAE before it processed videos in chunks (ComfyUI 0.3.75, comfy/sd.py: the
    same layout run on the whole video): encode 900 x max(T, 2) x H x W, decode 1500 x T x H x W x (4 x 8 x 8)
    elements, T / H / W of the tensor each is given."""
    import comfy.model_management

    def encode(shape, dtype):
        return 900 * max(shape[2], 2) * shape[3] * shape[4] * comfy.model_management.dtype_size(dtype)

    def decode(shape, dtype):
        return 1500 * shape[2] * shape[3] * shape[4] * (4 * 8 * 8) * comfy.model_management.dtype_size(dtype)

    return encode, decode


class OpenSoraHunyuanVAE:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": (
                    "VAE",
                    {
                        "tooltip": "Core Load VAE output for hunyuan_vae.safetensors (the Open-Sora 2.0 / HunyuanVideo "
                        "VAE). Not the Flux AE."
                    },
                )
            },
            "optional": {
                "whole_video": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "On: encode / decode the whole video at once, as the official VAE does (exact "
                        "Open-Sora numbers). Off: newer ComfyUI's chunks of a few frames (less memory; each chunk is "
                        "normalised on its own, so frames drift from the official numbers). ComfyUI 0.3.75 has no "
                        "chunks: no effect there.",
                    },
                )
            },
        }

    RETURN_TYPES = ("VAE",)
    OUTPUT_TOOLTIPS = ("The same VAE (shared weights) with the official frame-causal mid-block attention.",)
    FUNCTION = "patch"
    CATEGORY = "OpenSora/loaders"  # common.CATEGORY, written out: this module imports no ComfyUI (see its tests)
    DESCRIPTION = (
        "Give core's HunyuanVideo VAE the official frame-causal mid-block attention so encode / decode match "
        "Open-Sora 2.0 for multi-frame latents (single images are unaffected). Weights are shared, not copied."
    )

    def patch(self, vae, whole_video=True):
        return (frame_causal_vae(vae, whole_video),)


NODE_CLASS_MAPPINGS = {"OpenSoraHunyuanVAE": OpenSoraHunyuanVAE}
NODE_DISPLAY_NAME_MAPPINGS = {"OpenSoraHunyuanVAE": "Open-Sora HunyuanVideo VAE (causal fix)"}
