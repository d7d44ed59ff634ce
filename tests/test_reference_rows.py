"""One reference image per video of a batch, in ComfyUI (--cpu), for every version.

Encode Reference given as many images as the latent's batch_size (i2v_head) conditions each video on its own image:
the reference latent has one row per video, and sampling a batch of 2 with images [A, B] gives, bit for bit, row 0
of the batch [A, A] and row 1 of the batch [B, B] (same noise rows; the rows are computed independently). That holds
for the Sampler node on 1.2 (mask strategy), 1.3 (the DiT's reference input), 2.0 (HunyuanVideo VAE, a stand-in
encoder here) and the 2.0 DC-AE, and for the Open-Sora Guider on 1.3 and 2.0; 2.0 pastes each row's own reference
frame back. i2v_loop takes one start and one end image per video (image and end_image of batch_size images each).
A latent whose batch changed after Encode Reference is refused by name; other image counts keep the
first image, and the warning says how to get one per video.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_comfy_probe import run_probe
from test_nodes_v2 import StandInVAE

LATENTS = {  # Empty Latent Video arguments, batch 2
    "1.2": ("1.2", "144p", "9:16", 17, 2),
    "1.3": ("1.3", "144p", "9:16", 17, 2),
    "2.0": ("2.0", "256px", "16:9", 9, 2, 64, 48),
    "2.0 DC-AE": ("2.0 DC-AE", "768px", "16:9", 12, 2, 64, 96, 24),
}


def probe(out_path: str, models_dir: str) -> None:
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import folder_paths
    from helpers_comfy_probe import pack_warnings
    from helpers_conditioning import random_conditioning
    from opensora_pack.nodes import guider, latent, loaders, sampling

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    for folder in ("diffusion_models", "vae"):
        folder_paths.add_model_folder_path(folder, str(Path(models_dir) / folder), True)
    names = json.loads((Path(models_dir) / "names.json").read_text())
    gen = torch.Generator().manual_seed(11)
    a, b, c = (torch.rand(1, 40, 60, 3, generator=gen) for _ in range(3))
    results: dict = {}
    for version, args in LATENTS.items():
        model = loaders.OpenSoraLoadDiT().load(names[f"dit_{version}"], "fp32")[0]
        vae = core_vae = None
        if version == "2.0":
            core_vae = StandInVAE()
        else:
            vae = loaders.OpenSoraLoadVAE().load(names[f"vae_{version}"], "fp32")[0]
        positive, negative = random_conditioning(version.split()[0], model.model.diffusion_model.config)
        (empty,) = latent.OpenSoraEmptyLatentVideo().generate(*args)

        def encode(images, cond_type="i2v_head", on=empty, vae=vae, core_vae=core_vae):
            return latent.OpenSoraEncodeReference().encode(images, on, cond_type, vae=vae, core_vae=core_vae, seed=3)[0]

        def sampled(ref_latent, model=model, positive=positive, negative=negative):
            out = sampling.OpenSoraSampler().sample(model, positive, negative, ref_latent, 5, 2, 7.5)[0]["samples"]
            comfy.model_management.unload_all_models()
            return out

        def guided(ref_latent, model=model, positive=positive, negative=negative):
            (g,) = guider.OpenSoraGuider().get_guider(model, positive, negative, ref_latent, 7.5, 3.0)
            (sigmas,) = sampling.OpenSoraSigmas().sigmas(ref_latent, 2)
            noise = comfy.sample.prepare_noise(ref_latent["samples"], 5)
            sampler = comfy.samplers.sampler_object("euler")
            out = g.sample(noise, ref_latent["samples"], sampler, sigmas, disable_pbar=True, seed=5)
            comfy.model_management.unload_all_models()
            return out

        ab, aa, bb = encode(torch.cat([a, b])), encode(torch.cat([a, a])), encode(torch.cat([b, b]))
        entry = {"reference_rows": ab["opensora_reference"]["latent"].shape[0]}
        runs = {"sampler": sampled} if version in ("1.2", "2.0 DC-AE") else {"sampler": sampled, "guider": guided}
        for name, run in runs.items():
            got_ab, got_aa, got_bb = run(ab), run(aa), run(bb)
            entry[name] = {
                "row0_is_a": bool(torch.equal(got_ab[0], got_aa[0])),
                "row1_is_b": bool(torch.equal(got_ab[1], got_bb[1])),
                "rows_differ": not torch.equal(got_ab[1], got_aa[1]),
            }
            if version.startswith("2.0") and name == "sampler":  # each row's own frame pasted back
                raw = ab["opensora_reference"]["latent"]
                frame = ab["opensora_reference"]["mask_index"][0]
                scaled = model.model.process_latent_out(model.model.process_latent_in(raw.float()))
                entry["pasted_own_frame"] = bool(torch.allclose(got_ab[:, :, frame], scaled[:, :, 0], atol=1e-5))
        # i2v_loop: start images [A, B] and end_image [C, A]: each video its own pair
        loops = {}
        for key, (starts, ends) in {"ab": ((a, b), (c, a)), "aa": ((a, a), (c, c)), "bb": ((b, b), (a, a))}.items():
            loop_latent = latent.OpenSoraEncodeReference().encode(
                torch.cat(starts), empty, "i2v_loop", vae=vae, core_vae=core_vae, seed=3, end_image=torch.cat(ends)
            )[0]
            loops[key] = (loop_latent["opensora_reference"]["latent"].shape[:3], sampled(loop_latent))
        entry["loop"] = {
            "reference_shape": list(loops["ab"][0]),
            "row0_is_a_c": bool(torch.equal(loops["ab"][1][0], loops["aa"][1][0])),
            "row1_is_b_a": bool(torch.equal(loops["ab"][1][1], loops["bb"][1][1])),
            "rows_differ": not torch.equal(loops["ab"][1][1], loops["aa"][1][1]),
        }
        with pack_warnings() as messages:
            shared = encode(torch.cat([a, b, c]))
        entry["three_images_keep_the_first"] = shared["opensora_reference"]["latent"].shape[0] == 1
        entry["warnings"] = messages
        one_row = dict(ab, samples=ab["samples"][:1])  # as LatentFromBatch after Encode Reference
        try:
            sampled(one_row)
            entry["changed_batch"] = "no error"
        except ValueError as e:
            entry["changed_batch"] = str(e)
        results[version] = entry
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    from demo_models import install_tiny_models
    from demo_models_v2 import NAMES, make_dcae, make_mmdit, make_mmdit_dcae

    models = tmp_path_factory.mktemp("models-reference-rows")
    names = install_tiny_models(models, ("1.2", "1.3"))
    make_mmdit(models / "diffusion_models" / NAMES["dit_2.0"])
    make_mmdit_dcae(models / "diffusion_models" / NAMES["dit_dcae"])
    make_dcae(models / "vae" / NAMES["vae_dcae"])
    names |= {"dit_2.0": NAMES["dit_2.0"], "dit_2.0 DC-AE": NAMES["dit_dcae"], "vae_2.0 DC-AE": NAMES["vae_dcae"]}
    (models / "names.json").write_text(json.dumps(names))
    return run_probe("test_reference_rows", models / "results.json", models)


@pytest.mark.parametrize("version", list(LATENTS))
def test_each_video_of_a_batch_gets_its_own_reference_image(measured, version):
    entry = measured[version]
    assert entry["reference_rows"] == 2, entry
    for run in ("sampler", "guider"):
        if run in entry:
            assert entry[run] == {"row0_is_a": True, "row1_is_b": True, "rows_differ": True}, (run, entry)
    if version.startswith("2.0"):
        assert entry["pasted_own_frame"], entry
    loop = entry["loop"]  # start and end frame per video: reference [2 videos, C, 2 frames]
    assert loop["reference_shape"][0] == 2 and loop["reference_shape"][2] == 2, loop
    assert loop["row0_is_a_c"] and loop["row1_is_b_a"] and loop["rows_differ"], loop


@pytest.mark.parametrize("version", list(LATENTS))
def test_other_image_counts_share_the_first_and_a_changed_batch_is_refused(measured, version):
    entry = measured[version]
    assert entry["three_images_keep_the_first"], entry
    assert any("uses the first of the 3 images" in m and "give 2 images" in m for m in entry["warnings"]), entry
    assert "holds 2 references" in entry["changed_batch"] and "batch of 1" in entry["changed_batch"], entry
