"""Open-Sora 2.0 node layer without a server: MODEL seam, Sampler / Sigmas / Guider, Encode Reference.

ComfyUI is imported in ONE subprocess (it parses argv and sets devices at import time, and the pack imports
comfy only when comfy is importable), which runs `probe()` below and returns its measurements as JSON;
the tests assert on them. The probe uses the tiny 2.0 MMDiT / T5 / CLIP from scripts/demo_models_v2.py and
a small stand-in for core's VAE (the real HunyuanVideo VAE runs in test_workflows_v2.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_comfy_probe import run_probe

REPO = Path(__file__).resolve().parent.parent


class StandInVAE:
    """core VAE.encode's contract for a video VAE: [T, H, W, 3] in 0..1 -> raw latent [1, 16, (T-1)//4+1, H/8, W/8]."""

    def __init__(self):
        self.calls = []

    def encode(self, images):
        import torch

        self.calls.append(tuple(images.shape))
        frames = (images.shape[0] - 1) // 4 + 1
        pooled = torch.nn.functional.avg_pool2d(images.movedim(-1, 1), 8)  # [T, 3, H/8, W/8]
        picked = pooled[::4][:frames]
        channels = torch.cat([picked * (1 + i) for i in range(6)], dim=1)[:, :16]
        return channels.movedim(0, 1)[None] * 2 - 1


