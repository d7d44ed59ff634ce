"""One attention entry point for every model, with selectable backends.

Tensors are [batch, heads, tokens, head_dim]. `mask` is a boolean [.., q, k] mask (True = attend) or
an additive float mask, as torch SDPA takes it. Optional kernels are imported only when selected.

Backends:
- sdpa: torch's scaled_dot_product_attention with its own kernel choice (works everywhere).
- math: explicit float32 softmax(QK^T)V (slow; a reference and for FLOP counting).
- cudnn: torch SDPA with the cuDNN attention kernel tried first (CUDA, bf16 / fp16 only).
- flash_attn (FlashAttention-2), flash_attn_3 (FlashAttention-3, Hopper: the flash-attention repo's hopper/ build,
  module flash_attn_interface, or the forward-only fa3-fwd wheel, module fa3_fwd_interface) and sageattention: the
  external packages, when installed.
- backends a host registers (register_backend): the node layer's "comfy", ComfyUI's own attention.
The CUDA kernels (cudnn and the packages) take bf16 / fp16 CUDA tensors without a mask and with a head width of
at most 256 (a multiple of 8); any other call runs plain sdpa. FA3 builds without fp16 kernels (fa3-fwd) send fp16
to sdpa too, and FA3 is offered on Ampere / Hopper GPUs only (its kernels are sm_80 / sm_90).

`frame_causal_attention` ([B, C, T, H, W]) is core's HunyuanVideo VAE mid attention with the official mask.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from functools import cache
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("sdpa", "math", "flash_attn", "flash_attn_3", "sageattention", "cudnn")
# Backends that need a package: the modules that provide one, tried in order.
_PACKAGES = {
    "flash_attn": ("flash_attn",),
    "flash_attn_3": ("flash_attn_interface", "fa3_fwd_interface"),
    "sageattention": ("sageattention",),
}
# Backends the host computes (this library never imports ComfyUI): name -> fn(q, k, v, mask) -> out, in the layout
# above. They take every call, masked or not, on any device.
_hosted: dict[str, Callable] = {}
_backend = "sdpa"
_kernels: ModuleType | None = None  # the selected backend's package, found once by set_backend
_import_errors: dict[str, str] = {}  # module -> why it did not import (missing, or a binary built for another torch)

# cuDNN first, then SDPA's usual kernels: a shape cuDNN rejects still runs (torch >= 2.6 orders with
# set_priority; older torch only restricts to cuDNN, so a rejected shape raises there).
_CUDNN_ORDER = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]
_HAS_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # what the CUDA kernels take
_kernel_dtypes = _KERNEL_DTYPES  # what the selected one takes (set_backend)
# Where an FA3 build records its build flags (FLASHATTENTION_DISABLE_FP16, ...): module -> its config module.
_FA3_CONFIGS = {"flash_attn_interface": "flash_attn_config", "fa3_fwd_interface": "fa3_fwd_config"}


@cache
def _package(backend: str) -> ModuleType | None:
    """The first of the backend's modules that imports, else None (the reasons go to _import_errors)."""
    for name in _PACKAGES[backend]:
        try:
            module = importlib.import_module(name)
        except Exception as e:  # a broken binary can raise anything on import: reported by set_backend, not raised
            _import_errors[name] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            continue
        _import_errors.pop(name, None)
        return module
    return None


def _unavailable(name: str) -> str | None:
    """Why backend `name` cannot run in this process, or None if it can."""
    if name == "cudnn" and not (torch.cuda.is_available() and torch.backends.cudnn.is_available()):
        return "needs CUDA with cuDNN (not found here)"
    if name in _PACKAGES and _package(name) is None:
        return "does not import (" + "; ".join(f"{m}: {_import_errors.get(m)}" for m in _PACKAGES[name]) + ")"
    if name == "flash_attn_3" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if major not in (8, 9):
            return f"(FlashAttention-3) has kernels for Ampere and Hopper GPUs only, and this one is sm_{major}{minor}"
    return None


def _half_dtypes(module: ModuleType | None) -> tuple[torch.dtype, ...]:
    """The half-precision dtypes the selected package has kernels for: FA3 builds may leave fp16 out (fa3-fwd does)."""
    config = _FA3_CONFIGS.get(getattr(module, "__name__", ""))
    if config is None:
        return _KERNEL_DTYPES
    try:
        flags = importlib.import_module(config).CONFIG["build_flags"]
    except Exception:  # no readable config: assume the full build
        return _KERNEL_DTYPES
    return (torch.bfloat16,) if flags.get("FLASHATTENTION_DISABLE_FP16") else _KERNEL_DTYPES


