"""T5 (Open-Sora 1.x and 2.0) and CLIP-L (2.0 pooled vector) text encoders on top of transformers.

Models are built from a config (config.json in an HF folder, or inferred from the weight shapes for
ComfyUI-style single files) and filled from safetensors; nothing is downloaded and nothing is unpickled.

Official behaviour reproduced (OPENSORA.md A.4, B.3, D):
- 1.x T5: max_length 300, padding to max_length, truncation, attention mask USED, float32.
- 2.0 T5: max_length 512, padding to max_length, truncation, attention_mask=None (Q18), bfloat16.
- 2.0 CLIP-L: max_length 77, padding to max_length, attention_mask=None, pooler_output [B, 768], bfloat16.

Empty strings are encoded (2.0 uses "" as its negative prompt); the prompt node refuses an empty prompt itself.
Both embedders' encode() return the number of prompts cut to max_length as the last value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from . import checkpoint, detection, gguf_file, packed_linear
from .configs import check_types, read_config_json

T5_V1 = dict(max_length=300, use_mask=True, dtype=torch.float32)  # Open-Sora 1.2 / 1.3
T5_V2 = dict(max_length=512, use_mask=False, dtype=torch.bfloat16)  # Open-Sora 2.0

# The files that make a folder a tokenizer of that kind: a CLIP (BPE) folder's vocab.json / tokenizer_config.json
# would load as a T5 tokenizer of a few hundred entries that turns every prompt into <unk> (audit 23).
_TOKENIZER_FILES = {"T5": ("tokenizer.json", "spiece.model"), "CLIP": ("tokenizer.json", "vocab.json")}
T5_TOKENIZER_HINT = "give a T5 tokenizer folder (e.g. ComfyUI's comfy/text_encoders/t5_tokenizer)"
# keys a text-encoder file may carry besides the encoder (full T5 seq2seq checkpoints, CLIP projection)
_IGNORED_PREFIXES = ("decoder.", "lm_head.", "text_projection.", "logit_scale")


# ---------------------------------------------------------------------------------------------------------------
# Loading


# the sizes a T5 / CLIP text config.json must give as integers (Hugging Face's configs take any value)
_INTEGER_FIELDS = {
    "t5": ("d_model", "d_kv", "d_ff", "num_layers", "num_heads", "vocab_size", "relative_attention_num_buckets"),
    "clip_l": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"),
}


def _read_config(folder: Path, family: str) -> dict[str, Any] | None:
    data = read_config_json(folder)
    if data is None:
        return None
    data = data.get("text_config", data)  # a full CLIPModel config nests the text tower
    check_types(data, dict.fromkeys(_INTEGER_FIELDS.get(family, ()), int), f"{folder / 'config.json'}: the text")
    return data


def _find_tokenizer(source: Path, tokenizer_path: str | Path | None, what: str, hint: str) -> Path:
    if tokenizer_path is not None:
        candidates = [Path(tokenizer_path)]
    elif source.is_dir():
        candidates = [source, source / "tokenizer", source.parent / "tokenizer"]
    else:
        candidates = [source.parent]
    files = _TOKENIZER_FILES[what]
    for folder in candidates:
        if folder.is_dir() and any((folder / name).is_file() for name in files):
            return folder
    looked = ", ".join(str(c.absolute()) for c in candidates)
    raise FileNotFoundError(
        f"no {what} tokenizer found (looked for {', '.join(files)} in: {looked}); {hint}, or leave the tokenizer folder empty to use the one ComfyUI ships"
    )


def _materialize_buffers(model: torch.nn.Module, device: torch.device | str) -> None:
    """Non-persistent buffers are not in the file; rebuild the ones a meta-built HF text model has."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if not buffer.is_meta:
                continue
            if name != "position_ids":
                raise RuntimeError(f"{type(module).__name__}.{name} was not loaded and cannot be rebuilt")
            setattr(module, name, torch.arange(buffer.shape[-1], device=device).expand(buffer.shape))


class T5PackedLinear(packed_linear.PackedLinear):
    """Hugging Face's T5 casts the feed-forward activations to the dtype of `wo`'s weight unless that weight is int8
    (T5DenseGatedActDense, for int8-quantized models): bytes held as int8 leave them in the compute dtype, so `wo`
    can stay packed too (tests/test_text_encoders.py checks the encodings against the dense load)."""

    byte_dtype = torch.int8


