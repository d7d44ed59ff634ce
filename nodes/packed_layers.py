"""The DiT's packed layers (opensora_lib.packed_linear.PackedLinear: the weight stays packed as in its file, GGUF
blocks or scaled fp8 rows, and is expanded at each forward) joined to core's model machinery.

How they meet core's model machinery:
- The bytes are the layer's `weight` parameter, so model_size counts them, partial loading moves or leaves them
  per layer (a left layer's bytes go to the device at each forward, `comfy_cast_weights`), and LoRA keys match.
- LoRA is never merged into a layer: PackedModelPatcher (core's plain ModelPatcher otherwise; newer hosts'
  DynamicVRAM pages comfy.ops weights by their float geometry, which these bytes do not have) gives a loaded layer
  its patch list (ForwardPatch) instead of a patched copy, and core gives a layer it leaves offloaded a LowVramPatch;
  the forward applies either to the expanded weight. So memory stays the blocks' size, as core counts it, and
  unpatching has nothing to restore.
- `convert_weight` turns the bytes, cast to a float dtype by core (byte values are exact in any), into the weight:
  core's get_key_patches uses it (model merging). A patched layer shows its patched weight in model_state_dict
  (LoRA extraction); saving (ModelSave, CheckpointSave) writes the expanded weights, LoRA applied
  (`save_expanded`).
- Hook LoRA (CreateHookLora, CreateHookModelAsLora): core patches a float weight in place
  per hook group (patch_hooks); a kept layer gets the group's combined patches as its `hook_patch` instead,
  applied at the forward on top of the MODEL's LoRA, as core's in-place patch sits on top of a merged one.
- Not supported: LoRA training.

The DiT's packed layers are all ComfyPackedLinear (the loader installs them as that class), so the library's
`packed_layers` lists exactly the kept layers.
"""

from __future__ import annotations

import contextlib
from functools import partial

import comfy.lora
import comfy.model_patcher
import comfy.utils
import torch
import torch.nn.functional as F

from ..opensora_lib.packed_linear import PackedLinear, QuantizedWeight, expansion_bytes, packed_layers


class ForwardPatch:
    """A LoRA patch list a ComfyPackedLinear applies at its forward (the same fields as core's LowVramPatch)."""

    def __init__(self, key: str, patches: dict):
        self.key, self.patches = key, patches


class HookPatch:
    """The combined patch list of the hook group core applies (patch_hooks) to one kept layer's weight."""

    def __init__(self, key: str, patches: list):
        self.key, self.patches = key, patches

    def original_weights(self, expand) -> dict | None:
        """calculate_weight's original_weights for CreateHookModelAsLora's "model_as_lora" patches (the weight before
        any patch, as core's get_key_patches gives it: here the expansion); None when no patch reads it."""
        model_as_lora = any(isinstance(p[1], tuple) and p[1][0] == "model_as_lora" for p in self.patches)
        return {self.key: [(expand(), None)]} if model_as_lora else None


class ComfyPackedLinear(PackedLinear):
    """PackedLinear with core's patch lists: LoRA (ForwardPatch, LowVramPatch), hook LoRA (HookPatch) and weight
    functions."""

    comfy_cast_weights = False  # read by core's partial loading: set on layers it leaves on the offload device
    hook_patch: HookPatch | None = None

    def __init__(self, weight: QuantizedWeight, bias: bool, weight_dtype: torch.dtype):
        super().__init__(weight, bias, weight_dtype)
        self.weight_function, self.bias_function = [], []

    def expanded_bytes(self) -> int:
        """Device memory the forward's expansion takes at its peak, a LoRA's work included (one may come with the
        load that follows the estimate); opensora_lib.memory.forward_memory adds the largest layer's."""
        return expansion_bytes(self.qtype, (self.out_features, self.in_features), patched=True)

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **_) -> torch.Tensor:
        """core's get_key_patches path: the stored bytes cast to a float dtype -> the weight's values in that dtype."""
        return self.expand(weight, weight.dtype if weight.is_floating_point() else torch.float32)

    def patch_at_forward(self, key: str, patches: dict) -> None:
        """First in weight_function: core computes wrapper(W + LoRA), so weight wrappers come after the LoRA."""
        if not any(getattr(f, "key", None) == key for f in self.weight_function):
            self.weight_function.insert(0, ForwardPatch(key, patches))

    def drop_forward_patches(self) -> None:
        self.weight_function = [f for f in self.weight_function if not isinstance(f, ForwardPatch)]

    def effective_weight(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight with its LoRA and hook patches, expanded into `dtype` (default: weight_dtype, as a dense layer
        stores it)."""
        raw = self.weight.to(device or self.weight.device, non_blocking=True)
        dtype = dtype or self.weight_dtype
        if not self.weight_function and self.hook_patch is None:
            return self.expand(raw, dtype)
        expand = partial(self.expand, raw, torch.float32)
        return _apply(self.weight_function, expand(), self.hook_patch, expand).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.effective_weight(x.device).to(x.dtype)  # rounded to weight_dtype first, as a dense weight
        bias = None
        if self.bias is not None:
            bias = _apply(self.bias_function, self.bias.to(x.device, non_blocking=True)).to(x.dtype)
        return F.linear(x, weight, bias)


def _apply(functions: list, tensor: torch.Tensor, hook: HookPatch | None = None, expand=None) -> torch.Tensor:
    """What a dense layer's weight holds, then its forward applies: the patch lists (ForwardPatch, core's
    LowVramPatch: .patches[.key]; each key once, as core adds a LowVramPatch when it unloads a layer that already
    has its ForwardPatch), the hook group's patches, then the other weight functions as they are."""
    is_patch_list = [getattr(f, "key", None) is not None and hasattr(f, "patches") for f in functions]
    applied = set()
    for function in (f for f, patch_list in zip(functions, is_patch_list) if patch_list):
        if function.key not in applied:
            applied.add(function.key)
            tensor = comfy.lora.calculate_weight(function.patches[function.key], tensor, function.key)
    if hook is not None:
        original = hook.original_weights(expand)
        tensor = comfy.lora.calculate_weight(hook.patches, tensor, hook.key, original_weights=original)
    for function in (f for f, patch_list in zip(functions, is_patch_list) if not patch_list):
        tensor = function(tensor)
    return tensor


