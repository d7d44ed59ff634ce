"""Open-Sora 2.0 sampler: golden trajectories, conditioning, pass skipping (bit-identical), paste-back, bf16."""

import dataclasses

import pytest
import torch
from helpers_torch import no_grad, one_thread  # noqa: F401 (autouse fixtures)

from opensora_lib.fixtures.mmdit_cases import build_model
from opensora_lib.fixtures.runner import load_case, run_path
from opensora_lib.fixtures.v2_sampling_cases import _text
from opensora_lib.mmdit import MMDiT
from opensora_lib.sampling_v2 import (
    PASSES,
    V2SamplingOptions,
    conditioned_frames,
    image_ids,
    pack,
    pass_plan,
    prepare_condition,
    sample_v2,
    step_scales,
    unpack,
    v2_noise,
)


@pytest.fixture(scope="module")
def case(fixtures_dir):
    return load_case(fixtures_dir / "v2_t2v_sampling")


@pytest.fixture(scope="module")
def model(case):
    return build_model(case)


@pytest.fixture(scope="module")
def text(case):
    return _text(case, 1)


def small_latent(batch: int = 1, seed: int = 0) -> torch.Tensor:
    # 3 latent frames of 4 x 4 (12 tokens): cheap enough to sample many times.
    return v2_noise((batch, 16, 3, 4, 4), seed)


def reference_latent(seed: int = 1) -> torch.Tensor:
    return v2_noise((1, 16, 1, 4, 4), seed)


def small_options(**overrides) -> V2SamplingOptions:
    # 12 steps reach the oscillating steps (>= 10), where both scales drop to 1.0 on odd steps.
    return V2SamplingOptions(**{"num_steps": 12, **overrides})


@pytest.mark.parametrize("name", ["v2_t2v_sampling", "v2_i2v_sampling"])
def test_golden_sampling_cases_pass(fixtures_dir, name):
    comparisons = run_path(fixtures_dir / name)
    names = {c.name for c in comparisons}
    assert {"timesteps", "cond_packed", "step00.model_out", "step11.model_out", "x_final"} <= names
    assert "x_final[skipping sampler]" in names
    failed = [(c.name, c.max_abs, c.detail) for c in comparisons if not c.passed]
    assert not failed
    assert max(c.max_abs for c in comparisons if c.name.startswith("x_final")) < 1e-5


def test_golden_case_has_batch_one(fixtures_dir):
    # The reference pastes the reference latent into batch item 0 only (Q17); with one item that is
    # the same as our every-item paste, and the runner uses paste_reference="first" anyway.
    meta = load_case(fixtures_dir / "v2_i2v_sampling").meta
    assert meta["sampling_option"]["batch_prompts"] == 1 and meta["latent_shape"][0] == 1


def test_pack_unpack_and_ids(case):
    x = case.tensor("z_init")
    tokens = pack(x)
    assert tokens.shape == (1, 3 * 4 * 6, 64)
    assert torch.equal(unpack(tokens, 3, 8, 12), x)
    assert torch.equal(image_ids(3, 8, 12), case.tensor("img_ids"))
    # Feature order is (channel, ph, pw): channel 0's 2 x 2 patch comes first.
    assert torch.equal(tokens[0, 0, :4], x[0, 0, 0, :2, :2].flatten())
    with pytest.raises(ValueError, match="divisible by 2"):
        pack(torch.zeros(1, 16, 1, 3, 4))


def test_conditioned_frames_per_cond_type():
    assert conditioned_frames("t2v", 5) == []
    assert conditioned_frames("i2v_head", 5) == [0]
    assert conditioned_frames("i2v_tail", 5) == [4]
    assert conditioned_frames("i2v_loop", 5) == [0, 4]
    assert conditioned_frames("v2v_head", 33) == list(range(9))
    assert conditioned_frames("v2v_head", 33, causal=False) == list(range(8))
    assert conditioned_frames("v2v_tail_easy", 33) == list(range(16, 33))
    with pytest.raises(ValueError, match="unknown cond_type 'v2v_head_half'; allowed: t2v, i2v_head"):
        conditioned_frames("v2v_head_half", 33)
    with pytest.raises(ValueError, match="needs a video"):
        conditioned_frames("i2v_head", 1)
    with pytest.raises(
        ValueError, match="conditions the first 9 latent frames, so the video to generate needs at least 10"
    ):
        conditioned_frames("v2v_head", 9)