def _install_packed(model: torch.nn.Module, state_dict: dict, dtype: torch.dtype, device) -> dict:
    """Put a T5PackedLinear in place of every Linear whose weight the state dict holds packed (GGUF blocks, fp8 or
    16-bit rows); the other entries, cast to dtype, are returned for load_state_dict."""
    rest = packed_linear.install_all(model, state_dict, dtype, T5PackedLinear)
    for layer in packed_linear.packed_layers(model).values():
        layer.to(device)
    return {k: (t.to(dtype) if t.is_floating_point() else t).to(device) for k, t in rest.items()}


def _load_model(
    source: str | Path,
    family: str,
    dtype: torch.dtype,
    device: torch.device | str,
    inferred_overrides: dict[str, Any] | None = None,
) -> tuple[torch.nn.Module, detection.ModelInfo]:
    """Build on the meta device, then assign the (cast, dequantized) tensors: no random init, one copy."""
    source = Path(source)
    info = detection.detect_file(source)  # validates every file before anything is read
    detection.expect_family(info, {family}, "T5 loader" if family == "t5" else "CLIP-L loader")
    config_dict = _read_config(source, family) if source.is_dir() else None
    if config_dict is None:  # ComfyUI-style single file: the shapes give the config
        config_dict = {**info.config, **(inferred_overrides or {})}
    if family == "t5":
        config = T5Config.from_dict(config_dict)
        model_class = T5EncoderModel
    else:
        config = CLIPTextConfig.from_dict(config_dict)
        model_class = CLIPTextModel

    def wanted(key: str) -> bool:  # older CLIP files persist embeddings.position_ids: rebuilt, never loaded
        name = key[len(info.prefix) :]
        return (
            key.startswith(info.prefix) and not name.startswith(_IGNORED_PREFIXES) and not name.endswith("position_ids")
        )

    if family == "t5" and gguf_file.is_gguf(source):  # its matrices stay in their blocks (packed_linear.py)
        state_dict = gguf_file.load_keeping_blocks(source, select=wanted, narrower_than=dtype)
    else:  # a T5 keeps the matrices its file stores narrower than `dtype` (fp8, 16 bits under float32) packed
        narrower = (lambda stored, _scaled: stored.itemsize < dtype.itemsize) if family == "t5" else None
        state_dict = checkpoint.load_state_dict(source, dtype=dtype, device=device, select=wanted, pack=narrower)
    state_dict = checkpoint.strip_prefix(state_dict, info.prefix)
    if family == "t5":  # encoder.embed_tokens is tied to shared; keep one copy
        embed = state_dict.pop("encoder.embed_tokens.weight", None)
        if embed is not None:
            state_dict.setdefault("shared.weight", embed)
    with torch.device("meta"):
        model = model_class(config)
    expected = set(model.state_dict())
    if family == "t5":
        expected.discard("encoder.embed_tokens.weight")
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise checkpoint.CheckpointError(
            f"{source}: does not fit {info.description}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    state_dict = _install_packed(model, state_dict, dtype, device)
    model.load_state_dict(state_dict, strict=False, assign=True)
    if family == "t5":
        model.tie_weights()
    _materialize_buffers(model, device)
    return model.eval().requires_grad_(False), info


def load_t5(
    source: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> T5EncoderModel:
    """A T5EncoderModel from an HF folder or a single safetensors file (fp32/fp16/bf16/fp8, scaled fp8)."""
    return _load_model(source, "t5", dtype, device)[0]


# ---------------------------------------------------------------------------------------------------------------
# Encoding


def _check_prompts(prompts: list[str]) -> list[str]:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, not a single string")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to encode: the prompt list is empty")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt {i} is a {type(prompt).__name__}; prompts must be strings")
    return prompts


def _check_max_length(max_length: int, limit: int | None = None) -> int:
    if not isinstance(max_length, int) or max_length < 1 or (limit is not None and max_length > limit):
        allowed = f"1..{limit}" if limit is not None else "a positive integer"
        raise ValueError(f"max_length must be {allowed}, got {max_length!r}")
    return max_length


def _check_vocab(tokenizer: Any, model: torch.nn.Module) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model embeds only {rows}: wrong tokenizer?"
        )


