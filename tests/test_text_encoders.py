"""T5 / CLIP-L embedders on tiny random models: shapes, masks, truncation, file layouts, fp8, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_tiny_text import (
    make_clip_tokenizer,
    make_t5_spiece_tokenizer,
    make_t5_tokenizer,
    save_clip,
    save_t5,
    tiny_clip_model,
    tiny_t5_model,
)
from helpers_torch import no_grad  # noqa: F401 (autouse fixtures)
from safetensors.torch import save_file
from transformers import CLIPTokenizer, T5Tokenizer

from opensora_lib import packed_linear
from opensora_lib.checkpoint import load_state_dict
from opensora_lib.text_encoders import T5_V2, CLIPPooledEmbedder, T5Embedder, load_t5

PROMPTS = ["a cat sits on the mat", "the dog runs under the blue sky and the red sea wave in rain"]
LONG = " ".join(["the red cat walks over the blue mat"] * 6)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text")
    t5, clip = tiny_t5_model(seed=1), tiny_clip_model(seed=2)
    return dict(
        t5_folder=save_t5(t5, root / "t5"),
        t5_shards=save_t5(t5, root / "t5_shards", layout="shards"),
        t5_single=save_t5(t5, root / "te" / "t5xxl_fp16.safetensors", layout="single", store_dtype=torch.float16),
        t5_fp32=save_t5(t5, root / "te32" / "t5xxl_fp32.safetensors", layout="single"),
        t5_fp8=save_t5(
            t5, root / "te8" / "t5xxl_fp8_e4m3fn.safetensors", layout="single", store_dtype=torch.float8_e4m3fn
        ),
        t5_scaled=save_t5(t5, root / "te8s" / "t5xxl_fp8_e4m3fn_scaled.safetensors", layout="single", scaled_fp8=True),
        t5_tokenizer=make_t5_tokenizer(root / "t5_tokenizer"),
        clip_folder=save_clip(clip, root / "clip"),
        clip_single=save_clip(clip, root / "te" / "clip_l.safetensors", layout="single"),
        clip_tokenizer=make_clip_tokenizer(root / "sd1_tokenizer"),
    )


def reference_t5(files, ids_mask, use_mask, weights=None):
    """The plain transformers model on the same tokens (optionally with other weights)."""
    model = tiny_t5_model(seed=1)
    if weights is not None:
        model.load_state_dict(weights)
    ids, mask = ids_mask
    return model(input_ids=ids, attention_mask=mask if use_mask else None).last_hidden_state


def tokens(files, prompts, max_length):
    tokenizer = T5Tokenizer.from_pretrained(str(files["t5_tokenizer"]))
    batch = tokenizer(prompts, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


# ---------------------------------------------------------------------------------------------------------------
# T5


def test_t5_shapes_and_mask(files):
    embedder = T5Embedder.from_files(files["t5_folder"], max_length=16)
    y, mask, truncated = embedder.encode(PROMPTS)
    assert y.shape == (2, 1, 16, 64) and y.dtype == torch.float32 and truncated == 0
    assert mask.shape == (2, 16) and mask.dtype == torch.int64
    counts = [len(embedder.tokenizer(p)["input_ids"]) for p in PROMPTS]  # words + </s>
    assert mask.sum(1).tolist() == counts and counts[0] < counts[1] < 16
    for row, n in zip(mask, counts):
        assert row[:n].eq(1).all() and row[n:].eq(0).all()  # ones first, then padding


@pytest.mark.parametrize("use_mask", [True, False])
def test_t5_equals_running_transformers_directly(files, use_mask):
    embedder = T5Embedder.from_files(files["t5_fp32"], files["t5_tokenizer"], max_length=16, use_mask=use_mask)
    y, mask, _ = embedder.encode(PROMPTS)
    expected = reference_t5(files, tokens(files, PROMPTS, 16), use_mask)
    torch.testing.assert_close(y[:, 0], expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(mask, tokens(files, PROMPTS, 16)[1])


def test_t5_mask_semantics(files):
    def valid_states(max_length, use_mask):
        embedder = T5Embedder.from_files(files["t5_folder"], max_length=max_length, use_mask=use_mask)
        y, mask, _ = embedder.encode(PROMPTS[:1])
        return y[0, 0, : int(mask.sum())]

    # masked (1.x): the real tokens do not see the padding, so the pad length changes nothing
    torch.testing.assert_close(valid_states(12, True), valid_states(24, True), atol=1e-5, rtol=1e-5)
    # unmasked (2.0): pad tokens are attended, so the states depend on how much padding there is
    assert (valid_states(12, False) - valid_states(24, False)).abs().max() > 1e-3
    assert (valid_states(12, True) - valid_states(12, False)).abs().max() > 1e-3


def test_t5_truncation_is_counted(files):
    embedder = T5Embedder.from_files(files["t5_folder"], max_length=10)
    y, mask, truncated = embedder.encode(["a cat", LONG, LONG + " and the dog"])
    assert truncated == 2 and y.shape == (3, 1, 10, 64)
    assert mask[1:].eq(1).all() and mask[0].sum() == 3
    ids = tokens(files, [LONG], 10)[0]
    assert ids[0, -1] == embedder.tokenizer.eos_token_id  # cut like the official tokenizer call: </s> kept
    assert embedder.encode([LONG[:20]])[2] == 0


def test_single_file_sharded_folder_and_folder_agree(files):
    folder = T5Embedder.from_files(files["t5_folder"], max_length=16).encode(PROMPTS)
    shards = T5Embedder.from_files(files["t5_shards"], max_length=16).encode(PROMPTS)
    single = T5Embedder.from_files(files["t5_fp32"], tokenizer_path=files["t5_tokenizer"], max_length=16)
    single = single.encode(PROMPTS)
    for other in (shards, single):
        assert torch.equal(folder[0], other[0]) and torch.equal(folder[1], other[1])


@pytest.mark.parametrize("name", ["t5_single", "t5_fp8", "t5_scaled"])
def test_low_precision_files_load_upcast(files, name):
    embedder = T5Embedder.from_files(files[name], tokenizer_path=files["t5_tokenizer"], max_length=16)
    assert embedder.model.shared.weight.dtype == torch.float32  # upcast to the compute dtype
    y, _, _ = embedder.encode(PROMPTS)
    exact = tiny_t5_model(seed=1).state_dict()
    if name == "t5_single":
        stored = {k: v.half().float() for k, v in exact.items()}
    elif name == "t5_fp8":
        stored = {k: v.to(torch.float8_e4m3fn).float() for k, v in exact.items()}
    else:  # scaled fp8: matrices stored as weight/scale in fp8, with a per-tensor scale
        stored = {}
        for k, v in exact.items():
            if v.ndim == 2 and "embed" not in k and "shared" not in k:
                scale = v.abs().max() / 448.0
                stored[k] = (v / scale).to(torch.float8_e4m3fn).float() * scale
            else:
                stored[k] = v
    expected = reference_t5(files, tokens(files, PROMPTS, 16), True, weights=stored)
    torch.testing.assert_close(y[:, 0], expected, atol=1e-5, rtol=1e-5)
    if name != "t5_single":  # fp8 really changed the weights, so this is not the fp32 result by accident
        full = reference_t5(files, tokens(files, PROMPTS, 16), True)
        assert (y[:, 0] - full).abs().max() > 1e-3


def dense_embedder(files, name, dtype, **settings):
    """The same file loaded the plain way: every tensor cast to dtype, into an ordinary T5EncoderModel."""
    state_dict = load_state_dict(files[name], dtype=dtype)
    state_dict.setdefault("shared.weight", state_dict.pop("encoder.embed_tokens.weight", None))
    model = tiny_t5_model(seed=1)
    model.load_state_dict(state_dict, strict=False)
    model.tie_weights()
    tokenizer = T5Tokenizer.from_pretrained(str(files["t5_tokenizer"]))
    return T5Embedder(model, tokenizer, dtype=dtype, **settings)


KEPT_T5 = [  # file, compute dtype, the packed format of its matrices (None: loaded dense)
    ("t5_fp8", torch.float32, "F8_E4M3"),
    ("t5_fp8", torch.bfloat16, "F8_E4M3"),
    ("t5_scaled", torch.float32, "F8_E4M3"),
    ("t5_scaled", torch.bfloat16, "F8_E4M3"),
    ("t5_single", torch.float32, "F16"),  # ComfyUI's t5xxl_fp16 under 1.x's float32
    ("t5_single", torch.bfloat16, None),  # as wide as bf16: nothing to save
    ("t5_fp32", torch.float32, None),
]


@pytest.mark.parametrize(("name", "dtype", "qtype"), KEPT_T5)
def test_t5_keeps_matrices_narrower_than_its_dtype_packed_and_encodes_exactly_as_dense(files, name, dtype, qtype):
    """Every Linear of a T5 file stored narrower than the compute dtype stays packed (`wo` included: its bytes are
    int8, which Hugging Face's T5 does not cast its activations to), so an fp8 T5-XXL takes its file's 4.8 GB, not
    9.5 (bf16) or 19 (fp32); the encodings equal the dense load's bit for bit, 1.x and 2.0 settings."""
    for settings in ({"max_length": 16}, {**T5_V2, "max_length": 16, "dtype": dtype}):
        settings = {**settings, "dtype": dtype}
        kept = T5Embedder.from_files(files[name], tokenizer_path=files["t5_tokenizer"], **settings)
        dense = dense_embedder(files, name, **settings)
        layers = packed_linear.packed_layers(kept.model)
        linears = [m for m in dense.model.modules() if isinstance(m, torch.nn.Linear)]
        if qtype is None:
            assert not layers
        else:
            assert len(layers) == len(linears) and {m.qtype for m in layers.values()} == {qtype}, layers
            assert any(name.endswith("DenseReluDense.wo") for name in layers)
        size = sum(p.numel() * p.element_size() for p in kept.model.parameters())
        dense_size = sum(p.numel() * p.element_size() for p in dense.model.parameters())
        assert size < dense_size if qtype else size == dense_size, (size, dense_size)
        prompts = [*PROMPTS, LONG]
        assert torch.equal(kept.encode(prompts)[0], dense.encode(prompts)[0]), settings


def test_hf_folder_with_a_sentencepiece_tokenizer(files, tmp_path):
    folder = save_t5(tiny_t5_model(seed=1), tmp_path / "t5-v1_1-xxl", with_tokenizer=False)
    make_t5_spiece_tokenizer(folder)
    embedder = T5Embedder.from_files(folder, max_length=12)
    y, mask, _ = embedder.encode(PROMPTS)
    ids = embedder.tokenizer(PROMPTS, max_length=12, padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(mask, ids["attention_mask"]) and ids["input_ids"][0, int(mask[0].sum()) - 1] == 1  # </s>
    expected = reference_t5(files, (ids["input_ids"], ids["attention_mask"]), True)
    torch.testing.assert_close(y[:, 0], expected, atol=1e-6, rtol=1e-6)


def test_t5_v2_settings_bf16(files):
    embedder = T5Embedder.from_files(files["t5_folder"], **{**T5_V2, "max_length": 16})
    y, mask, _ = embedder.encode(PROMPTS)
    assert y.dtype == torch.bfloat16 and embedder.model.shared.weight.dtype == torch.bfloat16
    expected = reference_t5(files, tokens(files, PROMPTS, 16), use_mask=False)
    assert (y[:, 0].float() - expected).abs().max() < 0.1 * expected.abs().max()


def test_load_t5_ties_the_embedding(files):
    model = load_t5(files["t5_single"])
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert not any(p.is_meta for p in model.parameters())


def test_full_t5_file_and_embed_tokens_only_file(files, tmp_path):
    state = {k: v.clone() for k, v in tiny_t5_model(seed=1).state_dict().items()}  # untie for save_file
    full = {**state, "decoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(64, 64)}
    full["lm_head.weight"] = torch.zeros(128, 64)
    save_file(full, str(tmp_path / "t5_full.safetensors"))  # seq2seq checkpoint: the decoder is skipped
    only_embed = {k: v for k, v in state.items() if k != "shared.weight"}
    save_file(only_embed, str(tmp_path / "t5_embed.safetensors"))
    expected = T5Embedder.from_files(files["t5_fp32"], files["t5_tokenizer"], max_length=12).encode(PROMPTS)[0]
    for name in ("t5_full.safetensors", "t5_embed.safetensors"):
        embedder = T5Embedder.from_files(tmp_path / name, files["t5_tokenizer"], max_length=12)
        assert torch.equal(embedder.encode(PROMPTS)[0], expected), name
    del only_embed["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    save_file(only_embed, str(tmp_path / "t5_broken.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['encoder.block.1.layer.1.DenseReluDense.wo.weight'\]"):
        load_t5(tmp_path / "t5_broken.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# CLIP


def test_clip_pooled_equals_transformers_and_layouts_agree(files):
    folder = CLIPPooledEmbedder.from_files(files["clip_folder"], dtype=torch.float32)
    single = CLIPPooledEmbedder.from_files(files["clip_single"], files["clip_tokenizer"], dtype=torch.float32)
    pooled, truncated = folder.encode(PROMPTS)
    assert pooled.shape == (2, 128) and truncated == 0
    assert torch.equal(pooled, single.encode(PROMPTS)[0])
    tokenizer = CLIPTokenizer.from_pretrained(str(files["clip_tokenizer"]))
    ids = tokenizer(PROMPTS, max_length=77, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    output = tiny_clip_model(seed=2)(input_ids=ids)
    torch.testing.assert_close(pooled, output.pooler_output, atol=1e-6, rtol=1e-6)
    eos = (ids == tokenizer.eos_token_id).int().argmax(-1)  # pooled = the first EOS position's final state
    torch.testing.assert_close(pooled, output.last_hidden_state[torch.arange(2), eos], atol=1e-6, rtol=1e-6)
    assert (pooled[0] - pooled[1]).abs().max() > 1e-3


def test_clip_truncation_and_dtype(files):
    clip = CLIPPooledEmbedder.from_files(files["clip_single"], files["clip_tokenizer"])
    pooled, truncated = clip.encode([LONG * 2, "a cat"])  # character-level tokens: far past 77
    assert truncated == 1 and pooled.shape == (2, 128) and pooled.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"max_length must be 1\.\.77"):
        CLIPPooledEmbedder.from_files(files["clip_folder"], max_length=100)


def test_v2_settings_encode_a_prompt_and_the_empty_negative(files):
    t5 = T5Embedder.from_files(files["t5_folder"], **{**T5_V2, "max_length": 16})
    clip = CLIPPooledEmbedder.from_files(files["clip_folder"])
    texts = ["a cat sits on the mat", ""]  # "" is the official 2.0 negative prompt
    y, _mask, t5_truncated = t5.encode(texts)
    pooled, clip_truncated = clip.encode(texts)
    assert y[:, 0].shape == (2, 16, 64) and pooled.shape == (2, 128)
    assert y.dtype == pooled.dtype == torch.bfloat16
    assert t5_truncated == clip_truncated == 0


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_missing_tokenizer_names_where_it_looked(files, tmp_path):
    lonely = tmp_path / "models" / "t5.safetensors"
    lonely.parent.mkdir(parents=True)
    lonely.write_bytes(files["t5_fp32"].read_bytes())
    with pytest.raises(FileNotFoundError) as error:
        T5Embedder.from_files(lonely)
    assert str(lonely.parent) in str(error.value) and "tokenizer folder" in str(error.value)
    assert "t5_tokenizer" in str(error.value)  # points at ComfyUI's bundled folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer found.*empty"):
        CLIPPooledEmbedder.from_files(files["clip_single"], tokenizer_path=tmp_path / "empty")


def test_a_clip_tokenizer_is_refused_as_the_t5_tokenizer(files, tmp_path):
    """A CLIP (BPE) folder loads as a T5 tokenizer of a few hundred entries that encodes every prompt as <unk>
    (audit 23: a silently wrong video): without spiece.model / tokenizer.json it is not found, and a tokenizer.json
    whose vocabulary has no </s> is refused by name."""
    with pytest.raises(FileNotFoundError, match="no T5 tokenizer found .*tokenizer.json, spiece.model"):
        T5Embedder.from_files(files["t5_fp32"], tokenizer_path=files["clip_tokenizer"])
    clip_json = tmp_path / "clip_fast"
    CLIPTokenizer.from_pretrained(str(files["clip_tokenizer"])).save_pretrained(str(clip_json))
    assert (clip_json / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="is not a T5 tokenizer"):
        T5Embedder.from_files(files["t5_fp32"], tokenizer_path=clip_json)


def test_prompt_validation(files):
    embedder = T5Embedder.from_files(files["t5_folder"], max_length=8)
    with pytest.raises(ValueError, match="prompt list is empty"):
        embedder.encode([])
    with pytest.raises(ValueError, match="list of strings"):
        embedder.encode("a cat")
    with pytest.raises(ValueError, match="prompt 1 is a int"):
        embedder.encode(["a cat", 3])
    y, mask, _ = embedder.encode([""])  # allowed: encodes just </s>
    assert y.shape == (1, 1, 8, 64) and mask.sum() == 1
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        T5Embedder(embedder.model, embedder.tokenizer, max_length=0)


def test_wrong_model_or_tokenizer(files):
    with pytest.raises(ValueError, match="CLIP text encoder.*T5 loader expects a T5 encoder"):
        T5Embedder.from_files(files["clip_single"], tokenizer_path=files["t5_tokenizer"])
    with pytest.raises(ValueError, match="T5 encoder.*CLIP-L loader expects a CLIP text encoder"):
        CLIPPooledEmbedder.from_files(files["t5_fp32"], tokenizer_path=files["clip_tokenizer"])
    clip_tokenizer = CLIPTokenizer.from_pretrained(str(files["clip_tokenizer"]))
    with pytest.raises(ValueError, match="tokenizer has 519 tokens but the model embeds only 128"):
        T5Embedder(tiny_t5_model(), clip_tokenizer)


def test_a_missing_tokenizer_folder_is_named_with_its_absolute_path(files, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a relative folder is resolved against the server's working directory
    with pytest.raises(FileNotFoundError) as error:
        T5Embedder.from_files(files["t5_fp32"], tokenizer_path="no_such_tokenizer", max_length=16)
    message = str(error.value)
    assert str(tmp_path / "no_such_tokenizer") in message, message
    assert "leave the tokenizer folder empty" in message and "tokenizer_path" not in message, message
