"""GGUF weight files: read without pickle, dequantized on load (opensora_lib/gguf_file.py), in the DiT and T5 loaders.

The files are written by the `gguf` package (llama.cpp's writer and quantizers), laid out as ComfyUI-GGUF's
converter does. These tests check the reading (shapes, names, values, damaged files); test_gguf_loader.py runs the
loader nodes inside ComfyUI.
"""

from __future__ import annotations

import gguf  # a requirement of the pack (requirements.txt)
import numpy as np
import pytest
import torch
from helpers_gguf import write_gguf
from helpers_tiny_text import save_t5, tiny_t5_model
from safetensors.torch import load_file

from opensora_lib import checkpoint, detection, float_rows, gguf_dequant, packed_linear
from opensora_lib.checkpoint import CheckpointError
from opensora_lib.text_encoders import load_t5


@pytest.fixture(scope="module")
def tiny_dits(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """The tiny 2.0 MMDiT and 1.3 STDiT3 state dicts of the demo models."""
    from demo_models import make_dit
    from demo_models_v2 import make_mmdit

    root = tmp_path_factory.mktemp("gguf-dits")
    make_mmdit(root / "v2.safetensors")
    make_dit("1.3", root / "v13")
    return {"2.0": load_file(str(root / "v2.safetensors")), "1.3": load_file(str(root / "v13" / "model.safetensors"))}


@pytest.mark.parametrize("version", ["2.0", "1.3"])
def test_header_and_detection_match_the_safetensors_file(tiny_dits, tmp_path, version):
    state_dict = tiny_dits[version]
    write_gguf(tmp_path / "dit.gguf", state_dict, "Q8_0")
    header = checkpoint.read_header(tmp_path / "dit.gguf")
    assert {k: shape for k, (_, shape) in header.items()} == {k: tuple(v.shape) for k, v in state_dict.items()}
    assert any(kind == "Q8_0" for kind, _ in header.values()) and any(kind == "F32" for kind, _ in header.values())
    assert checkpoint.is_quantized(tmp_path / "dit.gguf")
    if version == "1.3":  # the 5-D patch embedding is stored flattened, with its shape in the metadata
        assert header["x_embedder.proj.weight"][1] == tuple(state_dict["x_embedder.proj.weight"].shape)
    info, expected = detection.detect(header), detection.detect(state_dict)
    assert (info.family, info.version, info.config) == (expected.family, expected.version, expected.config)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q5_1", "Q4_0"])
def test_values_are_the_files_dequantized_values(tiny_dits, tmp_path, qtype):
    state_dict = tiny_dits["2.0"]
    held = write_gguf(tmp_path / "dit.gguf", state_dict, qtype)
    loaded = checkpoint.load_state_dict(tmp_path / "dit.gguf", dtype=torch.float32)
    assert loaded.keys() == state_dict.keys()
    for key, tensor in loaded.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, held[key]), key
    matrix = "double_blocks.0.img_attn.q_proj.weight"
    error = (loaded[matrix] - state_dict[matrix].float()).abs().max().item()
    scale = state_dict[matrix].float().abs().max().item()
    if qtype == "F32":
        assert error == 0
    else:  # quantized: changed, by less than the type's step
        assert 0 < error < scale * {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q5_1": 0.1, "Q4_0": 0.2}[qtype]
    as_bf16 = checkpoint.load_state_dict(tmp_path / "dit.gguf", dtype=torch.bfloat16)
    assert as_bf16[matrix].dtype == torch.bfloat16 and torch.equal(as_bf16[matrix], held[matrix].bfloat16())


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_k_quant_types_load_with_their_shapes(tmp_path, qtype):
    """The gguf package has no K-quant quantizer; blocks of random codes with small float16 scales stand in."""
    kind = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rows, cols = 3, 2 * block
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    scale_at = {"Q4_K": slice(0, 4), "Q6_K": slice(size - 2, size)}[qtype]  # the float16 super-block scale(s)
    raw[:, scale_at] = np.full((raw.shape[0], (scale_at.stop - scale_at.start) // 2), 0.01, np.float16).view(np.uint8)
    raw = raw.reshape(rows, -1)
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "flux")
    writer.add_tensor("w", raw, raw_shape=raw.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert checkpoint.read_header(tmp_path / "k.gguf") == {"w": (qtype, (rows, cols))}
    loaded = checkpoint.load_state_dict(tmp_path / "k.gguf", dtype=torch.float32)["w"]
    expected = torch.from_numpy(gguf.quants.dequantize(raw, kind))
    assert loaded.shape == (rows, cols) and torch.equal(loaded, expected) and loaded.isfinite().all()


def test_t5_with_llama_cpp_names_loads_as_the_same_encoder(tmp_path):
    """llama.cpp's T5 encoder files (e.g. the t5-v1_1-xxl-encoder GGUFs) name tensors its own way; the names here
        come from the gguf package's own HF -> GGUF table, so the reader's reverse table is checked against it. A full
    T5's lm_head ("output") and decoder ("dec.*") tensors are dropped, as from a full safetensors T5."""
    model = tiny_t5_model(seed=3)
    save_t5(model, tmp_path / "t5.safetensors", layout="single")
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, model.config.num_layers)

    def llama_name(key: str) -> str:
        if key.startswith("dec."):  # a full T5's decoder, which llama.cpp's T5 encoder table does not name
            return key
        stem, _, leaf = key.rpartition(".")
        name = table.get_name(stem)
        assert name is not None, key
        return f"{name}.{leaf}"

    state_dict = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied
    d_model = model.config.d_model
    state_dict |= {"lm_head.weight": torch.ones(8, d_model), "dec.blk.0.attn_q.weight": torch.ones(d_model, d_model)}
    write_gguf(tmp_path / "t5.gguf", state_dict, "F32", arch="t5encoder", rename=llama_name)
    names = {str(t.name) for t in gguf.GGUFReader(tmp_path / "t5.gguf").tensors}
    assert {"token_embd.weight", "enc.blk.1.ffn_gate.weight", "output.weight"} <= names, sorted(names)[:5]
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    from_gguf = load_t5(tmp_path / "t5.gguf")(input_ids=ids).last_hidden_state
    from_safetensors = load_t5(tmp_path / "t5.safetensors")(input_ids=ids).last_hidden_state
    assert torch.equal(from_gguf, from_safetensors)


def test_damaged_and_unknown_files_are_refused_with_a_reason(tiny_dits, tmp_path):
    write_gguf(tmp_path / "dit.gguf", tiny_dits["2.0"], "Q8_0")
    data = (tmp_path / "dit.gguf").read_bytes()
    for cut, name in ((len(data) - 100, "data.gguf"), (200, "table.gguf")):
        (tmp_path / name).write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            checkpoint.load_state_dict(tmp_path / name, dtype=torch.float32)
    write_gguf(tmp_path / "odd-t5.gguf", {"enc.blk.0.something.weight": torch.ones(2, 2)}, arch="t5encoder")
    with pytest.raises(CheckpointError, match=r"odd-t5.gguf: unknown tensor 'enc.blk.0.something.weight'"):
        checkpoint.read_header(tmp_path / "odd-t5.gguf")
    write_gguf(tmp_path / "other.gguf", {"blk.0.attn_q.weight": torch.ones(64, 64)}, arch="llama")
    with pytest.raises(CheckpointError):
        detection.expect_family(detection.detect_file(tmp_path / "other.gguf"), {"mmdit", "stdit3"}, "DiT loader")


def test_matrices_go_straight_to_fp8_storage(tiny_dits, tmp_path):
    """matrix_dtype: matrices cast once from the dequantized values (no bf16 step), the rest in the given dtype."""
    held = write_gguf(tmp_path / "dit.gguf", tiny_dits["2.0"], "Q8_0")
    loaded = checkpoint.load_state_dict(tmp_path / "dit.gguf", dtype=torch.bfloat16, matrix_dtype=torch.float8_e4m3fn)
    for key, tensor in loaded.items():
        if checkpoint.is_matrix(key, tensor.ndim):
            assert tensor.dtype == torch.float8_e4m3fn and torch.equal(tensor, held[key].to(torch.float8_e4m3fn)), key
        else:
            assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, held[key].bfloat16()), key
    assert any(t.dtype == torch.float8_e4m3fn for t in loaded.values())


def test_the_names_not_the_architecture_label_decide_the_t5_renaming(tiny_dits, tmp_path):
    """Converters label files loosely; a DiT labelled "t5" and a T5 with Hugging Face names labelled "t5" load."""
    write_gguf(tmp_path / "dit.gguf", tiny_dits["2.0"], "Q8_0", arch="t5")
    assert detection.detect_file(tmp_path / "dit.gguf").family == "mmdit"
    model = tiny_t5_model(seed=1).eval()
    state_dict = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    write_gguf(tmp_path / "t5-hf-names.gguf", state_dict, "F32", arch="t5")
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    save_t5(model, tmp_path / "t5.safetensors", layout="single")
    loaded = load_t5(tmp_path / "t5-hf-names.gguf")(input_ids=ids).last_hidden_state
    assert torch.equal(loaded, load_t5(tmp_path / "t5.safetensors")(input_ids=ids).last_hidden_state)


def test_a_flattened_stdit3_patch_embedding_is_named(tiny_dits, tmp_path):
    """A 1.3 GGUF whose 5-D patch embedding was flattened without comfy.gguf.orig_shape: the error says so."""
    state_dict = dict(tiny_dits["1.3"])
    weight = state_dict["x_embedder.proj.weight"]
    state_dict["x_embedder.proj.weight"] = weight.reshape(weight.shape[0], -1)
    write_gguf(tmp_path / "flat.gguf", state_dict, "F32")
    with pytest.raises(CheckpointError, match="x_embedder.proj.weight has shape .*comfy.gguf.orig_shape"):
        detection.detect_file(tmp_path / "flat.gguf")


@pytest.mark.parametrize("qtype", sorted(gguf_dequant.BLOCKS))
def test_torch_dequantization_is_the_gguf_packages_bit_for_bit(qtype):
    """opensora_lib.gguf_dequant (what kept GGUF layers run at every forward) against the gguf package's numpy
    reference, on random blocks: every byte pattern of the packed integers, random float16 scales."""
    from gguf import GGMLQuantizationType, quants

    values, size = gguf_dequant.BLOCKS[qtype]
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, size=(96, size), dtype=np.uint8)
    for offset in gguf_dequant.FLOAT16_FIELDS[qtype]:
        raw[:, offset : offset + 2] = rng.normal(size=(96, 1)).astype(np.float16).view(np.uint8)
    reference = quants.dequantize(raw.reshape(8, -1), GGMLQuantizationType[qtype]).reshape(-1)
    ours = gguf_dequant.dequantize(torch.from_numpy(raw), qtype, (96 * values,))
    assert np.isfinite(reference).all()
    np.testing.assert_array_equal(ours.numpy(), reference)


