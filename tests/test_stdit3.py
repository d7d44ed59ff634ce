"""STDiT3 (Open-Sora 1.2 / 1.3): golden parity, official key set, bf16, odd sizes, attention pieces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers_torch import no_grad  # noqa: F401 (autouse fixtures)

from opensora_lib.detection import detect
from opensora_lib.fixtures import load_case, run_path
from opensora_lib.rope import interleaved_tables, rope_frequencies, window_angles
from opensora_lib.stdit3 import (
    STDiT3,
    STDiT3Config,
    stdit3_v12_config,
    stdit3_v13_config,
)
from opensora_lib.stdit3_layers import (
    CaptionKeys,
    CrossAttention,
    SelfAttention,
    TokenLayout,
    window_groups,
    window_views,
)

KEYS = Path(__file__).resolve().parent / "fixtures" / "reference_keys"  # copies of shared/reference/keys


def tiny_config(version: str, **overrides) -> STDiT3Config:
    base = {"depth": 2, "hidden_size": 48, "num_heads": 2, "caption_channels": 16, "model_max_length": 10}
    if version == "1.3":
        base.update(in_channels=16, kernel_size=(8, 8, -1), use_spatial_rope=True)
    else:
        base.update(in_channels=4)
    base.update(overrides)
    return STDiT3Config(**base)


def random_model(config: STDiT3Config, seed: int = 0) -> STDiT3:
    """Non-degenerate random weights (the official zero-inits would hide paths)."""
    torch.manual_seed(seed)
    model = STDiT3(config).eval()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.1 * torch.randn_like(p))
        elif p.ndim == 1:
            p.copy_(0.05 * torch.randn_like(p))
        else:
            p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
    return model


def model_inputs(config: STDiT3Config, shape, seed: int = 1, lengths=(3, 7)):
    torch.manual_seed(seed)
    b = shape[0]
    x = torch.randn(b, config.in_channels, *shape[1:])
    mask = torch.zeros(b, config.model_max_length, dtype=torch.long)
    for i, n in enumerate(lengths[:b]):
        mask[i, :n] = 1
    return {
        "x": x,
        "timestep": torch.tensor([700.0, 250.0][:b]),
        "y": torch.randn(b, 1, config.model_max_length, config.caption_channels),
        "mask": mask,
        "fps": torch.full((b,), 24.0),
        "height": torch.full((b,), shape[2] * 8.0),
        "width": torch.full((b,), shape[3] * 8.0),
    }


# ---------------------------------------------------------------- golden parity


@pytest.mark.parametrize("case", ["stdit3_v12_forward", "stdit3_v13_forward"])
def test_golden_case_passes(fixtures_dir, case):
    path = fixtures_dir / case
    comparisons = run_path(path)
    failed = [(c.name, c.max_abs, c.detail) for c in comparisons if not c.passed]
    assert not failed, failed
    outputs = {call["output"] for call in json.loads((path / "case.json").read_text())["calls"]}
    assert outputs <= {c.name for c in comparisons}  # every call's output was really compared
    assert all(c.max_abs < 1e-4 for c in comparisons)


def test_golden_xmask_changes_output_and_quirk_is_needed(fixtures_dir):
    """x_mask really matters in the recorded data (so the x_mask path is exercised by the golden test)."""
    io = load_case(fixtures_dir / "stdit3_v12_forward").io
    assert (io["plain.out"] - io["xmask.out"]).abs().max() > 0.1
    assert not bool(io["x_mask"].all())


# ---------------------------------------------------------------- official key set


def official_keys(name: str) -> dict[str, tuple[int, ...]]:
    keys = {}
    for line in (KEYS / name).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape, _dtype = line.split("\t")
        keys[key] = tuple(json.loads(shape))
    return keys


@pytest.mark.parametrize(
    ("factory", "keys_file", "tensors"),
    [(stdit3_v12_config, "stdit_v12.txt", 973), (stdit3_v13_config, "stdit_v13.txt", 977)],
)
def test_full_size_state_dict_equals_official_keys(factory, keys_file, tensors):
    model = STDiT3(factory(), device="meta")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = official_keys(keys_file)
    assert len(official) == tensors
    assert set(ours) - set(official) == set()
    assert set(official) - set(ours) == set()
    assert ours == official
    # and the loader's detection recovers the config from the keys alone
    assert STDiT3Config.from_dict(detect(model.state_dict()).config) == factory()


def test_rope_freqs_may_be_present_or_missing(fixtures_dir):
    case = load_case(fixtures_dir / "stdit3_v13_forward")
    config = STDiT3Config.from_dict(case.meta["model_config"])
    assert torch.equal(case.weights["rope.freqs"], rope_frequencies(config.rotation_dim))
    with_freqs = STDiT3(config)
    with_freqs.load_state_dict(case.weights, strict=True)
    without = {k: v for k, v in case.weights.items() if k != "rope.freqs"}
    model = STDiT3(config)
    model.rope.freqs.zero_()
    model.load_state_dict(without, strict=True)  # strict, and still no missing-key error
    assert torch.equal(model.rope.freqs, rope_frequencies(config.rotation_dim))
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({k: v for k, v in without.items() if k != "t_block.1.bias"}, strict=True)


def test_from_dict_ignores_training_and_hf_keys():
    d = {
        "architectures": ["STDiT3"],
        "model_type": "STDiT3",
        "torch_dtype": "float32",
        "depth": 28,
        "hidden_size": 1152,
        "in_channels": 4,
        "patch_size": [1, 2, 2],
        "drop_path": 0.0,
        "class_dropout_prob": 0.1,
        "enable_flash_attn": True,
        "enable_layernorm_kernel": True,
        "only_train_temporal": False,
        "freeze_y_embedder": False,
        "input_size": [None, None, None],
    }
    assert STDiT3Config.from_dict(d) == stdit3_v12_config()
    assert stdit3_v13_config().out_channels == 32 and stdit3_v12_config().out_channels == 8
    with pytest.raises(ValueError, match="kernel_size"):
        STDiT3Config(use_spatial_rope=True)
    with pytest.raises(ValueError, match="num_heads"):
        STDiT3Config(hidden_size=100, num_heads=16)
    with pytest.raises(ValueError, match="skip_y_embedder"):
        STDiT3Config.from_dict({"skip_y_embedder": True})


# ---------------------------------------------------------------- dtypes and sizes


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_bf16_forward_is_finite_and_close_to_fp32(version):
    config = tiny_config(version)
    model = random_model(config)
    inputs = model_inputs(config, (2, 3, 5, 7))
    reference = model(**inputs)
    model_bf16 = random_model(config).to(torch.bfloat16)
    bf16_inputs = {k: v.to(torch.bfloat16) if k in ("x", "y") else v for k, v in inputs.items()}
    out = model_bf16(**bf16_inputs)
    assert out.dtype == torch.float32 and out.shape == reference.shape
    assert torch.isfinite(out).all()
    error = (out - reference).abs().max() / reference.abs().max()
    assert error < 0.05, float(error)


@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 5, 7), (2, 4, 17, 19), (1, 2, 10, 12)])
def test_odd_sizes_keep_the_latent_shape(version, shape):
    config = tiny_config(version, depth=1)
    model = random_model(config)
    inputs = model_inputs(config, shape)
    out = model(**inputs)
    assert out.shape == (shape[0], config.out_channels, *shape[1:])
    assert torch.isfinite(out).all()
    inputs["x"] = inputs["x"] + 1  # and the prediction really depends on the latent
    assert not torch.allclose(model(**inputs), out)


def test_temporal_patch_padding():
    config = tiny_config("1.2", depth=1, patch_size=(2, 2, 2))
    model = random_model(config)
    inputs = model_inputs(config, (1, 3, 5, 5))
    out = model(**inputs, x_mask=torch.tensor([[True, False]]))  # x_mask is per token frame (T padded to 4 -> 2)
    assert out.shape == (1, 8, 3, 5, 5) and torch.isfinite(out).all()


def test_x_mask_all_true_equals_plain_and_false_differs():
    config = tiny_config("1.2")
    model = random_model(config)
    inputs = model_inputs(config, (2, 3, 4, 6))
    plain = model(**inputs)
    assert torch.allclose(model(**inputs, x_mask=torch.ones(2, 3, dtype=torch.bool)), plain, atol=1e-6)
    x_mask = torch.tensor([[False, True, True], [True, True, True]])
    masked = model(**inputs, x_mask=x_mask)
    assert not torch.allclose(masked[0], plain[0], atol=1e-3)
    assert torch.allclose(masked[1], plain[1], atol=1e-6)  # per-sample: sample 1 is untouched


def test_scalar_timestep_fps_and_size_are_broadcast():
    config = tiny_config("1.3", depth=1)
    model = random_model(config)
    inputs = model_inputs(config, (2, 2, 4, 4))
    inputs["timestep"] = torch.tensor([500.0, 500.0])
    expected = model(**inputs)
    out = model(**{**inputs, "timestep": torch.tensor(500.0), "fps": 24, "height": 32, "width": 32})
    assert torch.allclose(out, expected, atol=1e-6)


def test_fps_per_video_is_tiled_over_the_guidance_passes():
    """The official SizeEmbedder repeats [B] fps values as a block over a k*B batch (the guidance passes stacked);
    a count that does not divide the batch is refused."""
    config = tiny_config("1.3", depth=1)
    model = random_model(config)
    inputs = model_inputs(config, (2, 2, 4, 4))
    inputs = {k: torch.cat([v, v]) for k, v in inputs.items()}  # 4 rows: 2 videos x 2 passes
    inputs["fps"] = torch.tensor([24.0, 8.0, 24.0, 8.0])
    expected = model(**inputs)
    assert torch.equal(model(**{**inputs, "fps": torch.tensor([24.0, 8.0])}), expected)
    assert not torch.allclose(model(**{**inputs, "fps": torch.tensor([8.0, 24.0])}), expected)  # fps matters
    with pytest.raises(ValueError, match="fps must hold a divisor of 4 values"):
        model(**{**inputs, "fps": torch.ones(3)})


@pytest.mark.parametrize("reference", [False, True])
def test_sampler_batch_of_two_equals_two_single_runs(reference):
    """sample_rflow on the real STDiT3 with 2 videos (fps, size per video; 2 or 3 guidance passes per step)."""
    from opensora_lib.conditioning_v1 import reference_conditioning
    from opensora_lib.rflow import RFlowOptions, RFlowText, sample_rflow

    config = tiny_config("1.3")
    model = random_model(config)
    torch.manual_seed(5)
    z = torch.randn(2, config.in_channels, 3, 4, 4)
    mask = torch.zeros(2, config.model_max_length, dtype=torch.long)
    mask[0, :3], mask[1, :7] = 1, 1
    text = RFlowText(torch.randn(2, 1, config.model_max_length, config.caption_channels), mask,
                     torch.randn(config.model_max_length, config.caption_channels))  # fmt: skip
    options = RFlowOptions(num_steps=3, cfg_scale=7.5, version="1.3", image_cfg_scale=3.0)
    size = {"height": 32, "width": 32, "num_frames": 9}
    ref = torch.randn(2, config.in_channels, 1, 4, 4)

    def cond(items):
        return reference_conditioning("i2v_head", [ref[items]], z[items].shape) if reference else None

    both = sample_rflow(model, z, text, options, **size, cond=cond(slice(0, 2)))
    for b in range(2):
        one_text = RFlowText(text.y[b : b + 1], text.mask[b : b + 1], text.y_null)
        one = sample_rflow(model, z[b : b + 1], one_text, options, **size, cond=cond(slice(b, b + 1)))
        torch.testing.assert_close(both[b : b + 1], one, atol=2e-5, rtol=2e-5)


def test_batch_items_are_independent():
    """Per-sample caption masks: sample 0 alone gives the same result as inside a batch."""
    config = tiny_config("1.3")
    model = random_model(config)
    inputs = model_inputs(config, (2, 2, 6, 9), lengths=(2, 9))
    batched = model(**inputs)
    single = model(**{k: v[:1] for k, v in inputs.items()})
    assert torch.allclose(batched[:1], single, atol=1e-5)


def test_i2v_conditioned_frames_attend_to_y_null():
    config = tiny_config("1.3")
    model = random_model(config)
    inputs = model_inputs(config, (2, 3, 4, 4))
    cond = torch.randn_like(inputs["x"])
    i2v = {**inputs, "cond": cond, "cond_mask": torch.ones_like(cond), "y_null": torch.randn_like(inputs["y"])}
    out = model(**i2v, mask_index=[0])
    # giving the caption itself as y_null must equal an i2v call where every frame sees the caption
    same = model(**{**i2v, "y_null": inputs["y"]}, mask_index=[0])
    assert not torch.allclose(out, same, atol=1e-4)
    assert torch.allclose(model(**{**i2v, "y_null": inputs["y"]}, mask_index=[]), same, atol=1e-5)
    assert torch.equal(model(**i2v, mask_index=torch.tensor([0])), out)


# ---------------------------------------------------------------- attention pieces


def reference_rotate(z: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """lucidrains-style interleaved rotation, written out pair by pair."""
    cos, sin = angles.cos()[..., None, :], angles.sin()[..., None, :]
    even, odd = z[..., 0::2], z[..., 1::2]
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), -1).flatten(-2)


def padded_window_reference(attn: SelfAttention, x: torch.Tensor, t: int, h: int, w: int, scale: float) -> torch.Tensor:
    """The official algorithm: zero-pad the grid to whole 8x8 windows, -inf mask on padded keys."""
    b, _, c = x.shape
    heads, d = attn.num_heads, attn.head_dim
    grid = x.view(b, t, h, w, c)
    hp, wp = -(-h // 8) * 8, -(-w // 8) * 8
    grid = F.pad(grid, (0, 0, 0, wp - w, 0, hp - h))
    valid = F.pad(torch.ones(b, t, h, w), (0, wp - w, 0, hp - h))
    freqs = rope_frequencies(d // 3)
    angles = window_angles(t, 8, 8, scale, freqs).view(t, 8, 8, -1)  # one window's local positions
    out = torch.zeros(b, t, hp, wp, c)
    for i in range(0, hp, 8):
        for j in range(0, wp, 8):
            win = grid[:, :, i : i + 8, j : j + 8]  # [B, T, 8, 8, C]
            qkv = attn.qkv(win).view(b, t, 8, 8, 3, heads, d)
            q, k, v = qkv.unbind(4)
            q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = reference_rotate(q, angles), reference_rotate(k, angles)
            q, k, v = (z.reshape(b, -1, heads, d).transpose(1, 2) for z in (q, k, v))
            bias = torch.zeros(b, 1, 1, t * 64).masked_fill(
                valid[:, :, i : i + 8, j : j + 8].reshape(b, 1, 1, -1) == 0, float("-inf")
            )
            scores = (q * d**-0.5) @ k.transpose(-1, -2) + bias
            o = scores.softmax(-1) @ v
            out[:, :, i : i + 8, j : j + 8] = o.transpose(1, 2).reshape(b, t, 8, 8, c)
    return attn.proj(out[:, :, :h, :w].reshape(b, t * h * w, c))


@pytest.mark.parametrize(("h", "w"), [(11, 13), (8, 16), (3, 9), (16, 5)])
def test_windowed_temporal_attention_matches_padded_windows(h, w):
    torch.manual_seed(3)
    c, t, b, scale = 48, 3, 2, 0.7
    attn = SelfAttention(c, 2, qk_norm=True)
    for name, p in attn.named_parameters():
        p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.1))
    x = torch.randn(b, t * h * w, c)
    freqs = rope_frequencies(8)
    groups = window_groups(
        b, t, h, w, (8, 8), lambda wh, ww: interleaved_tables(window_angles(t, wh, ww, scale, freqs))
    )
    assert sum(g.tokens for g in groups) == x.shape[0] * x.shape[1]
    tokens = torch.empty(b * t * h * w, c)
    for grid_view, flat_view in window_views(x.view(b, t, h, w, c), tokens, groups):
        flat_view.copy_(grid_view)
    out = attn(tokens, groups)
    ours = torch.empty(b, t, h, w, c)
    for grid_view, flat_view in window_views(ours, out, groups):
        grid_view.copy_(flat_view)
    reference = padded_window_reference(attn, x, t, h, w, scale)
    assert torch.allclose(ours.view_as(reference), reference, atol=2e-5), float(
        (ours.view_as(reference) - reference).abs().max()
    )


def test_cross_attention_equals_per_sample_attention_with_any_mask():
    torch.manual_seed(4)
    c, heads = 32, 4
    cross = CrossAttention(c, heads)
    x = torch.randn(2, 10, c)
    tokens = torch.randn(2, 6, c)
    key_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    layout = TokenLayout(2, 1, 2, 5, captions=CaptionKeys(tokens, key_mask[:, None, None, :]))
    ours = cross(x, layout)
    for i in range(2):
        n = int(key_mask[i].sum())
        alone = cross(x[i : i + 1], TokenLayout(1, 1, 2, 5, captions=CaptionKeys(tokens[i : i + 1, :n], None)))
        assert torch.allclose(ours[i : i + 1], alone, atol=1e-6)


def test_non_prefix_caption_mask_selects_the_valid_tokens():
    config = tiny_config("1.2", depth=1)
    model = random_model(config)
    inputs = model_inputs(config, (1, 2, 4, 4))
    mask = torch.zeros(1, config.model_max_length, dtype=torch.long)
    mask[0, [1, 4, 6]] = 1
    y_compact = torch.zeros_like(inputs["y"])
    y_compact[0, 0, :3] = inputs["y"][0, 0, [1, 4, 6]]
    prefix = torch.zeros_like(mask)
    prefix[0, :3] = 1
    out = model(**{**inputs, "mask": mask})
    assert torch.allclose(out, model(**{**inputs, "y": y_compact, "mask": prefix}), atol=1e-6)


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    config = tiny_config("1.3", depth=1)
    model = random_model(config)
    inputs = model_inputs(config, (2, 2, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        model(**{**inputs, "x": torch.randn(2, 4, 2, 4, 4)})
    with pytest.raises(ValueError, match="fps"):
        model(**{**inputs, "fps": None})
    with pytest.raises(ValueError, match="height"):
        model(**{**inputs, "height": None})
    with pytest.raises(ValueError, match="no valid caption token"):
        model(**{**inputs, "mask": torch.zeros_like(inputs["mask"])})
    with pytest.raises(ValueError, match="mask_index"):
        cond = torch.zeros_like(inputs["x"])
        model(**inputs, cond=cond, cond_mask=cond, mask_index=[5], y_null=inputs["y"])
    with pytest.raises(ValueError, match="y_null"):
        model(**inputs, cond=cond, cond_mask=cond, mask_index=[0])
    with pytest.raises(ValueError, match="x_mask"):
        model(**inputs, x_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="timestep"):
        model(**{**inputs, "timestep": torch.ones(3)})
    v12 = random_model(tiny_config("1.2", depth=1))
    with pytest.raises(ValueError, match="1.3"):
        x = torch.randn(2, 4, 2, 4, 4)
        v12(**{**inputs, "x": x}, cond=x, cond_mask=x, mask_index=[0], y_null=inputs["y"])
