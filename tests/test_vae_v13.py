"""Open-Sora 1.3 VAE: golden-fixture parity, checkpoint layout, chunking, spatial tiling, input errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers_torch import no_grad  # noqa: F401 (autouse fixtures)

from opensora_lib.fixtures import run_path
from opensora_lib.vae_v13 import VIDEO_LATENT_MEAN, OpenSoraVAEv13, VAEv13Config
from opensora_lib.vae_v13_layers import blend_tiles

CASE = Path(__file__).parent / "fixtures" / "opensora" / "vae_v13_roundtrip"
KEYS = Path(__file__).parent / "fixtures" / "reference_keys" / "vae_v13.txt"  # copy of the reference keys list


@pytest.fixture(scope="module")
def small_model() -> OpenSoraVAEv13:
    return _small_model()


def _small_model(seed: int = 0, **overrides) -> OpenSoraVAEv13:
    """ch 32 (GroupNorm needs 32 groups), one channel width, one block per decoder level: fast on CPU."""
    torch.manual_seed(seed)
    return OpenSoraVAEv13(VAEv13Config.from_dict({**_architecture(), **overrides})).eval()


def _architecture() -> dict:
    architecture = {"ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 0}
    return {"encoder": dict(architecture), "decoder": dict(architecture)}


def test_golden_roundtrip_passes():
    comparisons = run_path(CASE)
    names = {c.name for c in comparisons}
    expected = {"det.latent", "det.decoded", "sampled.latent", "det.encoder_moments", "det.encoder_moments#1"}
    assert expected <= names
    failed = [(c.name, c.max_abs, c.detail) for c in comparisons if not c.passed]
    assert not failed, failed


def test_full_size_meta_state_dict_matches_official_keys():
    model = OpenSoraVAEv13(device="meta")
    expected = {}
    for line in KEYS.read_text().splitlines()[1:]:
        key, shape, _dtype = line.split("\t")
        expected[key] = [int(v) for v in shape.strip("[]").split(",") if v.strip()]
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert sum(v.numel() for v in model.state_dict().values()) == 259_163_811


def test_config_from_released_style_json_applies_video_normalisation():
    # config.json carries only the architecture plus HF metadata; "video" must still apply (Q26).
    released = {
        "architectures": ["OpenSoraVAE_V1_3_Pipline"],
        "model_type": "OpenSoraVAE_V1_3_Pipline",
        "torch_dtype": "bfloat16",
        "encoder": {"type": "VideoEncoder", "ch": 128, "ch_mult": [1, 2, 4, 4], "z_channels": 16, "double_z": True},
        "decoder": {"type": "VideoDecoder", "ch": 128, "ch_mult": [1, 2, 4, 4], "temporal_up_layers": [2, 3]},
    }
    config = VAEv13Config.from_dict(released)
    assert config.normalization == "video"
    assert config.micro_frame_size == 17 and config.temporal_overlap and config.micro_z_frame_size == 5
    assert config.encoder.ch_mult == (1, 2, 4, 4) and config.decoder.num_res_blocks == 2
    model = OpenSoraVAEv13(config, device="meta")
    z = torch.zeros(1, 16, 1, 1, 1)
    assert torch.allclose(model.unnormalize_latent(z)[0, :, 0, 0, 0], torch.tensor(VIDEO_LATENT_MEAN))


def test_reference_frames_follow_the_official_trim():
    """collect_references_batch (v1.3) keeps (T - 1) // 16 * 16 + 1 frames of a reference video (micro 17, overlap)."""
    model = OpenSoraVAEv13(device="meta")
    table = {1: 1, 6: 1, 16: 1, 17: 17, 20: 17, 33: 33, 40: 33, 113: 113}
    assert {n: model.reference_frames(n) for n in table} == table


def test_latent_frames_follow_the_reference_helper():
    model = OpenSoraVAEv13(device="meta")
    table = {1: 1, 2: 0, 16: 0, 17: 5, 18: 5, 33: 10, 49: 15, 113: 35, 129: 40}
    assert {n: model.latent_frames(n) for n in table} == table
    assert model.latent_size(17, 720, 1280) == (5, 90, 160)
    assert model.latent_size(17, 832, 1110) == (5, 104, 139)


