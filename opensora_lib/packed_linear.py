"""Linear layers whose weight stays packed as in its file and is expanded at each forward, on the device running it.

Two packings: GGUF blocks (gguf_dequant.py) and float rows (float_rows.py: fp8 with its scales, or 16-bit values
under a float32 compute dtype). A model keeps about its file's size in memory this way (a Q4_K 2.0 DiT about 6 GB,
not 11 in fp8 or 22 in bf16; an fp8 T5-XXL about 5 GB, not 9.5 in bf16 or 19 in fp32). The DiT loader uses the
ComfyUI-aware subclass (nodes/packed_layers.py: LoRA, core's patcher); the T5 encoder a plain one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import float_rows, gguf_dequant


class QuantizedWeight:
    """A matrix kept packed: its bytes [rows, bytes per row] (uint8), format name (a GGUF type, or a float_rows
    one), shape [rows, columns]."""

    __slots__ = ("raw", "qtype", "shape")

    def __init__(self, raw: torch.Tensor, qtype: str, shape: tuple[int, ...]):
        self.raw, self.qtype, self.shape = raw, qtype, torch.Size(shape)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.raw, self.qtype, tuple(self.shape), dtype)


def _packing(qtype: str):
    """The module that reads a format: float_rows or gguf_dequant (both give dequantize and row_bytes)."""
    return float_rows if qtype in float_rows.STORAGE else gguf_dequant


def dequantize(raw: torch.Tensor, qtype: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return _packing(qtype).dequantize(raw, qtype, shape, dtype)


def row_bytes(qtype: str, columns: int) -> int:
    return _packing(qtype).row_bytes(qtype, columns)


# Peak bytes per value of one GGUF expansion into bf16 or float32 (the float32 buffer, the result, the integer
# intermediates), measured with benchmarks/bench_comfy_memory.peak_activation_bytes on a 3072 x 12288 matrix:
# 5.1-6.0 for Q4_0 .. Q8_0 / Q2_K / Q4_K, 7.4-7.6 for Q3_K / Q5_K / Q6_K (float rows: their own figure). Patches work
# on float32 copies: the worst measured (review 19) is a ModelMergeSimple whose other model is a kept GGUF too,
# 15.5 bytes per value in all.
GGUF_EXPANSION_BYTES_PER_VALUE = 8
PATCH_BYTES_PER_VALUE = 8


def expansion_bytes(qtype: str, shape: tuple[int, ...], patched: bool = False) -> int:
    """Memory one expansion of a packed matrix takes at its peak, its bytes on the device included."""
    values = math.prod(shape)
    floats = qtype in float_rows.STORAGE
    per_value = float_rows.expansion_bytes_per_value(qtype) if floats else GGUF_EXPANSION_BYTES_PER_VALUE
    per_value += PATCH_BYTES_PER_VALUE if patched else 0
    return values * per_value + row_bytes(qtype, shape[-1]) * (values // shape[-1])


class PackedLinear(torch.nn.Module):
    """The bytes are the `weight` parameter ([rows, bytes per row] of `byte_dtype`), so state_dict sizes count them
    and .to(device) or .to(dtype) moves them unchanged; `bias` is a plain tensor in the compute dtype.

    `weight_dtype` is the dtype the same file loaded dense would store the matrix in: an expansion is rounded to it
    and then cast to the input's dtype, as a dense layer's weight is (core's manual cast, e.g. bf16 weights computed
    in fp16 / fp32 on GPUs without bf16 compute), so the two give the same numbers."""

    byte_dtype = torch.uint8

    def __init__(self, weight: QuantizedWeight, bias: bool, weight_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.qtype, self.weight_dtype = weight.qtype, weight_dtype
        self.weight = torch.nn.Parameter(weight.raw.view(self.byte_dtype), requires_grad=False)
        placeholder = torch.empty(self.out_features, dtype=weight_dtype)  # load_state_dict(assign=True) replaces it
        self.bias = torch.nn.Parameter(placeholder, requires_grad=False) if bias else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}"

    def expand(self, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The weight's values from its bytes (or from uint8 bytes cast to a float dtype: byte values are exact)."""
        raw = raw.view(torch.uint8) if raw.dtype == torch.int8 else raw.to(torch.uint8)
        return dequantize(raw, self.qtype, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.expand(self.weight.to(x.device, non_blocking=True), self.weight_dtype).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.device, x.dtype, non_blocking=True)
        return F.linear(x, weight, bias)


def install(
    module: torch.nn.Module,
    key: str,
    weight: QuantizedWeight,
    weight_dtype: torch.dtype,
    layer_class: type[PackedLinear] = PackedLinear,
) -> bool:
    """Put a `layer_class` holding `weight` in place of the Linear whose weight `key` names; False if `key` is not a
    Linear's weight (a convolution, an embedding: the caller dequantizes those)."""
    path = key.removesuffix(".weight")
    if path == key or len(weight.shape) != 2:
        return False
    parent_path, _, name = path.rpartition(".")
    parent = module.get_submodule(parent_path)
    layer = getattr(parent, name, None)
    if not isinstance(layer, torch.nn.Linear) or (layer.out_features, layer.in_features) != tuple(weight.shape):
        return False
    # newer ComfyUI hosts build comfy.ops Linears with no tensors until loading; this flag says a bias comes
    bias = layer.bias is not None or bool(getattr(layer, "comfy_need_lazy_init_bias", False))
    setattr(parent, name, layer_class(weight, bias, weight_dtype))
    return True


def install_all(
    module: torch.nn.Module,
    state_dict: dict,
    weight_dtype: torch.dtype,
    layer_class: type[PackedLinear] = PackedLinear,
) -> dict:
    """install() every QuantizedWeight of `state_dict`; returns the other entries for load_state_dict, a
    QuantizedWeight that is no Linear's weight dequantized to float32 (the caller casts)."""
    rest = {}
    for key, tensor in state_dict.items():
        if isinstance(tensor, QuantizedWeight):
            if install(module, key, tensor, weight_dtype, layer_class):
                continue
            tensor = tensor.dequantize(torch.float32)
        rest[key] = tensor
    return rest


def packed_layers(module: torch.nn.Module) -> dict[str, PackedLinear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, PackedLinear)}
