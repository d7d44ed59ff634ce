"""One attention entry point for every model, with selectable backends.

Tensors are [batch, heads, tokens, head_dim]. `mask` is a boolean [.., q, k] mask (True = attend) or
an additive float mask, as torch SDPA takes it. Optional kernels are imported only when selected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "math", "flash_attn", "sageattention")
_backend = "sdpa"


def available_backends() -> list[str]:
    found = ["sdpa", "math"]
    for name in ("flash_attn", "sageattention"):
        try:
            __import__(name)
            found.append(name)
        except ImportError:
            pass
    return found


def set_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name not in available_backends():
        raise ValueError(f"attention backend {name!r} is not installed; available: {available_backends()}")
    global _backend
    _backend = name


def get_backend() -> str:
    return _backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    backend = _backend
    if backend in ("flash_attn", "sageattention") and (mask is not None or q.device.type != "cuda"):
        backend = "sdpa"  # these kernels take no arbitrary mask and need CUDA
    if backend == "flash_attn":
        from flash_attn import flash_attn_func

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "sageattention":
        from sageattention import sageattn

        return sageattn(q, k, v, tensor_layout="HND")
    if backend == "math":
        scale = q.shape[-1] ** -0.5
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        return (scores.softmax(-1) @ v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
