"""Linear layers whose weight stays in its GGUF blocks and is expanded at each forward, on the device running it.

A model loaded from a GGUF file keeps about the file's size in memory this way (a Q4_K 2.0 DiT about 6 GB, not 11 in
fp8 or 22 in bf16). The DiT loader uses the ComfyUI-aware subclass (nodes/gguf_linear.py: LoRA, core's patcher);
the T5 encoder this plain one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gguf_dequant import dequantize
from .gguf_file import QuantizedWeight


class PackedLinear(torch.nn.Module):
    """The bytes are the `weight` parameter (uint8 [rows, bytes per row]), so state_dict sizes count them and
    .to(device) moves them; `bias` is a plain tensor in the compute dtype."""

    def __init__(self, weight: QuantizedWeight, bias: bool, compute_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.qtype, self.compute_dtype = weight.qtype, compute_dtype
        self.weight = torch.nn.Parameter(weight.raw, requires_grad=False)
        placeholder = torch.empty(self.out_features, dtype=compute_dtype)  # load_state_dict(assign=True) replaces it
        self.bias = torch.nn.Parameter(placeholder, requires_grad=False) if bias else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}"

    def expand(self, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The weight's values from its bytes (or from the bytes cast to a float dtype: byte values are exact)."""
        return dequantize(raw.to(torch.uint8), self.qtype, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.expand(self.weight.to(x.device, non_blocking=True), x.dtype)
        bias = None if self.bias is None else self.bias.to(x.device, x.dtype, non_blocking=True)
        return F.linear(x, weight, bias)


def install(
    module: torch.nn.Module,
    key: str,
    weight: QuantizedWeight,
    compute_dtype: torch.dtype,
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
    setattr(parent, name, layer_class(weight, bias, compute_dtype))
    return True


def install_all(
    module: torch.nn.Module,
    state_dict: dict,
    compute_dtype: torch.dtype,
    layer_class: type[PackedLinear] = PackedLinear,
    keep=lambda key: True,
) -> dict:
    """install() every QuantizedWeight of `state_dict` that `keep(key)` allows; returns the other entries for
    load_state_dict, a QuantizedWeight that stays unplaced dequantized to float32 (the caller casts)."""
    rest = {}
    for key, tensor in state_dict.items():
        if isinstance(tensor, QuantizedWeight):
            if keep(key) and install(module, key, tensor, compute_dtype, layer_class):
                continue
            tensor = tensor.dequantize(torch.float32)
        rest[key] = tensor
    return rest


def packed_layers(module: torch.nn.Module) -> dict[str, PackedLinear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, PackedLinear)}
