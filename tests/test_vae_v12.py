"""Open-Sora 1.2 VAE: golden-fixture parity, checkpoint layout, tiling, input errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers_torch import no_grad  # noqa: F401 (autouse fixtures)
from torch import nn

from opensora_lib.fixtures import run_path
from opensora_lib.fixtures.runner import load_case
from opensora_lib.fixtures.vae_v12_cases import build_model
from opensora_lib.vae_kl2d import AutoencoderKLConfig, tiled_apply
from opensora_lib.vae_temporal import VAETemporalConfig
from opensora_lib.vae_v12 import OpenSoraVAEv12, VAEv12Config

CASE = Path(__file__).parent / "fixtures" / "opensora" / "vae_v12_roundtrip"
KEYS = CASE / "reference_keys_vae_v12.txt"  # copy of /work/shared/reference/keys/vae_v12.txt


@pytest.fixture(scope="module")
def fixture_model() -> OpenSoraVAEv12:
    return build_model(load_case(CASE))


def _small_model(seed: int = 0, operations=None, **vae_2d) -> OpenSoraVAEv12:
    config = VAEv12Config.from_dict(
        {
            "vae_2d": {"block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4, **vae_2d},
            "vae_temporal": {"filters": 8, "num_res_blocks": 1, "num_groups": 4},
        }
    )
    torch.manual_seed(seed)
    return OpenSoraVAEv12(config, operations=operations).eval()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- parity with the official pipeline


def test_fixture_case_passes():
    comparisons = run_path(CASE)
    names = {c.name for c in comparisons}
    assert {"det.latent", "det.decoded", "sampled.latent", "det.spatial_latent_scaled", "det.temporal_moments"} <= names
    failed = [(c.name, c.max_abs, c.detail) for c in comparisons if not c.passed]
    assert not failed, failed
    assert max(c.max_abs for c in comparisons) < 1e-4  # the reference's own fp32-vs-fp64 error is ~9e-6


def test_sampled_encode_draws_in_reference_order(fixture_model):
    shapes = []

    def noise(shape, dtype, device):
        shapes.append(tuple(shape))
        return torch.randn(shape, dtype=dtype, device=device)

    z = fixture_model.encode(torch.rand(1, 3, 24, 16, 24) * 2 - 1, sample_posterior=True, noise=noise)
    # 24 frames: 6 micro-batches of 4 frames for the 2-D posterior, then chunks of 17 + 7 frames (5 + 2 latents)
    assert shapes == [(4, 4, 2, 3)] * 6 + [(1, 4, 5, 2, 3), (1, 4, 2, 2, 3)]
    assert z.shape == (1, 4, 7, 2, 3)


def test_latent_frames_match_reference_table(fixture_model):
    # sizes.json v1.2 latent_frames, produced by the reference get_latent_size
    table = {1: 1, 2: 1, 4: 1, 5: 2, 8: 2, 9: 3, 16: 4, 17: 5, 18: 6, 32: 9, 33: 9, 34: 10, 49: 14, 51: 15, 65: 19}
    table |= {68: 20, 81: 24, 97: 28, 102: 30, 113: 33, 129: 38, 204: 60, 408: 120}
    assert {n: fixture_model.latent_frames(n) for n in table} == table


def test_roundtrip_shapes_with_sizes_not_multiple_of_8(fixture_model):
    x = torch.rand(1, 3, 5, 36, 50) * 2 - 1
    z = fixture_model.encode(x, sample_posterior=False)
    assert z.shape == (1, 4, 2, 4, 6)  # floor(H / 8), as the reference's padded stride-2 convs give
    assert fixture_model.decode(z, num_frames=5).shape == (1, 3, 5, 32, 48)


def test_default_noise_is_seeded_by_the_global_rng(fixture_model):
    x = load_case(CASE).io["x"][:, :, :2, :16, :16]
    torch.manual_seed(7)
    first = fixture_model.encode(x)
    torch.manual_seed(7)
    again = fixture_model.encode(x)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.allclose(first, fixture_model.encode(x, sample_posterior=False), atol=1e-2)


# ---------------------------------------------------------------- checkpoint layout


def _reference_keys() -> dict[str, list[int]]:
    keys = {}
    for line in KEYS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape, _dtype = line.split("\t")
            keys[name] = [int(s) for s in shape.strip("[]").split(",") if s.strip()]
    return keys


def test_full_size_state_dict_matches_released_checkpoint():
    model = OpenSoraVAEv12(device="meta")
    ours = {name: list(t.shape) for name, t in model.state_dict().items()}
    reference = _reference_keys()
    assert len(reference) == 517
    assert sorted(set(ours) - set(reference)) == [] and sorted(set(reference) - set(ours)) == []
    assert ours == reference
    assert sum(p.numel() for p in model.parameters()) == 393_341_007  # 393.3M, as published


def test_config_defaults_are_the_released_model():
    config = VAEv12Config()
    assert config.vae_2d.block_out_channels == (128, 256, 512, 512) and config.vae_2d.layers_per_block == 2
    assert config.vae_temporal.filters == 128 and config.vae_temporal.temporal_downsample == (False, True, True)
    assert (config.micro_frame_size, config.micro_batch_size, config.spatial_scaling_factor) == (17, 4, 0.18215)


def test_operations_seam_builds_every_layer():
    made = []

    def counting(cls):
        class Counted(cls):
            def __init__(self, *args, **kwargs):
                made.append(cls.__name__)
                super().__init__(*args, **kwargs)

        return Counted

    ops = SimpleNamespace(**{n: counting(getattr(nn, n)) for n in ("Linear", "Conv2d", "Conv3d", "GroupNorm")})
    model = OpenSoraVAEv12(VAEv12Config.from_dict(load_case(CASE).meta["model_config"]), operations=ops)
    weight_layers = sum(1 for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d, nn.Conv3d, nn.GroupNorm))
    assert weight_layers == 0  # nothing built from torch.nn directly
    assert {"Linear", "Conv2d", "Conv3d", "GroupNorm"} <= set(made)


def test_bfloat16_runs(fixture_model):
    model = build_model(load_case(CASE)).to(torch.bfloat16)
    x = load_case(CASE).io["x"][:, :, :2, :16, :24]
    z = model.encode(x.bfloat16(), sample_posterior=False)
    assert z.dtype == torch.bfloat16 and torch.isfinite(z).all()
    reference = fixture_model.encode(x, sample_posterior=False)
    assert _relative(z.float(), reference) < 0.1
    out = model.decode(z, num_frames=2)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 2, 16, 24) and torch.isfinite(out).all()
    assert _relative(out.float(), fixture_model.decode(reference, num_frames=2)) < 0.1


# ---------------------------------------------------------------- tiling


def test_tiled_apply_places_and_blends_exactly():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 70, 101)  # not multiples of 8: the last tile runs to the edge
    down = tiled_apply(lambda t: F.avg_pool2d(t, 8), x, tile=32, overlap=16, scale=1 / 8, align=8)
    torch.testing.assert_close(down, F.avg_pool2d(x, 8))
    z = torch.randn(2, 4, 9, 13)
    up = tiled_apply(lambda t: F.interpolate(t, scale_factor=8.0), z, tile=4, overlap=2, scale=8)
    torch.testing.assert_close(up, F.interpolate(z, scale_factor=8.0))


def test_spatial_vae_runs_whole_frames_unless_decode_is_given_tiles():
    model = _small_model()
    torch.manual_seed(1)
    x = torch.rand(1, 3, 1, 64, 96) * 2 - 1
    frames = x[:, :, 0]
    direct = model.spatial_vae.module.encode_moments(frames)[:, :4] * 0.18215  # one whole-frame pass
    latent = model.spatial_vae.encode(x, sample_posterior=False)
    torch.testing.assert_close(latent[:, :, 0], direct)
    whole = model.spatial_vae.module.decode(latent[:, :, 0] / 0.18215)  # one whole-frame pass
    torch.testing.assert_close(model.spatial_vae.decode(latent)[:, :, 0], whole)
    assert not torch.allclose(model.spatial_vae.decode(latent, 8, 4)[:, :, 0], whole, atol=1e-3)
    torch.testing.assert_close(model.spatial_vae.decode(latent)[:, :, 0], whole)  # the tiles left nothing behind


def test_tiled_matches_untiled_when_layers_are_local():
    # With GroupNorm made local (plain scaling) the network is translation-equivariant up to borders, so the
    # only tiling error left is the blending of border-affected tile edges.
    class LocalNorm(nn.GroupNorm):
        def forward(self, x):
            return x * self.weight.view(1, -1, *([1] * (x.ndim - 2))) + self.bias.view(1, -1, *([1] * (x.ndim - 2)))

    ops = SimpleNamespace(Linear=nn.Linear, Conv2d=nn.Conv2d, Conv3d=nn.Conv3d, GroupNorm=LocalNorm)
    model = _small_model(operations=ops)
    torch.manual_seed(2)
    x = torch.rand(1, 3, 1, 128, 192) * 2 - 1
    latent = model.spatial_vae.encode(x, sample_posterior=False)
    frames = model.spatial_vae.decode(latent)
    assert _relative(model.spatial_vae.decode(latent, 12, 6), frames) < 0.04  # 96 / 48 pixels


def test_tiled_close_to_untiled_with_real_group_norm():
    # Per-tile GroupNorm statistics make tiling approximate (as in diffusers); random weights exaggerate it.
    model = _small_model()
    torch.manual_seed(3)
    x = torch.rand(1, 3, 1, 192, 256) * 2 - 1
    latent = model.spatial_vae.encode(x, sample_posterior=False)
    frames = model.spatial_vae.decode(latent)
    tiled_frames = model.spatial_vae.decode(latent, 24, 12)  # 192 / 96 pixels
    assert tiled_frames.shape == frames.shape
    assert _relative(tiled_frames, frames) < 0.3


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 3, 32, 48), r"\[B, 3, T, H, W\]"),
        ((1, 4, 2, 32, 48), "3 channels"),
        ((1, 3, 2, 4, 48), "H, W >= 8"),
    ],
)
def test_encode_rejects_bad_shapes(fixture_model, shape, message):
    with pytest.raises(ValueError, match=message):
        fixture_model.encode(torch.zeros(shape), sample_posterior=False)


def test_encode_rejects_integer_video(fixture_model):
    with pytest.raises(ValueError, match="floating-point"):
        fixture_model.encode(torch.zeros(1, 3, 2, 32, 48, dtype=torch.uint8))


def test_decode_rejects_wrong_latent_or_frame_count(fixture_model):
    z = torch.zeros(1, 4, 7, 4, 6)
    with pytest.raises(ValueError, match=r"num_frames must be in 22\.\.25"):
        fixture_model.decode(z, num_frames=30)
    with pytest.raises(ValueError, match="latent"):
        fixture_model.decode(torch.zeros(1, 4, 4, 6), num_frames=4)
    with pytest.raises(ValueError, match="positive int"):
        fixture_model.decode(z, num_frames=0)


def test_noise_callable_with_wrong_shape_is_reported(fixture_model):
    x = torch.rand(1, 3, 1, 32, 48)
    with pytest.raises(ValueError, match="noise callable returned shape"):
        fixture_model.encode(x, noise=lambda shape, dtype, device: torch.zeros(1))


def test_bad_tiling_and_config_values_are_rejected(fixture_model):
    z = torch.zeros(1, 4, 5, 4, 6)
    with pytest.raises(ValueError, match="multiples of 8, tile_size >= 16"):
        fixture_model.decode(z, 17, spatial_tile_size=1)
    with pytest.raises(ValueError, match="overlap"):
        fixture_model.decode(z, 17, spatial_tile_size=8, spatial_tile_overlap=8)
    with pytest.raises(ValueError, match="unknown"):
        VAEv12Config.from_dict({"vae_2d": {"block_out_channel": [8]}})
    with pytest.raises(ValueError, match="temporal_downsample"):
        VAETemporalConfig(temporal_downsample=(True,))
    with pytest.raises(ValueError, match="DownEncoderBlock2D"):
        AutoencoderKLConfig(down_block_types=("CrossAttnDownBlock2D",) * 4)


def test_longest_video_for_a_latent_without_its_frame_count(fixture_model):
    """The most frames each latent length decodes to: 17 per 5-frame chunk, then 4 per latent frame."""
    for latent_frames, frames in ((5, 17), (6, 21), (10, 34), (12, 42)):
        assert fixture_model.longest_video(latent_frames) == frames
        assert fixture_model.latent_frames(frames) == latent_frames
        assert fixture_model.latent_frames(frames + 1) == latent_frames + 1
    assert fixture_model.longest_video(1) == 1  # an image: 1.2 makes no 2..16-frame videos


def test_decode_tiles_for_one_call_as_the_1_3_vae():
    """decode(spatial_tile_size=, spatial_tile_overlap=) in latent pixels (the 1.3 VAE's signature) runs the 2-D
    VAE's decode on those tiles (tiled_apply) for that call only."""
    model = _small_model()
    torch.manual_seed(5)
    z = torch.randn(1, 4, 5, 16, 24)
    plain = model.decode(z, num_frames=17)
    tiled = model.decode(z, num_frames=17, spatial_tile_size=8, spatial_tile_overlap=2)
    calls = []
    decode_2d = model.spatial_vae.module.decode
    model.spatial_vae.module.decode = lambda x: calls.append(tuple(x.shape[-2:])) or decode_2d(x)
    assert torch.equal(tiled, model.decode(z, num_frames=17, spatial_tile_size=8, spatial_tile_overlap=2))
    assert calls and all(h <= 8 and w <= 8 for h, w in calls)  # tiles of 8 x 8 latent pixels at most
    calls.clear()
    assert torch.equal(plain, model.decode(z, num_frames=17))  # the next call is untiled again
    assert calls and all((h, w) == (16, 24) for h, w in calls)
    del model.spatial_vae.module.decode
    assert not torch.equal(tiled, plain)  # the tiles did run
    assert torch.equal(model.decode(z), model.decode(z, num_frames=model.longest_video(5)))  # None: longest