def _tokenize(tokenizer: Any, prompts: list[str], max_length: int) -> tuple[dict[str, torch.Tensor], int]:
    """Tokens padded/truncated to max_length as the official code does, and how many prompts were cut."""
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True, verbose=False)["input_ids"]]
    batch = tokenizer(
        prompts,
        max_length=max_length,
        padding="max_length",
        truncation=True,
        return_attention_mask=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    return batch, sum(n > max_length for n in lengths)


class T5Embedder:
    """T5 encoder with the official tokenization. 1.x: the defaults (T5_V1); 2.0: **T5_V2."""

    def __init__(
        self,
        model: T5EncoderModel,
        tokenizer: Any,
        max_length: int = 300,
        use_mask: bool = True,
        dtype: torch.dtype = torch.float32,
    ):
        self.max_length = _check_max_length(max_length)
        self.use_mask = use_mask
        self.dtype = dtype
        self.model = model.to(dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        _check_vocab(tokenizer, self.model)

    @classmethod
    def from_files(
        cls,
        weights_path_or_folder: str | Path,
        tokenizer_path: str | Path | None = None,
        max_length: int = 300,
        use_mask: bool = True,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> T5Embedder:
        source = Path(weights_path_or_folder)
        folder = _find_tokenizer(source, tokenizer_path, "T5", T5_TOKENIZER_HINT)
        try:
            tokenizer = T5Tokenizer.from_pretrained(str(folder), local_files_only=True)
            vocab = tokenizer.get_vocab()
        except (TypeError, ValueError, KeyError) as e:  # e.g. a CLIP tokenizer.json: its BPE vocabulary is a dict
            raise ValueError(f"{folder.absolute()} is not a T5 tokenizer ({e}); {T5_TOKENIZER_HINT}") from None
        if "</s>" not in vocab:  # loaded, but every prompt would become <unk>
            raise ValueError(
                f"{folder.absolute()} is not a T5 tokenizer (no </s> in its vocabulary); {T5_TOKENIZER_HINT}"
            )
        return cls(load_t5(source, dtype, device), tokenizer, max_length, use_mask, dtype)

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """y [B, 1, L, d_model], the tokenizer mask [B, L] (int64, 1 = token), number of prompts truncated.

        The mask is returned either way; use_mask decides whether the encoder itself sees it.
        """
        prompts = _check_prompts(prompts)
        batch, truncated = _tokenize(self.tokenizer, prompts, self.max_length)
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        y = self.model(input_ids=ids, attention_mask=mask if self.use_mask else None).last_hidden_state
        return y[:, None], mask, truncated


class CLIPPooledEmbedder:
    """CLIP text model -> pooler_output (the EOS-token state after the final norm), as Open-Sora 2.0 uses it."""

    def __init__(self, model: CLIPTextModel, tokenizer: Any, max_length: int = 77, dtype: torch.dtype = torch.bfloat16):
        self.max_length = _check_max_length(max_length, model.config.max_position_embeddings)
        self.dtype = dtype
        self.model = model.to(dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        _check_vocab(tokenizer, self.model)

    @classmethod
    def from_files(
        cls,
        weights_path_or_folder: str | Path,
        tokenizer_path: str | Path | None = None,
        max_length: int = 77,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
    ) -> CLIPPooledEmbedder:
        source = Path(weights_path_or_folder)
        folder = _find_tokenizer(
            source, tokenizer_path, "CLIP", "give the folder that holds it (e.g. ComfyUI's comfy/sd1_tokenizer)"
        )
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        # an inferred config takes its special-token ids from the tokenizer (pooling looks for the EOS id)
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model, _ = _load_model(source, "clip_l", dtype, device, {**ids, "pad_token_id": tokenizer.pad_token_id})
        return cls(model, tokenizer, max_length, dtype)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, int]:
        """pooled [B, hidden], number of prompts truncated."""
        prompts = _check_prompts(prompts)
        batch, truncated = _tokenize(self.tokenizer, prompts, self.max_length)
        ids = batch["input_ids"].to(self.device)
        return self.model(input_ids=ids, attention_mask=None).pooler_output, truncated  # no mask, as the official code
