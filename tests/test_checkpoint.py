"""Safe loading (safetensors only, checked before reading) and family detection from keys and shapes."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from opensora_lib import packed_linear
from opensora_lib.checkpoint import (
    CheckpointError,
    is_quantized,
    load_state_dict,
    read_header,
    strip_prefix,
    weight_files,
)
from opensora_lib.detection import FAMILIES, detect, detect_file, expect_family
from opensora_lib.packed_linear import QuantizedWeight

TESTS = Path(__file__).resolve().parent
KEYS = TESTS / "fixtures" / "reference_keys"  # copies of OPENSORA.md's keys/*.txt
CASES = TESTS / "fixtures" / "opensora"


def key_list(name: str) -> dict[str, tuple[int, ...]]:
    """Parse a reference key list: `key<TAB>[shape]<TAB>dtype` lines, `#` header."""
    shapes = {}
    for line in (KEYS / f"{name}.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, _dtype = line.split("\t")
        shapes[key] = tuple(int(x) for x in shape.strip("[]").split(",") if x.strip())
    assert shapes, name
    return shapes


# ---------------------------------------------------------------------------------------------------------------
# Detection on the official key lists

OFFICIAL_MMDIT = dict(  # configs/diffusion/inference/256px.py
    in_channels=64,
    vec_in_dim=768,
    context_in_dim=4096,
    hidden_size=3072,
    mlp_ratio=4.0,
    num_heads=24,
    depth=19,
    depth_single_blocks=38,
    axes_dim=[16, 56, 56],
    theta=10_000,
    qkv_bias=True,
    guidance_embed=False,
    cond_embed=True,
    fused_qkv=False,
    use_liger_rope=True,
    patch_size=2,
)


@pytest.mark.parametrize(
    "name, family, version",
    [
        ("stdit_v12", "stdit3", "1.2"),
        ("stdit_v13", "stdit3", "1.3"),
        ("mmdit", "mmdit", "2.0"),
        ("mmdit_dcae", "mmdit", "2.0"),
        ("flux_dev", "flux", "2.0"),
        ("vae_v12", "vae_v12", "1.2"),
        ("vae_v13", "vae_v13", "1.3"),
        ("hunyuan_vae", "hunyuan_vae", "2.0"),
        ("flux_ae", "flux_ae", "2.0"),
        ("dc_ae", "dc_ae", "2.0"),
        ("T5EncoderModel", "t5", None),
        ("CLIPTextModel_vit-l-14", "clip_l", "2.0"),
    ],
)
def test_every_reference_key_list_is_detected(name, family, version):
    info = detect(key_list(name))
    assert (info.family, info.version, info.prefix) == (family, version, "")
    assert info.description and info.config


def test_all_reference_lists_are_covered():
    assert len(list(KEYS.glob("*.txt"))) == 12


def test_stdit3_configs_match_the_released_models():
    common = dict(hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0, patch_size=(1, 2, 2), pred_sigma=True)
    common |= dict(caption_channels=4096, model_max_length=300, qk_norm=True)
    v12 = detect(key_list("stdit_v12")).config
    assert v12 == {**common, "in_channels": 4, "input_sq_size": 512, "class_dropout_prob": 0.1}
    v13 = detect(key_list("stdit_v13")).config
    assert v13 == {**v12, "in_channels": 16, "kernel_size": (8, 8, -1), "use_spatial_rope": True}


def test_stdit3_version_without_i2v_embedders_or_rope_freqs():
    v13 = {k: v for k, v in key_list("stdit_v13").items() if not k.startswith("x_embedder_cond")}
    assert detect(v13).version == "1.3"  # from rope.freqs [12] = head_dim / 6
    v13.pop("rope.freqs")
    assert detect(v13).version == "1.3"  # from 16 latent channels
    v12 = key_list("stdit_v12")
    v12.pop("rope.freqs")
    assert detect(v12).version == "1.2"


def test_mmdit_configs_match_the_official_inference_config():
    assert detect(key_list("mmdit")).config == OFFICIAL_MMDIT
    dcae = detect(key_list("mmdit_dcae"))
    assert dcae.config == {**OFFICIAL_MMDIT, "in_channels": 128, "patch_size": 1}  # high_compression.py
    assert "DC-AE" in dcae.description


def test_flux_dev_and_open_sora_mmdit_are_never_confused():
    flux, mmdit = detect(key_list("flux_dev")), detect(key_list("mmdit"))
    assert (flux.family, mmdit.family) == ("flux", "mmdit")
    assert flux.config["fused_qkv"] and flux.config["guidance_embed"] and not flux.config["cond_embed"]
    assert flux.config["use_liger_rope"] is False and mmdit.config["use_liger_rope"] is True  # OPENSORA.md Q25
    # a Flux file that gained a cond_in layer is Open-Sora's (fused_qkv=True variant), not Flux
    fused_with_cond = {**key_list("flux_dev"), "cond_in.weight": (3072, 68), "cond_in.bias": (3072,)}
    assert detect(fused_with_cond).family == "mmdit"
    schnell = {k: v for k, v in key_list("flux_dev").items() if not k.startswith("guidance_in")}
    assert detect(schnell).family == "flux" and detect(schnell).config["guidance_embed"] is False


def test_text_encoder_configs():
    t5 = detect(key_list("T5EncoderModel")).config
    assert (t5["d_model"], t5["d_ff"], t5["num_layers"], t5["num_heads"], t5["d_kv"]) == (4096, 10240, 24, 64, 64)
    assert (t5["vocab_size"], t5["feed_forward_proj"]) == (32128, "gated-gelu")
    clip = detect(key_list("CLIPTextModel_vit-l-14")).config
    assert (clip["hidden_size"], clip["num_hidden_layers"], clip["num_attention_heads"]) == (768, 12, 12)
    assert (clip["vocab_size"], clip["max_position_embeddings"], clip["intermediate_size"]) == (49408, 77, 3072)


def test_vae_configs_match_the_official_ones():
    assert detect(key_list("vae_v13")).config["encoder"]["ch_mult"] == [1, 2, 4, 4]
    assert detect(key_list("vae_v13")).config["decoder"]["num_res_blocks"] == 2
    hunyuan = detect(key_list("hunyuan_vae")).config
    assert (hunyuan["block_out_channels"], hunyuan["layers_per_block"]) == ([128, 256, 512, 512], 2)
    flux_ae = detect(key_list("flux_ae")).config
    assert (flux_ae["ch"], flux_ae["ch_mult"], flux_ae["z_channels"]) == (128, [1, 2, 4, 4], 16)
    dc_ae = detect(key_list("dc_ae")).config
    assert (dc_ae["width_list"], dc_ae["depth_list"]) == ([128, 256, 512, 512, 1024, 1024], [2, 2, 2, 3, 3, 3])
    assert dc_ae["latent_channels"] == 128
    v12 = detect(key_list("vae_v12")).config["vae_temporal"]
    assert (v12["filters"], v12["channel_multipliers"], v12["num_res_blocks"]) == (128, [1, 2, 2, 4], 4)
    assert v12["temporal_downsample"] == [False, True, True]


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "module.", "model."])
def test_common_prefixes_are_tolerated(prefix):
    info = detect({prefix + k: v for k, v in key_list("stdit_v13").items()})
    assert (info.family, info.version, info.prefix) == ("stdit3", "1.3", prefix)


def test_clip_with_text_model_prefix_and_vision_tower():
    keys = {"text_model." + k: v for k, v in key_list("CLIPTextModel_vit-l-14").items()}
    keys |= {"vision_model.embeddings.patch_embedding.weight": (1024, 3, 14, 14), "logit_scale": ()}
    info = detect(keys)
    assert (info.family, info.prefix) == ("clip_l", "text_model.")
    stripped = strip_prefix(keys, info.prefix)
    assert "embeddings.token_embedding.weight" in stripped and "logit_scale" not in stripped


def test_detect_accepts_read_header_tuples_and_state_dicts():
    shapes = key_list("flux_ae")
    as_header = {k: ("BF16", list(v)) for k, v in shapes.items()}
    as_tensors = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    assert detect(as_header).config == detect(shapes).config == detect(as_tensors).config


def test_unknown_checkpoint_lists_keys_and_families():
    with pytest.raises(ValueError) as error:
        detect({"foo.weight": (3, 3), "bar.bias": (3,)})
    message = str(error.value)
    assert "bar.bias" in message and "foo.weight" in message
    for family in FAMILIES:
        assert family in message
    with pytest.raises(ValueError, match="no tensors"):
        detect({})


def test_incomplete_checkpoint_names_the_missing_key():
    keys = {k: v for k, v in key_list("mmdit").items() if not k.startswith("txt_in")}
    keys["txt_in.weight"] = (3072, 4096)
    keys.pop("vector_in.in_layer.weight")
    with pytest.raises(ValueError, match="vector_in.in_layer.weight"):
        detect(keys)


def test_expect_family_names_found_and_expected():
    mmdit = detect(key_list("mmdit"))
    expect_family(mmdit, {"mmdit"}, "2.0 DiT loader")  # no error
    with pytest.raises(ValueError) as error:
        expect_family(mmdit, {"stdit3"}, "1.x DiT loader")
    message = str(error.value)
    assert "this is an Open-Sora 2.0 MMDiT checkpoint" in message
    assert "the 1.x DiT loader expects an Open-Sora STDiT3 (1.2/1.3)" in message
    with pytest.raises(ValueError, match="Open-Sora 1.3 STDiT3.*expects a T5 encoder or a CLIP text encoder"):
        expect_family(detect(key_list("stdit_v13")), {"clip_l", "t5"}, "text encoder loader")


# ---------------------------------------------------------------------------------------------------------------
# Detection on the tiny golden-fixture weights (their headers)

FIXTURE_FAMILIES = {
    "STDiT3": "stdit3",
    "MMDiTModel": "mmdit",
    "VideoAutoencoderPipeline": "vae_v12",
    "OpenSoraVAE_V1_3_Pipline": "vae_v13",
    "AutoencoderKLCausal3D": "hunyuan_vae",
    "DCAE": "dc_ae",
}
# config fields whose values are visible in the shapes (others are official defaults, not tiny-case values)
DERIVED = {
    "stdit3": ["in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio", "caption_channels", "model_max_length"],
    "mmdit": list(OFFICIAL_MMDIT),
    "hunyuan_vae": ["in_channels", "out_channels", "latent_channels", "layers_per_block", "block_out_channels"],
    "dc_ae": ["dotlist", "width_list"],
}


def fixture_weights() -> list[Path]:
    return sorted(CASES.glob("*/weights.safetensors"))


def test_fixture_weights_are_present():
    names = {p.parent.name for p in fixture_weights()}
    assert {"stdit3_v12_forward", "stdit3_v13_forward", "mmdit_v2_forward", "dcae_roundtrip"} <= names
    assert {"hunyuan_vae_roundtrip", "vae_v12_roundtrip", "vae_v13_roundtrip"} <= names


@pytest.mark.parametrize("weights", fixture_weights(), ids=lambda p: p.parent.name)
def test_fixture_weights_are_detected_from_their_headers(weights):
    meta = json.loads((weights.parent / "case.json").read_text())
    family = FIXTURE_FAMILIES[meta["model_class"].split(" ")[0]]
    info = detect_file(weights)
    assert info.family == family
    config = meta["model_config"]
    for name in DERIVED.get(family, []):
        assert info.config[name] == config[name], name
    if family == "stdit3":
        assert info.config["patch_size"] == tuple(config["patch_size"])
        assert info.version == ("1.3" if config.get("use_spatial_rope") else "1.2")
        if info.version == "1.3":
            assert list(info.config["kernel_size"]) == config["kernel_size"]
    if family == "vae_v13":
        for part in ("encoder", "decoder"):
            for name, value in info.config[part].items():
                assert value == config[part][name], (part, name)
    if family == "vae_v12":
        assert info.config["vae_2d"]["block_out_channels"] == config["vae_2d"]["block_out_channels"]
        derived = ["filters", "num_res_blocks", "channel_multipliers", "temporal_downsample", "in_out_channels"]
        for name in derived:
            assert info.config["vae_temporal"][name] == config["vae_temporal"][name], name


# ---------------------------------------------------------------------------------------------------------------
# Files


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    tensors = tensors or {"a.weight": torch.randn(4, 3), "b.bias": torch.arange(5, dtype=torch.float32)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return tensors


def test_load_single_file_and_header(tmp_path):
    tensors = write_checkpoint(tmp_path / "m.safetensors")
    loaded = load_state_dict(tmp_path / "m.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert read_header(tmp_path / "m.safetensors") == {"a.weight": ("F32", (4, 3)), "b.bias": ("F32", (5,))}
    (tmp_path / "m.sft").write_bytes((tmp_path / "m.safetensors").read_bytes())
    assert torch.equal(load_state_dict(tmp_path / "m.sft")["a.weight"], tensors["a.weight"])


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_state_dict("/nonexistent/model.safetensors")


def test_truncated_file_is_refused_before_reading(tmp_path):
    write_checkpoint(tmp_path / "full.safetensors", {"w": torch.randn(64, 64)})
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-1000])
    for call in (load_state_dict, read_header, detect_file):
        with pytest.raises(CheckpointError) as error:
            call(tmp_path / "cut.safetensors")
        message = str(error.value)
        assert "truncated" in message and f"{len(data)} bytes" in message and f"{len(data) - 1000} bytes" in message
    (tmp_path / "header_only.safetensors").write_bytes(data[:20])  # cut inside the JSON header
    with pytest.raises(CheckpointError, match="truncated"):
        load_state_dict(tmp_path / "header_only.safetensors")
    (tmp_path / "extra.safetensors").write_bytes(data + b"\0" * 8)
    with pytest.raises(CheckpointError, match="8 unexpected bytes"):
        load_state_dict(tmp_path / "extra.safetensors")


def test_pickle_renamed_to_safetensors_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "zip.safetensors")  # modern torch.save: a zip archive
    (tmp_path / "raw.safetensors").write_bytes(pickle.dumps({"w": [0.0, 1.0]}, protocol=2))
    for name in ("zip.safetensors", "raw.safetensors"):
        for call in (load_state_dict, read_header):
            with pytest.raises(CheckpointError, match="PyTorch pickle checkpoint, which is not loaded for safety"):
                call(tmp_path / name)


def test_other_non_safetensors_files(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_state_dict(tmp_path / "empty.safetensors")
    (tmp_path / "lfs.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\n")
    with pytest.raises(CheckpointError, match="Git LFS pointer"):
        load_state_dict(tmp_path / "lfs.safetensors")
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(CheckpointError, match="corrupt or truncated GGUF file"):
        load_state_dict(tmp_path / "model.gguf")
    header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}'
    (tmp_path / "bad.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match="needs 16 bytes but is given 8"):
        load_state_dict(tmp_path / "bad.safetensors")


def test_sharded_folder_with_index(tmp_path):
    tensors = {f"layer.{i}.weight": torch.randn(3, 2) for i in range(5)}
    folder = tmp_path / "hf"
    shards = {"model-00001-of-00002.safetensors": ["layer.0.weight", "layer.1.weight", "layer.2.weight"]}
    shards["model-00002-of-00002.safetensors"] = ["layer.3.weight", "layer.4.weight"]
    for name, keys in shards.items():
        write_checkpoint(folder / name, {k: tensors[k] for k in keys})
    weight_map = {k: name for name, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text("{}")
    loaded = load_state_dict(folder)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert len(read_header(folder)) == 5 and len(weight_files(folder)) == 2
    # without the index, a complete set of shards still loads
    (folder / "model.safetensors.index.json").unlink()
    assert load_state_dict(folder).keys() == tensors.keys()
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 2 shards"):
        load_state_dict(folder)
    # an index naming a missing shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors, which is missing"):
        load_state_dict(folder)


def test_diffusers_folder_and_truncated_shard(tmp_path):
    folder = tmp_path / "vae"
    tensors = write_checkpoint(folder / "diffusion_pytorch_model.safetensors")
    assert load_state_dict(folder).keys() == tensors.keys()
    shard = tmp_path / "sharded" / "model-00001-of-00001.safetensors"
    write_checkpoint(shard, {"w": torch.randn(32, 32)})
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        load_state_dict(shard.parent)


def test_folders_without_usable_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weights in this folder"):
        load_state_dict(tmp_path / "empty")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*not loaded for safety"):
        load_state_dict(tmp_path / "pickled")
    write_checkpoint(tmp_path / "two" / "a.safetensors")
    write_checkpoint(tmp_path / "two" / "b.safetensors")
    with pytest.raises(CheckpointError, match="several weight files.*a.safetensors, b.safetensors"):
        load_state_dict(tmp_path / "two")


def test_dtype_cast_and_scaled_fp8_dequantization(tmp_path):
    weight = torch.randn(8, 4)
    scale = weight.abs().max() / 448.0
    stored = {
        "lin.weight": (weight / scale).to(torch.float8_e4m3fn),
        "lin.scale_weight": scale.reshape(1),
        "lin.scale_input": torch.ones(1),
        "lin.bias": torch.randn(8, dtype=torch.float16),
        "plain.weight": weight.to(torch.float8_e4m3fn),
        "steps": torch.arange(3),
        "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
    }
    write_checkpoint(tmp_path / "q.safetensors", stored)
    raw = load_state_dict(tmp_path / "q.safetensors")
    assert raw["lin.weight"].dtype == torch.float8_e4m3fn and "lin.scale_weight" in raw
    cast = load_state_dict(tmp_path / "q.safetensors", dtype=torch.bfloat16)
    assert set(cast) == {"lin.weight", "lin.bias", "plain.weight", "steps"}
    expected = (stored["lin.weight"].float() * scale).to(torch.bfloat16)
    assert cast["lin.weight"].dtype == torch.bfloat16 and torch.equal(cast["lin.weight"], expected)
    assert (cast["lin.weight"].float() - weight).abs().max() < 0.1 * weight.abs().max()  # really dequantized
    assert torch.equal(cast["plain.weight"], stored["plain.weight"].to(torch.bfloat16))
    assert cast["steps"].dtype == torch.int64  # integers are never cast
    only = load_state_dict(tmp_path / "q.safetensors", dtype=torch.float32, select=lambda k: k.startswith("lin."))
    assert set(only) == {"lin.weight", "lin.bias"}
    assert is_quantized(tmp_path / "q.safetensors")
    write_checkpoint(tmp_path / "mixed.safetensors", {"a.weight": weight, "a.comfy_quant": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unreadable quantization description"):
        load_state_dict(tmp_path / "mixed.safetensors", dtype=torch.float32)


def comfy_quant(fmt: str) -> torch.Tensor:
    """A `<layer>.comfy_quant` entry as ComfyUI writes it: the layer's JSON config as uint8 bytes."""
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def test_newer_comfy_fp8_layouts_dequantize_like_the_old_one(tmp_path):
    """ComfyUI's per-layer layout (`.weight_scale`, `.input_scale`, format in `.comfy_quant` or in the header's
    `_quantization_metadata`, fp8 bytes possibly stored as uint8) gives the same tensors as the old scaled fp8."""
    weight, rows = torch.randn(8, 4), torch.randn(6, 4) * 10
    scale, row_scale = weight.abs().max() / 448.0, rows.abs().amax(1, keepdim=True) / 448.0
    fp8, fp8_rows = (weight / scale).to(torch.float8_e4m3fn), (rows / row_scale).to(torch.float8_e4m3fn)
    bias = torch.randn(8)
    old = {"lin.weight": fp8, "lin.scale_weight": scale.reshape(1), "lin.bias": bias, "scaled_fp8": torch.empty(0)}
    write_checkpoint(tmp_path / "old.safetensors", old)
    expected = load_state_dict(tmp_path / "old.safetensors", dtype=torch.float32)
    assert torch.equal(expected["lin.weight"], fp8.float() * scale)

    per_layer = {"lin.weight": fp8, "lin.weight_scale": scale, "lin.input_scale": torch.ones(()), "lin.bias": bias}
    write_checkpoint(tmp_path / "keys.safetensors", {**per_layer, "lin.comfy_quant": comfy_quant("float8_e4m3fn")})
    as_bytes = {**per_layer, "lin.weight": fp8.view(torch.uint8)}
    save_file(
        as_bytes,
        str(tmp_path / "meta.safetensors"),
        metadata={
            "_quantization_metadata": json.dumps(
                {"format_version": "1.0", "layers": {"lin": {"format": "float8_e4m3fn"}}}
            )
        },
    )
    for name in ("keys", "meta"):
        assert is_quantized(tmp_path / f"{name}.safetensors")
        loaded = load_state_dict(tmp_path / f"{name}.safetensors", dtype=torch.float32)
        assert set(loaded) == {"lin.weight", "lin.bias"}, name
        assert all(torch.equal(loaded[k], expected[k]) for k in loaded), name

    write_checkpoint(tmp_path / "rows.safetensors", {"r.weight": fp8_rows, "r.weight_scale": row_scale})
    loaded = load_state_dict(tmp_path / "rows.safetensors", dtype=torch.float32)["r.weight"]
    assert torch.equal(loaded, fp8_rows.float() * row_scale) and (loaded - rows).abs().max() < 0.1 * rows.abs().max()

    # a sharded folder whose scale sits in another shard than its weight
    folder = tmp_path / "sharded"
    write_checkpoint(folder / "model-00001-of-00002.safetensors", {"lin.weight": fp8, "lin.bias": bias})
    write_checkpoint(folder / "model-00002-of-00002.safetensors", {"lin.scale_weight": scale.reshape(1)})
    loaded = load_state_dict(folder, dtype=torch.float32)
    assert set(loaded) == {"lin.weight", "lin.bias"} and torch.equal(loaded["lin.weight"], expected["lin.weight"])

    write_checkpoint(tmp_path / "plain.safetensors", {"lin.weight": fp8, "lin.bias": bias})  # fp8, not scaled
    assert not is_quantized(tmp_path / "plain.safetensors")


