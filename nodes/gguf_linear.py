"""Linear layers whose weights stay in their GGUF blocks: a Q4_K 2.0 DiT takes about 6 GB of memory, not 11 (fp8)
or 22 (bf16). Each forward expands the layer's blocks on the device running it (opensora_lib.gguf_dequant).

How they meet core's ModelPatcher (the plain one: newer hosts' DynamicVRAM pages comfy.ops weights by their float
geometry, which these bytes do not have):
- The bytes are the layer's `weight` parameter, so model_size counts them, partial loading moves or leaves them
  per layer (a left layer's bytes go to the device at each forward, `comfy_cast_weights`), and LoRA keys match.
- LoRA on a loaded layer: core's patch_weight_to_device hands `convert_weight` the bytes cast to a float dtype
  (byte values are exact in any of them), patches the dequantized weight and gives it to `set_weight`, which
  keeps it dequantized in the compute dtype; unpatching restores the bytes. On a layer left offloaded, core lists
  the patches in `weight_function`; the forward applies them to the dequantized weight itself (0.3.75's
  LowVramPatch would run `convert_weight` again on it).
"""

from __future__ import annotations

import comfy.lora
import torch
import torch.nn.functional as F

from ..opensora_lib.gguf_dequant import dequantize, expansion_bytes
from ..opensora_lib.gguf_file import QuantizedWeight


class GGUFLinear(torch.nn.Module):
    comfy_cast_weights = False  # read by core's partial loading: set on layers it leaves on the offload device

    def __init__(self, weight: QuantizedWeight, bias: bool, compute_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.qtype, self.compute_dtype = weight.qtype, compute_dtype
        self.weight = torch.nn.Parameter(weight.raw, requires_grad=False)
        placeholder = torch.empty(self.out_features, dtype=compute_dtype)  # load_state_dict(assign=True) replaces it
        self.bias = torch.nn.Parameter(placeholder, requires_grad=False) if bias else None
        self.weight_function, self.bias_function = [], []

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}"

    @property
    def quantized(self) -> bool:
        return self.weight.dtype == torch.uint8  # else a LoRA-patched float weight (set_weight)

    def expanded_bytes(self) -> int:
        """Device memory the forward's expansion takes at its peak (opensora_lib.memory.forward_memory adds the
        largest layer's)."""
        if not self.quantized:
            return 0
        return expansion_bytes(self.qtype, (self.out_features, self.in_features), bool(self.weight_function))

    def _expand(self, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(raw.to(torch.uint8), self.qtype, (self.out_features, self.in_features), dtype)

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **_) -> torch.Tensor:
        """core's patch path: the stored bytes cast to a float dtype -> the weight's values in that dtype."""
        if weight.dtype == torch.uint8 or tuple(weight.shape) != (self.out_features, self.in_features):
            return self._expand(weight, weight.dtype if weight.is_floating_point() else torch.float32)
        return weight  # already a plain weight (a layer patched before)

    def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **_):
        if return_weight:
            return weight
        self.weight = torch.nn.Parameter(weight.to(self.compute_dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.device, non_blocking=True)
        patched = bool(self.weight_function)
        if self.quantized:
            weight = self._expand(weight, torch.float32 if patched else x.dtype)
        weight = _apply(self.weight_function, weight, "weight").to(x.dtype)
        bias = None
        if self.bias is not None:
            bias = _apply(self.bias_function, self.bias.to(x.device, non_blocking=True), "bias").to(x.dtype)
        return F.linear(x, weight, bias)


def _apply(functions: list, tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Core's offloaded-layer patches: LoRA patch lists (LowVramPatch: .patches[.key]) are applied here to the
    dequantized tensor; other weight functions are called as they are."""
    for function in functions:
        if hasattr(function, "patches") and hasattr(function, "key"):
            tensor = comfy.lora.calculate_weight(function.patches[function.key], tensor, function.key)
        else:
            tensor = function(tensor)
    return tensor


def install(module: torch.nn.Module, key: str, weight: QuantizedWeight, compute_dtype: torch.dtype) -> bool:
    """Put a GGUFLinear holding `weight` in place of the Linear whose weight `key` names; False if `key` is not a
    Linear's weight (a convolution, an embedding: the caller dequantizes those)."""
    path = key.removesuffix(".weight")
    if path == key or len(weight.shape) != 2:
        return False
    parent_path, _, name = path.rpartition(".")
    parent = module.get_submodule(parent_path)
    layer = getattr(parent, name, None)
    if not isinstance(layer, torch.nn.Linear) or (layer.out_features, layer.in_features) != tuple(weight.shape):
        return False
    setattr(parent, name, GGUFLinear(weight, layer.bias is not None or _lazy_bias(layer), compute_dtype))
    return True


def _lazy_bias(layer: torch.nn.Linear) -> bool:
    """Newer hosts' DynamicVRAM builds comfy.ops Linears with no tensors until loading; this flag says a bias comes."""
    return bool(getattr(layer, "comfy_need_lazy_init_bias", False))


def quantized_layers(module: torch.nn.Module) -> int:
    return sum(isinstance(m, GGUFLinear) for m in module.modules())
