"""Triton kernels for the MMDiT's eager element-wise work, each meant to give the torch form's values bit for bit.

They read and write each element once where eager PyTorch runs several kernels with float32 or rounded
intermediates in memory. Each does the torch form's float32 operations in the same order, each rounded to float32
(launched with enable_fp_fusion=False, so no fused multiply-add), and rounds into the tensor dtype exactly where
torch does (round to nearest even on a GPU). Whether that holds on a device is checked before use, and anything
else runs the torch form: see fused_ops, the only caller.

`triton` is None where Triton is missing or broken (e.g. many Windows installs). TRITON_INTERPRET=1 (read when the
kernels are defined) runs them on the CPU in numpy, as the tests do.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except Exception:  # not installed (or a broken install): the torch forms are used
    triton = None

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
ADD_PRODUCT_BLOCK = 1024  # columns per program of add_product (3 per 3072-wide row)


def _define_kernels():
    @triton.jit
    def rope_half_split(
        x_ptr,
        gain_ptr,
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
        HAS_GAIN: tl.constexpr,
    ):
        # One program per (batch item, token): every head of that token, both halves.
        token = tl.program_id(0).to(tl.int64)
        b = token // length
        pos = token % length
        h = tl.arange(0, BLOCK_HEADS)[:, None]
        d = tl.arange(0, HALF)[None, :]
        keep = h < heads
        kind = out_ptr.dtype.element_ty
        x_at = x_ptr + b * x_stride_b + pos * x_stride_l + h * x_stride_h + d
        x1 = tl.load(x_at, mask=keep).to(tl.float32)
        x2 = tl.load(x_at + HALF, mask=keep).to(tl.float32)
        if HAS_GAIN:  # the RMSNorm gain, a product rounded into the tensor dtype before the rotation reads it
            x1 = (x1 * tl.load(gain_ptr + d).to(tl.float32)).to(kind).to(tl.float32)
            x2 = (x2 * tl.load(gain_ptr + HALF + d).to(tl.float32)).to(kind).to(tl.float32)
        table_at = b * table_stride_b + pos * table_stride_l + d
        cos = tl.load(cos_ptr + table_at)
        sin = tl.load(sin_ptr + table_at)
        out_at = out_ptr + b * out_stride_b + pos * out_stride_l + h * out_stride_h + d
        tl.store(out_at, (x1 * cos - x2 * sin).to(kind), mask=keep)
        tl.store(out_at + HALF, (x2 * cos + x1 * sin).to(kind), mask=keep)

    @triton.jit
    def add_product(
        out_ptr,
        a_ptr,
        b_ptr,
        c_ptr,
        length,
        width,
        out_stride_b,
        out_stride_l,
        a_stride_b,
        a_stride_l,
        b_stride_b,
        c_stride_b,
        c_stride_l,
        BLOCK: tl.constexpr,
    ):
        # One program per (batch item, token, block of columns). b is one row per batch item.
        token = tl.program_id(0).to(tl.int64)
        i = token // length
        pos = token % length
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = cols < width
        kind = out_ptr.dtype.element_ty
        a = tl.load(a_ptr + i * a_stride_b + pos * a_stride_l + cols, mask=keep).to(tl.float32)
        b = tl.load(b_ptr + i * b_stride_b + cols, mask=keep).to(tl.float32)
        c = tl.load(c_ptr + i * c_stride_b + pos * c_stride_l + cols, mask=keep).to(tl.float32)
        product = (b * c).to(kind).to(tl.float32)  # torch rounds b * c into the dtype before the sum
        tl.store(out_ptr + i * out_stride_b + pos * out_stride_l + cols, (a + product).to(kind), mask=keep)

    return rope_half_split, add_product


_rope_half_split = _add_product = None
if triton is not None:
    try:
        _rope_half_split, _add_product = _define_kernels()
    except Exception:  # e.g. Triton cannot read the source: the torch forms are used
        triton = None


def on_kernel_device(*tensors: Tensor) -> bool:
    """All on one device the kernels run on: CUDA, or the CPU under the interpreter."""
    if triton is None:
        return False
    device = tensors[0].device
    return all(t.device == device for t in tensors) and (
        device.type == "cpu" if INTERPRETING else device.type == "cuda"
    )


def _on_device(x: Tensor):
    # Triton launches on the current CUDA device: make it x's (a second GPU, ComfyUI's --cuda-device aside).
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def launch_rope(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None) -> None:
    """out, x: [B, L, heads, D] (last dim contiguous); cos, sin: [B or 1, L, 1, D / 2] float32; gain: [D] or None."""
    batch, length, heads, dim = x.shape
    with _on_device(x):
        _rope_half_split[(batch * length,)](
            x,
            x if gain is None else gain,  # not read without a gain
            cos,
            sin,
            out,
            length,
            heads,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            cos.stride(0) if cos.shape[0] == batch else 0,
            cos.stride(1),
            out.stride(0),
            out.stride(1),
            out.stride(2),
            HALF=dim // 2,
            BLOCK_HEADS=triton.next_power_of_2(heads),
            HAS_GAIN=gain is not None,
            enable_fp_fusion=False,  # each product rounded to float32 before the sum, as torch does
        )


def launch_add_product(out: Tensor, a: Tensor, b: Tensor, c: Tensor) -> None:
    """out, c: [B, L, C]; a: [B or 1, L or 1, C]; b: [B or 1, 1, C]; every last dim contiguous."""
    batch, length, width = out.shape

    def stride(t: Tensor, dim: int) -> int:
        return t.stride(dim) if t.shape[dim] > 1 else 0  # a broadcast dimension

    with _on_device(out):
        _add_product[(batch * length, triton.cdiv(width, ADD_PRODUCT_BLOCK))](
            out,
            a,
            b,
            c,
            length,
            width,
            out.stride(0),
            out.stride(1),
            stride(a, 0),
            stride(a, 1),
            stride(b, 0),
            c.stride(0),
            c.stride(1),
            BLOCK=ADD_PRODUCT_BLOCK,
            enable_fp_fusion=False,  # b * c rounded before the sum, as torch does
        )
