"""1.x RFlow sampler: golden-fixture parity, conditioning helpers, pass skipping, long videos, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_torch import no_grad  # noqa: F401 (autouse fixtures)

from opensora_lib.conditioning_v1 import (
    MaskStrategy,
    apply_mask_strategy,
    cond_type_placements,
    parse_mask_strategy,
    place_references,
    reference_conditioning,
    sample_long_video,
    snap_to_alignment,
)
from opensora_lib.fixtures import run_path
from opensora_lib.rflow import (
    FrameMaskConditioning,
    ReferenceConditioning,
    RFlowOptions,
    RFlowText,
    add_noise,
    flaw_fix,
    image_scale_ramp,
    oscillation_scale,
    sample_rflow,
)

FIXTURES = Path(__file__).parent / "fixtures" / "opensora"
CASES = ["rflow_v12_t2v_sampling", "rflow_v12_mask_sampling", "rflow_v13_t2v_sampling", "rflow_v13_i2v_sampling"]


# ---------------------------------------------------------------- golden parity


@pytest.mark.parametrize("case", CASES)
def test_golden_sampler_case(case):
    comparisons = run_path(FIXTURES / case)
    failed = [(c.name, c.max_abs, c.detail) for c in comparisons if not c.passed]
    assert not failed
    names = [c.name for c in comparisons]
    # Both levels ran: recorded-output replay (guidance + Euler) and the real STDiT3 end to end.
    assert any(n.startswith("replay.") and n.endswith("z_final") for n in names)
    assert any(n.startswith("e2e.") and n.endswith("z_final") for n in names)
    assert any(n.startswith("e2e.") and "model_out_v" in n for n in names)


# ---------------------------------------------------------------- a row-wise toy model


class ToyModel:
    """Every output row depends only on its own input row with exact float ops (no reductions, no
    transcendental functions), so running a pass in a bigger or smaller batch gives identical bits."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, timestep, y, mask, fps, height, width, x_mask=None, cond=None, cond_mask=None,
                 mask_index=None, y_null=None):  # fmt: skip
        self.calls.append(
            dict(rows=x.shape[0], y=y, mask=mask, x_mask=x_mask, cond=cond, cond_mask=cond_mask,
                 mask_index=mask_index, y_null=y_null, timestep=timestep)
        )  # fmt: skip
        text = (y[:, 0, 0, 0] * mask[:, 0]).view(-1, 1, 1, 1, 1)
        t = (timestep / 1000).view(-1, 1, 1, 1, 1)
        v = 0.25 * x * x - 0.5 * x + text * (1 - x) + 0.1 * t
        if cond is not None:
            v = v + 0.7 * cond - 0.2 * cond_mask
        if x_mask is not None:
            v = v + 0.05 * x_mask.view(x.shape[0], 1, -1, 1, 1)
        return torch.cat([v, torch.full_like(v, 9.0)], dim=1)  # the sigma half must be ignored


def make_text(batch=1, tokens=6, channels=8, negative=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, tokens, dtype=torch.long)
    mask[:, :4] = 1
    text = RFlowText(
        y=torch.randn(batch, 1, tokens, channels, generator=g),
        mask=mask,
        y_null=torch.randn(tokens, channels, generator=g),
    )
    if negative:
        text.negative_y = torch.randn(batch, 1, tokens, channels, generator=g)
        text.negative_mask = torch.ones(batch, tokens, dtype=torch.long)
    return text


def latent(batch=1, channels=4, frames=5, size=4, seed=1):
    return torch.randn(batch, channels, frames, size, size, generator=torch.Generator().manual_seed(seed))


def seeded_noise(seed=2):
    g = torch.Generator().manual_seed(seed)
    return lambda shape, dtype, device: torch.randn(shape, generator=g).to(dtype=dtype, device=device)


SIZE = dict(height=240, width=426, num_frames=17)


# ---------------------------------------------------------------- sampler behaviour


def test_guidance_one_skips_uncond_pass_bit_identically():
    z, text = latent(), make_text()
    runs = {}
    for skip in (True, False):
        model = ToyModel()
        options = RFlowOptions(num_steps=5, cfg_scale=1.0, skip_redundant_passes=skip)
        runs[skip] = (sample_rflow(model, z, text, options, **SIZE), [c["rows"] for c in model.calls])
    assert runs[True][1] == [1] * 5 and runs[False][1] == [2] * 5
    assert torch.equal(runs[True][0], runs[False][0])


