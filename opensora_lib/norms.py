"""RMS normalisation in float32, returned in the input's dtype (Llama / Liger "llama" casting: a gain, if any, is
applied by the caller after the cast). Both DiTs normalise q and k with it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# F.rms_norm upcasts half-precision inputs to float32 from torch 2.5 (2.4 normalised in the input's dtype) and is
# one fused kernel on CUDA in recent torch; older torch gets the same maths spelled out.
FUSED_RMS_NORM = hasattr(F, "rms_norm") and torch.__version__ >= (2, 5)


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2, last dim) + eps), computed in float32, in x's dtype."""
    if FUSED_RMS_NORM:
        return F.rms_norm(x, x.shape[-1:], eps=eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
