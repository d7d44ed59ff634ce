"""One attention entry point for every model, with selectable backends.

Tensors are [batch, heads, tokens, head_dim]. `mask` is a boolean [.., q, k] mask (True = attend) or
an additive float mask, as torch SDPA takes it. Optional kernels are imported only when selected.

Backends:
- sdpa: torch's scaled_dot_product_attention with its own kernel choice (works everywhere).
- math: explicit float32 softmax(QK^T)V (slow; a reference and for FLOP counting).
- cudnn: torch SDPA with the cuDNN attention kernel tried first (CUDA, bf16 / fp16 only).
- flash_attn / sageattention: the external packages, when installed.
Kernels that cannot take the call fall back to plain sdpa: flash_attn, sageattention and cudnn on a non-CUDA
tensor or with any mask, cudnn also for float32 / float64 inputs.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("sdpa", "math", "flash_attn", "sageattention", "cudnn")
_PACKAGES = ("flash_attn", "sageattention")  # backends that need a package of that name
_backend = "sdpa"

# cuDNN first, then SDPA's usual kernels: a shape cuDNN rejects still runs (torch >= 2.6 orders with
# set_priority; older torch only restricts to cuDNN, so a rejected shape raises there).
_CUDNN_ORDER = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]
_HAS_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters
_CUDNN_DTYPES = (torch.bfloat16, torch.float16)


def available_backends() -> list[str]:
    """Backends that can be selected here: sdpa and math always, cudnn with CUDA, the others when installed."""
    found = ["sdpa", "math"]
    for name in _PACKAGES:
        try:
            __import__(name)
            found.append(name)
        except ImportError:
            pass
    if torch.cuda.is_available() and torch.backends.cudnn.is_available():
        found.append("cudnn")
    return found


def set_backend(name: str) -> None:
    """Select the process-wide backend; raises ValueError for an unknown or unavailable name."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    available = available_backends()
    if name not in available:
        why = "needs CUDA with cuDNN (not found here)" if name == "cudnn" else "is not installed"
        raise ValueError(f"attention backend {name!r} {why}; available: {', '.join(available)}")
    global _backend
    _backend = name


def get_backend() -> str:
    return _backend


def _cudnn_kernels():
    if _HAS_PRIORITY:
        return sdpa_kernel(_CUDNN_ORDER, set_priority=True)
    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    backend = _backend
    if backend in ("flash_attn", "sageattention", "cudnn") and (mask is not None or q.device.type != "cuda"):
        backend = "sdpa"  # these kernels need CUDA; masks go to plain SDPA (cuDNN's mask support varies by version)
    if backend == "cudnn" and q.dtype not in _CUDNN_DTYPES:
        backend = "sdpa"  # cuDNN attention is bf16 / fp16 only
    if backend == "flash_attn":
        from flash_attn import flash_attn_func

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend == "sageattention":
        from sageattention import sageattn

        return sageattn(q, k, v, tensor_layout="HND")
    if backend == "cudnn":
        with _cudnn_kernels():
            return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        scale = q.shape[-1] ** -0.5
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        return (scores.softmax(-1) @ v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