def test_prepare_condition_values_and_errors():
    head, tail = reference_latent(1), reference_latent(2)
    masks, masked, frames = prepare_condition((2, 16, 3, 4, 4), "i2v_loop", [head, tail])
    assert frames == [0, 2]
    assert masks[:, :, [0, 2]].eq(1).all() and masks[:, :, 1].eq(0).all()
    assert torch.equal(masked[1, :, 0], head[0, :, 0]) and torch.equal(masked[1, :, 2], tail[0, :, 0])
    assert masked[:, :, 1].eq(0).all()
    with pytest.raises(ValueError, match="needs a reference latent"):
        prepare_condition((1, 16, 3, 4, 4), "i2v_head", None)
    with pytest.raises(ValueError, match="does not fit the latent"):
        prepare_condition((1, 16, 3, 4, 4), "i2v_head", torch.zeros(1, 16, 1, 4, 6))


def test_pass_counts_at_50_steps():
    options = V2SamplingOptions()  # shipped defaults: 50 steps, 7.5 / 3.0, all oscillation on
    counts = {cond_type: sum(len(p) for p in pass_plan(options, cond_type, 33)) for cond_type in ("t2v", "i2v_head")}
    assert counts == {"t2v": 80, "i2v_head": 110}
    assert sum(len(p) for p in pass_plan(dataclasses.replace(options, skip_redundant_passes=False), "t2v")) == 150
    no_text_guidance = V2SamplingOptions(guidance=1.0, text_osci=False, image_osci=False)
    assert all(p == ("cond",) for p in pass_plan(no_text_guidance, "t2v"))
    # With text guidance 1 an i2v step still needs all three passes: v = v_c + (g_img - 1)(v_u - v_u2) ...
    assert pass_plan(dataclasses.replace(no_text_guidance, scale_temporal_osci=False), "i2v_head")[0] == PASSES
    # ... unless the image scale is 1 too.
    assert pass_plan(V2SamplingOptions(guidance=1.0, guidance_img=1.0), "i2v_head")[0] == ("cond",)


def test_temporal_image_scale_ramp():
    options = small_options()
    text_scale, ramp = step_scales(2, options, "i2v_head", 3)
    upper = torch.linspace(3.0, 1.0, 13)[2]
    assert text_scale == 7.5 and torch.equal(ramp, torch.linspace(1.0, upper.item(), 3))
    assert step_scales(2, options, "t2v", 3) == (7.5, 3.0)  # only i2v cond types get the ramp
    assert step_scales(11, options, "i2v_head", 3) == (1.0, 1.0)  # oscillation: odd step >= 10


def run_counting(model, x, text, options, **kwargs):
    passes = []
    trace = []

    def callback(info):
        passes.append(tuple(info["outputs"]))
        trace.append(info)

    out = sample_v2(model, x, text, options, callback=callback, **kwargs)
    return out, passes, trace