def test_oscillation_and_flaw_fix_skip_is_bit_identical():
    z, text = latent(frames=5), make_text()
    runs = {}
    for skip in (True, False):
        model = ToyModel()
        options = RFlowOptions(
            num_steps=14, cfg_scale=7.5, version="1.3", use_oscillation_guidance=True, use_flaw_fix=True,
            skip_redundant_passes=skip,
        )  # fmt: skip
        runs[skip] = (sample_rflow(model, z, text, options, **SIZE), [c["rows"] for c in model.calls])
    assert runs[True][1] == [2] * 11 + [1, 2, 1]  # odd steps from 10 are unguided
    assert torch.equal(runs[True][0], runs[False][0])
    # ...and guidance at 7.5 really does something.
    plain = sample_rflow(ToyModel(), z, text, RFlowOptions(num_steps=14, cfg_scale=1.0, version="1.3"), **SIZE)
    assert not torch.allclose(plain, runs[True][0])


def test_i2v_pass_skipping_is_bit_identical():
    z, text = latent(frames=5), make_text()
    ref = latent(frames=1, seed=7)[0]
    cond = reference_conditioning("i2v_head", [ref], z.shape)
    for image_scale, expected_rows in ((5.0, [3] * 11 + [1, 3, 1]), (1.0, [2] * 11 + [1, 2, 1])):
        runs = {}
        for skip in (True, False):
            model = ToyModel()
            options = RFlowOptions(
                num_steps=14, cfg_scale=7.5, version="1.3", image_cfg_scale=image_scale, use_oscillation_guidance=True,
                scale_image_weight=True, use_sdedit=True, skip_redundant_passes=skip,
            )  # fmt: skip
            out = sample_rflow(model, z, text, options, **SIZE, cond=cond, noise=seeded_noise())
            runs[skip] = (out, [c["rows"] for c in model.calls])
        assert runs[True][1] == expected_rows
        assert torch.equal(runs[True][0], runs[False][0])


def test_i2v_batch_two_works_and_matches_single_samples():
    # The reference repeats y_null batch x batch times and crashes for B > 1; here each row gets one.
    z = latent(batch=2, frames=5)
    text = make_text(batch=2)
    ref = latent(batch=2, frames=1, seed=9)
    options = RFlowOptions(num_steps=6, cfg_scale=7.5, version="1.3", image_cfg_scale=3.0, scale_image_weight=True)
    model = ToyModel()
    both = sample_rflow(model, z, text, options, **SIZE, cond=reference_conditioning("i2v_tail", [ref], z.shape))
    call = model.calls[0]
    assert call["rows"] == 6 and call["y_null"].shape[0] == 6 and call["mask_index"] == [4]
    assert torch.equal(call["cond"][4:], torch.zeros_like(call["cond"][4:]))  # all-uncond pass has no reference
    for b in range(2):
        single_text = RFlowText(text.y[b : b + 1], text.mask[b : b + 1], text.y_null)
        single_cond = reference_conditioning("i2v_tail", [ref[b : b + 1]], z[b : b + 1].shape)
        one = sample_rflow(ToyModel(), z[b : b + 1], single_text, options, **SIZE, cond=single_cond)
        assert torch.equal(one, both[b : b + 1])


def test_negative_prompt_replaces_null_caption():
    z = latent()
    text = make_text(negative=True)
    model = ToyModel()
    sample_rflow(model, z, text, RFlowOptions(num_steps=2, version="1.3"), **SIZE)
    call = model.calls[0]
    assert torch.equal(call["y"][1:], text.negative_y)
    assert torch.equal(call["mask"][1:], text.negative_mask)
    # Without it, the uncond row is the learned null caption with the PROMPT's mask (Q1).
    text = make_text()
    model = ToyModel()
    sample_rflow(model, z, text, RFlowOptions(num_steps=2), **SIZE)
    assert torch.equal(model.calls[0]["y"][1], text.y_null[None])
    assert torch.equal(model.calls[0]["mask"][1], text.mask[0])


