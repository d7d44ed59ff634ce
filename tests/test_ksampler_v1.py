"""Core KSampler on a 1.x MODEL with Open-Sora Encode Prompt's conditioning, in ComfyUI (--cpu).

Core's samplers give the model neither the video's pixel size and fps nor the learned null caption; the MODEL fills
them in (extra_conds): sizes from the latent (the official table size for it, else x8), fps 24 (120 for one frame), the null-caption negative as the
DiT's y_embedding with all its tokens. The result must equal KSampler on conditioning that spells these out.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_comfy_probe import probe_with_tiny_dits

DIT = "opensora-tiny-v13/"
SEED, STEPS = 4, 3


def probe(out_path: str, models_dir: str) -> None:
    import comfy.model_management as mm
    import folder_paths
    from helpers_conditioning import random_conditioning
    from opensora_pack.nodes import latent, loaders

    import nodes as core_nodes

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    folder_paths.add_model_folder_path("diffusion_models", str(Path(models_dir) / "diffusion_models"), True)
    (model,) = loaders.OpenSoraLoadDiT().load(DIT, "fp32")
    positive, negative = random_conditioning("1.3", model.model.diffusion_model.config)
    y_null = model.model.diffusion_model.y_embedder.y_embedding.detach().float()[None]
    results = {}

    def ksampler(pos, neg, lat):
        (out,) = core_nodes.KSampler().sample(model, SEED, STEPS, 5.0, "euler", "simple", pos, neg, lat)
        mm.unload_all_models()
        return out["samples"]

    # 144p 9:16 is 144 x 256, the latent x8; 480p 9:16 is 480 x 854, latent 60 x 107 (x8: 856), from the table
    for frames, fps, resolution, (height, width) in ((17, 24.0, "144p", (144, 256)), (1, 120.0, "480p", (480, 854))):
        (lat,) = latent.OpenSoraEmptyLatentVideo().generate("1.3", resolution, "9:16", frames)
        sizes = {"height": height, "width": width, "fps": fps}
        text, meta = positive[0]
        spelled_pos = [[text, {**meta, **sizes}]]
        null_mask = torch.ones(y_null.shape[:2], dtype=torch.long)
        spelled_neg = [[y_null, {"attention_mask": null_mask, "opensora_version": "1.3", **sizes}]]
        plain = ksampler(positive, negative, lat)
        spelled = ksampler(spelled_pos, spelled_neg, lat)
        other_fps = ksampler([[text, {**meta, **sizes, "fps": 8.0}]], spelled_neg, lat)
        times_8 = {"height": lat["samples"].shape[3] * 8, "width": lat["samples"].shape[4] * 8}
        other_size = ksampler([[text, {**meta, **sizes, **times_8}]], spelled_neg, lat)
        results[str(frames)] = {
            "equal": bool(torch.equal(plain, spelled)),
            "finite": bool(plain.isfinite().all()),
            "fps_matters": float((other_fps - spelled).abs().max()),
            "table_size": (height, width) != (times_8["height"], times_8["width"]),
            "size_matters": float((other_size - spelled).abs().max()),
        }
    text, meta = positive[0]
    try:
        ksampler([[text, {**meta, "opensora_version": "1.2"}]], negative, lat)
        results["other_version"] = None
    except ValueError as error:
        results["other_version"] = str(error)
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    return probe_with_tiny_dits("test_ksampler_v1", tmp_path_factory.mktemp("models-ksampler-v1"), {"1.3": DIT})


@pytest.mark.parametrize("frames", ["17", "1"])
def test_ksampler_fills_in_what_core_does_not_give(measured, frames):
    values = measured[frames]
    assert values["finite"] and values["equal"], values
    assert values["fps_matters"] > 1e-4, values  # the spelled-out fps reaches the model, so "equal" is meaningful
    if values["table_size"]:  # the table size, not the latent x8, is what reaches the model
        assert values["size_matters"] > 1e-6, values


def test_ksampler_refuses_conditioning_of_another_version(measured):
    message = measured["other_version"]
    assert message is not None and "encoded for Open-Sora 1.2 but the model is Open-Sora 1.3" in message, message