VARIANTS = {
    "shipped": {},
    "text_osci_off": {"text_osci": False},
    "image_osci_off": {"image_osci": False},
    "text_guidance_1": {"guidance": 1.0, "text_osci": False},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("cond_type", ["t2v", "i2v_head", "i2v_loop"])
def test_skipping_passes_is_bit_identical(model, text, cond_type, variant):
    # One model call per pass (batch_passes=False): every pass then sees the same batch composition in both
    # samplers, so a skipped pass cannot perturb the others through batch-dependent float results.
    options = small_options(batch_passes=False, **VARIANTS[variant])
    x = small_latent()
    cond = None if cond_type == "t2v" else [reference_latent(1), reference_latent(2)]
    full, full_passes, _ = run_counting(
        model, x, text, dataclasses.replace(options, skip_redundant_passes=False), cond=cond, cond_type=cond_type
    )
    fast, fast_passes, _ = run_counting(model, x, text, options, cond=cond, cond_type=cond_type)
    assert torch.equal(fast, full)
    assert all(p == PASSES for p in full_passes)
    # 12 steps; step 11 is the only oscillating (odd, >= 10) one.
    expected = {
        ("t2v", "shipped"): 23,  # 11 x (cond, uncond_text) + cond only at step 11
        ("t2v", "text_osci_off"): 24,  # text scale always 7.5: (cond, uncond_text) every step
        ("t2v", "image_osci_off"): 23,  # the image scale never matters for t2v
        ("t2v", "text_guidance_1"): 12,  # v = v_c every step
        ("i2v", "shipped"): 34,  # 11 x 3 + cond only at step 11
        ("i2v", "text_osci_off"): 35,  # step 11: image scale 1 -> (cond, uncond_text)
        ("i2v", "image_osci_off"): 36,  # image term every step: nothing can be skipped
        ("i2v", "text_guidance_1"): 34,  # image term until step 10, then v = v_c
    }
    assert sum(map(len, fast_passes)) == expected[(cond_type[:3], variant)]


def test_skipped_passes_are_really_redundant(model, text):
    """What the skipping relies on, checked on the always-3-pass run."""
    options = small_options(batch_passes=False, skip_redundant_passes=False)
    _, _, trace = run_counting(model, small_latent(), text, options, cond_type="t2v")
    for info in trace:  # t2v: the uncond-all pass sees exactly the uncond-text inputs
        assert torch.equal(info["outputs"]["uncond_all"], info["outputs"]["uncond_text"])
    _, _, trace = run_counting(model, small_latent(), text, options, cond=reference_latent(), cond_type="i2v_head")
    last = trace[11]  # both scales 1: the reference's formula is v_c up to float rounding
    assert last["passes"] == ("cond",)
    c, u, u2 = (last["outputs"][name] for name in PASSES)
    assert torch.equal(last["v"], c)
    assert torch.allclose(u2 + 1.0 * (u - u2) + 1.0 * (c - u), c, atol=1e-6, rtol=0)
    assert not torch.allclose(u, c, atol=1e-3)  # the passes themselves differ: the test is not vacuous


def test_batched_passes_match_per_pass_calls(model, text):
    x, ref = small_latent(), reference_latent()
    batched = sample_v2(model, x, text, small_options(), cond=ref, cond_type="i2v_head")
    single = sample_v2(model, x, text, small_options(batch_passes=False), cond=ref, cond_type="i2v_head")
    assert torch.allclose(batched, single, atol=1e-5, rtol=1e-5)


def test_callback_reports_the_step(model, text):
    _, _, trace = run_counting(model, small_latent(), text, small_options(num_steps=3), cond_type="t2v")
    assert [info["i"] for info in trace] == [0, 1, 2] and trace[0]["t"] == 1.0
    info = trace[1]
    x0 = pack(info["x"]) - info["t"] * info["v"]
    assert torch.allclose(pack(info["denoised"]), x0)
    assert info["t_next"] < info["t"] and info["passes"] == ("cond", "uncond_text")


def test_reference_paste_back_every_item_or_first(model, text):
    x, ref = small_latent(batch=2), reference_latent()
    every = sample_v2(model, x, text, small_options(num_steps=2), cond=ref, cond_type="i2v_head")
    assert torch.equal(every[:, :, 0], ref[:, :, 0].expand(2, -1, -1, -1))
    first = sample_v2(
        model, x, text, small_options(num_steps=2, paste_reference="first"), cond=ref, cond_type="i2v_head"
    )
    assert torch.equal(first[0, :, 0], ref[0, :, 0]) and not torch.equal(first[1, :, 0], ref[0, :, 0])
    assert torch.equal(first[:, :, 1:], every[:, :, 1:])
    tail = sample_v2(model, x, text, small_options(num_steps=2), cond=ref, cond_type="i2v_tail")
    assert torch.equal(tail[:, :, -1], ref[:, :, 0].expand(2, -1, -1, -1))


def test_bf16_model_and_state_smoke(case, text):
    x, ref = small_latent(), reference_latent()
    reference = sample_v2(build_model(case), x, text, small_options(), cond=ref, cond_type="i2v_head")
    model = MMDiT(case.meta["model_config"], dtype=torch.bfloat16).eval()
    model.load_state_dict(case.weights, strict=True)
    out = sample_v2(model, x, text, small_options(state_dtype=torch.bfloat16), cond=ref, cond_type="i2v_head")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.equal(out[:, :, 0], ref[:, :, 0].bfloat16())
    mixed = sample_v2(model, x, text, small_options(), cond=ref, cond_type="i2v_head")  # bf16 model, fp32 state
    assert mixed.dtype == torch.float32
    for result in (out.float(), mixed):
        relative = (result - reference).norm() / reference.norm()
        assert relative < 0.1, relative


def test_bad_input_errors(model, text):
    x = small_latent()
    with pytest.raises(ValueError, match="missing \\['neg_t5', 'neg_pooled'\\]"):
        sample_v2(model, x, {"t5": text["t5"], "pooled": text["pooled"]}, small_options())
    with pytest.raises(ValueError, match="paste_reference must be one of"):
        sample_v2(model, x, text, small_options(paste_reference="last"))
    with pytest.raises(ValueError, match="num_steps must be"):
        sample_v2(model, x, text, small_options(num_steps=0))
    with pytest.raises(ValueError, match="guidance and guidance_img must be numbers"):
        sample_v2(model, x, text, small_options(guidance_img=None))
    with pytest.raises(ValueError, match="x must be the latent noise"):
        sample_v2(model, pack(x), text, small_options())
    with pytest.raises(ValueError, match="unknown cond_type"):
        sample_v2(model, x, text, small_options(), cond=reference_latent(), cond_type="v2v_tail_half")
