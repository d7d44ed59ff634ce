"""Safe checkpoint loading: safetensors (and GGUF) only, every file validated against its own header before reading.

Nothing here unpickles: PyTorch pickles (.bin/.pt/.ckpt, zip or raw) are recognised by their magic bytes and
refused with a message. Every safetensors file is checked against its own header before any tensor is read,
so a truncated download fails with the expected and actual sizes instead of a deep library error. A GGUF file
(gguf_file.py) is read in place of a safetensors one and dequantized on load. Which model a file holds is
detection.py's job.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from . import float_rows
from .packed_linear import QuantizedWeight


class CheckpointError(ValueError):
    """A file or folder that is not a usable safetensors checkpoint (the message says why)."""


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2}
_DTYPE_BYTES |= {"I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_MAX_HEADER_BYTES = 100_000_000  # the format's own limit
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.safetensors$")
_PICKLE_HINT = "this is a PyTorch pickle checkpoint, which is not loaded for safety; convert it to safetensors"


def _foreign_format(head: bytes) -> str | None:
    """Name what a file is when its first bytes show it is not safetensors."""
    if head.startswith(b"PK\x03\x04"):
        return _PICKLE_HINT + " (zip archive written by torch.save)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return _PICKLE_HINT + " (raw pickle stream)"
    if head.startswith(b"version "):
        return "this is a Git LFS pointer file, not the weights; fetch the real file (git lfs pull)"
    if head.lstrip().lower().startswith((b"<!doctype", b"<html")):
        return "this is an HTML page, not weights (a failed download?)"
    return None


def _check_file(path: Path) -> dict[str, Any]:
    """Validate one safetensors file against its header without reading tensor data; return the header."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); the download or copy probably failed")
    with open(path, "rb") as f:
        head = f.read(16)
        foreign = _foreign_format(head)
        if foreign:
            raise CheckpointError(f"{path}: {foreign}")
        if size < 8:
            raise CheckpointError(f"{path}: truncated safetensors file: {size} bytes, shorter than the 8-byte header")
        header_len = int.from_bytes(head[:8], "little")
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(
                f"{path}: not a valid safetensors file, or truncated: its header length field says {header_len} "
                f"bytes but the whole file has {size} bytes"
            )
        f.seek(8)
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    data_end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = [int(x) for x in entry["shape"]]
            dtype = str(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header: bad entry for tensor {key!r}") from None
        if dtype in _DTYPE_BYTES and end - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: tensor {key!r} ({dtype} {shape}) needs "
                f"{math.prod(shape) * _DTYPE_BYTES[dtype]} bytes but is given {end - begin}"
            )
        data_end = max(data_end, end)
    expected = 8 + header_len + data_end
    if size < expected:
        raise CheckpointError(
            f"{path}: truncated safetensors file: its header describes {expected} bytes but the file has {size} "
            f"bytes ({expected - size} missing); download or copy it again"
        )
    if size > expected:
        raise CheckpointError(
            f"{path}: corrupt safetensors file: {size - expected} unexpected bytes after the tensor data "
            f"(expected {expected} bytes, found {size})"
        )
    return header


def _shards_from_index(folder: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    files = [folder / name for name in sorted(set(weight_map.values()))]
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{index} lists the shard {file.name}, which is missing from {folder}")
    return files


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors file(s) behind a file path or an HF-style folder (single file or shards + index)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_file():
        return [path]
    for stem in ("model", "diffusion_pytorch_model"):
        index = path / f"{stem}.safetensors.index.json"
        if index.is_file():
            return _shards_from_index(path, index)
        if (path / f"{stem}.safetensors").is_file():
            return [path / f"{stem}.safetensors"]
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".sft"))
    shards = [m for m in (_SHARD.match(p.name) for p in found) if m]
    if shards and len(shards) == len(found) and len({m["stem"] + m["total"] for m in shards}) == 1:
        total = int(shards[0]["total"])
        if len(found) != total:
            raise FileNotFoundError(f"{path}: found {len(found)} of {total} shards; some are missing")
        return found
    if len(found) == 1:
        return found
    if found:
        raise CheckpointError(f"{path}: several weight files, pass one of them: {', '.join(p.name for p in found)}")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{path}: only PyTorch pickle weights here ({', '.join(pickles[:4])}); {_PICKLE_HINT}")
    names = sorted(p.name for p in path.iterdir())[:8]
    raise FileNotFoundError(
        f"{path}: no weights in this folder (looked for model.safetensors, diffusion_pytorch_model.safetensors, "
        f"*.safetensors shards with an index); it holds: {', '.join(names) or 'nothing'}"
    )