EXPANSIONS = [(q, d) for q in sorted(gguf_dequant.BLOCKS) for d in (torch.bfloat16, torch.float32)]
# float rows: fp8 into either dtype; 16-bit rows are kept only under a float32 compute dtype (the T5 in 1.x)
EXPANSIONS += [(q, torch.bfloat16) for q in ("F8_E4M3", "F8_E5M2")]
EXPANSIONS += [(q, torch.float32) for q in sorted(float_rows.STORAGE)]


@pytest.mark.parametrize(("qtype", "dtype"), EXPANSIONS)
def test_the_expansion_estimate_covers_the_measured_peak(qtype, dtype):
    """packed_linear.expansion_bytes (what the Sampler tells ComfyUI to keep free for a kept layer) against the peak
    the expansion allocates (meta device, benchmarks/bench_comfy_memory.py's allocation tracker)."""
    from benchmarks.bench_comfy_memory import peak_activation_bytes

    rows, columns = 768, 3072
    raw = torch.empty(rows, packed_linear.row_bytes(qtype, columns), dtype=torch.uint8, device="meta")
    estimate = packed_linear.expansion_bytes(qtype, (rows, columns))
    measured = peak_activation_bytes(lambda: packed_linear.dequantize(raw, qtype, (rows, columns), dtype))
    measured += raw.numel()  # the bytes the forward copies to the device
    assert measured <= estimate <= 1.6 * measured, (measured, estimate)