def test_mask_strategy_path_keeps_and_releases_frames():
    z = latent(frames=10)
    ref = latent(frames=5, seed=3)[0]
    z_start, cond = apply_mask_strategy(z, [ref], "0,0,0,0,1,0;0,0,1,5,1,0.5")
    draws = []

    def noise(shape, dtype, device):
        draws.append(shape)
        return torch.randn(shape, dtype=dtype, device=device)

    model = ToyModel()
    out = sample_rflow(model, z_start, make_text(), RFlowOptions(num_steps=6), height=240, width=426,
                       num_frames=34, cond=cond, noise=noise)  # fmt: skip
    assert len(draws) == 6  # one draw per step, as the reference
    assert torch.equal(out[:, :, 0], ref[None, :, 0])  # edit ratio 0: kept exactly
    x_masks = [c["x_mask"][0] for c in model.calls]
    assert not any(m[0] for m in x_masks) and all(m[1] for m in x_masks)
    assert not x_masks[0][5] and x_masks[-1][5]  # edit ratio 0.5: released half way
    assert not torch.equal(out[:, :, 5], ref[None, :, 1])


def test_callback_and_noise_order():
    z = latent()
    seen = []
    out = sample_rflow(ToyModel(), z, make_text(), RFlowOptions(num_steps=4), **SIZE, callback=seen.append)
    assert [s["i"] for s in seen] == [0, 1, 2, 3] and all(s["total"] == 4 for s in seen)
    assert seen[0]["t"] == 1000.0 and seen[-1]["t"] < seen[0]["t"]
    assert torch.equal(seen[-1]["x"], out)
    # At the last step the update jumps to t = 0, so the prediction is the result.
    assert torch.allclose(seen[-1]["denoised"], out, atol=1e-5)

    def no_draws(shape, dtype, device):
        raise AssertionError("text-to-video draws no noise inside the sampler")

    sample_rflow(ToyModel(), z, make_text(), RFlowOptions(num_steps=2), **SIZE, noise=no_draws)


def test_image_fps_default_and_bf16_sizes():
    model = ToyModel()
    sample_rflow(model, latent(frames=1), make_text(), RFlowOptions(num_steps=1), height=480, width=854, num_frames=1)
    assert model.calls[0]["timestep"].shape == (2,)
    model = ToyModel()
    sample_rflow(model, latent(frames=1), make_text(), RFlowOptions(num_steps=1, bf16_inputs=True),
                 height=480, width=854, num_frames=1)  # fmt: skip