def _gguf_tensors(path: str | Path) -> dict | None:
    """A GGUF file's tensor records (gguf_file.read_tensors), or None for anything else."""
    from . import gguf_file

    return gguf_file.read_tensors(path) if gguf_file.is_gguf(path) else None


def read_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (safetensors dtype string, shape)} for a file or folder, without reading tensor data (for a GGUF
    file the GGUF type name, e.g. "Q8_0", and the shape in PyTorch order)."""
    tensors = _gguf_tensors(path)
    if tensors is not None:
        return {name: (t.qtype, t.shape) for name, t in tensors.items()}
    result: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in weight_files(path):
        for key, entry in _check_file(file).items():
            if key == "__metadata__":
                continue
            if key in result:
                raise CheckpointError(f"{path}: tensor {key!r} appears in more than one shard")
            result[key] = (str(entry["dtype"]), tuple(int(x) for x in entry["shape"]))
    if not result:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    return result


# ComfyUI's fp8 files: the old "scaled fp8" layout (a `scaled_fp8` marker, `<layer>.scale_weight`,
# `<layer>.scale_input`) and the newer one (`<layer>.weight_scale`, `<layer>.input_scale`, the layer's format in
# `<layer>.comfy_quant` or in the header's `_quantization_metadata`). Tensor-wise (or per-row) fp8 is dequantized
# as weight * scale; other formats (nvfp4, mxfp8, int8, ...) are refused by name.
_WEIGHT_SCALES = (".scale_weight", ".weight_scale")
_DROPPED = ("scaled_fp8", ".scale_input", ".input_scale", ".comfy_quant")
_FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


def _layer_formats(path: Path, f: Any) -> dict[str, str]:
    """{layer: quantization format} from a file's `_quantization_metadata` and `.comfy_quant` entries."""
    formats: dict[str, str] = {}
    try:
        raw = (f.metadata() or {}).get("_quantization_metadata")
        for layer, conf in (json.loads(raw)["layers"] if raw else {}).items():
            formats[layer] = conf.get("format")
        for key in f.keys():
            if key.endswith(".comfy_quant"):
                conf = json.loads(bytes(f.get_tensor(key).to(torch.uint8).tolist()))
                formats[key[: -len(".comfy_quant")]] = conf.get("format")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable quantization description ({e!r})") from None
    unsupported = {layer: kind for layer, kind in formats.items() if kind not in _FP8_FORMATS}
    if unsupported:
        layer, kind = next(iter(unsupported.items()))
        raise CheckpointError(
            f"{path}: layer {layer!r} is quantized as {kind!r}, a format this loader does not dequantize; it reads "
            f"fp32 / fp16 / bf16 files and fp8 ones ({', '.join(_FP8_FORMATS)}, scaled or not)"
        )
    return formats


def is_quantized(path: str | Path) -> bool:
    """Whether a file or folder holds ComfyUI scaled / per-layer quantized fp8 weights (see _WEIGHT_SCALES), or is a
    GGUF file with quantized tensors: both are dequantized by load_state_dict when it is given a dtype."""
    tensors = _gguf_tensors(path)
    if tensors is not None:
        from .gguf_file import is_quantized as gguf_quantized

        return gguf_quantized(tensors)
    for file in weight_files(path):
        header = _check_file(file)
        if "_quantization_metadata" in (header.get("__metadata__") or {}):
            return True
        if any(key.endswith(_WEIGHT_SCALES + _DROPPED) for key in header):
            return True
    return False


