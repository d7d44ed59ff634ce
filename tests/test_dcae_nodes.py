"""The Open-Sora 2.0 Video DC-AE ("high compression") path through the nodes, without a server.

ComfyUI is imported in ONE subprocess that runs `probe()` below with the tiny test models of
scripts/demo_models_v2.py (the DC-AE MMDiT: in 128, patch 1; the Video DC-AE: 128 latent channels) and returns
its measurements as JSON; the tests assert on them. The two DC-AE workflows run on the real host in
tests/test_workflows_v2.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers_comfy_probe import run_probe

REPO = Path(__file__).resolve().parent.parent
TRAINED_SCALING = 0.493


def probe(out_path: str, models_dir: str) -> None:  # noqa: C901 (one subprocess, many measurements)
    """Runs inside ComfyUI (--cpu). Writes {check: value} to out_path."""
    import types

    import comfy.latent_formats
    import comfy.sample
    import comfy.samplers
    import folder_paths
    import latent_preview
    import torch
    from comfy.cli_args import LatentPreviewMethod, args
    from helpers_comfy_probe import error_of, max_diff
    from opensora_pack.nodes import guider, latent, loaders, previews, sampling, sampling_common, text
    from opensora_pack.nodes.sampling_v2 import sigmas_v2
    from opensora_pack.opensora_lib import detection, reference_image
    from opensora_pack.opensora_lib import sampling_v2 as lib
    from opensora_pack.opensora_lib.dcae import DCAE, DCAEConfig
    from opensora_pack.opensora_lib.mmdit import MMDiT
    from opensora_pack.opensora_lib.schedules import v2_timesteps
    from safetensors.torch import load_file

    import nodes as core_nodes

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    results: dict = {}
    names = json.loads((Path(models_dir) / "names.json").read_text())  # demo_models_v2.NAMES
    for folder in ("diffusion_models", "text_encoders", "vae"):
        folder_paths.add_model_folder_path(folder, str(Path(models_dir) / folder), is_default=True)

    # -- Load DiT: the DC-AE MMDiT gets the DC-AE latent format, the 2.0 MMDiT keeps HunyuanVideo's
    (model,) = loaders.OpenSoraLoadDiT().load(names["dit_dcae"], "fp32", "sdpa")
    (hunyuan_model,) = loaders.OpenSoraLoadDiT().load(names["dit_2.0"], "fp32", "sdpa")
    dm = model.model.diffusion_model
    file_sd = load_file(str(Path(models_dir) / "diffusion_models" / names["dit_dcae"]))
    fmt = model.model.latent_format
    results["load_dit"] = {
        "version": sampling_common.model_version(model),
        "autoencoder": model.model.opensora_autoencoder,
        "format": type(fmt).__name__,
        "format_is_comfy": isinstance(fmt, comfy.latent_formats.LatentFormat),
        "channels": fmt.latent_channels,
        "dimensions": fmt.latent_dimensions,
        "scale": fmt.scale_factor,
        "rgb_factors": fmt.latent_rgb_factors,
        "patch_size": dm.config.patch_size,
        "in_channels": dm.config.in_channels,
        "weights_equal": set(dm.state_dict()) == set(file_sd)
        and all(torch.equal(dm.state_dict()[k].float(), v.float()) for k, v in file_sd.items()),
        "hunyuan_format": type(hunyuan_model.model.latent_format).__name__,
        "hunyuan_autoencoder": hunyuan_model.model.opensora_autoencoder,
    }
    # memory_required (what core plans with; the memory_usage_factor attributes are no longer read): a DC-AE latent
    # [2, 128, 8, 6, 10] with 7 T5 tokens per row, vs activation_memory and the per-token formula by hand
    from opensora_pack.opensora_lib.memory import FORWARD_WORKSPACE_BYTES, activation_memory

    dcae_shape = (2, 128, 8, 6, 10)
    hidden, mlp = dm.config.hidden_size, int(dm.config.hidden_size * dm.config.mlp_ratio)
    results["load_dit"]["memory"] = {
        "required": model.model.memory_required(dcae_shape, cond_shapes={"c_crossattn": [torch.Size([1, 7, 32])]}),
        "activation_memory": activation_memory(dm, dcae_shape, 7, torch.float32),
        # rows x (latent tokens, patch 1, + T5 tokens) x (6 H + M + 3 H) x float32
        "by_hand": 2 * (8 * 6 * 10 + 7) * (6 * hidden + mlp + 3 * hidden) * 4,
        "workspace": FORWARD_WORKSPACE_BYTES,
    }

    # -- Load VAE: the DC-AE with the official tiles and the chosen scaling
    (vae,) = loaders.OpenSoraLoadVAE().load(names["vae_dcae"], "fp32")  # default: the trained 0.493
    (vae_none,) = loaders.OpenSoraLoadVAE().load(names["vae_dcae"], "fp32", "none (official inference)")
    vae_file = Path(models_dir) / "vae" / names["vae_dcae"]
    vae_sd = {k: v.float() for k, v in load_file(str(vae_file)).items()}
    c = vae.model.config
    results["load_vae"] = {
        "version": vae.version,
        "autoencoder": vae.autoencoder,
        "class": type(vae.model).__name__,
        "scaling": [vae.model.scaling_factor, vae_none.model.scaling_factor],
        "tiling": [vae.model.use_spatial_tiling, vae.model.use_temporal_tiling, c.spatial_tile_size],
        "tiling_more": [c.temporal_tile_size, c.tile_overlap_factor, c.latent_channels],
        "weights_equal": all(torch.equal(vae.model.state_dict()[k], v) for k, v in vae_sd.items()),
        "bad_scaling": error_of(lambda: loaders.OpenSoraLoadVAE().load(names["vae_dcae"], "fp32", "0.5")),
    }
    # The library DC-AE as the official inference builds it (scaling None), and with the trained scaling.
    official_config = DCAEConfig.from_dict(detection.detect_file(vae_file).config)
    official = DCAE(official_config).eval()
    official.load_state_dict(vae_sd, strict=True)
    trained = DCAE(DCAEConfig.from_dict({**detection.detect_file(vae_file).config, "scaling_factor": 0.493})).eval()
    trained.load_state_dict(vae_sd, strict=True)

    # -- Empty Latent Video: the "2.0 DC-AE" choice
    empty_node = latent.OpenSoraEmptyLatentVideo()
    (full,) = empty_node.generate("2.0 DC-AE", "768px", "16:9", 128)
    (image,) = empty_node.generate("2.0 DC-AE", "768px", "16:9", 1)
    (hunyuan,) = empty_node.generate("2.0", "256px", "16:9", 129)
    validate = {
        f"{choice} {frames} {width}x{height}": empty_node.VALIDATE_INPUTS(
            choice, "768px", "16:9", frames, width=width, height=height
        )
        for choice, frames, width, height in (
            ("2.0 DC-AE", 128, 0, 0),
            ("2.0 DC-AE", 4, 0, 0),
            ("2.0 DC-AE", 1, 0, 0),
            ("2.0 DC-AE", 129, 0, 0),
            ("2.0 DC-AE", 9, 0, 0),
            ("2.0 DC-AE", 132, 0, 0),
            ("2.0 DC-AE", 128, 336, 192),
            ("2.0 DC-AE", 128, 352, 192),
            ("2.0", 128, 0, 0),
            ("2.0", 129, 0, 0),
            ("2.1", 129, 0, 0),
        )
    }
    results["empty"] = {
        "shape": list(full["samples"].shape),
        "info": full["opensora"],
        "image_shape": list(image["samples"].shape),
        "hunyuan_shape": list(hunyuan["samples"].shape),
        "hunyuan_info": hunyuan["opensora"],
        "validate": validate,
        "versions": latent.OpenSoraEmptyLatentVideo.INPUT_TYPES()["required"]["version"][0],
    }

    # -- text, a small DC-AE latent (64 x 96 px, 12 frames -> [1, 128, 3, 3, 2])
    (encoder,) = loaders.OpenSoraLoadTextEncoder().load(
        "opensora-tiny-t5/", "fp32", "2.0", clip_name="opensora-tiny-clip-l.safetensors"
    )
    positive, negative = text.OpenSoraEncodePrompt().encode(encoder, "a red fox in the snow", "")
    (small,) = empty_node.generate("2.0 DC-AE", "768px", "16:9", 12, 1, 64, 96, 24)
    steps, seed = 12, 5
    text_dict = {
        "t5": positive[0][0].reshape(1, -1, 64),
        "pooled": positive[0][1]["pooled_output"],
        "neg_t5": negative[0][0].reshape(1, -1, 64),
        "neg_pooled": negative[0][1]["pooled_output"],
    }

    def raw_mmdit(**kwargs):
        return MMDiT.forward(dm, **kwargs)

    # -- Sampler node (t2v) == sample_v2 with patch_size 1 on ComfyUI's noise (scale 1: LATENT = model space)
    (sampled,) = sampling.OpenSoraSampler().sample(model, positive, negative, small, seed, steps, 7.5, image_cfg=3.0)
    noise = comfy.sample.prepare_noise(small["samples"], seed)
    library = lib.sample_v2(raw_mmdit, noise, text_dict, lib.V2SamplingOptions(num_steps=steps, patch_size=1))
    results["sampler_t2v"] = {
        "keys": sorted(sampled),
        "info": sampled["opensora"],
        "shape": list(sampled["samples"].shape),
        "vs_library": max_diff(sampled["samples"], library),
        "magnitude": float(sampled["samples"].abs().mean()),
    }

    # -- Sigmas: (H/32)(W/32) = 6 tokens per frame, 12 // 4 = 3 latent frames; old 2.0 latents unchanged
    (sig,) = sampling.OpenSoraSigmas().sigmas(small, steps)
    (sig_full,) = sampling.OpenSoraSigmas().sigmas(full, 50)
    hunyuan_info = hunyuan["opensora"]
    results["sigmas"] = {
        "vs_schedule": max_diff(sig, v2_timesteps(steps, 6, 3)),
        "full_vs_schedule": max_diff(sig_full, v2_timesteps(50, 18 * 32, 32)),  # 768px 16:9, 128 frames
        "full_differs_from_hunyuan_count": max_diff(sig_full, v2_timesteps(50, 36 * 64, 32)),
        "hunyuan_vs_schedule": max_diff(sigmas_v2(hunyuan_info, 8, True), v2_timesteps(8, 12 * 21, 33)),
    }

    # -- Guider + Sigmas + euler (SamplerCustomAdvanced) == the Sampler node
    def run_guider(lat):
        (g,) = guider.OpenSoraGuider().get_guider(model, positive, negative, lat, 7.5, 3.0)
        (sg,) = sampling.OpenSoraSigmas().sigmas(lat, steps)
        sample_noise = comfy.sample.prepare_noise(lat["samples"], seed)
        euler = comfy.samplers.sampler_object("euler")
        return g.sample(sample_noise, lat["samples"], euler, sg, disable_pbar=True, seed=seed)

    results["guider_t2v"] = {"vs_sampler": max_diff(run_guider(small), sampled["samples"])}

    # -- Encode Reference through the node == DCAE.encode on the official resize-crop, per scaling
    picture = torch.rand(2, 80, 50, 3, generator=torch.Generator().manual_seed(1))
    pixels = reference_image.resize_crop(picture, 96, 64)  # [2, 3, 96, 64] in [-1, 1]
    (head,) = latent.OpenSoraEncodeReference().encode(picture, small, "i2v_head", vae=vae)
    (head_none,) = latent.OpenSoraEncodeReference().encode(picture, small, "i2v_head", vae=vae_none)
    reference = head["opensora_reference"]
    first = pixels[:1].unsqueeze(2)  # one image -> one latent frame
    results["encode"] = {
        "shape": list(reference["latent"].shape),
        "mask_index": reference["mask_index"],
        "tags": [reference["version"], reference["autoencoder"], reference["cond_type"]],
        "vs_trained_dcae": max_diff(reference["latent"], trained.encode(first)),
        "none_vs_official_dcae": max_diff(head_none["opensora_reference"]["latent"], official.encode(first)),
        "ratio": float((head_none["opensora_reference"]["latent"] / reference["latent"]).mean()),
        "magnitude": float(official.encode(first).abs().mean()),
    }

    # -- Decode through the node == DCAE.decode (official temporal tiles: 10 latent frames > 8), cut, 0..1
    (long,) = empty_node.generate("2.0 DC-AE", "768px", "16:9", 40, 1, 64, 96, 24)
    z = torch.randn(long["samples"].shape, generator=torch.Generator().manual_seed(2))
    long = {**long, "samples": z}

    def as_images(video):
        return ((video.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).reshape(-1, *video.shape[-2:], 3)

    (images,) = latent.OpenSoraDecode().decode(vae, long)
    (images_none,) = latent.OpenSoraDecode().decode(vae_none, long)
    (one,) = latent.OpenSoraDecode().decode(vae, {**image, "samples": torch.randn(1, 128, 1, 18, 32)})
    results["decode"] = {
        "shape": list(images.shape),
        "vs_trained_dcae": max_diff(images, as_images(trained.decode(z))),
        "none_vs_official_dcae": max_diff(images_none, as_images(official.decode(z))),
        "scalings_differ": max_diff(images, images_none),
        "image_shape": list(one.shape),
        "std": float(images.std()),
    }

    # -- i2v sampling with DC-AE references: pasted back, conditions the other frames, guider agrees
    i2v = {}
    for cond_type in ("i2v_head", "i2v_tail", "i2v_loop"):
        (ref_latent,) = latent.OpenSoraEncodeReference().encode(picture, small, cond_type, vae=vae)
        ref = ref_latent["opensora_reference"]["latent"]
        frames = ref_latent["opensora_reference"]["mask_index"]
        (out,) = sampling.OpenSoraSampler().sample(
            model, positive, negative, ref_latent, seed, steps, 7.5, image_cfg=3.0
        )
        library_i2v = lib.sample_v2(
            raw_mmdit,
            noise,
            text_dict,
            lib.V2SamplingOptions(num_steps=steps, patch_size=1, guidance_img=3.0),
            cond=ref,
            cond_type=cond_type,
        )
        expected = {"i2v_head": [ref[:, :, 0]], "i2v_tail": [ref[:, :, -1]], "i2v_loop": [ref[:, :, 0], ref[:, :, -1]]}
        i2v[cond_type] = {
            "ref_shape": list(ref.shape),
            "mask_index": frames,
            "vs_library": max_diff(out["samples"], library_i2v),
            "pasted": max(max_diff(out["samples"][:, :, f], e) for f, e in zip(frames, expected[cond_type])),
            "free_frame_differs_from_t2v": max_diff(out["samples"][:, :, 1], sampled["samples"][:, :, 1]),
            "guider_vs_sampler": max_diff(run_guider(ref_latent), out["samples"]),
        }
    results["i2v"] = i2v

    # -- core KSampler drives the DC-AE MODEL on a DC-AE latent (the latent format has the right channels)
    (ks,) = core_nodes.KSampler().sample(model, seed, 2, 5.0, "euler", "simple", positive, negative, small)
    results["ksampler"] = {"shape": list(ks["samples"].shape), "finite": bool(torch.isfinite(ks["samples"]).all())}

    # -- previews: the principal-component preview on 128 channels, the pack's Sampler and core's samplers alike
    args.preview_method = LatentPreviewMethod.Latent2RGB
    kind, picture_out, max_size = previews.previewer_for(model)(sampled["samples"])
    pixels_out = torch.tensor(list(picture_out.getdata()), dtype=torch.float32)
    core_previewer = latent_preview.get_previewer("cpu", model.model.latent_format)  # what KSampler's callback uses
    core_picture = core_previewer.decode_latent_to_preview_image("JPEG", sampled["samples"])[1]
    results["preview"] = {"kind": kind, "size": list(picture_out.size), "max": max_size, "std": float(pixels_out.std())}
    results["preview"]["core_max"] = latent_preview.MAX_PREVIEW_RESOLUTION
    results["preview"]["same_as_core"] = picture_out.tobytes() == core_picture.tobytes()
    # every principal-component format: [C, 3] factors, so code that skips the reshape (VideoHelperSuite's animated
    # previews) still gets an RGB picture from a raw latent
    from opensora_pack.nodes.comfy_model import LATENT_FORMATS

    results["preview"]["raw_factor_pictures"] = {
        cls.__name__: list(
            latent_preview.Latent2RGBPreviewer(cls().latent_rgb_factors)
            .decode_latent_to_preview(torch.randn(1, cls.latent_channels, 2, 5, 7))
            .size
        )
        for cls in (*LATENT_FORMATS.values(), type(fmt))
    }
    args.preview_method = LatentPreviewMethod.NoPreviews
    results["preview"]["none"] = previews.previewer_for(model) is None
    args.preview_method = LatentPreviewMethod.Latent2RGB

    # -- mismatches and bad input: specific errors
    (vae13,) = loaders.OpenSoraLoadVAE().load("opensora-tiny-vae-v13/", "fp32")
    hunyuan_small = empty_node.generate("2.0", "256px", "16:9", 9, 1, 64, 96, 24)[0]
    fake_v13 = types.SimpleNamespace(model=types.SimpleNamespace(opensora_version="1.3"))
    sampler = sampling.OpenSoraSampler()
    results["errors"] = {
        "hunyuan_latent_on_dcae_dit": error_of(
            lambda: sampler.sample(model, positive, negative, hunyuan_small, 1, 2, 7.5)
        ),
        "dcae_latent_on_hunyuan_dit": error_of(
            lambda: sampler.sample(hunyuan_model, positive, negative, small, 1, 2, 7.5)
        ),
        "guider_mismatch": error_of(
            lambda: guider.OpenSoraGuider().get_guider(hunyuan_model, positive, negative, small, 7.5)
        ),
        "dcae_latent_on_1_3_dit": error_of(lambda: sampling_common.check_versions(fake_v13, small)),
        "decode_hunyuan_latent": error_of(lambda: latent.OpenSoraDecode().decode(vae, hunyuan_small)),
        "decode_with_1_3_vae": error_of(lambda: latent.OpenSoraDecode().decode(vae13, small)),
        "decode_tiled": error_of(lambda: latent.OpenSoraDecode().decode(vae, small, 256, 64)),
        "reference_core_vae_only": error_of(
            lambda: latent.OpenSoraEncodeReference().encode(picture, small, "i2v_head", core_vae=object())
        ),
        "reference_1_3_vae": error_of(
            lambda: latent.OpenSoraEncodeReference().encode(picture, small, "i2v_head", vae=vae13)
        ),
        "reference_v2v": error_of(lambda: latent.OpenSoraEncodeReference().encode(picture, small, "v2v_head", vae=vae)),
        "reference_one_frame": error_of(
            lambda: latent.OpenSoraEncodeReference().encode(picture, image, "i2v_head", vae=vae)
        ),
        "hunyuan_reference_on_dcae_dit": error_of(
            lambda: sampler.sample(
                model,
                positive,
                negative,
                {**small, "opensora_reference": {**head["opensora_reference"], "autoencoder": "hunyuan"}},
                1,
                2,
                7.5,
            )
        ),
    }
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    """Run probe() once inside ComfyUI with the tiny DC-AE DiT / DC-AE, the tiny 2.0 DiT, T5, CLIP and 1.3 VAE."""
    from demo_models import VAE_NAMES, make_t5, make_vae
    from demo_models_v2 import NAMES, make_clip, make_dcae, make_mmdit, make_mmdit_dcae

    models = tmp_path_factory.mktemp("models-dcae")
    (models / "names.json").write_text(json.dumps(NAMES))  # the probe runs where scripts/ is not importable
    make_mmdit_dcae(models / "diffusion_models" / NAMES["dit_dcae"])
    make_mmdit(models / "diffusion_models" / NAMES["dit_2.0"])
    make_dcae(models / "vae" / NAMES["vae_dcae"])
    make_vae("1.3", models / "vae" / VAE_NAMES["1.3"])
    make_t5(models / "text_encoders" / NAMES["t5"].rstrip("/"))
    make_clip(models / "text_encoders" / NAMES["clip_l_2.0"])
    return run_probe("test_dcae_nodes", models / "results.json", models)


def test_load_dit_gives_a_dc_ae_model(measured):
    load = measured["load_dit"]
    assert load["version"] == "2.0" and load["autoencoder"] == "dc_ae"
    assert (load["patch_size"], load["in_channels"]) == (1, 128)
    assert load["format"] == "OpenSoraDCAELatent" and load["format_is_comfy"]
    assert (load["channels"], load["dimensions"], load["scale"]) == (128, 3, 1.0)
    # no published factors: the principal-component preview, whose reshape puts the picture in channels 0-2
    assert load["rgb_factors"] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]] + [[0.0, 0.0, 0.0]] * 125
    assert load["weights_equal"]
    assert load["hunyuan_format"] == "HunyuanVideo" and load["hunyuan_autoencoder"] == "hunyuan"
    memory = load["memory"]  # one token per DC-AE latent pixel (patch 1) plus the T5 tokens, float32 compute
    assert memory["activation_memory"] == memory["by_hand"] > 0, memory
    assert memory["required"] == memory["activation_memory"] + memory["workspace"], memory


def test_load_vae_gives_the_dc_ae_with_official_tiles_and_the_chosen_scaling(measured):
    load = measured["load_vae"]
    assert (load["version"], load["autoencoder"], load["class"]) == ("2.0", "dc_ae", "DCAE")
    assert load["scaling"] == [TRAINED_SCALING, None]  # default: trained 0.493; "none": official inference
    assert load["tiling"] == [True, True, 256] and load["tiling_more"] == [32, 0.25, 128]
    assert load["weights_equal"]
    assert "dc_ae_scaling" in load["bad_scaling"] and "trained 0.493" in load["bad_scaling"]


def test_empty_latent_dc_ae_choice(measured):
    empty = measured["empty"]
    assert empty["versions"] == ["1.3", "1.2", "2.0", "2.0 DC-AE"]  # old choices kept, in their order
    assert empty["shape"] == [1, 128, 32, 18, 32]  # 768px 16:9 = 576 x 1024, 128 // 4 latent frames
    assert empty["info"] == {
        "version": "2.0",
        "height": 576,
        "width": 1024,
        "num_frames": 128,
        "fps": 24,
        "autoencoder": "dc_ae",
    }
    assert empty["image_shape"] == [1, 128, 1, 18, 32]
    assert empty["hunyuan_shape"] == [1, 16, 33, 24, 42]  # the 2.0 choice is unchanged
    assert "autoencoder" not in empty["hunyuan_info"]
    validate = empty["validate"]
    for ok in ("2.0 DC-AE 128 0x0", "2.0 DC-AE 1 0x0", "2.0 DC-AE 128 352x192", "2.0 129 0x0"):
        assert validate[ok] is True, ok
    for bad in ("2.0 DC-AE 129 0x0", "2.0 DC-AE 9 0x0", "2.0 DC-AE 132 0x0", "2.0 DC-AE 4 0x0"):
        assert "DC-AE takes 1 or 4k frames from 8 to 128" in validate[bad], bad
    # 4 frames would be one latent frame: the DC-AE decodes it as one image (as the official code), so it is refused
    assert "decodes as one image" in validate["2.0 DC-AE 4 0x0"]
    assert "multiples of 32" in validate["2.0 DC-AE 128 336x192"] and "try 192x352" in validate["2.0 DC-AE 128 336x192"]
    assert "4k+1" in validate["2.0 128 0x0"]
    assert "2.0 DC-AE" in validate["2.1 129 0x0"] and "'2.1'" in validate["2.1 129 0x0"]


def test_sampler_node_is_sample_v2_with_patch_1(measured):
    t2v = measured["sampler_t2v"]
    assert t2v["keys"] == ["opensora", "samples"]
    assert t2v["info"]["autoencoder"] == "dc_ae"
    assert t2v["shape"] == [1, 128, 3, 3, 2]
    assert t2v["magnitude"] > 0.1
    assert t2v["vs_library"] == 0.0  # same calls, same order: bit-identical


def test_sigmas_use_32_pixel_tokens_and_dc_ae_frames(measured):
    sig = measured["sigmas"]
    assert sig["vs_schedule"] == 0.0
    assert sig["full_vs_schedule"] == 0.0
    assert sig["full_differs_from_hunyuan_count"] > 1e-3  # the token count changes the shift
    assert sig["hunyuan_vs_schedule"] == 0.0


def test_guider_reproduces_the_sampler_node(measured):
    assert measured["guider_t2v"]["vs_sampler"] < 1e-4
    for cond_type, values in measured["i2v"].items():
        assert values["guider_vs_sampler"] < 1e-4, cond_type


def test_encode_reference_is_the_dc_ae_with_the_chosen_scaling(measured):
    encode = measured["encode"]
    assert encode["shape"] == [1, 128, 1, 3, 2]  # one image -> one latent frame
    assert encode["mask_index"] == [0]
    assert encode["tags"] == ["2.0", "dc_ae", "i2v_head"]
    assert encode["magnitude"] > 0.1
    assert encode["vs_trained_dcae"] < 1e-6  # z / 0.493
    assert encode["none_vs_official_dcae"] == 0.0  # the library's official (unscaled) path
    assert encode["ratio"] == pytest.approx(TRAINED_SCALING, rel=1e-5)


def test_decode_is_the_dc_ae_cut_to_the_request(measured):
    decode = measured["decode"]
    assert decode["shape"] == [40, 96, 64, 3]
    assert decode["vs_trained_dcae"] < 1e-6
    assert decode["none_vs_official_dcae"] == 0.0
    assert decode["scalings_differ"] > 1e-3
    assert decode["image_shape"] == [1, 576, 1024, 3]  # a one-frame latent decodes to one image
    assert decode["std"] > 0.01


def test_i2v_with_dc_ae_references(measured):
    i2v = measured["i2v"]
    assert i2v["i2v_head"]["mask_index"] == [0] and i2v["i2v_tail"]["mask_index"] == [2]
    assert i2v["i2v_loop"]["mask_index"] == [0, 2] and i2v["i2v_loop"]["ref_shape"] == [1, 128, 2, 3, 2]
    for cond_type, values in i2v.items():
        assert values["vs_library"] == 0.0, cond_type
        assert values["pasted"] == 0.0, cond_type  # the reference frames are pasted back
        assert values["free_frame_differs_from_t2v"] > 1e-3, cond_type  # and condition the rest through cond_in


def test_core_ksampler_and_previews(measured):
    assert measured["ksampler"] == {"shape": [1, 128, 3, 3, 2], "finite": True}
    preview = measured["preview"]
    assert preview["kind"] == "JPEG" and preview["max"] == preview["core_max"] == 512  # --preview-size's default
    assert preview["size"] == [2 * 36, 3 * 36]  # 2 x 3 latent pixels scaled up within 2**20 elements (128 channels)
    assert preview["std"] > 1.0
    assert preview["same_as_core"]  # core KSampler's previewer draws the same picture
    assert preview["none"]  # --preview-method none: no previewer
    assert preview["raw_factor_pictures"] == {
        "OpenSoraLatent12": [7, 5],
        "OpenSoraLatent13": [7, 5],
        "OpenSoraDCAELatent": [7, 5],
    }


def test_mismatches_give_specific_errors(measured):
    errors = measured["errors"]
    wrong_latent = errors["hunyuan_latent_on_dcae_dit"]
    assert "Video DC-AE DiT" in wrong_latent and "HunyuanVideo VAE" in wrong_latent
    assert "'2.0 DC-AE'" in wrong_latent and "Open_Sora_v2.safetensors" in wrong_latent
    wrong_dit = errors["dcae_latent_on_hunyuan_dit"]
    assert "HunyuanVideo VAE (patch 2" in wrong_dit and "Video DC-AE" in wrong_dit
    assert "'2.0'" in wrong_dit and "Open_Sora_v2_Video_DC_AE.safetensors" in wrong_dit
    assert errors["guider_mismatch"] == wrong_dit
    assert "2.0 DC-AE" in errors["dcae_latent_on_1_3_dit"] and "1.3" in errors["dcae_latent_on_1_3_dit"]
    assert "core Load VAE" in errors["decode_hunyuan_latent"]
    assert "F32T4C128_AE" in errors["decode_with_1_3_vae"] and "1.3" in errors["decode_with_1_3_vae"]
    assert "tile_size" in errors["decode_tiled"] and "official tiles" in errors["decode_tiled"]
    assert "connect vae" in errors["reference_core_vae_only"]
    assert "F32T4C128_AE" in errors["reference_1_3_vae"]
    assert "v2v_head" in errors["reference_v2v"] and "i2v_head, i2v_tail, i2v_loop" in errors["reference_v2v"]
    assert ">= 2 latent frames" in errors["reference_one_frame"]
    assert "num_frames to 8 or more" in errors["reference_one_frame"], errors["reference_one_frame"]
    assert "HunyuanVideo VAE" in errors["hunyuan_reference_on_dcae_dit"]


# -- the tiny DC-AE test models: official key layouts, configs inferred from shapes (no ComfyUI needed) -------


def reference_listing(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (REPO / "tests" / "fixtures" / "reference_keys" / f"{name}.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _dtype = line.split("\t")
        out[key] = tuple(int(x) for x in shape.strip("[]").split(", ") if x)
    return out


def test_tiny_dc_ae_is_detected_with_its_config(tmp_path):
    from demo_models_v2 import DC_AE_DEPTHS, DC_AE_WIDTHS, dcae_dotlist, make_dcae

    from opensora_lib import checkpoint, detection
    from opensora_lib.dcae import DCAEConfig

    path = tmp_path / "dcae.safetensors"
    make_dcae(path)
    info = detection.detect_file(path)
    assert (info.family, info.version) == ("dc_ae", "2.0")
    assert info.config["width_list"] == list(DC_AE_WIDTHS) and info.config["depth_list"] == list(DC_AE_DEPTHS)
    inferred = DCAEConfig.from_dict(info.config)
    made = DCAEConfig.from_dotlist(dcae_dotlist(), use_spatial_tiling=True, use_temporal_tiling=True)
    assert inferred == made  # shapes -> the generator's config, with the official inference tiles
    assert (inferred.latent_channels, inferred.spatial_compression_ratio, inferred.time_compression_ratio) == (
        128,
        32,
        4,
    )

    # Official names with fewer blocks per stage: the same keys once the block index is left out.
    def layout(keys) -> set[str]:
        return {re.sub(r"\.op_list\.\d+\.", ".op_list.N.", key) for key in keys}

    assert layout(checkpoint.read_header(path)) == layout(reference_listing("dc_ae"))


def test_tiny_dc_ae_mmdit_is_detected_as_the_dc_ae_variant(tmp_path):
    from demo_models_v2 import MMDIT_DCAE_CONFIG, make_mmdit_dcae

    from opensora_lib import checkpoint, detection

    path = tmp_path / "mmdit.safetensors"
    make_mmdit_dcae(path)
    info = detection.detect_file(path)
    assert (info.family, info.version) == ("mmdit", "2.0")
    assert {k: info.config[k] for k in MMDIT_DCAE_CONFIG} == MMDIT_DCAE_CONFIG
    assert (info.config["patch_size"], info.config["in_channels"]) == (1, 128)
    shapes = {key: shape for key, (_dtype, shape) in checkpoint.read_header(path).items()}
    official = reference_listing("mmdit_dcae")
    assert set(shapes) <= set(official)
    # 128 latent features in, 129 cond features (mask + 128), 128 out: as the official file
    assert shapes["img_in.weight"][1] == official["img_in.weight"][1] == 128
    assert shapes["cond_in.weight"][1] == official["cond_in.weight"][1] == 129
    assert shapes["final_layer.linear.weight"][0] == official["final_layer.linear.weight"][0] == 128