def probe(out_path: str, models_dir: str) -> None:  # noqa: C901 (one subprocess, many measurements)
    """Runs inside ComfyUI (--cpu). Writes {check: value} to out_path."""
    import comfy.sample
    import comfy.samplers
    import folder_paths
    import torch
    from helpers_comfy_probe import error_of, max_diff
    from opensora_pack.nodes import guider, latent, loaders, sampling, text
    from opensora_pack.nodes.comfy_model_v2 import ComfyMMDiT, OpenSoraV2Model
    from opensora_pack.nodes.sampling_common import model_version
    from opensora_pack.nodes.sampling_v2 import sigmas_v2
    from opensora_pack.opensora_lib import sampling_v2 as lib
    from opensora_pack.opensora_lib.mmdit import MMDiT
    from opensora_pack.opensora_lib.schedules import v2_timesteps
    from safetensors.torch import load_file

    import nodes as core_nodes

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    results: dict = {}
    for folder in ("diffusion_models", "text_encoders"):
        folder_paths.add_model_folder_path(folder, str(Path(models_dir) / folder), is_default=True)

    # -- Load DiT: detection, MODEL type, strict weights
    (model,) = loaders.OpenSoraLoadDiT().load("opensora-tiny-v2.safetensors", "fp32", "sdpa")
    dm = model.model.diffusion_model
    file_sd = load_file(str(Path(models_dir) / "diffusion_models" / "opensora-tiny-v2.safetensors"))
    results["load"] = {
        "version": model_version(model),
        "model_class": type(model.model).__name__,
        "is_v2_model": isinstance(model.model, OpenSoraV2Model) and isinstance(dm, ComfyMMDiT),
        "scale_factor": model.model.latent_format.scale_factor,
        "multiplier": float(model.model.model_sampling.multiplier),
        "config": dm.config.to_dict(),
        "weights_equal": all(torch.equal(dm.state_dict()[k].float(), v.float()) for k, v in file_sd.items())
        and set(dm.state_dict()) == set(file_sd),
    }

    # -- ComfyMMDiT.forward == pack -> MMDiT.forward -> unpack; odd latent sizes padded
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 4, 6, generator=gen)
    context = torch.randn(2, 7, 64, generator=gen)
    pooled = torch.randn(2, 64, generator=gen)
    cond = torch.randn(2, 17, 3, 4, 6, generator=gen)
    t = torch.tensor([0.9, 0.3])
    ids = lib.image_ids(3, 4, 6)
    manual = lib.unpack(
        MMDiT.forward(dm, lib.pack(x), ids, context, lib.text_ids(7), t, pooled, lib.pack(cond)), 3, 4, 6
    )
    wrapped = dm(x, t, context=context, y_vec=pooled, cond=cond)
    zero_cond = dm(x, t, context=context, y_vec=pooled)
    manual_zero = lib.unpack(
        MMDiT.forward(dm, lib.pack(x), ids, context, lib.text_ids(7), t, pooled, torch.zeros(2, 18, 68)), 3, 4, 6
    )
    odd = dm(torch.randn(1, 16, 2, 5, 7, generator=gen), t[:1], context=context[:1], y_vec=pooled[:1])
    sigma = torch.tensor([0.7, 0.7])
    denoised = model.model.apply_model(x, sigma, c_crossattn=context, y_vec=pooled, cond=cond)
    velocity = lib.unpack(
        MMDiT.forward(dm, lib.pack(x), ids, context, lib.text_ids(7), sigma, pooled, lib.pack(cond)), 3, 4, 6
    )
    results["forward"] = {
        "wrapper_vs_manual": max_diff(wrapped, manual),
        "zero_cond_vs_manual": max_diff(zero_cond, manual_zero),
        "cond_matters": max_diff(wrapped, zero_cond),
        "odd_shape": list(odd.shape),
        "apply_model_const": max_diff(denoised, x - 0.7 * velocity),
        "no_pooled_error": error_of(lambda: dm(x, t, context=context)),
    }

    # -- text encoder, prompt, latent
    (encoder,) = loaders.OpenSoraLoadTextEncoder().load(
        "opensora-tiny-t5/", "fp32", "2.0", clip_name="opensora-tiny-clip-l.safetensors"
    )
    positive, negative = text.OpenSoraEncodePrompt().encode(encoder, "a red fox in the snow", "")
    (empty,) = latent.OpenSoraEmptyLatentVideo().generate("2.0", "256px", "16:9", 9, 1, 64, 48, 24)
    steps, seed = 12, 5

    # -- text encoder device: default = ComfyUI's text-encoder device (a GPU stand-in here), cpu = always the CPU
    import comfy.model_management as mm

    def load_text(device: str):
        files = ("opensora-tiny-t5/", "fp32", "2.0", "opensora-tiny-clip-l.safetensors", "")
        return loaders.OpenSoraLoadTextEncoder().load(*files, device=device)[0]

    gpu_like = torch.device("cuda", 3)  # only named: nothing is loaded on it here
    real_device = mm.text_encoder_device
    mm.text_encoder_device = lambda: gpu_like
    try:
        default_encoder, cpu_encoder = load_text("default"), load_text("cpu")
    finally:
        mm.text_encoder_device = real_device
    cpu_positive, _ = text.OpenSoraEncodePrompt().encode(cpu_encoder, "a red fox in the snow", "")
    results["text_device"] = {
        name: [
            str(d)
            for e in (enc.encoders.t5_patcher, enc.encoders.clip_patcher)
            for d in (e.load_device, e.offload_device)
        ]
        for name, enc in (("default", default_encoder), ("cpu", cpu_encoder))
    }
    results["text_device"]["cpu_conditioning_equal"] = torch.equal(cpu_positive[0][0], positive[0][0]) and torch.equal(
        cpu_positive[0][1]["pooled_output"], positive[0][1]["pooled_output"]
    )
    results["text_device"]["bad"] = error_of(lambda: load_text("cuda"))
    results["text_device"]["advanced"] = (
        loaders.OpenSoraLoadTextEncoder.INPUT_TYPES()["optional"]["device"][1].get("advanced") is True
    )

    # -- Sampler node (t2v) == the library sampler on ComfyUI's noise, in model space
    (sampled,) = sampling.OpenSoraSampler().sample(model, positive, negative, empty, seed, steps, 7.5, image_cfg=3.0)
    noise = comfy.sample.prepare_noise(empty["samples"], seed)
    t5 = positive[0][0].reshape(1, -1, 64)
    neg_t5 = negative[0][0].reshape(1, -1, 64)
    text_dict = {
        "t5": t5,
        "pooled": positive[0][1]["pooled_output"],
        "neg_t5": neg_t5,
        "neg_pooled": negative[0][1]["pooled_output"],
    }

    def raw_mmdit(**kwargs):
        return MMDiT.forward(dm, **kwargs)

    library = lib.sample_v2(raw_mmdit, noise, text_dict, lib.V2SamplingOptions(num_steps=steps))
    results["sampler_t2v"] = {
        "keys": sorted(sampled),
        "info": sampled["opensora"],
        "shape": list(sampled["samples"].shape),
        "vs_library_raw": max_diff(sampled["samples"], library / 0.476986),
        "magnitude": float(sampled["samples"].abs().mean()),
    }

    # -- Sigmas
    (sig,) = sampling.OpenSoraSigmas().sigmas(empty, steps)
    tokens = (48 // 16) * (64 // 16)
    results["sigmas"] = {
        "values": sig.tolist(),
        "vs_schedule": max_diff(sig, v2_timesteps(steps, tokens, 3)),
        "no_shift": sigmas_v2(empty["opensora"], 4, False).tolist(),
    }

    # -- Guider + sigmas + euler (what SamplerCustomAdvanced runs) == Sampler node
    def run_guider(lat, cfg=7.5, image_cfg=3.0):
        (g,) = guider.OpenSoraGuider().get_guider(model, positive, negative, lat, cfg, image_cfg)
        (sg,) = sampling.OpenSoraSigmas().sigmas(lat, steps)
        sample_noise = comfy.sample.prepare_noise(lat["samples"], seed)
        sampler = comfy.samplers.sampler_object("euler")
        return g.sample(sample_noise, lat["samples"], sampler, sg, disable_pbar=True, seed=seed)

    results["guider_t2v"] = {"vs_sampler": max_diff(run_guider(empty), sampled["samples"])}

    # -- Encode Reference + i2v sampling
    vae = StandInVAE()
    image = torch.rand(2, 40, 60, 3, generator=gen)
    i2v = {}
    for cond_type in ("i2v_head", "i2v_tail", "i2v_loop"):
        (ref_latent,) = latent.OpenSoraEncodeReference().encode(image, empty, cond_type, core_vae=vae)
        reference = ref_latent["opensora_reference"]
        (out,) = sampling.OpenSoraSampler().sample(
            model, positive, negative, ref_latent, seed, steps, 7.5, image_cfg=3.0
        )
        ref = reference["latent"]
        frames = reference["mask_index"]
        expected = {"i2v_head": [ref[:, :, 0]], "i2v_tail": [ref[:, :, -1]], "i2v_loop": [ref[:, :, 0], ref[:, :, -1]]}
        i2v[cond_type] = {
            "ref_shape": list(ref.shape),
            "mask_index": frames,
            "pasted": max(max_diff(out["samples"][:, :, f], e) for f, e in zip(frames, expected[cond_type])),
            "free_frames_differ_from_t2v": max_diff(out["samples"][:, :, 1], sampled["samples"][:, :, 1]),
            "guider_vs_sampler": max_diff(run_guider(ref_latent), out["samples"]),
            "reference_dropped": "opensora_reference" not in out,
        }
    results["i2v"] = i2v
    results["vae_calls"] = vae.calls
    encode_reference = latent.OpenSoraEncodeReference().encode
    results["reference_errors"] = {
        "frame_index": error_of(lambda: encode_reference(image, empty, "frame_index", core_vae=vae)),
        "v2v_short": error_of(lambda: encode_reference(image, empty, "v2v_head", core_vae=vae)),
        "wrong_vae": error_of(
            lambda: encode_reference(
                image, empty, "i2v_head", core_vae=type("V", (), {"encode": lambda s, i: torch.zeros(1, 4, 1, 6, 8)})()
            )
        ),
        "missing_core_vae": error_of(lambda: latent.OpenSoraEncodeReference().encode(image, empty, "i2v_head")),
    }

    # -- core-style conditioning (other token counts, 3-D), and bad conditioning
    core_positive = [[t5[:, :256].clone(), {"pooled_output": positive[0][1]["pooled_output"]}]]
    core_negative = [[neg_t5[:, :300].clone(), {"pooled_output": negative[0][1]["pooled_output"]}]]
    (core_out,) = sampling.OpenSoraSampler().sample(
        model, core_positive, core_negative, empty, seed, 4, 7.5, image_cfg=3.0
    )
    core_library = lib.sample_v2(
        raw_mmdit,
        noise,
        {
            "t5": t5[:, :256],
            "pooled": text_dict["pooled"],
            "neg_t5": neg_t5[:, :300],
            "neg_pooled": text_dict["neg_pooled"],
        },
        lib.V2SamplingOptions(num_steps=4),
    )
    (ks,) = core_nodes.KSampler().sample(model, seed, 3, 5.0, "euler", "simple", core_positive, core_negative, empty)
    null_caption = [[torch.zeros(1, 1, 1), {"opensora_null_caption": True, "opensora_version": "1.3"}]]
    v1_cond = [[torch.zeros(1, 300, 64), {"attention_mask": torch.ones(1, 300), "opensora_version": "1.3"}]]
    results["conditioning"] = {
        "core_layout_vs_library": max_diff(core_out["samples"], core_library / 0.476986),
        "ksampler_shape": list(ks["samples"].shape),
        "ksampler_finite": bool(torch.isfinite(ks["samples"]).all()),
        "no_pooled": error_of(
            lambda: sampling.OpenSoraSampler().sample(model, [[t5, {}]], negative, empty, seed, 2, 7.5)
        ),
        "wrong_width": error_of(
            lambda: sampling.OpenSoraSampler().sample(
                model, [[torch.zeros(1, 512, 4096), positive[0][1]]], negative, empty, seed, 2, 7.5
            )
        ),
        "v1_negative": error_of(
            lambda: sampling.OpenSoraSampler().sample(model, positive, null_caption, empty, 1, 2, 7.5)
        ),
        "v1_positive": error_of(lambda: sampling.OpenSoraSampler().sample(model, v1_cond, negative, empty, 1, 2, 7.5)),
        "loops": error_of(
            lambda: sampling.OpenSoraSampler().sample(model, positive, negative, empty, 1, 2, 7.5, loops=2)
        ),
        "v1_latent": error_of(
            lambda: sampling.OpenSoraSampler().sample(
                model,
                positive,
                negative,
                latent.OpenSoraEmptyLatentVideo().generate("1.3", "144p", "9:16", 17)[0],
                1,
                2,
                7.5,
            )
        ),
    }
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    """Run probe() once inside ComfyUI with the tiny 2.0 DiT / T5 / CLIP."""
    from demo_models import make_t5
    from demo_models_v2 import NAMES, make_clip, make_mmdit

    models = tmp_path_factory.mktemp("models-v2")
    make_mmdit(models / "diffusion_models" / NAMES["dit_2.0"])
    make_t5(models / "text_encoders" / NAMES["t5"].rstrip("/"))
    make_clip(models / "text_encoders" / NAMES["clip_l_2.0"])
    out = models / "results.json"
    return run_probe("test_nodes_v2", out, models)


def test_load_dit_gives_a_2_0_model(measured):
    load = measured["load"]
    assert load["version"] == "2.0"
    assert load["model_class"] == "OpenSoraV2Model" and load["is_v2_model"]
    assert load["scale_factor"] == pytest.approx(0.476986)  # HunyuanVideo latent format = the official scaling
    assert load["multiplier"] == 1.0  # the MMDiT takes t in [0, 1]
    assert load["weights_equal"]
    config = load["config"]
    assert (config["cond_embed"], config["fused_qkv"], config["use_liger_rope"]) == (True, False, True)
    assert config["axes_dim"] == [4, 14, 14] and config["context_in_dim"] == 64 and config["vec_in_dim"] == 64


def test_comfy_forward_packs_like_the_library(measured):
    forward = measured["forward"]
    assert forward["wrapper_vs_manual"] == 0.0
    assert forward["zero_cond_vs_manual"] == 0.0  # no cond = t2v zeros
    assert forward["cond_matters"] > 1e-3
    assert forward["odd_shape"] == [1, 16, 2, 5, 7]  # padded to the patch, cropped back
    assert forward["apply_model_const"] < 1e-5  # core's CONST: denoised = x - sigma * v
    assert "pooled" in forward["no_pooled_error"] and "ValueError" in forward["no_pooled_error"]


def test_sampler_node_is_the_library_sampler(measured):
    t2v = measured["sampler_t2v"]
    assert t2v["keys"] == ["opensora", "samples"]  # info kept, no reference
    assert t2v["info"] == {"version": "2.0", "height": 48, "width": 64, "num_frames": 9, "fps": 24}
    assert t2v["shape"] == [1, 16, 3, 6, 8]
    assert t2v["magnitude"] > 0.1
    assert t2v["vs_library_raw"] < 1e-4  # LATENT is raw VAE space = model space / 0.476986


def test_sigmas_are_the_2_0_schedule(measured):
    sig = measured["sigmas"]
    assert len(sig["values"]) == 13 and sig["values"][-1] == 0.0
    # the shifted schedule's float32 value is 1.0000001; the Sigmas clamp it to 1 (core's logit(sigma) samplers)
    assert sig["values"][0] == 1.0
    assert all(a > b for a, b in zip(sig["values"], sig["values"][1:]))
    assert sig["vs_schedule"] <= 2e-7
    assert sig["no_shift"] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_guider_with_euler_reproduces_the_sampler_node(measured):
    assert measured["guider_t2v"]["vs_sampler"] < 1e-4
    for cond_type, values in measured["i2v"].items():
        assert values["guider_vs_sampler"] < 1e-4, cond_type


def test_reference_conditioning(measured):
    i2v = measured["i2v"]
    assert i2v["i2v_head"]["mask_index"] == [0] and i2v["i2v_head"]["ref_shape"] == [1, 16, 1, 6, 8]
    assert i2v["i2v_tail"]["mask_index"] == [2]
    assert i2v["i2v_loop"]["mask_index"] == [0, 2] and i2v["i2v_loop"]["ref_shape"] == [1, 16, 2, 6, 8]
    for cond_type, values in i2v.items():
        assert values["pasted"] < 1e-5, cond_type  # the reference frames are pasted back
        assert values["free_frames_differ_from_t2v"] > 1e-3, cond_type  # and condition the rest through cond_in
        assert values["reference_dropped"], cond_type
    # each image is resized-cropped to 48 x 64 and encoded on its own (loop: first and last image)
    assert measured["vae_calls"][:4] == [[1, 48, 64, 3], [1, 48, 64, 3], [1, 48, 64, 3], [1, 48, 64, 3]]


def test_reference_errors_are_specific(measured):
    errors = measured["reference_errors"]
    assert "frame_index" in errors["frame_index"] and "i2v_head" in errors["frame_index"]
    assert "9 latent frames" in errors["v2v_short"] and "num_frames to 37 or more" in errors["v2v_short"]
    assert "HunyuanVideo VAE" in errors["wrong_vae"]
    assert "core_vae" in errors["missing_core_vae"]


def test_text_encoder_device_option(measured):
    # default: ComfyUI's text-encoder device (stood in by cuda:3) and its offload device; cpu: the CPU for both, as
    # core's CLIP loaders with device "cpu"; the same conditioning either way
    found = measured["text_device"]
    assert found["default"] == ["cuda:3", "cpu", "cuda:3", "cpu"]
    assert found["cpu"] == ["cpu"] * 4
    assert found["cpu_conditioning_equal"] is True and found["advanced"] is True
    assert found["bad"] == "ValueError: device 'cuda' is not one of default, cpu"


def test_conditioning_from_core_text_encoders(measured):
    cond = measured["conditioning"]
    assert cond["core_layout_vs_library"] < 1e-4  # 256 / 300 tokens accepted, lengths kept separate
    assert cond["ksampler_shape"] == [1, 16, 3, 6, 8] and cond["ksampler_finite"]
    assert "pooled_output" in cond["no_pooled"]
    assert "[batch, tokens, 64]" in cond["wrong_width"]
    assert "loops (official 1.x --loop) are for Open-Sora 1.2 / 1.3" in cond["loops"], cond["loops"]
    for refused in (cond["v1_negative"], cond["v1_positive"]):  # the common version check, with the 2.0 hint
        assert "encoded for Open-Sora 1.3 but the model is Open-Sora 2.0" in refused, refused
        assert "DualCLIPLoader(type=flux) + CLIPTextEncode" in refused, refused
    assert "1.3" in cond["v1_latent"] and "2.0" in cond["v1_latent"]


# -- the 2.0 test models: official key layouts (no ComfyUI needed) ------------------------------------------


def reference_listing(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (REPO / "tests" / "fixtures" / "reference_keys" / f"{name}.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _dtype = line.split("\t")
        out[key] = tuple(int(x) for x in shape.strip("[]").split(", ") if x)
    return out


def test_test_vaes_have_the_official_layouts():
    from demo_models_v2 import flux_ae_layout, hunyuan_vae_layout

    assert hunyuan_vae_layout() == reference_listing("hunyuan_vae")  # 248 tensors, names and shapes
    assert flux_ae_layout() == reference_listing("flux_ae")  # 244 tensors


def test_test_flux_is_flux_dev_with_one_block_and_small_text_widths():
    from demo_models_v2 import FLUX_CONFIG, mmdit_layout

    layout = mmdit_layout(FLUX_CONFIG)
    official = {
        k: v
        for k, v in reference_listing("flux_dev").items()
        if not k.startswith(("single_blocks.", "double_blocks.")) or k.startswith("double_blocks.0.")
    }
    assert set(layout) == set(official)
    differ = {k for k in layout if layout[k] != official[k]}
    assert differ == {"txt_in.weight", "vector_in.in_layer.weight"}  # fed by the tiny T5 / CLIP (width 64)


def test_tiny_mmdit_is_detected_as_open_sora_2_0(tmp_path):
    from demo_models_v2 import MMDIT_CONFIG, NAMES, make_mmdit

    from opensora_lib import checkpoint, detection

    path = tmp_path / NAMES["dit_2.0"]
    make_mmdit(path)
    info = detection.detect_file(path)
    assert (info.family, info.version) == ("mmdit", "2.0")
    assert {k: info.config[k] for k in MMDIT_CONFIG} == MMDIT_CONFIG  # the loader infers the full config
    official = reference_listing("mmdit")
    keys = set(checkpoint.read_header(path))
    assert {k for k in official if not k.startswith(("double_blocks.", "single_blocks."))} <= keys
    assert keys <= set(official)  # one double + one single block, named as the official ones