def register_backend(name: str, fn: Callable) -> None:
    """Add a backend the host computes, selectable by name like the built-in ones."""
    _hosted[name] = fn


def backend_names() -> tuple[str, ...]:
    """Every backend name, built-in then hosted, whether or not it can run here."""
    return (*BACKENDS, *_hosted)


def available_backends() -> list[str]:
    """Backends that can be selected here: sdpa, math and the hosted ones always, cudnn with CUDA, the others when
    installed (and FA3 on a GPU it has kernels for)."""
    return [name for name in backend_names() if _unavailable(name) is None]


def check_backend(name: str) -> None:
    """Raise ValueError for an unknown or unavailable backend name. Only the requested package is imported (the
    others only to list what is available, in the error)."""
    if name not in backend_names():
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(backend_names())}")
    why = _unavailable(name)
    if why is not None:
        raise ValueError(f"attention backend {name!r} {why}; available: {', '.join(available_backends())}")


def set_backend(name: str) -> None:
    """Select the backend every attention call uses from now on; raises ValueError as check_backend."""
    check_backend(name)
    _select(name)


def use_backend(name: str) -> None:
    """Select a backend already checked (check_backend): a model with a backend of its own calls this at the top of
    its forward, so models loaded with different backends each run theirs."""
    if name != _backend:
        _select(name)


def _select(name: str) -> None:
    global _backend, _kernels, _kernel_dtypes
    # the package is looked up here, not per call: torch.compile then traces the kernel call without a graph break
    _backend, _kernels = name, _package(name) if name in _PACKAGES else None
    _kernel_dtypes = _half_dtypes(_kernels)


def get_backend() -> str:
    return _backend


def _cudnn_kernels():
    if _HAS_PRIORITY:
        return sdpa_kernel(_CUDNN_ORDER, set_priority=True)
    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])


def _kernel_takes(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether the selected CUDA kernel (cudnn or a package) can take this call; otherwise plain sdpa runs it. Masks
    go to SDPA because cuDNN's mask support varies by version and the packages take none; head widths over 256
    (the 1.2 VAE's 512-wide mid-block attention) are beyond the flash kernels."""
    head_dim = q.shape[-1]
    return (
        mask is None and q.device.type == "cuda" and q.dtype in _kernel_dtypes and head_dim <= 256 and head_dim % 8 == 0
    )


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    backend = _backend
    if backend in _hosted:
        return _hosted[backend](q, k, v, mask)
    if backend not in ("sdpa", "math") and not _kernel_takes(q, mask):
        backend = "sdpa"
    if backend in ("flash_attn", "flash_attn_3"):  # both take [batch, tokens, heads, head_dim]
        out = _kernels.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out[0] if isinstance(out, tuple) else out  # FA3 releases before 2025 also returned the logsumexp
        return out.transpose(1, 2)
    if backend == "sageattention":
        return _kernels.sageattn(q, k, v, tensor_layout="HND")
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


def frame_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Core AttnBlock's attention (one head over the C channels) with the official frame-causal mask: the
    HunyuanVideo VAE fix (nodes/hunyuan_vae.py) puts it in core's VAE, in place of core's own attention call, so it
    runs torch SDPA rather than the backend selected here.

    q, k, v: [B, C, T, H, W]. Tokens are ordered frame by frame, so the keys a frame may see are a prefix of the
    sequence: each frame's queries attend to that prefix without a mask. Same result as the official dense
    [T*H*W, T*H*W] mask, without building it, and every call can use a memory-efficient kernel.
    """
    if q.ndim != 5:
        raise ValueError(
            f"frame-causal attention needs [B, C, T, H, W] video features, got shape {tuple(q.shape)}: "
            "this is not the 3-D HunyuanVideo VAE"
        )
    batch, channels, frames, height, width = q.shape
    per_frame = height * width
    q, k, v = (x.reshape(batch, 1, channels, frames * per_frame).transpose(2, 3) for x in (q, k, v))
    out = torch.empty_like(q)
    for frame in range(frames):
        start, end = frame * per_frame, (frame + 1) * per_frame
        out[:, :, start:end] = F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end])
    return out.transpose(2, 3).reshape(batch, channels, frames, height, width)