def _check_scale(path: Path, key: str, tensor: torch.Tensor, scale: torch.Tensor) -> None:
    """A tensor-wise scale (one value) or a per-row one ([rows, 1, ...]); a 1-D per-row scale would broadcast over the
    columns instead, so any other shape is refused."""
    rows = scale.ndim == tensor.ndim and scale.shape[0] == tensor.shape[0] and all(d == 1 for d in scale.shape[1:])
    if scale.numel() != 1 and not rows:
        raise CheckpointError(
            f"{path}: the scale of {key!r} has shape {tuple(scale.shape)}, which does not fit the weight's "
            f"{tuple(tensor.shape)} (one value, or one per row shaped [{tensor.shape[0]}, 1])"
        )


def load_state_dict(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    select: Callable[[str], bool] | None = None,
    matrix_dtype: torch.dtype | None = None,
    pack: Callable[[torch.dtype, bool], bool] | None = None,
) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Load a safetensors file or folder. Every file is validated before anything is read.

    dtype=None returns the tensors as stored. With a dtype, floating tensors (fp8 included) are cast to it one
    at a time, and ComfyUI's scaled fp8 weights are dequantized (weight * scale; the scale and format entries are
    dropped). `select(key)` -> False skips a tensor without reading it (e.g. the decoder of a full T5 checkpoint).
    A GGUF file is dequantized tensor by tensor (to float32 for quantized types when dtype is None).
    `matrix_dtype` (with a dtype): the dtype of the matrices (is_matrix), e.g. fp8 storage, cast straight from the
    dequantized values, so that no full-size intermediate copy is ever held.
    `pack(stored dtype, scaled)` (with a dtype) -> True keeps a matrix stored in fp8 or 16 bits packed as it is
    (float_rows: a QuantizedWeight, scale included) instead; e.g. the T5 keeps every matrix narrower than its dtype.
    """

    def target(key: str, ndim: int) -> torch.dtype | None:
        return matrix_dtype if matrix_dtype is not None and dtype is not None and is_matrix(key, ndim) else dtype

    tensors = _gguf_tensors(path)
    if tensors is not None:
        from .gguf_file import dequantize

        return {
            k: dequantize(t, target(k, len(t.shape))).to(device)
            for k, t in tensors.items()
            if select is None or select(k)
        }
    files = weight_files(path)
    headers = {file: _check_file(file) for file in files}
    if not any(k != "__metadata__" for h in headers.values() for k in h):
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    formats: dict[str, str] = {}
    scales: dict[str, torch.Tensor] = {}  # gathered from every shard first: a scale may sit in another shard
    if dtype is not None:
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                formats |= _layer_formats(file, f)
                for key in f.keys():
                    if key.endswith(_WEIGHT_SCALES):
                        scales[key.rsplit(".", 1)[0] + ".weight"] = f.get_tensor(key).float()
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if dtype is not None and key.endswith(_WEIGHT_SCALES + _DROPPED):
                    continue
                if select is not None and not select(key):
                    continue
                tensor = f.get_tensor(key)
                layer_format = formats.get(key.rsplit(".", 1)[0]) if key.endswith(".weight") else None
                if layer_format and tensor.dtype == torch.uint8:  # older files store the fp8 bytes as uint8
                    tensor = tensor.view(_FP8_FORMATS[layer_format])
                if key in scales:
                    _check_scale(file, key, tensor, scales[key])
                kept = pack is not None and dtype is not None and is_matrix(key, tensor.ndim) and tensor.ndim == 2
                if kept and float_rows.qtype_of(tensor.dtype, key in scales) and pack(tensor.dtype, key in scales):
                    raw, qtype = float_rows.pack(tensor, scales.get(key))
                    state_dict[key] = QuantizedWeight(raw, qtype, tensor.shape)
                    continue
                if key in scales:
                    tensor = tensor.float() * scales[key]
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(target(key, tensor.ndim))
                state_dict[key] = tensor.to(device)
    return state_dict


def is_matrix(key: str, ndim: int) -> bool:
    """The weights a layer multiplies with (Linear / Conv), which may be stored in fp8; biases, norms, embeddings
    of one dim and buffers stay in the compute dtype."""
    return key.endswith(".weight") and ndim >= 2


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Keys under `prefix` with the prefix removed; other keys are dropped (e.g. a CLIP vision tower)."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