def _record_calls(module: torch.nn.Module, calls: list) -> torch.utils.hooks.RemovableHandle:
    # Clones: the pipeline averages the boundary frame into the previous chunk's output in place.
    return module.register_forward_hook(lambda _m, args, out: calls.append((args[0].clone(), out.clone())))


def test_chunking_matches_encoder_calls_and_boundary_average(small_model):
    model = small_model
    torch.manual_seed(1)
    x = torch.rand(1, 3, 33, 12, 20) * 2 - 1
    encoder_calls: list = []
    handle = _record_calls(model.encoder, encoder_calls)
    latent = model.encode(x, sample_posterior=False)
    handle.remove()
    assert latent.shape == (1, 16, 10, 2, 3) and model.latent_size(33, 12, 20) == (10, 2, 3)
    assert [tuple(args.shape) for args, _ in encoder_calls] == [(1, 3, 17, 12, 20)] * 2
    assert torch.equal(encoder_calls[0][0], x[:, :, :17]) and torch.equal(encoder_calls[1][0], x[:, :, 16:])
    means = torch.cat([out[:, :16] for _, out in encoder_calls], dim=2)
    torch.testing.assert_close(latent, model.normalize_latent(means), rtol=0, atol=0)

    decoder_calls: list = []
    handle = _record_calls(model.decoder, decoder_calls)
    decoded = model.decode(latent)
    handle.remove()
    raw = model.unnormalize_latent(latent)
    assert torch.equal(decoder_calls[0][0], raw[:, :, :5]) and torch.equal(decoder_calls[1][0], raw[:, :, 5:])
    head, tail = decoder_calls[0][1], decoder_calls[1][1]
    assert head.shape == tail.shape == (1, 3, 17, 16, 24)
    assert decoded.shape == (1, 3, 33, 16, 24)  # Q5: 8 x latent, never cropped back to 12 x 20
    torch.testing.assert_close(decoded[:, :, :16], head[:, :, :16], rtol=0, atol=0)
    torch.testing.assert_close(decoded[:, :, 16], 0.5 * (head[:, :, 16] + tail[:, :, 0]), rtol=0, atol=0)
    torch.testing.assert_close(decoded[:, :, 17:], tail[:, :, 1:], rtol=0, atol=0)
    torch.testing.assert_close(model.decode(latent[:, :, :5], num_frames=10), head[:, :, :10], rtol=0, atol=0)
    assert model.decode(latent[:, :, :1], num_frames=5).shape[2] == 1  # never padded (inference passes t_cut*17//5)


def test_image_and_sampled_encode(small_model):
    model = small_model
    image = torch.rand(2, 3, 1, 16, 24) * 2 - 1
    assert model.encode(image, sample_posterior=False).shape == (2, 16, 1, 2, 3)
    assert model.decode(model.encode(image, sample_posterior=False)).shape == (2, 3, 1, 16, 24)
    torch.manual_seed(7)
    drawn = model.encode(image)
    torch.manual_seed(7)
    again = model.encode(image)
    torch.testing.assert_close(drawn, again, rtol=0, atol=0)
    zero = model.encode(image, noise=lambda shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device))
    torch.testing.assert_close(zero, model.encode(image, sample_posterior=False), rtol=0, atol=0)
    assert not torch.equal(drawn, zero)


def test_blend_tiles_is_exact_for_a_local_map():
    torch.manual_seed(2)
    x = torch.randn(1, 3, 2, 13, 18)

    def local(t: torch.Tensor) -> torch.Tensor:  # x4 nearest in H, W: no cross-pixel mixing
        return F.interpolate(t, scale_factor=(1, 4, 4), mode="nearest") * 2 + 1

    expected = local(x)
    for tile, overlap in [(4, 1), (5, 2), (6, 3), (13, 0), (30, 5)]:
        torch.testing.assert_close(blend_tiles(x, local, tile, overlap, 4), expected, rtol=1e-6, atol=1e-6)


