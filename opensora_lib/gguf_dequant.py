"""GGUF block dequantization in PyTorch, so that quantized weights can stay quantized in memory and be expanded one
layer at a time, on the device that runs the layer (see nodes/packed_layers.py).

Layouts are llama.cpp's (ggml-common.h): a row of a quantized matrix is a run of blocks; each block holds its
scales (float16) and packed integers. The arithmetic follows the `gguf` package's numpy reference (float32, scale
times integer, minus the scaled minimum), which the tests compare against bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

# type name -> (values per block, bytes per block)
BLOCKS = {
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q2_K": (256, 84),
    "Q3_K": (256, 110),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}


def row_bytes(qtype: str, columns: int) -> int:
    values, size = BLOCKS[qtype]
    return columns // values * size


# Where each block keeps its float16 fields (d, and dmin / m where the type has one): byte offsets in the block.
FLOAT16_FIELDS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}


def _half(raw: Tensor) -> Tensor:
    """[n, 2k] bytes -> [n, k] float32 (little-endian float16)."""
    return raw.contiguous().view(torch.float16).float()


def _bits(raw: Tensor, count: int) -> Tensor:
    """[n, b] bytes -> [n, count, b]: bit i of every byte, i < count."""
    shifts = torch.arange(count, device=raw.device, dtype=torch.uint8)
    return (raw.unsqueeze(1) >> shifts.view(1, count, 1)) & 1


def _nibbles(raw: Tensor) -> Tensor:
    """[..., b] bytes -> [..., 2b]: the low nibbles, then the high ones (llama.cpp's order within a block)."""
    return torch.cat([raw & 0x0F, raw >> 4], dim=-1)


def _scaled(q: Tensor, d: Tensor, m: Tensor | None = None) -> Tensor:
    """d * q (+ m) for integer q, computed in place on q's float32 copy: at forward time a layer's expansion then
    holds one float32 buffer of its size, not three."""
    out = q.float().mul_(d)
    return out if m is None else out.add_(m)


def _q4_0(b: Tensor) -> Tensor:
    return _scaled(_nibbles(b[:, 2:]).to(torch.int8) - 8, _half(b[:, :2]))


def _q4_1(b: Tensor) -> Tensor:
    return _scaled(_nibbles(b[:, 4:]), _half(b[:, :2]), _half(b[:, 2:4]))


def _five_bits(low: Tensor, high: Tensor) -> Tensor:
    """4 low bits from nibbles, the 5th from a little-endian 32-bit mask (bit j for value j), as int8."""
    return (_nibbles(low) | (_bits(high, 8).transpose(1, 2).reshape(-1, 32) << 4)).to(torch.int8)


def _q5_0(b: Tensor) -> Tensor:
    return _scaled(_five_bits(b[:, 6:], b[:, 2:6]) - 16, _half(b[:, :2]))


def _q5_1(b: Tensor) -> Tensor:
    return _scaled(_five_bits(b[:, 8:], b[:, 4:8]), _half(b[:, :2]), _half(b[:, 2:4]))


def _q8_0(b: Tensor) -> Tensor:
    return _scaled(b[:, 2:].contiguous().view(torch.int8), _half(b[:, :2]))


def _k4_scales(s: Tensor) -> tuple[Tensor, Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes (Q4_K, Q5_K)."""
    scale = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    low = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return scale.float(), low.float()


def _with_mins(d_dmin: Tensor, q: Tensor, scales: Tensor, mins: Tensor) -> Tensor:
    """d * scale * q - dmin * min per sub-block: d_dmin is the block's two float16 bytes pairs, q [n, sub-blocks,
    values], scales and mins [n, sub-blocks]."""
    d, dmin = _half(d_dmin).chunk(2, dim=1)
    return _scaled(q, (d * scales).unsqueeze(-1)).sub_((dmin * mins).unsqueeze(-1)).flatten(1)


def _q4_k(b: Tensor) -> Tensor:
    scales, mins = _k4_scales(b[:, 4:16])
    qs = b[:, 16:].reshape(-1, 4, 32)  # 4 chunks of 64 values: 32 low nibbles, then 32 high
    return _with_mins(b[:, :4], _nibbles(qs).reshape(-1, 8, 32), scales, mins)


def _q5_k(b: Tensor) -> Tensor:
    scales, mins = _k4_scales(b[:, 4:16])
    high = _bits(b[:, 16:48], 8)  # [n, 8, 32]: bit i of byte l is the 5th bit of value l of sub-block i
    qs = _nibbles(b[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    return _with_mins(b[:, :4], qs | (high << 4), scales, mins)


def _q2_k(b: Tensor) -> Tensor:
    s = b[:, :16]
    shifts = torch.arange(0, 8, 2, device=b.device, dtype=torch.uint8).view(1, 1, 4, 1)
    q = (b[:, 16:80].reshape(-1, 2, 1, 32) >> shifts) & 3  # 2 chunks x 4 shifts x 32 values
    return _with_mins(b[:, 80:84], q.reshape(-1, 16, 16), (s & 0x0F).float(), (s >> 4).float())


def _q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    s = b[:, 96:108]
    four = torch.arange(0, 8, 4, device=b.device, dtype=torch.uint8).view(1, 2, 1)  # made on the device: no copy
    two = torch.arange(0, 8, 2, device=b.device, dtype=torch.uint8).view(1, 4, 1)
    low = ((s[:, :8].unsqueeze(1) >> four) & 0x0F).reshape(n, 16)
    high = ((s[:, 8:12].unsqueeze(1) >> two) & 3).reshape(n, 16)
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    q = (b[:, 32:96].reshape(n, 2, 1, 32) >> two.view(1, 1, 4, 1)) & 3  # [n, 2 chunks, 4 shifts, 32]
    missing = 1 - _bits(b[:, :32], 8).reshape(n, 2, 4, 32)  # the mask bit set means no offset of -4
    values = (q.to(torch.int8) - (missing << 2).to(torch.int8)).reshape(n, 16, 16)
    return _scaled(values, (_half(b[:, 108:110]) * scales).unsqueeze(-1)).reshape(n, -1)


def _q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    low = _nibbles(b[:, :128].reshape(n, 2, 64))  # [n, 2 chunks, 128]
    shifts = torch.arange(0, 8, 2, device=b.device, dtype=torch.uint8).view(1, 1, 4, 1)
    high = ((b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 2, 128)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16)
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    return _scaled(q, (_half(b[:, 208:210]) * scales).unsqueeze(-1)).reshape(n, -1)


_KERNELS = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


def dequantize(raw: Tensor, qtype: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """The values of a quantized tensor: raw is its bytes (uint8, any shape whose size is a whole number of
    blocks), shape the tensor's own. Computed in float32, returned in dtype."""
    if qtype not in _KERNELS:
        raise ValueError(f"GGUF type {qtype} cannot be dequantized here; types: {', '.join(_KERNELS)}")
    size = BLOCKS[qtype][1]
    values = _KERNELS[qtype](raw.reshape(-1, size))
    return values.reshape(shape).to(dtype)