def test_packed_matrices_expand_to_exactly_the_dense_load(tmp_path):
    """load_state_dict(pack=...) keeps fp8 (every ComfyUI layout, scaled tensor-wise, per row or not at all) and
    16-bit matrices as float rows; expanded, each equals the dense load's tensor bit for bit, in float32 and bf16.
    `pack` is asked with the stored dtype and whether the matrix has a scale; what it declines stays dense."""
    weight, rows = torch.randn(8, 4), torch.randn(6, 4) * 10
    scale, row_scale = weight.abs().max() / 448.0, rows.abs().amax(1, keepdim=True) / 448.0
    fp8, fp8_rows = (weight / scale).to(torch.float8_e4m3fn), (rows / row_scale).to(torch.float8_e5m2)
    files = {
        "old": {"lin.weight": fp8, "lin.scale_weight": scale.reshape(1), "scaled_fp8": torch.empty(0)},
        "keys": {"lin.weight": fp8, "lin.weight_scale": scale, "lin.comfy_quant": comfy_quant("float8_e4m3fn")},
        "rows": {"r.weight": fp8_rows, "r.weight_scale": row_scale, "r.comfy_quant": comfy_quant("float8_e5m2")},
        "plain_fp8": {"lin.weight": fp8},
        "fp16": {"lin.weight": weight.half()},
        "bf16": {"lin.weight": weight.bfloat16()},
        "mixed16": {"lin.weight": weight.bfloat16(), "lin.scale_weight": scale.reshape(1)},  # scaled, not fp8
    }
    save_file(
        {"lin.weight": fp8.view(torch.uint8), "lin.weight_scale": scale, "lin.bias": torch.randn(8)},
        str(tmp_path / "meta.safetensors"),
        metadata={"_quantization_metadata": json.dumps({"layers": {"lin": {"format": "float8_e4m3fn"}}})},
    )
    for name, tensors in files.items():
        write_checkpoint(tmp_path / f"{name}.safetensors", {**tensors, "lin.bias": torch.randn(8)})
    asked = {}
    for name in [*files, "meta"]:
        path = tmp_path / f"{name}.safetensors"
        for dtype in (torch.float32, torch.bfloat16):
            dense = load_state_dict(path, dtype=dtype)
            kept = load_state_dict(
                path, dtype=dtype, pack=lambda stored, scaled, n=name: asked.setdefault(n, (stored, scaled)) and True
            )
            assert set(kept) == set(dense), name
            matrix = "r.weight" if name == "rows" else "lin.weight"
            if name == "mixed16":  # a scale on a 16-bit matrix: dense (weight x scale), never offered to pack
                assert torch.equal(kept[matrix], dense[matrix]) and name not in asked, name
                continue
            assert isinstance(kept[matrix], QuantizedWeight), name
            assert torch.equal(kept[matrix].dequantize(dtype), dense[matrix]), (name, dtype)
            assert torch.equal(kept["lin.bias"], dense["lin.bias"]), name  # only matrices are packed
    assert asked["old"] == asked["keys"] == asked["meta"] == (torch.float8_e4m3fn, True)
    assert asked["rows"] == (torch.float8_e5m2, True) and asked["plain_fp8"] == (torch.float8_e4m3fn, False)
    assert asked["fp16"] == (torch.float16, False)
    declined = load_state_dict(tmp_path / "old.safetensors", dtype=torch.float32, pack=lambda stored, scaled: False)
    assert torch.equal(
        declined["lin.weight"], load_state_dict(tmp_path / "old.safetensors", dtype=torch.float32)["lin.weight"]
    )
    assert packed_linear.row_bytes("F8_E4M3", 4) == 4 + 4 and packed_linear.row_bytes("F16", 4) == 8


def test_quantized_formats_it_cannot_read_are_refused_by_name(tmp_path):
    weight = torch.randn(4, 4).to(torch.float8_e4m3fn)
    nvfp4 = {
        "lin.weight": weight.view(torch.uint8),
        "lin.weight_scale": torch.ones(1),
        "lin.comfy_quant": comfy_quant("nvfp4"),
    }
    write_checkpoint(tmp_path / "nvfp4.safetensors", nvfp4)
    with pytest.raises(CheckpointError, match="'lin' is quantized as 'nvfp4'.*float8_e4m3fn, float8_e5m2"):
        load_state_dict(tmp_path / "nvfp4.safetensors", dtype=torch.bfloat16)
    for name, scale in (("odd", torch.ones(3)), ("rows_1d", torch.ones(4))):  # [4] would scale columns silently
        write_checkpoint(tmp_path / f"{name}.safetensors", {"lin.weight": weight, "lin.scale_weight": scale})
        with pytest.raises(CheckpointError, match=rf"scale of 'lin.weight' has shape \({len(scale)},\).*\(4, 4\)"):
            load_state_dict(tmp_path / f"{name}.safetensors", dtype=torch.bfloat16)
