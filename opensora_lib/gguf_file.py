"""GGUF weight files: read without pickle, dequantized on load or kept in their blocks.

GGUF is llama.cpp's format, used by ComfyUI-GGUF's converter (keys as in the original safetensors file) and by
llama.cpp's own converters, e.g. the popular T5-v1.1-XXL encoder files (llama.cpp tensor names, renamed here to the
Hugging Face ones). Nothing is unpickled: the `gguf` package parses the header and memory-maps the data.

Two ways to read one: `dequantize` gives each tensor as a plain floating tensor (the `gguf` package's numpy code,
llama.cpp's reference; about 0.2 s for a 3072 x 12288 Q8_0 matrix on one CPU core), so the model gets ordinary
comfy.ops layers; `load_keeping_blocks` keeps every quantized matrix as its bytes (QuantizedWeight), which the DiT
loader gives to layers that expand them at each forward (gguf_dequant.py, nodes/packed_layers.py).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from . import float_rows, gguf_dequant
from .checkpoint import CheckpointError as GGUFError  # one error type for every unusable weight file
from .packed_linear import QuantizedWeight

MAGIC = b"GGUF"
_PLAIN = ("F32", "F16", "BF16")
_ORIG_SHAPE = "comfy.gguf.orig_shape."  # ComfyUI-GGUF's record of shapes with more than 4 dims, reshaped to fit


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


# llama.cpp's T5 encoder names (its "t5encoder" / "t5" files) -> the Hugging Face ones that ComfyUI's t5xxl files use.
_T5_BLOCK = {
    "attn_norm": "layer.0.layer_norm",
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "ffn_norm": "layer.1.layer_norm",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo",
}
_T5_TOP = {"token_embd": "shared", "enc.output_norm": "encoder.final_layer_norm", "output": "lm_head"}
_T5_NAME = re.compile(r"^enc\.blk\.(\d+)\.(\w+)\.(weight|bias)$")


def _t5_name(name: str) -> str:
    stem, _, leaf = name.rpartition(".")
    if stem in _T5_TOP:
        return f"{_T5_TOP[stem]}.{leaf}"
    match = _T5_NAME.match(name)
    if match and match[2] in _T5_BLOCK:
        return f"encoder.block.{match[1]}.{_T5_BLOCK[match[2]]}.{match[3]}"
    if name.startswith("dec."):  # a full T5's decoder (and lm_head above): not the encoder; the T5 loader drops them
        return "decoder." + name
    raise GGUFError(f"unknown tensor {name!r} in a llama.cpp T5 encoder file")


class _Tensor:
    __slots__ = ("name", "qtype", "shape", "data")

    def __init__(self, name: str, qtype: str, shape: tuple[int, ...], data: np.ndarray):
        self.name, self.qtype, self.shape, self.data = name, qtype, shape, data


def _field_ints(reader, key: str) -> tuple[int, ...] | None:
    field = reader.get_field(key)
    return None if field is None else tuple(int(field.parts[i][0]) for i in field.data)


def read_tensors(path: str | Path) -> dict[str, _Tensor]:
    """{name: tensor record} of a GGUF file: type name, shape in PyTorch order, memory-mapped raw data.
    Validates the file first: a truncated or corrupt file raises GGUFError with the sizes."""
    try:
        import gguf  # here, not at import time: only GGUF files need the package
    except ImportError:
        raise GGUFError(f"{path}: reading GGUF files needs the gguf package: pip install -r requirements.txt") from None
    path = Path(path)
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader's own messages are about numpy views; say what it means
        raise GGUFError(
            f"{path}: corrupt or truncated GGUF file ({size} bytes); its header, tensor table or tensor data could not be read "
            f"({type(e).__name__}: {e}); download or copy it again"
        ) from None
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise GGUFError(f"{path}: truncated GGUF file: its tensors need {end} bytes but the file has {size}")
    # llama.cpp's T5 names are told by the names themselves, not by general.architecture: converters label files
    # loosely (ComfyUI-GGUF's calls an Open-Sora 2.0 DiT "flux"), and a T5 with Hugging Face names needs none.
    llama_t5 = any(t.name.startswith("enc.blk.") for t in reader.tensors)
    rename = _t5_name if llama_t5 else (lambda name: name)
    tensors: dict[str, _Tensor] = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        orig = _field_ints(reader, _ORIG_SHAPE + t.name)
        if orig is not None:
            if math.prod(orig) != math.prod(shape):
                raise GGUFError(f"{path}: {t.name!r} records shape {orig}, which does not fit its {shape} elements")
            shape = orig
        try:
            name = rename(t.name)
        except GGUFError as e:
            raise GGUFError(f"{path}: {e}") from None
        tensors[name] = _Tensor(name, t.tensor_type.name, shape, t.data)
    if not tensors:
        raise GGUFError(f"{path}: the GGUF file holds no tensors")
    return tensors


def load_keeping_blocks(
    path: str | Path, select=None, narrower_than: torch.dtype | None = None
) -> dict[str, torch.Tensor | QuantizedWeight]:
    """A GGUF file's tensors with every matrix of a type gguf_dequant expands kept as a QuantizedWeight (copied
    out of the memory map), and F16 / BF16 matrices too where they are narrower than `narrower_than` (float rows,
    e.g. an F16 T5 under fp32); the rest as dequantize() gives them. `select(name)` -> False skips a tensor unread."""
    out: dict[str, torch.Tensor | QuantizedWeight] = {}
    keep_16_bit = narrower_than is not None and narrower_than.itemsize > 2
    for name, t in read_tensors(path).items():
        if select is not None and not select(name):
            continue
        if t.qtype in ("F16", "BF16") and len(t.shape) == 2 and keep_16_bit:
            out[name] = QuantizedWeight(*float_rows.pack(dequantize(t)), t.shape)
            continue
        # rows of whole blocks only: a converter may also write blocks that run across rows (the shape recorded in
        # comfy.gguf.orig_shape), which only the flat dequantization reads
        if t.qtype in gguf_dequant.BLOCKS and len(t.shape) == 2 and t.shape[1] % gguf_dequant.BLOCKS[t.qtype][0] == 0:
            out[name] = QuantizedWeight(torch.from_numpy(np.array(t.data)).reshape(t.shape[0], -1), t.qtype, t.shape)
        else:
            out[name] = dequantize(t)
    return out


def expanded_on_load(header: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, int]:
    """{GGUF type: matrices} that load_keeping_blocks dequantizes although quantized (types gguf_dequant lacks,
    e.g. IQ4_XS): they take the compute dtype's memory, not the file's."""
    counts: dict[str, int] = {}
    for qtype, shape in header.values():
        if qtype not in _PLAIN and qtype not in gguf_dequant.BLOCKS and len(shape) == 2:
            counts[qtype] = counts.get(qtype, 0) + 1
    return counts


def is_quantized(tensors: dict[str, _Tensor]) -> bool:
    return any(t.qtype not in _PLAIN for t in tensors.values())


def dequantize(tensor: _Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor as a plain torch tensor in `dtype` (None: as stored for F32/F16/BF16, float32 otherwise)."""
    if tensor.qtype in ("F32", "F16"):
        out = torch.from_numpy(np.array(tensor.data)).reshape(tensor.shape)
    elif tensor.qtype == "BF16":  # stored as raw bytes: numpy has no bfloat16
        out = torch.from_numpy(np.array(tensor.data)).view(torch.bfloat16).reshape(tensor.shape)
    else:
        from gguf import GGMLQuantizationType, quants

        try:
            values = quants.dequantize(tensor.data, GGMLQuantizationType[tensor.qtype])
        except NotImplementedError:
            raise GGUFError(
                f"tensor {tensor.name!r} has GGUF type {tensor.qtype}, which cannot be dequantized"
            ) from None
        out = torch.from_numpy(np.ascontiguousarray(values)).reshape(tensor.shape)
    return out if dtype is None else out.to(dtype)
