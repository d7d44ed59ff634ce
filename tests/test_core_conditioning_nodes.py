"""Core conditioning and latent nodes in front of the Open-Sora Sampler / Guider / KSampler, in ComfyUI (--cpu).

- What the Sampler and the Guider would drop is refused by name: several entries (ConditioningCombine), core's
  timestep range / area / mask keys, a noise mask (SetLatentNoiseMask). Core KSampler applies them and runs.
- 1.x conditioning whose mask no longer fits its T5 states (ConditioningConcat) or of another width (a CLIP encoder)
  is named, also under KSampler (before: a shape or matmul error deep in the DiT).
- LatentFromBatch: the Sampler draws the noise of the batch row it was given, as core samplers do.
- An empty IMAGE batch into Encode Reference is named.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_comfy_probe import probe_with_tiny_dits

DIT = {"1.3": "opensora-tiny-v13/", "2.0": "opensora-tiny-v2.safetensors"}
LATENT = {"1.3": ("1.3", "144p", "9:16", 17), "2.0": ("2.0", "256px", "16:9", 9, 1, 64, 64)}
SEED, STEPS, CFG = 11, 2, 7.0


def probe(out_path: str, models_dir: str) -> None:
    import comfy.model_management as mm
    import folder_paths
    from helpers_conditioning import random_conditioning
    from opensora_pack.nodes import guider, latent, loaders, sampling

    import nodes as core

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    folder_paths.add_model_folder_path("diffusion_models", str(Path(models_dir) / "diffusion_models"), True)
    results: dict = {}

    def outcome(run) -> str | None:
        try:
            run()
        except ValueError as e:
            return str(e)
        finally:
            mm.unload_all_models()
        return None

    def one_version(version: str) -> None:
        (model,) = loaders.OpenSoraLoadDiT().load(DIT[version], "fp32")
        positive, negative = random_conditioning(version, model.model.diffusion_model.config)
        (empty,) = latent.OpenSoraEmptyLatentVideo().generate(*LATENT[version])

        def sampler(pos, lat=empty, neg=negative, m=model):
            return sampling.OpenSoraSampler().sample(m, pos, neg, lat, SEED, STEPS, CFG)[0]["samples"]

        def guided(pos, m=model):
            return guider.OpenSoraGuider().get_guider(m, pos, negative, empty, CFG)[0].set_conds(pos, negative)

        def ksampler(pos, neg=negative, m=model):
            return core.KSampler().sample(m, SEED, STEPS, 5.0, "euler", "simple", pos, neg, empty)[0]["samples"]

        other = [[positive[0][0].flip(1), dict(positive[0][1])]]
        changed = {
            "combine": core.ConditioningCombine().combine(positive, other)[0],
            "timestep range": core.ConditioningSetTimestepRange().set_range(positive, 0.5, 0.5)[0],
            "area": core.ConditioningSetAreaPercentage().append(positive, 0.5, 0.5, 0.0, 0.0, 1.0)[0],
            "mask": core.ConditioningSetMask().append(positive, torch.zeros(1, 64, 64), "default", 1.0)[0],
            "whole range": core.ConditioningSetTimestepRange().set_range(positive, 0.0, 1.0)[0],
        }
        for name, conditioning in changed.items():
            results[f"{version} sampler {name}"] = outcome(lambda c=conditioning: sampler(c))
            results[f"{version} guider {name}"] = outcome(lambda c=conditioning: guided(c))
        results[f"{version} sampler empty"] = outcome(lambda: sampler([]))  # e.g. from a custom node
        results[f"{version} ksampler combine"] = outcome(lambda: ksampler(changed["combine"]))
        results[f"{version} ksampler timestep range"] = outcome(lambda: ksampler(changed["timestep range"]))

        (masked,) = core.SetLatentNoiseMask().set_mask(empty, torch.zeros(1, 64, 64))
        results[f"{version} noise mask"] = outcome(lambda m=masked: sampler(positive, lat=m))

        (batch,) = latent.OpenSoraEmptyLatentVideo().generate(*LATENT[version][:4], 2, *LATENT[version][5:])
        (row,) = core.LatentFromBatch().frombatch(batch, 1, 1)
        both, second = sampler(positive, lat=batch), sampler(positive, lat=row)
        mm.unload_all_models()
        results[f"{version} batch_index"] = {
            "to_row_1": float((second[0] - both[1]).abs().max()),
            "to_row_0": float((second[0] - both[0]).abs().max()),
        }

        if version == "1.3":
            import comfy.hooks

            # hooked conditioning runs through core's sampling, which has no SDEdit: a 1.3 reference with sdedit on
            # (the Sampler's default) is named before anything runs (only the reference's presence is read first)
            hooked = comfy.hooks.set_hooks_for_conditioning(positive, comfy.hooks.create_hook_lora({}, 1.0, 0.0))
            referenced = {**empty, "opensora_reference": "from Encode Reference"}
            results["1.3 sampler hooks sdedit"] = outcome(lambda: sampler(hooked, lat=referenced))
            (concat,) = core.ConditioningConcat().concat(positive, positive)
            results["1.3 sampler concat"] = outcome(lambda c=concat: sampler(c))
            results["1.3 ksampler concat"] = outcome(lambda c=concat: ksampler(c))
            clip_like = [[torch.randn(1, 77, 768), {}]]  # core CLIPTextEncode output of a CLIP-L encoder
            results["1.3 ksampler clip width"] = outcome(lambda c=clip_like: ksampler(c, neg=c))

    for version in ("1.3", "2.0"):
        one_version(version)

    (reference_latent,) = latent.OpenSoraEmptyLatentVideo().generate(*LATENT["1.3"])
    results["empty image batch"] = outcome(
        lambda: latent.OpenSoraEncodeReference().encode(torch.zeros(0, 64, 64, 3), reference_latent, "i2v_head")
    )
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    return probe_with_tiny_dits(
        "test_core_conditioning_nodes", tmp_path_factory.mktemp("models-core-conditioning"), DIT
    )


REFUSED = {
    "combine": "has 2 entries (e.g. from ConditioningCombine)",
    "timestep range": "start_percent, end_percent (from ConditioningSetTimestepRange or a hook node's timestep range)",
    "area": "area (from ConditioningSetArea / ConditioningSetAreaPercentage)",
    "mask": "mask (from ConditioningSetMask)",
}


@pytest.mark.parametrize("node", ["sampler", "guider"])
@pytest.mark.parametrize("change", list(REFUSED))
@pytest.mark.parametrize("version", ["1.3", "2.0"])
def test_what_the_sampler_and_guider_would_drop_is_refused(measured, version, change, node):
    message = measured[f"{version} {node} {change}"]
    assert message is not None and REFUSED[change] in message and "core KSampler" in message, message


@pytest.mark.parametrize("version", ["1.3", "2.0"])
def test_whole_timestep_range_and_ksampler_still_run(measured, version):
    assert measured[f"{version} sampler whole range"] is None
    assert measured[f"{version} guider whole range"] is None
    assert measured[f"{version} ksampler combine"] is None
    assert measured[f"{version} ksampler timestep range"] is None


@pytest.mark.parametrize("version", ["1.3", "2.0"])
def test_empty_conditioning_is_named(measured, version):
    assert measured[f"{version} sampler empty"] == "The positive conditioning is empty."


def test_hooks_with_sdedit_on_a_1_3_reference_are_refused_by_name(measured):
    message = measured["1.3 sampler hooks sdedit"]
    assert message is not None and "no sdedit" in message and "turn sdedit off" in message, message
    assert "LoraLoaderModelOnly" in message, message


@pytest.mark.parametrize("version", ["1.3", "2.0"])
def test_noise_mask_is_refused_by_the_sampler(measured, version):
    message = measured[f"{version} noise mask"]
    assert message is not None and "SetLatentNoiseMask" in message and "KSampler" in message, message


@pytest.mark.parametrize("version", ["1.3", "2.0"])
def test_latent_from_batch_draws_its_own_row(measured, version):
    values = measured[f"{version} batch_index"]
    assert values["to_row_1"] < 1e-3 < values["to_row_0"], values


def test_concat_and_clip_width_are_named_for_1x(measured):
    for key in ("1.3 sampler concat", "1.3 ksampler concat"):
        message = measured[key]
        assert message is not None and "ConditioningConcat" in message and "but an attention mask for" in message, (
            message
        )
    message = measured["1.3 ksampler clip width"]
    assert message is not None and "text states of shape (1, 77, 768)" in message, message


def test_empty_image_batch_is_named(measured):
    message = measured["empty image batch"]
    assert message is not None and "batch is empty" in message, message
