"""Open-Sora 2.0 Video DC-AE: golden parity, checkpoint layout, config, tiling, operations seam, input errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from opensora_lib.dcae import DCAE, DCAEConfig, dc_ae_f32t4c128_config
from opensora_lib.fixtures import run_path
from opensora_lib.fixtures.dcae_cases import _matches

CASE = Path(__file__).parent / "fixtures" / "opensora" / "dcae_roundtrip"
KEYS = Path(__file__).parent / "fixtures" / "reference_keys" / "dc_ae.txt"  # copy of the reference keys list


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _case_config(**overrides) -> DCAEConfig:
    config = DCAEConfig.from_dict(json.loads((CASE / "case.json").read_text())["model_config"])
    return dataclasses.replace(config, **overrides)


def _case_model(dtype=None, **overrides) -> DCAE:
    model = DCAE(_case_config(**overrides), dtype=dtype).eval()
    weights = {k: v.float() for k, v in load_file(str(CASE / "weights.safetensors")).items()}
    model.load_state_dict(weights, strict=True)
    return model


@pytest.fixture(scope="module")
def model() -> DCAE:
    return _case_model()


# -- parity and layout ---------------------------------------------------------------------------------------


def test_golden_roundtrip_passes():
    comparisons = run_path(CASE)
    names = {c.name for c in comparisons}
    assert {"ttiled.latent", "ttiled.decoded", "small.latent", "small.decoded"} <= names
    assert {"ttiled.encode.temporal_tiling_active", "small.decode.temporal_tiling_active"} <= names
    failed = [(c.name, c.max_abs, c.detail) for c in comparisons if not c.passed]
    assert not failed, failed


def test_runner_matches_case_content_not_folder_name():
    meta = json.loads((CASE / "case.json").read_text())
    assert _matches(meta)
    assert _matches({"model_class": "DCAE", "model_config": {"model_name": "dc-ae-f32t4c128"}})
    assert not _matches({**meta, "model_class": "AutoencoderKLCausal3D (CausalVAE3D_HUNYUAN)"})
    assert not _matches({"model_class": "DCAE", "model_config": {"width_list": [8]}})


def test_full_size_meta_state_dict_matches_official_keys():
    model = DCAE(device="meta")
    expected = {}
    for line in KEYS.read_text().splitlines()[1:]:
        key, shape, _dtype = line.split("\t")
        expected[key] = [int(v) for v in shape.strip("[]").split(",") if v.strip()]
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert sum(v.numel() for v in model.state_dict().values()) == 459_462_147  # "459.5M"


def test_full_size_config_is_the_official_inference_setup():
    config = dc_ae_f32t4c128_config()
    assert (config.latent_channels, config.time_compression_ratio, config.spatial_compression_ratio) == (128, 4, 32)
    assert config.encoder.width_list == (128, 256, 512, 512, 1024, 1024)
    assert config.encoder.depth_list == (2, 2, 2, 3, 3, 3) and config.decoder.depth_list == (3,) * 6
    assert config.encoder.block_type == ("ResBlock",) * 3 + ("EViTS5_GLU",) * 3
    assert config.encoder.temporal_downsample == (False, False, False, True, True, False)
    assert config.decoder.out_act == "relu"  # the DecoderConfig default; the dot-list does not set it
    assert config.encoder.in_channels == 3 and config.decoder.latent_channels == 128  # the ${..x} interpolation
    # high_compression.py: tiles 256 px / 32 frames, overlap 0.25, scaling_factor not set (Q12)
    assert (config.use_spatial_tiling, config.use_temporal_tiling) == (True, True)
    assert (config.spatial_tile_size, config.temporal_tile_size, config.tile_overlap_factor) == (256, 32, 0.25)
    assert config.scaling_factor is None
    model = DCAE(device="meta")
    assert (model.spatial_tile_latent_size, model.temporal_tile_latent_size) == (8, 8)
    assert model.latent_size(128, 768, 1280) == (32, 24, 40)
    assert model.latent_size(1, 32, 32) == (1, 1, 1) and model.latent_size(2, 64, 32) == (1, 2, 1)


def test_config_detected_from_checkpoint_keys_builds_the_released_model():
    from opensora_lib.detection import detect

    shapes = {}
    for line in KEYS.read_text().splitlines()[1:]:
        key, shape, _dtype = line.split("\t")
        shapes[key] = tuple(int(v) for v in shape.strip("[]").split(",") if v.strip())
    config = DCAEConfig.from_dict(detect(shapes).config)
    assert config == dc_ae_f32t4c128_config()


def test_case_dotlist_merges_onto_official_defaults():
    config = _case_config()
    assert config.encoder.width_list == (8, 16, 16, 32, 32, 32) and config.latent_channels == 32
    assert config.temporal_tile_size == 16 and config.scaling_factor is None
    assert config.decoder.upsample_match_channel and config.encoder.out_shortcut == "averaging"  # defaults kept
    with pytest.raises(ValueError, match="unknown DC-AE config keys.*encoder.widths"):
        DCAEConfig.from_dotlist(["encoder.widths=[1,2]"])
    with pytest.raises(ValueError, match="not key=value"):
        DCAEConfig.from_dotlist(["latent_channels"])
    with pytest.raises(ValueError, match="model_name 'dc-ae-f64' is not supported"):
        DCAEConfig.from_dict({"model_name": "dc-ae-f64"})


# -- behaviour -----------------------------------------------------------------------------------------------


def test_operations_seam_builds_every_conv_and_casts_norms():
    made = []

    class RecordingConv3d(nn.Conv3d):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    operations = SimpleNamespace(
        Linear=nn.Linear,
        Conv2d=nn.Conv2d,
        Conv3d=RecordingConv3d,
        LayerNorm=nn.LayerNorm,
        GroupNorm=nn.GroupNorm,
        Embedding=nn.Embedding,
    )
    model = DCAE(_case_config(), dtype=torch.bfloat16, device="meta", operations=operations)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    assert convs and all(isinstance(m, RecordingConv3d) for m in convs) and len(made) == len(convs)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_bfloat16_model_runs_close_to_the_float32_reference():
    model = _case_model(dtype=torch.bfloat16)
    io = load_file(str(CASE / "io.safetensors"))
    latent = model.encode(io["small.x"].bfloat16())
    decoded = model.decode(io["small.latent"].bfloat16())
    assert latent.dtype == decoded.dtype == torch.bfloat16
    assert (latent.float() - io["small.latent"]).abs().max() < 0.05  # latent magnitude ~2.4
    assert (decoded.float() - io["small.decoded"]).abs().max() < 0.01


def test_scaling_factor_divides_on_encode_and_multiplies_on_decode(model):
    # Official encode_single / decode_single; None (the inference config) leaves latents unscaled.
    torch.manual_seed(0)
    x = torch.rand(1, 3, 4, 32, 32) * 2 - 1
    z, decoded = model.encode(x), model.decode(torch.ones(1, 32, 1, 1, 1))
    model.scaling_factor = 0.5
    try:
        assert torch.allclose(model.encode(x), z / 0.5, atol=1e-6)
        assert torch.allclose(model.decode(torch.full((1, 32, 1, 1, 1), 2.0)), decoded, atol=1e-5)
    finally:
        model.scaling_factor = None


def test_one_latent_frame_decodes_to_one_frame_like_the_reference(model):
    # Temporal up/downsampling is skipped for a single frame (official): 4 frames -> 1 latent -> 1 frame.
    x = torch.rand(1, 3, 4, 32, 32) * 2 - 1
    z = model.encode(x)
    assert z.shape == (1, 32, 1, 1, 1)
    assert model.decode(z).shape == (1, 3, 1, 32, 32)
    assert model.encode(x[:, :, :1]).shape == (1, 32, 1, 1, 1)


def test_batch_items_are_encoded_independently(model):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 32, 32) * 2 - 1
    both = model.encode(x)
    assert torch.allclose(both[1:], model.encode(x[1:]), atol=1e-6)


# -- tiling geometry and blending (fake encoders, so any bug in positions or ramps shows exactly) --------------


def _spatial_model(**overrides) -> DCAE:
    # Tile 128 px (4 latents), overlap 0.5: tiles every 64 px / 2 latents, blend 2 latents or 64 px.
    return DCAE(_case_config(spatial_tile_size=128, tile_overlap_factor=0.5, **overrides), device="meta")


def test_spatial_tiling_of_a_position_wise_encoder_changes_nothing():
    model = _spatial_model()
    model._encode_items = lambda x: F.avg_pool3d(x, (4, 32, 32)).repeat(1, 11, 1, 1, 1)[:, :32]
    x = torch.randn(1, 3, 8, 192, 256)
    tiled = model.encode(x)
    model.use_spatial_tiling = False
    assert tiled.shape == (1, 32, 2, 6, 8)
    assert torch.allclose(tiled, model.encode(x), atol=1e-6)


def _recording(make):
    calls = []

    def fn(x):
        out = make(x)
        calls.append(out.clone())
        return out

    return fn, calls


def _loop_blend(grid: list[list[torch.Tensor]], extent: int, keep: int) -> torch.Tensor:
    """The reference rule written element by element: in row-major order, each tile's first rows / columns are
    faded in (weight k/extent) from the end of its already-blended upper / left neighbour; keep keep x keep."""
    grid = [[t.clone() for t in row] for row in grid]
    for i, row in enumerate(grid):
        for j, tile in enumerate(row):
            if i > 0:
                above = grid[i - 1][j]
                e = min(above.shape[3], tile.shape[3], extent)
                for k in range(e):
                    tile[:, :, :, k] = above[:, :, :, k - e] * (1 - k / e) + tile[:, :, :, k] * (k / e)
            if j > 0:
                left = row[j - 1]
                e = min(left.shape[4], tile.shape[4], extent)
                for k in range(e):
                    tile[..., k] = left[..., k - e] * (1 - k / e) + tile[..., k] * (k / e)
    return torch.cat([torch.cat([t[:, :, :, :keep, :keep] for t in row], dim=4) for row in grid], dim=3)


def test_spatial_tiled_encode_blends_like_the_reference_rule():
    model = _spatial_model()
    generator = torch.Generator().manual_seed(1)
    model._encode_items, calls = _recording(
        lambda x: torch.randn(x.shape[0], 32, x.shape[2] // 4, x.shape[3] // 32, x.shape[4] // 32, generator=generator)
    )
    out = model.encode(torch.zeros(1, 3, 4, 192, 224))  # tiles: H at 0/64/128 px, W at 0/64/128/192 px
    assert len(calls) == 12
    grid = [calls[i * 4 : i * 4 + 4] for i in range(3)]
    assert out.shape == (1, 32, 1, 6, 7)
    assert torch.allclose(out, _loop_blend(grid, extent=2, keep=2), atol=1e-6)


def test_spatial_tiled_decode_blends_like_the_reference_rule():
    model = _spatial_model()
    generator = torch.Generator().manual_seed(2)
    model._decode_items, calls = _recording(
        lambda z: torch.randn(z.shape[0], 3, z.shape[2] * 4, z.shape[3] * 32, z.shape[4] * 32, generator=generator)
    )
    out = model.decode(torch.zeros(1, 32, 1, 5, 6))  # latent tiles of 4 every 2: H at 0/2/4, W at 0/2/4
    assert len(calls) == 9
    grid = [calls[i * 3 : i * 3 + 3] for i in range(3)]
    assert out.shape == (1, 3, 4, 160, 192)
    assert torch.allclose(out, _loop_blend(grid, extent=64, keep=64), atol=1e-6)


def test_real_model_spatial_tiles_have_consistent_shapes():
    model = _case_model(spatial_tile_size=64, tile_overlap_factor=0.5)
    z = model.encode(torch.rand(1, 3, 4, 64, 96) * 2 - 1)  # 2 x 3 tiles of 64 px
    assert z.shape == (1, 32, 1, 2, 3) and torch.isfinite(z).all()
    x = model.decode(z)
    assert x.shape == (1, 3, 1, 64, 96) and torch.isfinite(x).all()


# -- input errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 3, 4, 48, 32), (1, 3, 4, 32, 40), (1, 3, 4, 16, 32)])
def test_spatial_sizes_must_be_multiples_of_32(model, shape):
    with pytest.raises(ValueError, match="positive multiples of 32"):
        model.encode(torch.zeros(shape))


@pytest.mark.parametrize("frames", [3, 6, 10])
def test_frame_counts_must_pass_the_temporal_downsampling(model, frames):
    with pytest.raises(ValueError, match=f"cannot encode {frames} frames: use a multiple of 4 frames"):
        model.encode(torch.zeros(1, 3, frames, 32, 32))


def test_bad_tensors_raise_clear_errors(model):
    with pytest.raises(ValueError, match=r"expects a float tensor \[B, 3, T, H, W\]"):
        model.encode(torch.zeros(3, 4, 32, 32))
    with pytest.raises(ValueError, match="expects 3 pixels"):
        model.encode(torch.zeros(1, 4, 4, 32, 32))
    with pytest.raises(ValueError, match="expects 32 latent channels"):
        model.decode(torch.zeros(1, 16, 2, 1, 1))
    with pytest.raises(ValueError, match="float tensor"):
        model.decode(torch.zeros(1, 32, 2, 1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="frame count >= 1"):
        model.latent_size(0, 32, 32)


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="temporal_tile_size 18 .* multiples of the compression 4"):
        DCAE(_case_config(temporal_tile_size=18), device="meta")
    with pytest.raises(ValueError, match="spatial_tile_size 96 .* multiples of the compression 32"):
        DCAE(_case_config(spatial_tile_size=96), device="meta")  # step int(96 * 0.75) = 72
    with pytest.raises(ValueError, match="tile_overlap_factor must be in"):
        DCAE(_case_config(tile_overlap_factor=1.0), device="meta")
    with pytest.raises(ValueError, match="only the video DC-AE"):
        DCAE(DCAEConfig(), device="meta")
    config = _case_config()
    with pytest.raises(ValueError, match="block_type 'MBConv' is not supported"):
        DCAE(dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, block_type="MBConv")))
    with pytest.raises(ValueError, match="time_compression_ratio 8"):
        DCAE(dataclasses.replace(config, time_compression_ratio=8), device="meta")