class PackedModelPatcher(comfy.model_patcher.ModelPatcher):
    """core's plain ModelPatcher, except that LoRA and hook LoRA on a ComfyPackedLinear weight are applied at the
    layer's forward."""

    def _kept_layer(self, key: str) -> ComfyPackedLinear | None:
        path, _, name = key.rpartition(".")
        if name != "weight":
            return None
        try:
            layer = comfy.utils.get_attr(self.model, path)
        except AttributeError:
            return None
        return layer if isinstance(layer, ComfyPackedLinear) else None

    def load(self, *args, **kwargs):
        """core's load() clears the patch lists of layers that stay loaded and does not patch them again (a float
        layer keeps its merged LoRA; a kept layer's was in that list): give them their ForwardPatch back."""
        result = super().load(*args, **kwargs)
        for name, layer in packed_layers(self.model).items():
            key = f"{name}.weight"
            if getattr(layer, "comfy_patched_weights", False) and key in self.patches:
                layer.patch_at_forward(key, self.patches)
        return result

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False, **kwargs):
        layer = self._kept_layer(key)
        if layer is None:
            return super().patch_weight_to_device(key, device_to, inplace_update, **kwargs)
        if key in self.patches:
            layer.patch_at_forward(key, self.patches)
        if kwargs.get("return_weight"):  # newer hosts' lazy saving asks for the patched weight
            return layer.effective_weight(device_to)
        return None

    def patch_hooks(self, hooks):
        """core's patch_hooks for the float weights (in place, cached per group), then each kept layer gets the
        group's combined patches for its weight (or none): on core's cached path too, which patches only what it
        cached and unpatches the rest."""
        with self._state_dict_keys_only():  # core reads its keys only here too
            super().patch_hooks(hooks)
        combined = self.get_combined_hook_patches(hooks=hooks) if hooks is not None else {}
        for name, layer in packed_layers(self.model).items():
            key = f"{name}.weight"
            layer.hook_patch = HookPatch(key, combined[key]) if combined.get(key) else None

    def patch_hook_weight_to_device(self, hooks, combined_patches, key, original_weights, memory_counter):
        if self._kept_layer(key) is None:
            return super().patch_hook_weight_to_device(hooks, combined_patches, key, original_weights, memory_counter)
        original_weights.pop(key, None)  # as core's: the layer's HookPatch is set by patch_hooks
        return None

    def unpatch_hooks(self, whitelist_keys_set=None):
        for name, layer in packed_layers(self.model).items():  # core's rule: a non-empty set names the keys, else all
            if not whitelist_keys_set or f"{name}.weight" in whitelist_keys_set:
                layer.hook_patch = None
        return super().unpatch_hooks(whitelist_keys_set)

    def model_state_dict(self, filter_prefix=None):
        """A layer with LoRA or hook patches shows its patched weight (core's LoRA extraction reads the merged weights
        here); an unpatched one its bytes, as core shows its own quantized weights (get_key_weight's convert_weight)."""
        state_dict = super().model_state_dict(filter_prefix)
        if not self._keys_only:
            for name, layer in packed_layers(self.model).items():
                if (layer.weight_function or layer.hook_patch) and f"{name}.weight" in state_dict:
                    state_dict[f"{name}.weight"] = layer.effective_weight()
        return state_dict

    _keys_only = False

    @contextlib.contextmanager
    def _state_dict_keys_only(self):
        """For core code that reads model_state_dict's keys only: expanding every patched layer would be waste."""
        previous, self._keys_only = self._keys_only, True
        try:
            yield
        finally:
            self._keys_only = previous

    def get_key_patches(self, filter_prefix=None):
        with self._state_dict_keys_only():
            return super().get_key_patches(filter_prefix)

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for layer in packed_layers(self.model).values():
                layer.drop_forward_patches()
        return super().unpatch_model(device_to, unpatch_weights)


def save_expanded(model_config, diffusion_model: torch.nn.Module) -> None:
    """Make ModelSave / CheckpointSave write the kept layers' weights expanded (LoRA applied), not their bytes:
    `process_unet_state_dict_for_saving` is the step both 0.3.75 and newer hosts run on the DiT's state dict."""
    process = model_config.process_unet_state_dict_for_saving

    def expanded_then_processed(state_dict):
        for name, layer in packed_layers(diffusion_model).items():
            if f"{name}.weight" in state_dict:
                state_dict[f"{name}.weight"] = layer.effective_weight().to("cpu")
        return process(state_dict)

    model_config.process_unet_state_dict_for_saving = expanded_then_processed
