"""Open-Sora 1.2 image-to-video through Encode Reference + the Sampler node, in ComfyUI (--cpu).

1.2 has no reference input: as its official inference, the reference is written into the latent with a mask
strategy (edit ratio 0) aligned to 5 latent frames. Checked on a 51-frame latent (15 latent frames, the official
default length): the kept frames come out as the Encode Reference latent exactly (head: 0; tail: frame 10, where
align 5 puts -1; loop: both), the DiT sees them as x_mask False at every step, the other frames are generated.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_comfy_probe import run_probe

DIT, VAE = "opensora-tiny-v12/", "opensora-tiny-vae-v12/"
KEPT = {"i2v_head": [0], "i2v_tail": [10], "i2v_loop": [0, 10]}


def probe(out_path: str, models_dir: str) -> None:
    import comfy.model_management as mm
    import folder_paths
    from helpers_conditioning import random_conditioning
    from opensora_pack.nodes import latent, loaders, sampling

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    for kind in ("diffusion_models", "vae"):
        folder_paths.add_model_folder_path(kind, str(Path(models_dir) / kind), True)
    (model,) = loaders.OpenSoraLoadDiT().load(DIT, "fp32")
    (vae,) = loaders.OpenSoraLoadVAE().load(VAE, "fp32")
    positive, negative = random_conditioning("1.2", model.model.diffusion_model.config)
    (empty,) = latent.OpenSoraEmptyLatentVideo().generate("1.2", "144p", "9:16", 51)
    image = torch.rand(1, 144, 256, 3, generator=torch.Generator().manual_seed(2))
    x_masks: list = []
    dm = model.model.diffusion_model
    dm.register_forward_pre_hook(lambda _m, _a, kwargs: x_masks.append(kwargs.get("x_mask")), with_kwargs=True)
    results = {}
    for cond_type in KEPT:
        (lat,) = latent.OpenSoraEncodeReference().encode(image, empty, cond_type, vae=vae, seed=3)
        reference = lat["opensora_reference"]["latent"]
        runs = []
        x_masks.clear()
        for seed in (1, 2):
            (out,) = sampling.OpenSoraSampler().sample(model, positive, negative, lat, seed, 3, 7.0)
            mm.unload_all_models()
            runs.append(out["samples"])
        a, b = runs
        kept = KEPT[cond_type]
        others = [f for f in range(a.shape[2]) if f not in kept]
        masks = [m for m in x_masks if m is not None]
        results[cond_type] = {
            "latent_frames": a.shape[2],
            "kept_is_reference": all(torch.equal(a[:, :, f], reference[:, :, 0]) for f in kept),
            "kept_same_across_seeds": all(torch.equal(a[:, :, f], b[:, :, f]) for f in kept),
            "others_differ": float((a[:, :, others] - b[:, :, others]).abs().max()),
            "dit_calls": len(x_masks),
            "x_mask_calls": len(masks),
            "x_mask_false": sorted({f for m in masks for f in (~m[0]).nonzero().flatten().tolist()}),
        }
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    from demo_models import make_dit, make_vae

    models = tmp_path_factory.mktemp("models-v12-reference")
    make_dit("1.2", models / "diffusion_models" / DIT.rstrip("/"))
    make_vae("1.2", models / "vae" / VAE.rstrip("/"))
    return run_probe("test_v12_reference", models / "results.json", models)


@pytest.mark.parametrize("cond_type", list(KEPT))
def test_v12_reference_frames_are_kept_where_the_official_strategy_puts_them(measured, cond_type):
    values = measured[cond_type]
    assert values["latent_frames"] == 15, values
    assert values["kept_is_reference"] and values["kept_same_across_seeds"], values
    assert values["others_differ"] > 0.1, values
    assert values["dit_calls"] == values["x_mask_calls"] > 0, values  # the frame mask reaches every DiT call
    assert values["x_mask_false"] == KEPT[cond_type], values
