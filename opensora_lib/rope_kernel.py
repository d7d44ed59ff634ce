"""One Triton kernel for the MMDiT's half-split RoPE in eager inference, with the same values as the torch form.

Why: in eager PyTorch the rotation (x1 * cos - x2 * sin, x2 * cos + x1 * sin with x in bf16 and the tables in
float32) is four mixed-dtype products with float32 results, a subtraction and an addition: ~22 bytes moved per
element of q / k instead of 4. On one H200 that was ~154 ms of a 1.10 s 256px batch-3 forward (torch.profiler,
benchmarks/official_mmdit.py --profile); the official code's Liger Triton kernel does it in ~9 ms.

This kernel reads x once, does the same float32 operations in the same order, each rounded to float32 (fused
multiply-adds are switched off: enable_fp_fusion=False), and rounds once into the output dtype (round to nearest
even, as torch's cast), so its results are meant to be the torch form's bit for bit; where that has not been
checked it is not used: `rotate_into` self-checks against the torch form once per (device, dtype) before the first real use and
falls back to torch for good (with a warning) on any difference or error. Triton absent (e.g. many Windows
installs), a CPU tensor, a head size whose half is not a power of two: torch form. OPENSORA_TRITON_ROPE=0 turns
the kernel off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except Exception:  # not installed (or a broken install): the torch form is used
    triton = None

# TRITON_INTERPRET=1 runs kernels on the CPU in numpy (the tests); then CPU tensors, and only they, use the kernel.
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
_checked: dict[tuple[str, torch.dtype], bool] = {}  # (device, dtype) -> the self-check passed
_launches = 0  # kernel launches so far, the self-checks' included (kernel_state; benchmarks and tests read it)


def _define_kernel():
    @triton.jit
    def _rope_half_split(
        x_ptr,
        cos_ptr,
        sin_ptr,
        out_ptr,
        length,
        heads,
        x_stride_b,
        x_stride_l,
        x_stride_h,
        table_stride_b,
        table_stride_l,
        out_stride_b,
        out_stride_l,
        out_stride_h,
        HALF: tl.constexpr,
        BLOCK_HEADS: tl.constexpr,
    ):
        # One program per (batch item, token): every head of that token, both halves.
        token = tl.program_id(0).to(tl.int64)
        b = token // length
        pos = token % length
        h = tl.arange(0, BLOCK_HEADS)[:, None]
        d = tl.arange(0, HALF)[None, :]
        keep = h < heads
        x_at = x_ptr + b * x_stride_b + pos * x_stride_l + h * x_stride_h + d
        x1 = tl.load(x_at, mask=keep).to(tl.float32)
        x2 = tl.load(x_at + HALF, mask=keep).to(tl.float32)
        table_at = b * table_stride_b + pos * table_stride_l + d
        cos = tl.load(cos_ptr + table_at)
        sin = tl.load(sin_ptr + table_at)
        out_at = out_ptr + b * out_stride_b + pos * out_stride_l + h * out_stride_h + d
        kind = out_ptr.dtype.element_ty
        tl.store(out_at, (x1 * cos - x2 * sin).to(kind), mask=keep)
        tl.store(out_at + HALF, (x2 * cos + x1 * sin).to(kind), mask=keep)

    return _rope_half_split


_rope_half_split = None
if triton is not None:
    try:
        _rope_half_split = _define_kernel()
    except Exception:  # e.g. Triton cannot read the source: the torch form is used
        triton = None


def _eligible(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    if triton is None or os.environ.get("OPENSORA_TRITON_ROPE", "1") == "0":
        return False
    on_kernel_device = x.device.type == "cpu" if _INTERPRETING else x.is_cuda
    if not on_kernel_device or not x.device == out.device == cos.device == sin.device:
        return False
    half = x.shape[-1] // 2
    return (
        x.dim() == 4
        and out.shape == x.shape
        and x.shape[-1] % 2 == 0
        and half >= 1
        and half & (half - 1) == 0  # tl.arange needs a power of two
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and out.dtype == x.dtype
        and cos.dtype == sin.dtype == torch.float32
        and cos.dim() == 4
        and cos.shape == sin.shape
        and cos.stride() == sin.stride()
        and cos.shape[0] in (1, x.shape[0])
        and cos.shape[1] == x.shape[1]
        and cos.shape[2] == 1
        and cos.shape[3] == half
        and x.stride(-1) == out.stride(-1) == cos.stride(-1) == 1
    )


def _launch(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor) -> None:
    """out, x: [B, L, heads, D] (last dim contiguous); cos, sin: [B or 1, L, 1, D / 2] float32."""
    global _launches
    _launches += 1
    batch, length, heads, dim = x.shape
    table_stride_b = cos.stride(0) if cos.shape[0] == batch else 0
    # Triton launches on the current CUDA device: make it x's (a second GPU, ComfyUI's --cuda-device aside).
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _rope_half_split[(batch * length,)](
            x,
            cos,
            sin,
            out,
            length,
            heads,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            table_stride_b,
            cos.stride(1),
            out.stride(0),
            out.stride(1),
            out.stride(2),
            HALF=dim // 2,
            BLOCK_HEADS=triton.next_power_of_2(heads),
            enable_fp_fusion=False,  # each product rounded to float32 before the sum, as torch does
        )


def torch_rotate_into(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor) -> None:
    """The torch form: x's halves times the float32 tables (float32 products), sums rounded into out's halves."""
    x1, x2 = x.chunk(2, dim=-1)
    out1, out2 = out.chunk(2, dim=-1)
    torch.sub(x1 * cos, x2 * sin, out=out1)
    torch.add(x2 * cos, x1 * sin, out=out2)


def _refuse(why: str) -> None:
    warnings.warn(f"Triton RoPE kernel {why}; using the torch form", stacklevel=4)


def _self_check(x: Tensor) -> bool:
    """The kernel against the torch form on random inputs of x's device, dtype, heads and head size (the kernel
    compiled for the probe is the one the model then uses), with shared and per-item tables: equal bit for bit?
    256 tokens, ~1.5M elements at 24 x 128: a fused multiply-add or another rounding rule, which moves only a few
    half-precision results per million, shows."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    probe = (torch.randn(2, 256, *x.shape[2:], generator=generator) * 4).to(device=x.device, dtype=x.dtype)
    angle = torch.randn(2, 256, 1, x.shape[-1] // 2, generator=generator).to(x.device) * 30
    for tables in (angle[:1], angle):
        cos, sin = tables.cos(), tables.sin()
        expected, got = torch.empty_like(probe), torch.empty_like(probe)
        torch_rotate_into(expected, probe, cos, sin)
        try:
            _launch(got, probe, cos, sin)
        except Exception as e:  # a Triton / driver problem: torch form from now on
            _refuse(f"failed its check ({type(e).__name__}: {e})")
            return False
        if not torch.equal(got, expected):
            _refuse(f"differs from the torch form on {x.device} {x.dtype}")
            return False
    logging.getLogger(__name__).info("Triton RoPE kernel in use on %s %s (self-check passed)", x.device, x.dtype)
    return True


def rotate_into(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor) -> None:
    """Write the half-split rotation of x [B, L, heads, D] into out (same shape) with tables [B or 1, L, 1, D / 2];
    the Triton kernel where eligible and checked, else the torch form. Values are the same either way."""
    if _eligible(out, x, cos, sin):
        key = (str(x.device), x.dtype)
        if key not in _checked:
            _checked[key] = _self_check(x)
        if _checked[key]:
            try:
                _launch(out, x, cos, sin)
                return
            except Exception as e:  # e.g. a new shape that does not compile: torch form from now on
                _checked[key] = False
                _refuse(f"failed ({type(e).__name__}: {e})")
    torch_rotate_into(out, x, cos, sin)


def kernel_state() -> dict[str, object]:
    """What the kernel is doing here (benchmarks record it): Triton present, the self-checks and launches so far."""
    return {
        "triton": getattr(triton, "__version__", None),
        "launches": _launches,
        "disabled": os.environ.get("OPENSORA_TRITON_ROPE", "1") == "0",
        "checked": {f"{device} {str(dtype).removeprefix('torch.')}": ok for (device, dtype), ok in _checked.items()},
    }