def test_helpers():
    assert [oscillation_scale(7.5, i) for i in (0, 9, 10, 11, 12, 13)] == [7.5, 7.5, 7.5, 1.0, 7.5, 1.0]
    ramp = image_scale_ramp(5.0, 1.0, 0, 14, 5).flatten()
    assert ramp[0] == 1.0 and ramp[-1] == 5.0 and ramp.shape == (5,)
    assert image_scale_ramp(5.0, 1.0, 13, 14, 5).flatten().tolist() == [1.0] * 5
    x0, eps = torch.ones(1, 1, 1, 1, 1), torch.zeros(1, 1, 1, 1, 1)
    assert add_noise(x0, eps, torch.tensor([250.0])).item() == 0.75
    v = torch.randn(2, 3, 4)
    assert torch.equal(flaw_fix(v, v), v)
    assert torch.isfinite(flaw_fix(torch.ones(1, 2, 2), torch.randn(1, 2, 2))).all()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(version="1.1"), "allowed: 1.2, 1.3"),
        (dict(num_steps=0), "num_steps"),
        (dict(cfg_scale=float("nan")), "cfg_scale"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RFlowOptions(**kwargs)


def test_bad_sampler_inputs():
    z, text, options = latent(), make_text(), RFlowOptions(num_steps=2)
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        sample_rflow(ToyModel(), z[0], text, options, **SIZE)
    with pytest.raises(ValueError, match="text.y has batch 3, the latent has batch 2"):
        sample_rflow(ToyModel(), latent(batch=2), make_text(batch=3), options, **SIZE)
    with pytest.raises(ValueError, match="num_frames >= 17"):
        sample_rflow(ToyModel(), z, text, options, height=240, width=426, num_frames=8)
    with pytest.raises(ValueError, match="frame_mask"):
        sample_rflow(ToyModel(), z, text, options, **SIZE, cond=FrameMaskConditioning(torch.ones(1, 3)))
    with pytest.raises(ValueError, match="mask_index 7"):
        sample_rflow(ToyModel(), z, text, options, **SIZE, cond=ReferenceConditioning(torch.zeros_like(z), [7]))
    with pytest.raises(ValueError, match="y_null"):
        sample_rflow(ToyModel(), z, RFlowText(text.y, text.mask), options, **SIZE)
    with pytest.raises(ValueError, match="negative_mask"):
        sample_rflow(ToyModel(), z, RFlowText(text.y, text.mask, text.y_null, negative_y=text.y), options, **SIZE)


# ---------------------------------------------------------------- mask strategies


def test_parse_mask_strategy():
    assert parse_mask_strategy("") == [] and parse_mask_strategy(None) == []
    assert parse_mask_strategy("0") == [MaskStrategy()]
    assert parse_mask_strategy("0;0,0,0,-1,1,0.5") == [MaskStrategy(), MaskStrategy(0, 0, 0, -1, 1, 0.5)]
    assert parse_mask_strategy(" 1, 2 ,3,4,5, 0.25") == [MaskStrategy(1, 2, 3, 4, 5, 0.25)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0,0,0,0,1,0,9", "at most 6"),
        ("0,a", "ref_id must be an integer"),
        ("0,0,0,0,1.5", "length must be an integer"),
        ("0;", r"group 2 \(''\): loop must be an integer"),
        ("0,0,0,0,1,x", "edit_ratio must be a number"),
        ("0,0,0,0,1,1.5", r"edit_ratio must be in \[0, 1\]"),
        ("0,0,0,0,0", "length must be >= 1"),
        ("-1", "loop and ref_id must be >= 0"),
    ],
)
def test_bad_mask_strategy(text, message):
    with pytest.raises(ValueError, match=message):
        parse_mask_strategy(text)


def test_snap_to_alignment():
    # find_nearest_point semantics: round to the nearest multiple, but never up to the last multiple.
    assert snap_to_alignment(9, 5, 10) == 5
    assert snap_to_alignment(8, 5, 15) == 10
    assert snap_to_alignment(7, 5, 15) == 5
    assert snap_to_alignment(13, 5, 15) == 10
    assert snap_to_alignment(0, 5, 15) == 0


def test_apply_mask_strategy():
    z = latent(frames=10)
    ref = latent(frames=5, seed=3)[0]
    out, cond = apply_mask_strategy(z, [ref], "0;0,0,0,-1,1,0.5", align=5)
    assert cond.frame_mask.tolist() == [[0.0, 1, 1, 1, 1, 0.5, 1, 1, 1, 1]]
    assert torch.equal(out[0, :, 0], ref[:, 0]) and torch.equal(out[0, :, 5], ref[:, 0])
    assert torch.equal(out[:, :, 1:5], z[:, :, 1:5]) and not torch.equal(z[:, :, 0], out[:, :, 0])
    # Without align the negative target is the last frame; lengths are clipped to what exists.
    out, cond = apply_mask_strategy(z, [ref], "0,0,2,-1,9,0")
    assert cond.frame_mask[0, -1] == 0 and torch.equal(out[0, :, -1], ref[:, 2])
    # Other loops' groups and empty strategies condition nothing.
    assert apply_mask_strategy(z, [ref], "1,0,0,0,1,0")[1] is None
    assert apply_mask_strategy(z, [], "")[1] is None
    with pytest.raises(ValueError, match="ref_id 1 but only 1"):
        apply_mask_strategy(z, [ref], "0,1")
    with pytest.raises(ValueError, match="target_start -11"):
        apply_mask_strategy(z, [ref], "0,0,0,-11")
    with pytest.raises(ValueError, match="encode the reference at the target size"):
        apply_mask_strategy(z, [latent(frames=2, size=6)[0]], "0")
    with pytest.raises(ValueError, match="2 mask strategies for a batch of 1"):
        apply_mask_strategy(z, [ref], ["0", "0"])


