"""Quirk Q2 on a 1.x DiT that computes in bf16, inside ComfyUI (--cpu): the official bf16 inference holds the pixel
sizes and fps as bf16 tensors, so its shift is worked out from bf16 sizes and the DiT's pos-emb / RoPE scale sees
bf16-rounded ones (480 x 854 -> 480 x 856). Every official config runs in bf16.

- The Open-Sora Sampler, and the Guider with Open-Sora Sigmas given the MODEL, hand the DiT the bf16 schedule; in
  float32 (the golden fixtures' precision) or Sigmas without the MODEL the float32 one.
- The MODEL's conditioning (the Guider's and core KSampler's path) rounds the sizes to bf16 when it computes in bf16.
- A bf16 Guider given Open-Sora Sigmas made without the MODEL (the float32 schedule) says so.

A bf16 DiT computes in float32 on a CPU (core's manual cast); the probe turns the cast off, as a GPU with bf16 runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_comfy_probe import probe_with_tiny_dits

DITS = {"1.3": "tiny-v13/"}
SMALL = ("1.3", "144p", "9:16", 17, 1, 248, 136)  # sampled: 136 x 248 (t differs by up to 0.46 / 1000)
OFFICIAL = ("1.3", "480p", "9:16", 49)  # the table size 480 x 854: schedule and conditioning only
STEPS = 3


def probe(out_path: str, models_dir: str) -> None:
    import comfy.model_management as mm
    import folder_paths
    from comfy_extras.nodes_custom_sampler import KSamplerSelect, RandomNoise, SamplerCustomAdvanced
    from helpers_comfy_probe import pack_warnings, result_of
    from helpers_conditioning import random_conditioning
    from opensora_pack.nodes import guider, latent, loaders, sampling
    from opensora_pack.opensora_lib.schedules import rflow_timesteps

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    folder_paths.add_model_folder_path("diffusion_models", str(Path(models_dir) / "diffusion_models"), True)

    def load(weight_dtype):
        (model,) = loaders.OpenSoraLoadDiT().load(DITS["1.3"], weight_dtype)
        if weight_dtype == "bf16":
            model.model.manual_cast_dtype = None  # compute in the weights' bf16, as on a GPU
        return model

    def seen_timesteps(model, run) -> list[float]:
        """The timesteps the DiT is called with (0..1000), one per step (cond and uncond share a call)."""
        seen: list[float] = []

        def record(_module, args, kwargs):
            t = args[1] if len(args) > 1 else kwargs["timesteps"]
            seen.append(float(t.flatten()[0]))

        hook = model.model.diffusion_model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            run()
        finally:
            hook.remove()
            mm.unload_all_models()
        return seen

    results: dict = {}
    (official,) = latent.OpenSoraEmptyLatentVideo().generate(*OFFICIAL)
    (small,) = latent.OpenSoraEmptyLatentVideo().generate(*SMALL)
    for weight_dtype in ("bf16", "fp32"):
        model = load(weight_dtype)
        positive, negative = random_conditioning("1.3", model.model.diffusion_model.config)
        conds = model.model.extra_conds(opensora_version="1.3", height=480, width=854, fps=24)

        def sampler_node(model=model, positive=positive, negative=negative):
            sampling.OpenSoraSampler().sample(model, positive, negative, small, 5, STEPS, 7.5)

        def guided(model=model, positive=positive, negative=negative, sigmas_model=model):
            (g,) = guider.OpenSoraGuider().get_guider(model, positive, negative, small, 7.5)
            (sigmas,) = sampling.OpenSoraSigmas().sigmas(small, STEPS, True, sigmas_model)
            noise, euler = result_of(RandomNoise.execute(5)), result_of(KSamplerSelect.execute("euler"))
            result_of(SamplerCustomAdvanced.execute(noise, g, euler, sigmas, small))

        results[weight_dtype] = {
            "sizes": [conds[name].cond for name in ("height", "width", "fps")],
            "sigmas": sampling.OpenSoraSigmas().sigmas(official, 30, True, model)[0].tolist(),
            "sampler": seen_timesteps(model, sampler_node),
            "guider": seen_timesteps(model, guided),
        }
        with pack_warnings() as messages:
            seen_timesteps(model, lambda guided=guided: guided(sigmas_model=None))
        results[weight_dtype]["without_model_warnings"] = [m for m in messages if "Open-Sora Sigmas" in m]
    results["sigmas_without_model"] = sampling.OpenSoraSigmas().sigmas(official, 30)[0].tolist()
    for bf16 in (True, False):
        results[f"schedule_bf16_{bf16}"] = {
            "official": rflow_timesteps(30, 480, 854, 49, "1.3", bf16_inputs=bf16).tolist(),
            "small": rflow_timesteps(STEPS, 136, 248, 17, "1.3", bf16_inputs=bf16).tolist(),
        }
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    return probe_with_tiny_dits("test_bf16_sizes", tmp_path_factory.mktemp("bf16-sizes"), DITS)


def test_the_model_conditioning_rounds_sizes_to_bf16_when_it_computes_in_bf16(measured):
    assert measured["bf16"]["sizes"] == [480, 856, 24], measured["bf16"]
    assert measured["fp32"]["sizes"] == [480, 854, 24], measured["fp32"]


@pytest.mark.parametrize("weight_dtype", ["bf16", "fp32"])
def test_sigmas_follow_the_models_compute_dtype(measured, weight_dtype):
    schedule = measured[f"schedule_bf16_{weight_dtype == 'bf16'}"]["official"]
    expected = [t / 1000 for t in schedule]
    assert measured[weight_dtype]["sigmas"] == pytest.approx([*expected, 0.0], abs=1e-7)
    assert measured["sigmas_without_model"] == measured["fp32"]["sigmas"]
    bf16, fp32 = measured["schedule_bf16_True"]["official"], measured["schedule_bf16_False"]["official"]
    assert max(abs(a - b) for a, b in zip(bf16, fp32, strict=True)) > 0.5  # 480 x 854, 49 frames: ~1/1000 of t


@pytest.mark.parametrize("weight_dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("path", ["sampler", "guider"])
def test_the_dit_sees_the_schedule_of_its_compute_dtype(measured, weight_dtype, path):
    seen = measured[weight_dtype][path]
    expected = measured[f"schedule_bf16_{weight_dtype == 'bf16'}"]["small"]
    other = measured[f"schedule_bf16_{weight_dtype != 'bf16'}"]["small"]
    assert seen == pytest.approx(expected, abs=1e-3), seen
    assert seen != pytest.approx(other, abs=1e-3), (seen, other)  # the two schedules are told apart here


def test_a_bf16_guider_on_sigmas_made_without_the_model_says_so(measured):
    (message,) = measured["bf16"]["without_model_warnings"]
    assert "connect the MODEL to Open-Sora Sigmas" in message, message
    assert measured["fp32"]["without_model_warnings"] == []  # float32: that schedule is the right one
