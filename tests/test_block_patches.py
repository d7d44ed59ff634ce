"""Core's "dit" block patches and sampling hooks with the Open-Sora 2.0 MMDiT.

- Library: MMDiT.forward(block_replace=...) with a pass-through replacement is bit-identical to none; a skip equals
  the model with that block taken out (a hand-made ModuleList swap).
- In ComfyUI (--cpu), a tiny 2.0 MMDiT with 2 double + 2 single blocks:
  (a) set_model_patch_replace(..., "dit", "double_block" / "single_block", i) reaches ComfyMMDiT with the args
      core's Flux gives (img, txt, vec, pe, attn_mask, transformer_options with block_type / block_index /
      total_blocks): pass-through is bit-identical with the Sampler node and with the Guider; a skip patch equals
      the swapped-out block and the skipped block never runs;
  (b) core's SkipLayerGuidanceDiT (a post-CFG function) with the Open-Sora Guider: one extra model call per step
      in which the chosen layers do not run; scale 0 is bit-identical to no SLG;
  (c) core's SkipLayerGuidanceDiTSimple (a calc-cond-batch function) with the Guider: the negative text pass runs
      without the chosen layers; a pass-through handler / pre-CFG function is bit-identical (t2v) or within float
      rounding (i2v, where the image pass runs on its own);
  (d) KSampler (core's CFG) with SkipLayerGuidanceDiT: the skip applies there too;
  (e) a sampler_cfg_function is not applied by the Guider, with one warning;
  (f) the Sampler node runs no sampling hooks: with SkipLayerGuidanceDiT its output is unchanged, with one warning
      that points to the Guider;
  (g) the 1.x STDiT3 (spatial / temporal block pairs) does not apply "dit" patches: output unchanged, one warning
      per process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers_comfy_probe import pack_warnings, result_of, run_probe

REPO = Path(__file__).resolve().parent.parent
DIT_FILE = "opensora-tiny-v2-4blocks.safetensors"
V13_FILE = "opensora-tiny-v13/"
LATENT = ("2.0", "256px", "16:9", 9, 1, 64, 48)  # Empty Latent Video: version, preset, ratio, frames, batch, w, h
STEPS = 12  # past step 10 the odd steps run one pass (oscillation): step 11 has no negative pass
SEED, CFG, IMAGE_CFG = 17, 7.5, 3.0
SLG_LAYERS = ("1", "0")  # double_layers, single_layers


def _tiny_config(depth: int = 2, single: int = 2) -> dict:
    sys.path.insert(0, str(REPO / "scripts"))
    from demo_models_v2 import MMDIT_CONFIG

    return {**MMDIT_CONFIG, "depth": depth, "depth_single_blocks": single}


class _SkipDouble(torch.nn.Module):
    def forward(self, img, txt, vec, pe):
        return img, txt


class _SkipSingle(torch.nn.Module):
    def forward(self, joint, vec, pe):
        return joint


def test_library_block_replace_pass_through_and_skip():
    sys.path.insert(0, str(REPO))
    from opensora_lib.mmdit import MMDiT
    from opensora_lib.sampling_v2 import image_ids, text_ids

    torch.manual_seed(0)
    with torch.no_grad():
        model = MMDiT(_tiny_config()).eval()
        for p in model.parameters():
            p.normal_(0, 0.05)
        config = model.config
        tokens, text = 2 * 3 * 4, 5
        inputs = dict(
            img=torch.randn(2, tokens, config.in_channels),
            img_ids=image_ids(2, 6, 8, 2),
            txt=torch.randn(2, text, config.context_in_dim),
            txt_ids=text_ids(text),
            timesteps=torch.tensor([0.3, 0.7]),
            y_vec=torch.randn(2, config.vec_in_dim),
            cond=torch.randn(2, tokens, config.in_channels + 4),
        )
        plain = model(**inputs)
        seen = []

        def pass_through(args, extra):
            seen.append(sorted(args))
            return extra["original_block"](args)

        keys = [("double_block", 0), ("double_block", 1), ("single_block", 0), ("single_block", 1)]
        out = model(**inputs, block_replace={key: pass_through for key in keys})
        assert torch.equal(out, plain)
        assert seen == [["img", "pe", "txt", "vec"]] * 2 + [["img", "pe", "vec"]] * 2

        def skip(args, extra):
            return args

        skipped = model(**inputs, block_replace={("double_block", 1): skip, ("single_block", 0): skip})
        model.double_blocks[1], model.single_blocks[0] = _SkipDouble(), _SkipSingle()
        swapped = model(**inputs)
        assert torch.equal(skipped, swapped)
        assert (skipped - plain).abs().max() > 1e-3  # the skip changes the output


def probe(out_path: str, models_dir: str) -> None:  # noqa: C901 (one subprocess, many measurements)
    """Runs inside ComfyUI (--cpu). Writes {check: value} to out_path."""
    import contextlib
    import json

    import comfy.model_management as mm
    import folder_paths
    from comfy_extras.nodes_custom_sampler import KSamplerSelect, RandomNoise, SamplerCustomAdvanced
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiT, SkipLayerGuidanceDiTSimple
    from helpers_conditioning import random_conditioning
    from opensora_pack.nodes import guider, latent, loaders, sampling

    import nodes as core_nodes

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    folder_paths.add_model_folder_path("diffusion_models", str(Path(models_dir) / "diffusion_models"), True)
    results: dict = {}

    (model,) = loaders.OpenSoraLoadDiT().load(DIT_FILE, "fp32")
    dm = model.model.diffusion_model
    positive, negative = random_conditioning("2.0", dm.config)

    def latent_for(i2v: bool) -> dict:
        (empty,) = latent.OpenSoraEmptyLatentVideo().generate(*LATENT)
        if not i2v:
            return empty
        samples = empty["samples"]
        ref = torch.randn(1, samples.shape[1], 1, *samples.shape[3:], generator=torch.Generator().manual_seed(3))
        reference = {"latent": ref, "mask_index": [0], "cond_type": "i2v_head", "version": "2.0"}
        return {**empty, "opensora_reference": reference}

    def sampler_node(m, i2v=False):
        (out,) = sampling.OpenSoraSampler().sample(
            m, positive, negative, latent_for(i2v), SEED, STEPS, CFG, image_cfg=IMAGE_CFG
        )
        mm.unload_all_models()
        return out["samples"]

    def guided(m, i2v=False, sampler_name="euler"):  # Open-Sora Guider + Sigmas + a core sampler (euler: reference)
        lat = latent_for(i2v)
        (g,) = guider.OpenSoraGuider().get_guider(m, positive, negative, lat, CFG, IMAGE_CFG)
        (sigmas,) = sampling.OpenSoraSigmas().sigmas(lat, STEPS)
        noise, euler = result_of(RandomNoise.execute(SEED)), result_of(KSamplerSelect.execute(sampler_name))
        out = result_of(SamplerCustomAdvanced.execute(noise, g, euler, sigmas, lat))
        mm.unload_all_models()
        return out["samples"]

    def ksampler(m):
        (out,) = core_nodes.KSampler().sample(m, SEED, STEPS, 5.0, "euler", "simple", positive, negative, latent_for(0))
        mm.unload_all_models()
        return out["samples"]

    @contextlib.contextmanager
    def block_calls():
        """Counts calls of every block module (a replaced block's module runs only through original_block)."""
        counts = {f"double {i}": 0 for i in range(len(dm.double_blocks))}
        counts.update({f"single {i}": 0 for i in range(len(dm.single_blocks))})
        handles = []
        for kind, blocks in (("double", dm.double_blocks), ("single", dm.single_blocks)):
            for i, block in enumerate(blocks):

                def hook(_module, _args, name=f"{kind} {i}"):
                    counts[name] += 1

                handles.append(block.register_forward_pre_hook(hook))
        try:
            yield counts
        finally:
            for handle in handles:
                handle.remove()

    def compare(a, b) -> dict:
        return {"equal": bool(torch.equal(a, b)), "max_abs_diff": float((a - b).abs().max())}

    plain = {"sampler t2v": sampler_node(model), "sampler i2v": sampler_node(model, True)}
    plain.update({"guider t2v": guided(model), "guider i2v": guided(model, True)})
    with block_calls() as counts:
        guided(model)
    results["guider_plain_counts"] = dict(counts)

    # -- (a) block replacement patches
    seen = []

    def pass_through(args, extra):
        options = args["transformer_options"]
        seen.append(
            {
                "keys": sorted(args),
                "attn_mask": args["attn_mask"] is None,
                "where": [options.get("block_type"), options.get("block_index"), options.get("total_blocks")],
                "img_slice": options.get("img_slice"),
            }
        )
        return extra["original_block"](args)

    patched = model.clone()
    for kind, index in (("double_block", 0), ("double_block", 1), ("single_block", 1)):
        patched.set_model_patch_replace(pass_through, "dit", kind, index)
    runs = {
        "sampler t2v": lambda: sampler_node(patched),
        "sampler i2v": lambda: sampler_node(patched, True),
        "guider t2v": lambda: guided(patched),
        "guider i2v": lambda: guided(patched, True),
    }
    pass_results = {}
    for key, run in runs.items():
        seen.clear()
        out = run()
        pass_results[key] = {**compare(out, plain[key]), "patch_calls": len(seen)}
        pass_results[key]["args"] = seen[:3]
    results["pass_through"] = pass_results

    def skip(args, extra):
        return args

    skipping = model.clone()
    skipping.set_model_patch_replace(skip, "dit", "double_block", 1)
    skipping.set_model_patch_replace(skip, "dit", "single_block", 0)
    with block_calls() as counts:
        skipped = sampler_node(skipping)
    saved = dm.double_blocks[1], dm.single_blocks[0]
    dm.double_blocks[1], dm.single_blocks[0] = _SkipDouble(), _SkipSingle()
    try:
        swapped = sampler_node(model)
    finally:
        dm.double_blocks[1], dm.single_blocks[0] = saved
    results["skip"] = {**compare(skipped, swapped), "vs_plain": float((skipped - plain["sampler t2v"]).abs().max())}
    results["skip"]["counts"] = dict(counts)

    # -- (b) SkipLayerGuidanceDiT: a post-CFG function (scale, start 0 %, end 100 %: every step)
    def slg(scale):
        return result_of(SkipLayerGuidanceDiT.execute(model, scale, 0.0, 1.0, *SLG_LAYERS, 0.0))

    with block_calls() as counts:
        out = guided(slg(3.0))
    results["slg"] = {"vs_plain": float((out - plain["guider t2v"]).abs().max()), "counts": dict(counts)}
    # core's window test (sigma_end <= sigma <= sigma_start) on the Open-Sora schedule
    sampling_object = model.get_model_object("model_sampling")
    start, end = sampling_object.percent_to_sigma(0.0), sampling_object.percent_to_sigma(1.0)
    (sigmas,) = sampling.OpenSoraSigmas().sigmas(latent_for(False), STEPS)
    results["slg"]["sigmas"] = [float(s) for s in sigmas[:-1]]
    results["slg"]["steps_in_window"] = sum(end <= float(s) <= start for s in sigmas[:-1])
    results["slg"]["finite"] = bool(torch.isfinite(out).all())
    results["slg_scale0"] = compare(guided(slg(0.0)), plain["guider t2v"])

    recorded = []

    def recording_post_cfg(args):
        recorded.append(
            {
                "uncond_is_none": args["uncond"] is None,
                "uncond_zero": bool((args["uncond_denoised"] == 0).all()),
                "cond_scale": args["cond_scale"],
                "same_shapes": args["denoised"].shape == args["cond_denoised"].shape == args["input"].shape,
            }
        )
        return args["denoised"]

    recorder = model.clone()
    recorder.set_model_sampler_post_cfg_function(recording_post_cfg)
    results["post_cfg_identity"] = {**compare(guided(recorder), plain["guider t2v"]), "calls": list(recorded)}

    # disable_cfg1_optimization (set by CFG++ samplers' hooks, SAG): the negative pass runs on every step, for the
    # hooks; the guidance still uses only the passes it needs
    recorded.clear()
    cfg1 = model.clone()
    cfg1.set_model_sampler_post_cfg_function(recording_post_cfg, disable_cfg1_optimization=True)
    out = guided(cfg1)
    results["post_cfg_cfg1"] = {**compare(out, plain["guider t2v"]), "calls": list(recorded)}
    results["post_cfg_cfg1"]["magnitude"] = float(plain["guider t2v"].abs().mean())
    # core samplers that take logit(sigma) (CFG++, SDE) need sigma <= 1 on the first step
    results["first_sigma"] = results["slg"]["sigmas"][0]
    cfg_pp = guided(model, sampler_name="euler_cfg_pp")
    sde = guided(model, sampler_name="dpmpp_2m_sde")
    results["other_samplers_finite"] = {"euler_cfg_pp": bool(torch.isfinite(cfg_pp).all())}
    results["other_samplers_finite"]["dpmpp_2m_sde"] = bool(torch.isfinite(sde).all())

    # a patch that hands the block an attention mask: refused with a clear error (the MMDiT takes none)
    def masking(args, extra):
        return extra["original_block"]({**args, "attn_mask": torch.ones(1)})

    masked = model.clone()
    masked.set_model_patch_replace(masking, "dit", "double_block", 0)
    try:
        sampler_node(masked)
        results["mask_patch_error"] = "no error"
    except ValueError as error:
        results["mask_patch_error"] = str(error)
    mm.unload_all_models()

    # -- (c) SkipLayerGuidanceDiTSimple: a calc-cond-batch function on the [positive, negative] pair
    simple = result_of(SkipLayerGuidanceDiTSimple.execute(model, 0.0, 1.0, *SLG_LAYERS))
    with block_calls() as counts:
        out = guided(simple)
    results["slg_simple"] = {"vs_plain": float((out - plain["guider t2v"]).abs().max()), "counts": dict(counts)}

    import comfy.samplers

    handler_calls = []

    def pass_through_handler(args):
        handler_calls.append([c is None for c in args["conds"]])
        return comfy.samplers.calc_cond_batch(
            args["model"], args["conds"], args["input"], args["sigma"], args["model_options"]
        )

    def pass_through_pre_cfg(args):
        return args["conds_out"]

    hooked = model.clone()
    hooked.set_model_sampler_calc_cond_batch_function(pass_through_handler)
    hooked.set_model_sampler_pre_cfg_function(pass_through_pre_cfg)
    results["handler_t2v"] = {**compare(guided(hooked), plain["guider t2v"]), "conds_none": list(handler_calls)}
    handler_calls.clear()
    out = guided(hooked, True)
    results["handler_i2v"] = {**compare(out, plain["guider i2v"]), "magnitude": float(plain["guider i2v"].abs().mean())}
    results["handler_i2v"]["calls"] = len(handler_calls)

    # -- (d) KSampler with SkipLayerGuidanceDiT
    base = ksampler(model)
    with block_calls() as counts:
        out = ksampler(slg(3.0))
    results["ksampler_slg"] = {"vs_plain": float((out - base).abs().max()), "counts": dict(counts)}
    with block_calls() as counts:
        ksampler(model)
    results["ksampler_plain_counts"] = dict(counts)

    # -- (e) a sampler_cfg_function: not applied by the Guider, one warning
    cfg_fn = model.clone()
    cfg_fn.set_model_sampler_cfg_function(lambda args: args["cond"] * 0.0)
    with pack_warnings() as warnings:
        out = guided(cfg_fn)
    results["cfg_function"] = {**compare(out, plain["guider t2v"]), "warnings": warnings}
    # (f) the Sampler node runs no sampling hooks: SLG there leaves the output alone, with one warning
    with pack_warnings() as warnings:
        out = sampler_node(slg(3.0))
    results["sampler_slg"] = {**compare(out, plain["sampler t2v"]), "warnings": warnings}

    # (g) 1.x: the STDiT3 has no double / single blocks; "dit" patches are not applied, with one warning
    (v13,) = loaders.OpenSoraLoadDiT().load(V13_FILE, "fp32")
    v13_positive, v13_negative = random_conditioning("1.3", v13.model.diffusion_model.config)
    (v13_latent,) = latent.OpenSoraEmptyLatentVideo().generate("1.3", "144p", "9:16", 17)

    def v13_sample(m):
        args = (m, v13_positive, v13_negative, v13_latent, SEED, 3, CFG)
        (out,) = sampling.OpenSoraSampler().sample(*args)
        mm.unload_all_models()
        return out["samples"]

    v13_skip = v13.clone()
    v13_skip.set_model_patch_replace(skip, "dit", "double_block", 0)
    with pack_warnings() as warnings:
        base, out, again = v13_sample(v13), v13_sample(v13_skip), v13_sample(v13_skip)
    results["v13_dit_patch"] = {
        **compare(out, base),
        "again_equal": bool(torch.equal(again, base)),
        "warnings": warnings,
    }

    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    from demo_models import make_dit
    from demo_models_v2 import make_mmdit

    models = tmp_path_factory.mktemp("models-block-patches")
    make_mmdit(models / "diffusion_models" / DIT_FILE, _tiny_config())
    make_dit("1.3", models / "diffusion_models" / V13_FILE.rstrip("/"))
    return run_probe("test_block_patches", models / "results.json", models)


def test_pass_through_patches_are_bit_identical(measured):
    for key, values in measured["pass_through"].items():
        assert values["equal"], (key, values["max_abs_diff"])
        assert values["patch_calls"] > 0, key
    args = measured["pass_through"]["sampler t2v"]["args"]
    assert args[0] == {
        "keys": ["attn_mask", "img", "pe", "transformer_options", "txt", "vec"],
        "attn_mask": True,
        "where": ["double", 0, 2],
        "img_slice": None,
    }
    assert args[1]["where"] == ["double", 1, 2]
    assert args[2]["keys"] == ["attn_mask", "img", "pe", "transformer_options", "vec"]
    assert args[2]["where"] == ["single", 1, 2]
    # where the image tokens sit in the single blocks' joint sequence: after the 7 T5 tokens, 3 x 3 x 4 of them
    assert args[2]["img_slice"] == [7, 7 + 36] and args[0]["img_slice"] is None
    # the Sampler node batches the guidance passes: one call of each of the 3 patches per step
    assert measured["pass_through"]["sampler t2v"]["patch_calls"] == 3 * STEPS


def test_skip_patch_equals_the_block_taken_out(measured):
    skip = measured["skip"]
    assert skip["equal"], skip["max_abs_diff"]
    assert skip["vs_plain"] > 1e-3
    assert skip["counts"]["double 1"] == 0 and skip["counts"]["single 0"] == 0
    assert skip["counts"]["double 0"] == STEPS and skip["counts"]["single 1"] == STEPS


def test_skip_layer_guidance_with_the_open_sora_guider(measured):
    plain, slg = measured["guider_plain_counts"], measured["slg"]
    assert slg["finite"] and slg["vs_plain"] > 1e-3
    # one extra model call per step in core's window, in which double 1 and single 0 are skipped
    assert slg["steps_in_window"] == STEPS, slg["sigmas"]
    assert slg["counts"]["double 0"] == plain["double 0"] + slg["steps_in_window"]
    assert slg["counts"]["single 1"] == plain["single 1"] + slg["steps_in_window"]
    assert slg["counts"]["double 1"] == plain["double 1"] and slg["counts"]["single 0"] == plain["single 0"]
    assert measured["slg_scale0"]["equal"], measured["slg_scale0"]["max_abs_diff"]
    calls = measured["post_cfg_identity"]["calls"]
    assert measured["post_cfg_identity"]["equal"] and len(calls) == STEPS
    assert all(c["same_shapes"] for c in calls)
    # step 11 (odd, past step 10) has no negative pass: uncond None and zeros, as core's cfg-1 optimisation
    assert [c["uncond_is_none"] for c in calls] == [False] * 11 + [True]
    assert calls[-1]["uncond_zero"] and not calls[0]["uncond_zero"]
    assert [c["cond_scale"] for c in calls] == [CFG] * 11 + [1.0]


def test_skip_layer_guidance_simple_with_the_open_sora_guider(measured):
    simple, plain, sigmas = measured["slg_simple"], measured["guider_plain_counts"], measured["slg"]["sigmas"]
    assert simple["vs_plain"] > 1e-3
    # in core's window (sigma <= 1.0: every step, the Sigmas clamp the first to 1.0) the handler runs the positive
    # and negative passes as separate calls, the negative one without double 1 / single 0; step 11 (odd, past step
    # 10) has no negative pass
    split_steps = sum(1 for step, sigma in enumerate(sigmas) if sigma <= 1.0 and step != 11)
    assert plain["double 0"] == STEPS and split_steps == 11, sigmas
    assert simple["counts"]["double 0"] == STEPS + split_steps and simple["counts"]["single 1"] == STEPS + split_steps
    assert simple["counts"]["double 1"] == STEPS and simple["counts"]["single 0"] == STEPS


def test_pass_through_calc_cond_batch_and_pre_cfg_hooks(measured):
    t2v, i2v = measured["handler_t2v"], measured["handler_i2v"]
    assert t2v["equal"], t2v["max_abs_diff"]
    assert t2v["conds_none"] == [[False, False]] * 11 + [[False, True]]
    assert i2v["calls"] == STEPS
    assert i2v["max_abs_diff"] <= 1e-5 * max(1.0, i2v["magnitude"]), i2v  # the image pass runs on its own


def test_skip_layer_guidance_with_ksampler(measured):
    slg, plain = measured["ksampler_slg"], measured["ksampler_plain_counts"]
    assert slg["vs_plain"] > 1e-3
    assert slg["counts"]["double 0"] == plain["double 0"] + STEPS
    assert slg["counts"]["double 1"] == plain["double 1"]


def test_cfg_function_is_not_applied_and_warned(measured):
    values = measured["cfg_function"]
    assert values["equal"], values["max_abs_diff"]
    assert len(values["warnings"]) == 1 and "sampler_cfg_function" in values["warnings"][0]


def test_sampler_node_warns_about_sampling_hooks(measured):
    values = measured["sampler_slg"]
    assert values["equal"], values["max_abs_diff"]
    assert len(values["warnings"]) == 1, values["warnings"]
    assert "sampler_post_cfg_function" in values["warnings"][0] and "Open-Sora Guider" in values["warnings"][0]


def test_stdit3_ignores_dit_patches_with_one_warning(measured):
    values = measured["v13_dit_patch"]
    assert values["equal"] and values["again_equal"], values["max_abs_diff"]
    assert len(values["warnings"]) == 1 and "not applied to the Open-Sora 1.x STDiT3" in values["warnings"][0]


def test_disable_cfg1_optimization_runs_the_negative_pass_for_hooks(measured):
    values = measured["post_cfg_cfg1"]
    calls = values["calls"]
    assert len(calls) == STEPS and not any(c["uncond_is_none"] or c["uncond_zero"] for c in calls)
    # the guidance is unchanged (step 11 still uses the positive pass alone; batching may round differently)
    assert values["max_abs_diff"] <= 1e-5 * max(1.0, values["magnitude"]), values


def test_sigmas_suit_core_samplers_that_take_logit_sigma(measured):
    assert measured["first_sigma"] == 1.0  # the float32 schedule rounds to 1.0000001 without the clamp
    assert measured["other_samplers_finite"] == {"euler_cfg_pp": True, "dpmpp_2m_sde": True}


def test_block_patch_passing_an_attention_mask_is_refused(measured):
    assert "attention mask" in measured["mask_patch_error"] and "takes no mask" in measured["mask_patch_error"]
