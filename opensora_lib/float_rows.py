"""Float matrices kept in their file's narrower storage, as bytes a PackedLinear expands at each forward.

ComfyUI's fp8 files (plain or scaled) and 16-bit files under a float32 compute dtype would take two to four times
their file's size once cast to the compute dtype; packed this way they take the file's size. A row of the packed
matrix is, for fp8, the row's float32 scale (4 bytes: the file's tensor-wise or per-row scale, 1.0 for an unscaled
file) followed by its fp8 values, and for F16 / BF16 just the values.

The expansion is the arithmetic of the dense load (checkpoint.load_state_dict): fp8 in float32 times the scale,
then the dtype; 16-bit values cast to it. So a kept matrix gives exactly the values of the same file loaded dense.
The format names are safetensors' dtype names.
"""

from __future__ import annotations

import torch
from torch import Tensor

STORAGE = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_SCALE_BYTES = 4  # an fp8 row starts with its float32 scale


def qtype_of(dtype: torch.dtype, scaled: bool = False) -> str | None:
    """The format that keeps a matrix stored in `dtype` (with a scale: fp8 only), None if there is none (float32,
    integers, a scaled 16-bit matrix)."""
    name = next((name for name, stored in STORAGE.items() if stored == dtype), None)
    return None if name is None or (scaled and not _scaled(name)) else name


def _scaled(qtype: str) -> bool:
    return STORAGE[qtype].itemsize == 1


def expansion_bytes_per_value(qtype: str) -> int:
    """Peak bytes per value of one expansion (fp8: the float32 buffer, then the result if it is narrower; 16-bit: the
    result), as tests/test_gguf.py measures it."""
    return 6 if _scaled(qtype) else 4


def row_bytes(qtype: str, columns: int) -> int:
    return columns * STORAGE[qtype].itemsize + (_SCALE_BYTES if _scaled(qtype) else 0)


def pack(matrix: Tensor, scale: Tensor | None = None) -> tuple[Tensor, str]:
    """(bytes [rows, row_bytes] uint8, format) of a 2-D matrix in a STORAGE dtype. `scale` (fp8 only): one value or
    one per row ([rows] or [rows, 1]), as checkpoint checked it."""
    qtype = qtype_of(matrix.dtype)
    if qtype is None or matrix.ndim != 2:
        raise ValueError(f"cannot pack a {matrix.ndim}-D {matrix.dtype} tensor: 2-D {', '.join(STORAGE)} only")
    values = matrix.contiguous().view(torch.uint8)
    if not _scaled(qtype):
        if scale is not None:
            raise ValueError(f"a {qtype} matrix takes no scale")
        return values, qtype
    rows = matrix.shape[0]
    scales = torch.ones(rows) if scale is None else scale.float().reshape(-1).expand(rows)
    return torch.cat([scales.reshape(rows, 1).contiguous().view(torch.uint8), values], dim=1), qtype


def dequantize(raw: Tensor, qtype: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """The matrix's values in `dtype` from its bytes (uint8 [rows, row_bytes])."""
    rows = raw.reshape(shape[0], -1)
    if not _scaled(qtype):
        return rows.view(STORAGE[qtype]).reshape(shape).to(dtype)
    scale = rows[:, :_SCALE_BYTES]  # viewed in place where rows keep float32 alignment (a packed weight starts at 0)
    scale = (scale if rows.stride(0) % _SCALE_BYTES == 0 else scale.contiguous()).view(torch.float32)  # [rows, 1]
    return rows[:, _SCALE_BYTES:].view(STORAGE[qtype]).float().mul_(scale).reshape(shape).to(dtype)
