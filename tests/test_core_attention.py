"""ComfyUI's own attention on the Open-Sora DiTs, inside ComfyUI (--cpu): Load Open-Sora DiT's "comfy" backend and
attention overrides on the MODEL (transformer_options["optimized_attention_override"], what patch nodes such as
KJNodes' Patch Sage Attention set).

- "comfy" sends every DiT attention call to core's optimized_attention (looked up at each call, so startup flags and
  patches that replace it apply), the 1.x caption mask included, and samples as sdpa does within float32 rounding.
- An override on the MODEL runs whatever the loader's backend, gets the running forward's transformer_options
  (sigmas, sample_sigmas) as core's DiTs hand them, under the Sampler node and core KSampler, and the log says it
  replaced sdpa; one a 2.0 block patch sets applies to that block.
- After a forward the backend lets go of the options.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_comfy_probe import probe_with_tiny_dits

DITS = {"2.0": "tiny-v2.safetensors", "1.3": "tiny-v13/"}
LATENTS = {"2.0": ("2.0", "256px", "16:9", 9, 1, 64, 48), "1.3": ("1.3", "144p", "9:16", 17)}
SEED, STEPS, CFG = 3, 2, 5.0


def probe(out_path: str, models_dir: str) -> None:
    import comfy.model_management as mm
    import folder_paths
    from comfy.ldm.modules import attention as core
    from helpers_comfy_probe import error_of, pack_warnings
    from helpers_conditioning import random_conditioning, sampler_node_samples
    from opensora_pack.nodes import core_attention, latent, loaders

    import nodes as core_nodes

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    folder_paths.add_model_folder_path("diffusion_models", str(Path(models_dir) / "diffusion_models"), True)
    calls: list[dict] = []
    original = core.optimized_attention

    def counting(q, k, v, heads, **kwargs):  # stands in for a patch that replaces core's function
        calls.append({"masked": kwargs.get("mask") is not None, "options": kwargs.get("transformer_options")})
        return original(q, k, v, heads, **kwargs)

    core.optimized_attention = counting
    overridden: list[dict] = []

    def override(func, *args, **kwargs):  # a patch node's override: sees core's function and arguments
        overridden.append(kwargs.get("transformer_options") or {})
        return func(*args, **kwargs)

    def with_override(model, function):
        model = model.clone()
        model.model_options["transformer_options"][core_attention.OVERRIDE] = function
        return model

    results: dict = {"choices": loaders.OpenSoraLoadDiT.INPUT_TYPES()["required"]["attention"][0]}
    for version in DITS:
        load = loaders.OpenSoraLoadDiT().load
        sdpa, comfy = (load(DITS[version], "fp32", backend)[0] for backend in ("sdpa", "comfy"))
        calls.clear()
        plain = sampler_node_samples(sdpa, version, LATENTS[version], SEED, STEPS, CFG)
        sdpa_calls = len(calls)
        via_core = sampler_node_samples(comfy, version, LATENTS[version], SEED, STEPS, CFG)
        core_calls = list(calls)
        calls.clear()
        with pack_warnings() as messages:
            hooked = sampler_node_samples(with_override(sdpa, override), version, LATENTS[version], SEED, STEPS, CFG)
        zeroed = sampler_node_samples(
            with_override(sdpa, lambda func, *a, **kw: func(*a, **kw) * 0), version, LATENTS[version], SEED, STEPS, CFG
        )
        sampler_overrides = len(overridden)
        sampler_sigmas = all(
            "sigmas" in options and bool(torch.isin(options["sigmas"], options["sample_sigmas"]).all())
            for options in overridden
        )
        overridden[:] = []
        positive, negative = random_conditioning(version, comfy.model.diffusion_model.config)
        (empty,) = latent.OpenSoraEmptyLatentVideo().generate(*LATENTS[version])
        core_nodes.KSampler().sample(
            with_override(comfy, override), SEED, STEPS, CFG, "euler", "simple", positive, negative, empty
        )
        mm.unload_all_models()
        if version == "1.3":  # a negative caption of another length: one batch, so a key mask on the captions
            y, meta = positive[0]
            short = meta["attention_mask"].clone()
            short[:, 5:] = 0
            negative = [[y.flip(1), {**meta, "attention_mask": short}]]
            calls.clear()
            masked = [
                core_nodes.KSampler().sample(model, SEED, STEPS, CFG, "euler", "simple", positive, negative, empty)
                for model in (sdpa, comfy)
            ]
            results["masked"] = {
                "calls": sum(call["masked"] for call in calls),
                "comfy_vs_sdpa": float((masked[1][0]["samples"] - masked[0][0]["samples"]).abs().max()),
            }
        results[version] = {
            "sdpa_calls": sdpa_calls,
            "core_calls": len(core_calls),
            "options_given": all(isinstance(call["options"], dict) for call in core_calls),
            "comfy_vs_sdpa": float((via_core - plain).abs().max()),
            "override_vs_comfy": float((hooked - via_core).abs().max()),
            "zeroed_vs_plain": float((zeroed - plain).abs().max()),
            "sampler_overrides": sampler_overrides,
            "sampler_sigmas": sampler_sigmas,
            "ksampler_overrides": len(overridden),
            "ksampler_sigmas": all("sigmas" in options for options in overridden),
            "warnings": [m for m in messages if "attention override" in m],
            "released": core_attention._options is None,
        }
    # an override that hands back core's [B, heads, tokens, head_dim] instead of Flux's [B, tokens, heads x head_dim]
    sdpa = loaders.OpenSoraLoadDiT().load(DITS["2.0"], "fp32", "sdpa")[0]

    def unreshaped(func, *args, **kwargs):
        return func(*args, **{**kwargs, "skip_output_reshape": True})

    results["wrong_shape"] = error_of(
        lambda: sampler_node_samples(with_override(sdpa, unreshaped), "2.0", LATENTS["2.0"], SEED, STEPS, CFG)
    )
    results["released_after_error"] = core_attention._options is None
    # a block patch that sets an override for its own block (as EliGen-style patches do on core's DiTs)
    block_calls: list[int] = []

    def block_override(func, *args, **kwargs):
        block_calls.append(kwargs["transformer_options"]["block_index"])
        return func(*args, **kwargs)

    def block_patch(args, extra):
        args["transformer_options"][core_attention.OVERRIDE] = block_override
        return extra["original_block"](args)

    patched = sdpa.clone()
    patched.set_model_patch_replace(block_patch, "dit", "double_block", 0)
    with_block = sampler_node_samples(patched, "2.0", LATENTS["2.0"], SEED, STEPS, CFG)
    results["block_override"] = {
        "blocks": sorted(set(block_calls)),
        "calls": len(block_calls),
        "vs_plain": float(
            (with_block - sampler_node_samples(sdpa, "2.0", LATENTS["2.0"], SEED, STEPS, CFG)).abs().max()
        ),
    }
    # ComfyUI 0.33's own Model Attention Backend node sets the same override (absent from 0.3.75)
    import comfyui_version
    from comfy_extras import nodes_model_advanced

    node = getattr(nodes_model_advanced, "ModelAttentionBackend", None)
    results["host"] = comfyui_version.__version__
    if node is not None:
        patched = node().patch(sdpa, "pytorch attention")[0]
        with_node = sampler_node_samples(patched, "2.0", LATENTS["2.0"], SEED, STEPS, CFG)
        plain = sampler_node_samples(sdpa, "2.0", LATENTS["2.0"], SEED, STEPS, CFG)
        results["core_node_vs_sdpa"] = float((with_node - plain).abs().max())
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    return probe_with_tiny_dits("test_core_attention", tmp_path_factory.mktemp("core-attention"), DITS)


def test_the_loader_offers_comfy(measured):
    assert "comfy" in measured["choices"] and measured["choices"][0] == "sdpa", measured["choices"]


@pytest.mark.parametrize("version", DITS)
def test_comfy_sends_every_attention_to_core_and_samples_as_sdpa(measured, version):
    values = measured[version]
    assert values["sdpa_calls"] == 0, values  # sdpa never calls core
    assert values["core_calls"] > 0 and values["options_given"], values
    assert values["comfy_vs_sdpa"] < 1e-4, values


def test_a_caption_mask_reaches_core(measured):
    """1.3 captions of different lengths in one batch attend through a key mask, which core takes as a float mask."""
    values = measured["masked"]
    assert values["calls"] > 0 and values["comfy_vs_sdpa"] < 1e-4, values


@pytest.mark.parametrize("version", DITS)
def test_an_override_on_the_model_runs_whatever_the_backend(measured, version):
    values = measured[version]
    assert values["sampler_overrides"] > 0 and values["ksampler_overrides"] > 0, values
    # the forward's sigmas and the schedule, as core's samplers put them in transformer_options (the Sampler node too)
    assert values["ksampler_sigmas"] and values["sampler_sigmas"], values
    assert values["override_vs_comfy"] == 0.0, values  # an override that delegates is core's attention exactly
    assert values["zeroed_vs_plain"] > 1e-3, values  # and what it returns is used
    assert values["released"], values


def test_the_log_says_an_override_replaced_the_loaders_backend(measured):
    (message,) = measured["2.0"]["warnings"]  # once per process
    assert "runs in place of Load Open-Sora DiT's attention 'sdpa'" in message, message


def test_an_override_that_returns_another_layout_is_named(measured):
    message = measured["wrong_shape"]
    assert message.startswith("ValueError: The MODEL's attention override returned shape"), message
    assert "[batch, tokens, heads x head_dim]" in message and measured["released_after_error"], measured


def test_core_model_attention_backend_node_applies_where_the_host_has_it(measured):
    """ComfyUI 0.33.0 has the node (0.3.75 does not): its "pytorch attention" override samples as sdpa."""
    if "core_node_vs_sdpa" in measured:
        assert measured["core_node_vs_sdpa"] < 1e-6, measured
    else:
        major, minor = (int(part) for part in measured["host"].split(".")[:2])
        assert (major, minor) < (0, 33), f"ComfyUI {measured['host']} should have ModelAttentionBackend"


def test_an_override_a_block_patch_sets_applies_to_that_block(measured):
    values = measured["block_override"]
    assert values["blocks"] == [0] and values["calls"] > 0, values  # with its block's options (block_index)
    assert values["vs_plain"] < 1e-4, values  # core's attention in that block, sdpa elsewhere