def test_spatial_tiled_decode_is_close_to_untiled():
    model = _small_model(seed=3, spatial_tile_size=10, spatial_tile_overlap=4)
    torch.manual_seed(4)
    z = torch.randn(1, 16, 1, 12, 16)
    untiled = model.decode(z, spatial_tile_size=16)  # a tile as large as the latent is the untiled path
    assert untiled.shape == (1, 3, 1, 96, 128)
    model.config.spatial_tile_size = None
    torch.testing.assert_close(model.decode(z), untiled, rtol=0, atol=0)
    model.config.spatial_tile_size = 10
    tiled = model.decode(z)
    assert tiled.shape == untiled.shape and torch.isfinite(tiled).all()
    # conv_in, the mid attention and the deepest stage run untiled; per-tile GroupNorm statistics and tile-border
    # zero padding in the high-resolution stages remain (about 8% of the mean magnitude on this random model).
    relative = (tiled - untiled).abs().mean() / untiled.abs().mean()
    assert relative < 0.12, relative
    shifted = torch.roll(untiled, shifts=8, dims=4)  # what a misplaced tile would look like
    assert (tiled - untiled).abs().mean() < 0.25 * (shifted - untiled).abs().mean()


@pytest.mark.parametrize(
    "shape, match",
    [
        ((3, 17, 16, 16), r"video tensor \[B, 3, T, H, W\]"),
        ((1, 4, 17, 16, 16), "expects 3 channels"),
        ((1, 3, 0, 16, 16), "T >= 1"),
        ((1, 3, 17, 1, 16), "H, W >= 2"),
    ],
)
def test_encode_rejects_bad_shapes(small_model, shape, match):
    with pytest.raises(ValueError, match=match):
        small_model.encode(torch.zeros(shape))


@pytest.mark.parametrize(
    "shape, match",
    [
        ((16, 5, 3, 4), r"latent \[B, 16, T, H, W\]"),
        ((1, 4, 5, 3, 4), "16 latent channels"),
        ((1, 16, 0, 3, 4), "non-empty"),
    ],
)
def test_decode_rejects_bad_shapes(small_model, shape, match):
    with pytest.raises(ValueError, match=match):
        small_model.decode(torch.zeros(shape))


def test_other_bad_inputs(small_model):
    with pytest.raises(ValueError, match="encode expects a float"):
        small_model.encode(torch.zeros(1, 3, 17, 16, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_frames must be None or an int >= 1"):
        small_model.decode(torch.zeros(1, 16, 5, 3, 4), num_frames=0)
    with pytest.raises(ValueError, match="num_frames must be an int >= 1"):
        small_model.latent_frames(0)
    with pytest.raises(ValueError, match=r"noise returned shape \(1, 16\), expected \(1, 16, 1, 2, 3\)"):
        small_model.encode(torch.zeros(1, 3, 1, 16, 24), noise=lambda shape, dtype, device: torch.zeros(1, 16))
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 3\]"):
        small_model.decode(torch.zeros(1, 16, 5, 6, 6), spatial_tile_size=4, spatial_tile_overlap=4)
    with pytest.raises(ValueError, match="normalization 'image' is not supported"):
        VAEv13Config.from_dict({"normalization": "image"})
    with pytest.raises(ValueError, match="only 'VideoEncoder' is supported"):
        VAEv13Config.from_dict({"encoder": {"type": "VideoEncoderV2"}})


def test_bf16_runs_close_to_float32():
    model = _small_model(seed=5)
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    latent = model.encode(x, sample_posterior=False)
    decoded = model.decode(latent)
    half = _small_model(seed=5).to(torch.bfloat16)
    latent_bf16 = half.encode(x.bfloat16(), sample_posterior=False)
    decoded_bf16 = half.decode(latent_bf16)
    assert latent_bf16.dtype == decoded_bf16.dtype == torch.bfloat16
    assert (latent_bf16.float() - latent).abs().mean() < 0.05 * latent.abs().mean()
    assert (decoded_bf16.float() - decoded).abs().mean() < 0.05 * decoded.abs().mean()