# ---------------------------------------------------------------- 1.3 cond types


def test_cond_types():
    shape = (1, 4, 10, 4, 4)
    image = latent(frames=1, seed=4)[0]
    video = latent(frames=8, seed=5)[0]
    assert reference_conditioning("i2v_head", [image], shape).mask_index == [0]
    tail = reference_conditioning("i2v_tail", [image], shape)
    assert tail.mask_index == [9] and torch.equal(tail.latent[0, :, 9], image[:, 0])
    assert reference_conditioning("i2v_loop", [image], shape).mask_index == [0, 9]
    loop_two = reference_conditioning("i2v_loop", [image, video], shape)
    assert torch.equal(loop_two.latent[0, :, 9], video[:, 0])  # second reference: its first frame
    v2v = reference_conditioning("v2v_head", [video], shape)
    assert v2v.mask_index == [0, 1, 2, 3, 4] and torch.equal(v2v.latent[0, :, :5], video[:, :5])
    assert reference_conditioning("v2v_head", [video[:, :3]], shape).mask_index == [0, 1, 2]
    anywhere = place_references(shape, [image], [(0, 0, 3), (0, 0, -2)])
    assert anywhere.mask_index == [3, 8] and torch.equal(anywhere.latent[0, :, 8], image[:, 0])
    assert cond_type_placements("i2v_loop", 10, [1], tail=False) == [(0, 0, 0)]
    with pytest.raises(ValueError, match="allowed: i2v_head, i2v_tail, i2v_loop, v2v_head"):
        reference_conditioning("i2v_middle", [image], shape)
    with pytest.raises(ValueError, match="target frame 10"):
        place_references(shape, [image], [(0, 0, 10)])
    with pytest.raises(ValueError, match="needs a reference"):
        reference_conditioning("i2v_head", [], shape)


# ---------------------------------------------------------------- long videos


def test_long_video_mask_strategy_chain():
    shape = (1, 4, 10, 4, 4)
    chunks = {}

    def keep_last(info):
        if info["i"] == info["total"] - 1:
            chunks[info["loop"]] = info["x"].clone()

    out = sample_long_video(
        ToyModel(), make_text(), RFlowOptions(num_steps=3), latent_shape=shape, num_loops=3,
        height=240, width=426, num_frames=34, noise=seeded_noise(), callback=keep_last,
    )  # fmt: skip
    assert out.shape == (1, 4, 20, 4, 4)
    for k in (1, 2):  # edit ratio 0: the 5 overlap frames are kept exactly from the previous chunk
        assert torch.equal(chunks[k][:, :, :5], chunks[k - 1][:, :, 5:])
    assert torch.equal(out, torch.cat([chunks[0], chunks[1][:, :, 5:], chunks[2][:, :, 5:]], dim=2))


def test_long_video_reference_chain_i2v_loop():
    shape = (1, 4, 8, 4, 4)
    image = latent(frames=1, seed=6)[0]
    model = ToyModel()
    out = sample_long_video(
        model, make_text(), RFlowOptions(num_steps=2, version="1.3", image_cfg_scale=2.0), latent_shape=shape,
        num_loops=2, height=240, width=426, num_frames=33, references=[image], cond_type="i2v_loop",
    )  # fmt: skip
    assert out.shape == (1, 4, 11, 4, 4)
    first, second = model.calls[0], model.calls[2]
    assert first["mask_index"] == [0]  # the end frame only on the last chunk
    assert second["mask_index"] == [0, 1, 2, 3, 4, 7]
    assert torch.equal(second["cond"][:1, :, :5], out[:, :, 3:8])
    assert torch.equal(second["cond"][:1, :, 7], image[None, :, 0])


def test_long_video_i2v_tail_first_chunk_unconditioned():
    model = ToyModel()
    sample_long_video(
        model, make_text(), RFlowOptions(num_steps=1, version="1.3"), latent_shape=(1, 4, 8, 4, 4), num_loops=2,
        height=240, width=426, num_frames=33, references=[latent(frames=1)[0]], cond_type="i2v_tail",
    )  # fmt: skip
    assert model.calls[0]["cond"] is None and model.calls[1]["mask_index"] == [0, 1, 2, 3, 4, 7]


