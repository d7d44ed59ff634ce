"""ComfyUI's own attention for the Open-Sora DiTs: Load Open-Sora DiT's "comfy" backend, and attention overrides.

Core's DiTs call comfy.ldm.modules.attention.optimized_attention, which ComfyUI's startup flags choose
(--use-sage-attention, --use-flash-attention, --use-pytorch-cross-attention, --use-split-cross-attention, ...) and
patch nodes change: by replacing that module attribute, or per MODEL through
transformer_options["optimized_attention_override"] (e.g. KJNodes' Patch Sage Attention). The "comfy" backend sends
the DiT's attention there with the running forward's transformer_options, so both apply. A MODEL that carries an
override runs it whatever its loader's backend: the user patched this MODEL on purpose (said once in the log).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from comfy.ldm.modules import attention as core

from ..opensora_lib import attention
from .common import warn_once

NAME = "comfy"
OVERRIDE = "optimized_attention_override"
_options: dict | None = None  # the running DiT forward's transformer_options, while it uses this backend


def _core_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, heads, tokens, head_dim] through core's optimized_attention, called as core's Flux calls it."""
    if _options is None:  # outside a DiT forward (a VAE's attention after a DiT chose this backend): plain SDPA
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    batch, heads, tokens, head_dim = q.shape
    if mask is not None and mask.dtype == torch.bool:  # core's attention functions add a float mask to the scores
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, -torch.finfo(q.dtype).max)
    # Flux's form (skip_reshape, output [B, tokens, heads * head_dim]): the one every override is written for
    out = core.optimized_attention(q, k, v, heads, mask=mask, skip_reshape=True, transformer_options=_options)
    if tuple(out.shape) != (batch, tokens, heads * head_dim):  # e.g. an override that skipped the output reshape
        source = "The MODEL's attention override" if _options.get(OVERRIDE) is not None else "Core's attention"
        raise ValueError(
            f"{source} returned shape {tuple(out.shape)} for the Open-Sora DiT; expected "
            f"{(batch, tokens, heads * head_dim)} ([batch, tokens, heads x head_dim], as core's Flux gets it)"
        )
    return out.reshape(batch, tokens, heads, head_dim).transpose(1, 2)  # an override may hand back a strided view


attention.register_backend(NAME, _core_attention)


def select(backend: str, transformer_options: dict | None) -> None:
    """Select a DiT's attention for the forward about to run (`transformer_options` None: the forward ended)."""
    global _options
    if transformer_options is not None and transformer_options.get(OVERRIDE) is not None and backend != NAME:
        warn_once(
            "attention override",
            f"OpenSora: the MODEL carries an attention override (e.g. a Patch Sage Attention node); it runs in place "
            f"of Load Open-Sora DiT's attention {backend!r}",
        )
        backend = NAME
    attention.use_backend(backend)
    _options = transformer_options if backend == NAME else None