def test_quantized_types_without_a_torch_kernel_are_named_for_the_load_warning():
    from opensora_lib.gguf_file import expanded_on_load

    header = {
        "a.weight": ("IQ4_XS", (64, 256)),
        "b.weight": ("IQ4_XS", (64, 256)),
        "c.weight": ("Q4_K", (64, 256)),  # kept
        "d.weight": ("F16", (64, 64)),  # plain
        "e.bias": ("IQ4_XS", (64,)),  # not a matrix
    }
    assert expanded_on_load(header) == {"IQ4_XS": 2}


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_quantized_t5_keeps_its_blocks_and_encodes_as_its_dequantized_weights(tmp_path, qtype, dtype):
    """The T5 loader keeps a GGUF's matrices packed (T5PackedLinear, expanded at each forward), `wo` included (its
    bytes are int8, which Hugging Face's T5 does not cast the feed-forward activations to), and dequantizes the
    embedding. The encoder states equal those of the same weights dequantized into a safetensors file, bit for bit."""
    from safetensors.torch import save_file

    from opensora_lib.packed_linear import PackedLinear

    model = tiny_t5_model(seed=5)
    state_dict = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied
    held = write_gguf(tmp_path / "t5.gguf", state_dict, qtype)
    save_file(held, str(tmp_path / "t5-dequantized.safetensors"))
    packed = load_t5(tmp_path / "t5.gguf", dtype)
    layers = {
        name: type(m).__name__ for name, m in packed.named_modules() if isinstance(m, torch.nn.Linear | PackedLinear)
    }
    assert set(layers.values()) == {"T5PackedLinear"}, layers  # q, k, v, o, wi_0, wi_1 and wo of every block
    assert packed.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.int8
    dequantized = load_t5(tmp_path / "t5-dequantized.safetensors", dtype)
    size = sum(t.numel() * t.element_size() for t in packed.state_dict().values())
    assert size < 0.75 * sum(t.numel() * t.element_size() for t in dequantized.state_dict().values())
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(packed(input_ids=ids).last_hidden_state, dequantized(input_ids=ids).last_hidden_state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_f16_gguf_t5_stays_16_bit_under_fp32(tmp_path, dtype):
    """An F16 GGUF T5 keeps its matrices as 16-bit rows under 1.x's fp32 (half the memory), as t5xxl_fp16 does, and
    loads dense under bf16 (nothing narrower to keep); the encoder states equal the dense load bit for bit."""
    from opensora_lib import packed_linear

    model = tiny_t5_model(seed=5)
    state_dict = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    write_gguf(tmp_path / "t5.gguf", state_dict, "F16")
    kept = load_t5(tmp_path / "t5.gguf", dtype)
    dense = tiny_t5_model(seed=5)
    dense.load_state_dict(checkpoint.load_state_dict(tmp_path / "t5.gguf", dtype=dtype), strict=False)
    dense.tie_weights()
    dense = dense.to(dtype)
    layers = packed_linear.packed_layers(kept)
    linears = sum(isinstance(m, torch.nn.Linear) for m in dense.modules())
    assert {m.qtype for m in layers.values()} == ({"F16"} if dtype == torch.float32 else set()), layers
    assert len(layers) == (linears if dtype == torch.float32 else 0)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(kept(input_ids=ids).last_hidden_state, dense(input_ids=ids).last_hidden_state)


def test_blocks_that_run_across_rows_are_dequantized_not_kept(tmp_path):
    """A converter may quantize a matrix whose rows do not split into blocks over its flattened values (the shape in
    comfy.gguf.orig_shape): load_keeping_blocks dequantizes it (before, its bytes were split into rows as if each
    row held whole blocks: a bare RuntimeError, or here a packed weight that would expand wrongly); a matrix of
    whole-block rows stays packed."""
    from gguf import GGMLQuantizationType, quants

    from opensora_lib.gguf_file import QuantizedWeight, load_keeping_blocks

    rng = np.random.default_rng(2)
    odd, even = rng.normal(size=(4, 48)).astype(np.float32), rng.normal(size=(4, 64)).astype(np.float32)
    writer = gguf.GGUFWriter(str(tmp_path / "rows.gguf"), "flux")
    writer.add_array("comfy.gguf.orig_shape.odd.weight", [4, 48])
    odd_data = quants.quantize(odd.reshape(-1, 32), GGMLQuantizationType.Q8_0)  # 6 blocks over 4 rows of 48
    writer.add_tensor("odd.weight", odd_data, raw_shape=odd_data.shape, raw_dtype=GGMLQuantizationType.Q8_0)
    even_data = quants.quantize(even, GGMLQuantizationType.Q8_0)
    writer.add_tensor("even.weight", even_data, raw_shape=even_data.shape, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    loaded = load_keeping_blocks(tmp_path / "rows.gguf")
    expected = quants.dequantize(odd_data, GGMLQuantizationType.Q8_0).reshape(4, 48)
    assert isinstance(loaded["odd.weight"], torch.Tensor) and loaded["odd.weight"].shape == (4, 48)
    np.testing.assert_array_equal(loaded["odd.weight"].numpy(), expected)
    assert isinstance(loaded["even.weight"], QuantizedWeight) and tuple(loaded["even.weight"].shape) == (4, 64)