def test_long_video_bad_input():
    args = dict(latent_shape=(1, 4, 10, 4, 4), height=240, width=426, num_frames=34)
    with pytest.raises(ValueError, match="condition_frame_length must be between 1 and 9"):
        sample_long_video(ToyModel(), make_text(), RFlowOptions(num_steps=1), num_loops=2, condition_frame_length=10,
                          **args)  # fmt: skip
    with pytest.raises(ValueError, match="one per loop"):
        sample_long_video(ToyModel(), [make_text()] * 2, RFlowOptions(num_steps=1), num_loops=3, **args)
    with pytest.raises(ValueError, match="not both"):
        sample_long_video(ToyModel(), make_text(), RFlowOptions(num_steps=1), num_loops=1, cond_type="i2v_head",
                          mask_strategy="0", **args)  # fmt: skip
    with pytest.raises(ValueError, match="num_loops"):
        sample_long_video(ToyModel(), make_text(), RFlowOptions(num_steps=1), num_loops=0, **args)


def test_conditioning_fps_is_120_for_a_single_image_whatever_was_asked():
    from opensora_lib.rflow import conditioning_fps

    assert conditioning_fps(24, 1) == conditioning_fps(None, 1) == 120
    assert conditioning_fps(None, 17) == 24 and conditioning_fps(8, 17) == 8


@pytest.mark.parametrize(
    ("mask_index", "reference_frames", "official"),
    [
        ([0], 1, "0"),  # i2v_head, as the official docs' image example
        ([14], 1, "0,0,0,-1,1,0"),  # i2v_tail: align 5 moves it to latent frame 10 of 15
        ([0, 14], 1, "0;0,0,0,-1,1,0"),  # i2v_loop
        ([0, 1, 2, 3, 4], 8, "0,0,0,0,5,0"),  # v2v_head: one group of 5
        ([7], 1, "0,0,0,7,1,0"),  # any frame (snapped to 5)
    ],
)
def test_v12_mask_strategies_for_the_cond_types_equal_the_official_strings(mask_index, reference_frames, official):
    from opensora_lib.conditioning_v1 import V12_ALIGN, mask_strategies_for

    z = latent(batch=1, frames=15)
    ref = latent(batch=1, frames=reference_frames, seed=4)
    ours_z, ours = apply_mask_strategy(z, [ref], mask_strategies_for(mask_index, reference_frames), align=V12_ALIGN)
    want_z, want = apply_mask_strategy(z, [ref], official, align=V12_ALIGN)
    assert torch.equal(ours_z, want_z) and torch.equal(ours.frame_mask, want.frame_mask)
    assert (ours.frame_mask == 0).sum() == len(mask_index)  # every reference frame is kept, none dropped


@pytest.mark.parametrize(
    ("mask_index", "images", "official"),
    [
        ([0], 1, "0"),  # i2v_head
        ([14], 1, "0,0,0,-1,1,0"),  # i2v_tail
        ([0, 14], 1, "0;0,0,0,-1,1,0"),  # i2v_loop, one image at both ends
        ([0, 14], 2, "0;0,1,0,-1,1,0"),  # i2v_loop with an end image: the official "a.png;b.png" ref_id 1
    ],
)
def test_v12_image_strategies_equal_the_official_strings(mask_index, images, official):
    from opensora_lib.conditioning_v1 import V12_ALIGN, image_strategies

    z = latent(batch=1, frames=15)
    encoded = latent(batch=1, frames=images, seed=4)  # one latent frame per image
    references = [encoded[:, :, k : k + 1] for k in range(images)]  # one reference per image, as the official
    ours_z, ours = apply_mask_strategy(z, references, image_strategies(mask_index, images), align=V12_ALIGN)
    want_z, want = apply_mask_strategy(z, references, official, align=V12_ALIGN)
    assert torch.equal(ours_z, want_z) and torch.equal(ours.frame_mask, want.frame_mask)
    if images == 2:  # the end image lands on the aligned last frame, the start image on frame 0
        assert torch.equal(ours_z[:, :, 10], encoded[:, :, 1]) and torch.equal(ours_z[:, :, 0], encoded[:, :, 0])
