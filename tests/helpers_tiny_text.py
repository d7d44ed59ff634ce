"""Tiny random T5 / CLIP-L text encoders and tokenizers, saved the ways real ones ship (for tests).

Layouts written by `save_t5` / `save_clip`:
- "folder": HF folder with config.json, model.safetensors and the tokenizer files.
- "shards": HF folder with two model-0000N-of-00002.safetensors shards and model.safetensors.index.json.
- "single": one ComfyUI-style .safetensors file (no config; CLIP keys under `text_model.`), tokenizer elsewhere.

The tiny configs keep the rules the loaders infer from shapes (T5: heads from the relative-bias table;
CLIP: 64-dim heads), so a single file and a folder of the same weights build identical models.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

WORDS = "a the cat dog sits on mat red blue sky sea wave rain city night walks runs under over and with of in".split()
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"


def tiny_t5_config() -> T5Config:
    return T5Config(
        vocab_size=128,
        d_model=64,
        d_kv=16,
        d_ff=96,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
        dropout_rate=0.0,
    )


def tiny_clip_config(eos_token_id: int, bos_token_id: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=600,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # hidden / 64, as the shape-based inference assumes
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=768,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-degenerate random weights (norm gains away from 1) so every path matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1:
                param.copy_((1.0 + 0.1 * noise) if "bias" not in name else 0.05 * noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)
    return model.eval()


def tiny_t5_model(seed: int = 0) -> T5EncoderModel:
    return _randomize(T5EncoderModel(tiny_t5_config()), seed)


def make_t5_tokenizer(folder: str | Path) -> Path:
    """A small Unigram T5 tokenizer (tokenizer.json + tokenizer_config.json, like ComfyUI's t5_tokenizer)."""
    folder = Path(folder)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0) for w in WORDS]
    vocab += [(c, -8.0) for c in LETTERS] + [("▁" + c, -9.0) for c in LETTERS if c not in WORDS]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(str(folder))
    return folder


def make_t5_spiece_tokenizer(folder: str | Path) -> Path:
    """A SentencePiece spiece.model folder, the layout of DeepFloyd/google t5-v1_1-xxl (converted on load)."""
    import random

    import sentencepiece

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(300)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "spiece"),
        vocab_size=40,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    corpus.unlink()
    (folder / "spiece.vocab").unlink()
    # the real files ask for 100 sentinel tokens; the tiny model's vocabulary has no room for them
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))
    return folder


def tiny_clip_tokenizer_ids() -> tuple[int, int]:
    """(bos, eos) ids of the tokenizer written by make_clip_tokenizer."""
    return 512, 513


def _bytes_to_unicode() -> list[str]:
    """The byte-level alphabet of GPT-2/CLIP BPE (printable stand-ins for the 256 byte values)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def make_clip_tokenizer(folder: str | Path) -> Path:
    """A byte-level BPE CLIP tokenizer as vocab.json + merges.txt (like ComfyUI's sd1_tokenizer folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab |= {c + "</w>": 256 + i for i, c in enumerate(alphabet)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    merges = ["t h", "th e</w>", "c a", "ca t</w>", "o n</w>"]
    for i, merged in enumerate(["th", "the</w>", "ca", "cat</w>", "on</w>"]):
        vocab[merged] = 514 + i
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    special["unk_token"] = "<|endoftext|>"
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def tiny_clip_model(seed: int = 0) -> CLIPTextModel:
    bos, eos = tiny_clip_tokenizer_ids()
    return _randomize(CLIPTextModel(tiny_clip_config(eos_token_id=eos, bos_token_id=bos)), seed)


def _stored(state_dict: dict[str, torch.Tensor], store_dtype: torch.dtype | None, scaled_fp8: bool) -> dict:
    out = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach().clone().contiguous()
        if scaled_fp8 and tensor.ndim == 2 and key.endswith(".weight") and "embed" not in key and "shared" not in key:
            scale = tensor.abs().max() / 448.0  # e4m3 max; ComfyUI stores weight / scale in fp8
            out[key] = (tensor / scale).to(torch.float8_e4m3fn)
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(1).float()
        elif store_dtype is not None:
            out[key] = tensor.to(store_dtype)
        else:
            out[key] = tensor
    if scaled_fp8:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def _write(path: Path, tensors: dict[str, torch.Tensor], layout: str, config: dict) -> Path:
    if layout == "single":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path))
        return path
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if layout == "folder":
        save_file(tensors, str(path / "model.safetensors"))
    elif layout == "shards":
        keys = sorted(tensors)
        halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, part in halves.items():
            save_file({k: tensors[k] for k in part}, str(path / name))
        weight_map = {k: name for name, part in halves.items() for k in part}
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        raise ValueError(f"layout must be single, folder or shards, got {layout!r}")
    return path


def save_t5(
    model: T5EncoderModel,
    path: str | Path,
    layout: str = "folder",
    store_dtype: torch.dtype | None = None,
    scaled_fp8: bool = False,
    with_tokenizer: bool = True,
) -> Path:
    """Write the model (and, for folders, its tokenizer). Returns the file or folder path."""
    path = Path(path)
    tensors = _stored(model.state_dict(), store_dtype, scaled_fp8)
    _write(path, tensors, layout, model.config.to_dict())
    if layout != "single" and with_tokenizer:
        make_t5_tokenizer(path)
    return path


def save_clip(model: CLIPTextModel, path: str | Path, layout: str = "folder", with_tokenizer: bool = True) -> Path:
    """Folders get transformers-5 key names; a single file gets the `text_model.` prefix of ComfyUI's clip_l."""
    path = Path(path)
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if layout == "single":
        tensors = {"text_model." + k: v for k, v in tensors.items()}
        tensors["text_projection.weight"] = torch.eye(model.config.hidden_size)  # present in ComfyUI's file
        tensors["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # persisted by older exports
    _write(path, tensors, layout, model.config.to_dict())
    if layout != "single" and with_tokenizer:
        make_clip_tokenizer(path)
    return path
