"""Write GGUF files for tests with the `gguf` package (llama.cpp's own writer and quantizers), the way ComfyUI-GGUF's
converter lays them out: matrices whose rows split into the type's blocks in the chosen type, everything else F32,
and tensors of more than 4 dims flattened to 2 with their shape in `comfy.gguf.orig_shape.<name>`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def write_gguf(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    qtype: str = "F32",
    arch: str = "flux",
    rename: Callable[[str], str] | None = None,
) -> dict[str, torch.Tensor]:
    """Write `state_dict` to `path`; return what the file holds as float32 tensors in their original shapes (each
    quantized tensor dequantized by the gguf package), keyed as in `state_dict`."""
    import gguf
    from gguf import GGMLQuantizationType, quants

    kind = GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[kind][0]
    writer = gguf.GGUFWriter(str(path), arch)
    held: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        name = rename(key) if rename else key
        array = np.ascontiguousarray(tensor.detach().float().numpy())
        shape = array.shape
        if array.ndim > 4:
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(shape))
            array = array.reshape(shape[0], -1)
        if kind == GGMLQuantizationType.F32 or array.ndim < 2 or array.shape[-1] % block:
            writer.add_tensor(name, array)
            stored = array
        elif kind == GGMLQuantizationType.F16:
            writer.add_tensor(name, array.astype(np.float16))
            stored = array.astype(np.float16).astype(np.float32)
        else:
            data = quants.quantize(array, kind)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)
            stored = quants.dequantize(data, kind)
        held[key] = torch.from_numpy(np.array(stored, dtype=np.float32)).reshape(shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def write_scaled_fp8(path: str | Path, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write `state_dict` as a ComfyUI scaled fp8 file (the `scaled_fp8` marker, `<layer>.scale_weight`): every 2-D
    matrix as weight / scale in e4m3, the scale tensor-wise for every other matrix and per row ([rows, 1]) for the
    rest, but the last matrix plain fp8 with no scale (as core reads it: scale 1); everything else float32. Returns
    what the file holds dequantized (fp8 in float32 x scale), float32."""
    from safetensors.torch import save_file

    out: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    held: dict[str, torch.Tensor] = {}
    last = [k for k, t in state_dict.items() if t.ndim == 2 and k.endswith(".weight")][-1]
    for index, (key, tensor) in enumerate(state_dict.items()):
        tensor = tensor.detach().float()
        if tensor.ndim != 2 or not key.endswith(".weight"):
            out[key] = held[key] = tensor.contiguous()
            continue
        if key == last:
            out[key] = tensor.to(torch.float8_e4m3fn)
            held[key] = out[key].float()
            continue
        per_row = index % 2 == 1
        largest = tensor.abs().amax(dim=1, keepdim=True) if per_row else tensor.abs().max().reshape(1)
        scale = largest.clamp_min(1e-12) / 448.0  # e4m3's largest value, as ComfyUI's scaled fp8 files
        fp8 = (tensor / scale).to(torch.float8_e4m3fn)
        out[key], out[f"{key.removesuffix('.weight')}.scale_weight"] = fp8, scale
        held[key] = fp8.float() * scale
    save_file(out, str(path))
    return held
