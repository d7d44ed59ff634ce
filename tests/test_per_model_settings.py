"""Core's model sampling (shift) nodes and the attention backend on the Open-Sora MODELs, inside ComfyUI (--cpu).

- ModelSamplingSD3 hands a DiT 1000 x sigma as its timestep, ModelSamplingAuraFlow / ModelSamplingFlux sigma. Each
  Open-Sora DiT takes one scale (1.x: 1000 x t, 2.0: t), so under core KSampler a shift node must change the
  schedule only: SD3 and AuraFlow (the same shift formula) give the same samples, and at shift 1 both equal the
  unpatched MODEL. ModelSamplingFlux runs on 2.0 and is refused by name on 1.x.
- The Open-Sora Sampler node keeps Open-Sora's own schedule and says that a shift node is ignored.
- Load Open-Sora DiT's attention belongs to its MODEL: loading a second DiT with another backend does not change
  the first one's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_comfy_probe import probe_with_tiny_dits

DITS = {"2.0": "tiny-v2.safetensors", "1.3": "tiny-v13/"}
LATENTS = {"2.0": ("2.0", "256px", "16:9", 9, 1, 64, 48), "1.3": ("1.3", "144p", "9:16", 17)}
SEED, STEPS = 3, 3


def probe(out_path: str, models_dir: str) -> None:
    import comfy.model_management as mm
    import folder_paths
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow, ModelSamplingFlux, ModelSamplingSD3
    from helpers_comfy_probe import pack_warnings
    from helpers_conditioning import random_conditioning, sampler_node_samples
    from opensora_pack.nodes import latent, loaders

    import nodes as core_nodes

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    folder_paths.add_model_folder_path("diffusion_models", str(Path(models_dir) / "diffusion_models"), True)
    results: dict = {}

    def load(version, attention="sdpa"):
        return loaders.OpenSoraLoadDiT().load(DITS[version], "fp32", attention)[0]

    def ksampler(model, version):
        positive, negative = random_conditioning(version, model.model.diffusion_model.config)
        (empty,) = latent.OpenSoraEmptyLatentVideo().generate(*LATENTS[version])
        (out,) = core_nodes.KSampler().sample(model, SEED, STEPS, 4.0, "euler", "simple", positive, negative, empty)
        mm.unload_all_models()
        return out["samples"]

    for version in DITS:
        model = load(version)
        plain = ksampler(model, version)
        sd3, aura = (
            ksampler(patch(model, 3.0)[0], version)
            for patch in (ModelSamplingSD3().patch, ModelSamplingAuraFlow().patch_aura)
        )
        sd3_1, aura_1 = (
            ksampler(patch(model, 1.0)[0], version)
            for patch in (ModelSamplingSD3().patch, ModelSamplingAuraFlow().patch_aura)
        )
        flux = ModelSamplingFlux().patch(model, 1.15, 0.5, 64, 48)[0]
        try:
            flux_result = "finite" if bool(ksampler(flux, version).isfinite().all()) else "not finite"
        except ValueError as e:
            flux_result = f"ValueError: {e}"
        results[version] = {
            "sd3_equals_aura": bool(torch.equal(sd3, aura)),
            "shift_1_equals_plain": [bool(torch.equal(sd3_1, plain)), bool(torch.equal(aura_1, plain))],
            "shift_3_differs": float((sd3 - plain).abs().max()),
            "flux": flux_result,
        }

    with pack_warnings() as messages:
        sampler_node_samples(ModelSamplingSD3().patch(load("2.0"), 3.0)[0], "2.0", LATENTS["2.0"], SEED, 2, 5.0)
    results["sampler_warnings"] = messages

    # 2.0 reads the fps written into the prompt; a different Empty Latent fps is named
    from opensora_pack.nodes.sampling_v2 import warn_fps_mismatch

    prompt = [[torch.zeros(1), {"opensora_text": "a fox in snow. 24 FPS. 4 motion score."}]]
    with pack_warnings() as fps_messages:
        warn_fps_mismatch(prompt, {"opensora": {"fps": 12}})
        warn_fps_mismatch(prompt, {"opensora": {"fps": 24}})
        warn_fps_mismatch([[torch.zeros(1), {}]], {"opensora": {"fps": 12}})  # core conditioning: no text to read
    results["fps_warnings"] = fps_messages

    # attention: the 2.0 DiT with "math", sampled before and after a 1.3 DiT is loaded with "sdpa"
    math_v2 = load("2.0", "math")
    before = sampler_node_samples(math_v2, "2.0", LATENTS["2.0"], SEED, 2, 5.0)
    load("1.3", "sdpa")
    after = sampler_node_samples(math_v2, "2.0", LATENTS["2.0"], SEED, 2, 5.0)
    sdpa = sampler_node_samples(load("2.0", "sdpa"), "2.0", LATENTS["2.0"], SEED, 2, 5.0)
    results["attention"] = {
        "same_after_other_load": bool(torch.equal(before, after)),
        "math_vs_sdpa": float((after - sdpa).abs().max()),
    }
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    return probe_with_tiny_dits("test_per_model_settings", tmp_path_factory.mktemp("per-model"), DITS)


@pytest.mark.parametrize("version", ["2.0", "1.3"])
def test_shift_nodes_change_the_schedule_not_the_timestep_scale(measured, version):
    values = measured[version]
    assert values["sd3_equals_aura"], values  # the same shift; only their timestep scales differ
    assert values["shift_1_equals_plain"] == [True, True], values
    assert values["shift_3_differs"] > 1e-3, values  # the shift itself is honoured


def test_model_sampling_flux_fits_2_0_and_is_refused_on_1_x(measured):
    assert measured["2.0"]["flux"] == "finite"
    message = measured["1.3"]["flux"]
    assert message.startswith("ValueError") and "ModelSamplingFlux" in message and "ModelSamplingSD3" in message, (
        message
    )


def test_the_sampler_node_says_it_ignores_a_shift_node(measured):
    assert any("model sampling node" in m and "ignored" in m for m in measured["sampler_warnings"]), measured


def test_each_dit_keeps_its_own_attention_backend(measured):
    values = measured["attention"]
    assert values["same_after_other_load"], values
    assert values["math_vs_sdpa"] > 0, "math and sdpa attention must differ in the last bits on the CPU"


def test_a_2_0_latent_fps_other_than_the_prompts_is_named(measured):
    (message,) = measured["fps_warnings"]
    assert "the prompt says 24 FPS but Empty Latent Video's fps is 12" in message
