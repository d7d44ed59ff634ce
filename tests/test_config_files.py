"""A damaged config.json in a model folder is named with what is wrong in it (audit 23: a bare JSONDecodeError,
"'list' object is not a mapping" or "not all arguments converted during string formatting" before)."""

from __future__ import annotations

import pytest
from helpers_tiny_text import save_t5, tiny_t5_model

from opensora_lib.configs import read_config_json
from opensora_lib.mmdit import MMDiTConfig
from opensora_lib.stdit3 import STDiT3Config
from opensora_lib.text_encoders import load_t5
from opensora_lib.vae_v12 import VAEv12Config
from opensora_lib.vae_v13 import VAEv13Config


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"{", "is not valid JSON: Expecting property name enclosed in double quotes at line 1, column 2"),
        (b"", "is not valid JSON: Expecting value at line 1, column 1"),
        (b'{\n  "depth": 2,\n}', "at line 3, column 1"),  # the message before it differs between Pythons
        (b"[1, 2]", "must hold a JSON object of config fields ({...}), not a list"),
        (b'"text"', "not a str"),
        (b"\xff\xfe{}", "is not a text file"),
    ],
)
def test_unreadable_config_json_is_named(tmp_path, content, expected):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ValueError) as error:
        read_config_json(tmp_path)
    assert str(tmp_path / "config.json") in str(error.value) and expected in str(error.value), error.value


def test_a_folder_without_config_json_or_a_file_gives_none(tmp_path):
    assert read_config_json(tmp_path) is None
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert read_config_json(tmp_path / "model.safetensors") is None
    (tmp_path / "config.json").write_text('{"depth": 2}')
    assert read_config_json(tmp_path) == {"depth": 2}


MMDIT = {
    "in_channels": 4,
    "vec_in_dim": 8,
    "context_in_dim": 8,
    "hidden_size": 32,
    "mlp_ratio": 4,  # an int where a float is asked: JSON writes 4.0 as 4 too
    "num_heads": 2,
    "depth": 1,
    "depth_single_blocks": 1,
    "axes_dim": [4, 6, 6],
    "theta": 10000,
    "qkv_bias": True,
    "guidance_embed": False,
}


@pytest.mark.parametrize(
    ("build", "values", "expected"),
    [
        (STDiT3Config.from_dict, {"hidden_size": "wide"}, "STDiT3 config: hidden_size must be int, got 'wide'"),
        (STDiT3Config.from_dict, {"depth": 2.5}, "STDiT3 config: depth must be int, got 2.5"),
        (STDiT3Config.from_dict, {"qk_norm": "yes"}, "qk_norm must be bool, got 'yes'"),
        (STDiT3Config.from_dict, {"patch_size": [1, "2", 2]}, "patch_size must be tuple[int, int, int], got"),
        (STDiT3Config.from_dict, {"kernel_size": 8}, "kernel_size must be tuple[int, int, int] | None, got 8"),
        (MMDiTConfig.from_dict, {**MMDIT, "num_heads": None}, "MMDiT config: num_heads must be int, got None"),
        (MMDiTConfig.from_dict, {**MMDIT, "axes_dim": "4,6,6"}, "axes_dim must be list[int], got '4,6,6'"),
        (VAEv13Config.from_dict, {"micro_frame_size": "17"}, "VAE 1.3 config: micro_frame_size must be int | None"),
        (VAEv13Config.from_dict, {"decoder": {"ch_mult": "1248"}}, "VAE 1.3 VideoDecoder config: ch_mult must be"),
        (VAEv12Config.from_dict, {"micro_frame_size": [17]}, "VideoAutoencoderPipeline config: micro_frame_size"),
        (VAEv12Config.from_dict, {"vae_temporal": {"embed_dim": "4"}}, "temporal VAE config: embed_dim must be int"),
        (VAEv12Config.from_dict, {"vae_2d": {"latent_channels": 4.0}}, "AutoencoderKL config: latent_channels must"),
    ],
)
def test_config_values_of_the_wrong_type_are_named(build, values, expected):
    with pytest.raises(ValueError) as error:
        build(values)
    assert expected in str(error.value), error.value


def test_configs_of_the_right_types_still_build():
    assert STDiT3Config.from_dict({"hidden_size": 96, "patch_size": [1, 2, 2], "kernel_size": None}).hidden_size == 96
    assert MMDiTConfig.from_dict(MMDIT).mlp_ratio == 4
    assert VAEv13Config.from_dict({"micro_frame_size": None}).micro_frame_size is None


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"{", "is not valid JSON"), (b'{"d_model": "wide"}', "the text config: d_model must be int, got 'wide'")],
)
def test_a_t5_folder_with_a_damaged_config_is_named(tmp_path, content, expected):
    folder = save_t5(tiny_t5_model(), tmp_path / "t5")
    (folder / "config.json").write_bytes(content)
    with pytest.raises(ValueError) as error:
        load_t5(folder)
    assert str(folder / "config.json") in str(error.value) and expected in str(error.value), error.value
