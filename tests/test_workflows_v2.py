"""The shipped Open-Sora 2.0 workflows on the real host with the 2.0 test models, and GUIDER/SIGMAS parity.

Each API workflow from workflows/api/ is pointed at the test models (use_models) and shrunk to 64 x 64
pixels, 9 frames (8 for the Video DC-AE ones; tiny_settings). In text-to-image-to-video the FLUX first frame
takes its conditioning from Open-Sora Encode Prompt, because core DualCLIPLoader only loads a full-size T5-XXL
(see scripts/demo_models_v2.py); every other node of the workflow runs as shipped.
"""

import json
from pathlib import Path

import pytest
import torch
from comfy_host import output_files
from helpers_server import run_ok, tiny_workflow, video_properties, write_reference_image
from PIL import Image
from safetensors.torch import load_file
from shipped_workflows import OFFICIAL, definitions, tiny_settings, use_models
from workflows_v2 import definitions_v2

pytestmark = pytest.mark.server

NAMES_V2 = (
    "opensora20_t2v",
    "opensora20_i2v",
    "opensora20_flf2v",
    "opensora20_t2i2v",
    "opensora20_dcae_t2v",
    "opensora20_dcae_t2i2v",
)
WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
STEPS = 4


def saved_files(server, result, key: str) -> list[Path]:
    files = []
    for output in result.outputs.values():
        for item in output.get(key, []):
            files.append(server.base / item.get("type", "output") / item.get("subfolder", "") / item["filename"])
    return files


@pytest.mark.parametrize("name", NAMES_V2)
def test_v2_workflow_writes_mp4(comfy_server, name):
    if name in ("opensora20_i2v", "opensora20_flf2v"):
        write_reference_image(comfy_server)
        write_reference_image(comfy_server, "opensora_reference_end.png", seed=1)
    prompt = tiny_workflow(comfy_server, name, steps=STEPS)
    result = comfy_server.client().run(prompt, timeout=900)
    assert result.ok, f"{result.status}: {json.dumps(result.error)[:3000]}"
    videos = output_files(result, comfy_server.base)
    assert len(videos) == 1 and videos[0].is_file()
    props = video_properties(videos[0])
    assert props["frames"] == (8 if "dcae" in name else 9)  # the DC-AE takes 4k frames, the 2.0 VAE 4k+1
    assert (props["width"], props["height"]) == (64, 64)
    assert props["fps"] == 24
    assert props["pixels"].std() > 1.0  # not a blank video
    progress = [m["data"]["value"] for m in result.messages if m["type"] == "progress" and m["data"].get("node") == "5"]
    assert progress and progress[-1] == STEPS  # the Sampler node reports its steps
    assert result.previews >= STEPS  # and sends a latent preview per step
    if name.endswith("t2i2v"):
        images = [p for p in saved_files(comfy_server, result, "images") if p.suffix == ".png"]
        assert len(images) == 1  # the FLUX first frame, saved as the official t2i2v does
        with Image.open(images[0]) as first:
            assert first.size == (64, 64)
        ran = {m["data"].get("node") for m in result.messages if m["type"] == "executing"}
        assert {"20", "24", "26", "28", "11"} <= ran  # UNETLoader, ModelSamplingFlux, KSampler, VAEDecode, reference


def test_v2_workflows_ship_in_ui_and_api_format():
    for name, definition in definitions_v2().items():
        prompt = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
        assert prompt == definition, f"workflows/api/{name}.json is stale: run scripts/shipped_workflows.py"
        ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
        assert {n["type"] for n in ui["nodes"]} - {"Note"} == {n["class_type"] for n in prompt.values()}
        kinds = {n["class_type"]: n["inputs"] for n in prompt.values()}
        assert kinds["SaveVideo"]["video"][0] == next(k for k, n in prompt.items() if n["class_type"] == "CreateVideo")
        assert kinds["CreateVideo"]["fps"] == 24.0


def test_workflows_reference_official_files():
    files = set()
    for prompt in definitions().values():  # every version's: each OFFICIAL role is loaded somewhere
        for node in prompt.values():
            for field in ("dit_name", "t5_name", "clip_name", "vae_name", "unet_name", "clip_name1", "clip_name2"):
                if field in node["inputs"]:
                    files.add(node["inputs"][field])
    assert files == set(OFFICIAL.values())
    t2i2v = {n["class_type"]: n["inputs"] for n in definitions_v2()["opensora20_t2i2v"].values()}
    assert t2i2v["DualCLIPLoader"]["type"] == "flux"
    assert t2i2v["FluxGuidance"]["guidance"] == 4.0 and t2i2v["KSampler"]["cfg"] == 1.0
    assert (t2i2v["EmptySD3LatentImage"]["width"], t2i2v["EmptySD3LatentImage"]["height"]) == (1024, 576)
    # Open-Sora's T2I shift alpha = 1 + 2 (2304 - 256) / 3840 at 768px 16:9, one latent frame
    assert t2i2v["ModelSamplingFlux"]["max_shift"] == pytest.approx(torch.tensor(1 + 2 * 2048 / 3840).log().item())
    assert t2i2v["OpenSoraEncodeReference"]["cond_type"] == "i2v_head"


def test_dcae_workflows_follow_high_compression_py():
    """configs/diffusion/inference/high_compression.py: DC-AE DiT, 768px 16:9, 128 frames, 256px.py's sampler."""
    for name in ("opensora20_dcae_t2v", "opensora20_dcae_t2i2v"):
        nodes = {n["class_type"]: n["inputs"] for n in definitions_v2()[name].values()}
        assert nodes["OpenSoraLoadDiT"]["dit_name"] == "Open_Sora_v2_Video_DC_AE.safetensors"
        latent = nodes["OpenSoraEmptyLatentVideo"]
        assert (latent["version"], latent["resolution"], latent["aspect_ratio"]) == ("2.0 DC-AE", "768px", "16:9")
        assert (latent["num_frames"], latent["fps"]) == (128, 24)
        sampler = nodes["OpenSoraSampler"]
        assert (sampler["steps"], sampler["cfg"], sampler["image_cfg"], sampler["seed"]) == (50, 7.5, 3.0, 42)
        assert sampler["oscillation"] and sampler["image_oscillation"] and sampler["scale_image_weight"]
        assert nodes["OpenSoraLoadVAE"] == {
            "vae_name": "F32T4C128_AE.safetensors",
            "dtype": "default",
            "dc_ae_scaling": "trained 0.493",
        }
        assert nodes["OpenSoraDecode"]["tile_size"] == 0  # the DC-AE's own official tiles
        assert not {"OpenSoraHunyuanVAE", "VAEDecodeTiled"} & set(nodes)  # no HunyuanVideo VAE anywhere
    t2i2v = definitions_v2()["opensora20_dcae_t2i2v"]
    nodes = {n["class_type"]: n["inputs"] for n in t2i2v.values()}
    assert nodes["OpenSoraEncodeReference"] == {
        "image": ["28", 0],  # the FLUX first frame
        "latent": ["4", 0],
        "cond_type": "i2v_head",
        "vae": ["6", 0],  # encoded with the DC-AE
    }
    assert t2i2v["5"]["inputs"]["latent"] == ["11", 0]
    assert [n["inputs"]["vae_name"] for n in t2i2v.values() if n["class_type"] == "VAELoader"] == ["ae.safetensors"]
    assert (nodes["EmptySD3LatentImage"]["width"], nodes["EmptySD3LatentImage"]["height"]) == (1024, 576)
    # The same FLUX first frame as opensora20_t2i2v: 768px 16:9 is 576 x 1024 on the 16 and the 32 grid alike.
    assert nodes["ModelSamplingFlux"] == definitions_v2()["opensora20_t2i2v"]["24"]["inputs"]
    assert "VAELoader" not in {n["class_type"] for n in definitions_v2()["opensora20_dcae_t2v"].values()}


def test_use_models_substitutes_only_what_core_cannot_load():
    names = {"dit_2.0": "d", "t5": "t/", "clip_l_2.0": "c", "vae_2.0": "v", "flux": "f", "flux_ae": "a"}
    swapped = use_models(definitions_v2()["opensora20_t2i2v"], names)
    kinds = {n["class_type"]: n["inputs"] for n in swapped.values()}
    assert "DualCLIPLoader" not in kinds and "CLIPTextEncode" not in kinds
    assert kinds["FluxGuidance"]["conditioning"] == ["3", 0]  # Open-Sora Encode Prompt's positive output
    assert kinds["UNETLoader"]["unet_name"] == "f" and kinds["OpenSoraLoadDiT"]["dit_name"] == "d"
    vaes = sorted(n["inputs"]["vae_name"] for n in swapped.values() if n["class_type"] == "VAELoader")
    assert vaes == ["a", "v"]
    kept = use_models(definitions_v2()["opensora20_t2i2v"], {**names, "flux_t5": "T5", "flux_clip_l": "L"})
    kept_kinds = {n["class_type"]: n["inputs"] for n in kept.values()}
    assert (kept_kinds["DualCLIPLoader"]["clip_name1"], kept_kinds["DualCLIPLoader"]["clip_name2"]) == ("T5", "L")
    assert kept_kinds["FluxGuidance"]["conditioning"] == ["22", 0]
    dcae = use_models(definitions_v2()["opensora20_dcae_t2i2v"], {**names, "dit_dcae": "dd", "vae_dcae": "dv"})
    dcae_kinds = {n["class_type"]: n["inputs"] for n in dcae.values()}
    assert dcae_kinds["OpenSoraLoadDiT"]["dit_name"] == "dd" and dcae_kinds["OpenSoraLoadVAE"]["vae_name"] == "dv"
    assert dcae_kinds["VAELoader"]["vae_name"] == "a" and dcae_kinds["UNETLoader"]["unet_name"] == "f"
    assert tiny_settings(dcae)["4"]["inputs"]["num_frames"] == 8  # 4k for the DC-AE
    # the same roles reach the 1.x loaders; a role not given keeps its official file
    v13 = use_models(definitions()["opensora13_i2v"], {"dit_1.3": "d13", "t5": "t/", "dit_2.0": "d"})
    v13_kinds = {n["class_type"]: n["inputs"] for n in v13.values()}
    assert v13_kinds["OpenSoraLoadDiT"]["dit_name"] == "d13" and v13_kinds["OpenSoraLoadTextEncoder"]["t5_name"] == "t/"
    assert v13_kinds["OpenSoraLoadVAE"]["vae_name"] == OFFICIAL["vae_1.3"]
    assert tiny_settings(v13, steps=2, num_frames=33)["4"]["inputs"] == {
        **v13["4"]["inputs"],
        **{"resolution": "144p", "aspect_ratio": "9:16", "num_frames": 33},
    }


def _latent(server, result) -> torch.Tensor:
    files = saved_files(server, result, "latents")
    assert len(files) == 1, result.outputs
    return load_file(str(files[0]))["latent_tensor"]


@pytest.mark.parametrize("name", ["opensora20_t2v", "opensora20_i2v"])
def test_v2_guider_and_sigmas_reproduce_the_sampler_node(comfy_server, name):
    """SamplerCustomAdvanced + Open-Sora Guider / Sigmas + euler == the Open-Sora Sampler node (2.0).

    Both run the same guidance on the same noise; the guider recovers each velocity from core's denoised
    output (v = (x - denoised) / sigma) in float32, hence differences at the 1e-5 level, not bit equality.
    """
    write_reference_image(comfy_server)
    base = tiny_workflow(comfy_server, name, steps=STEPS)
    keep = {k: v for k, v in base.items() if v["class_type"] not in ("VAEDecodeTiled", "CreateVideo", "SaveVideo")}
    seed, steps, cfg, image_cfg = 31, 12, 7.5, 3.0  # 12 steps reach the oscillating steps (>= 10)
    keep["5"]["inputs"].update(seed=seed, steps=steps, cfg=cfg, image_cfg=image_cfg)
    latent = keep["5"]["inputs"]["latent"]
    keep["40"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "parity20/sampler"}}
    reference = comfy_server.client().run(keep, timeout=900)
    assert reference.ok, reference.error

    custom = {k: v for k, v in keep.items() if k not in ("5", "40")}
    custom["50"] = {
        "class_type": "OpenSoraGuider",
        "inputs": {
            "model": ["1", 0],
            "positive": ["3", 0],
            "negative": ["3", 1],
            "latent": latent,
            "cfg": cfg,
            "image_cfg": image_cfg,
        },
    }
    custom["51"] = {"class_type": "OpenSoraSigmas", "inputs": {"latent": latent, "steps": steps}}
    custom["52"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    custom["53"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}}
    custom["54"] = {
        "class_type": "SamplerCustomAdvanced",
        "inputs": {
            "noise": ["53", 0],
            "guider": ["50", 0],
            "sampler": ["52", 0],
            "sigmas": ["51", 0],
            "latent_image": latent,
        },
    }
    custom["55"] = {"class_type": "SaveLatent", "inputs": {"samples": ["54", 0], "filename_prefix": "parity20/custom"}}
    result = comfy_server.client().run(custom, timeout=900)
    assert result.ok, result.error

    a, b = _latent(comfy_server, reference), _latent(comfy_server, result)
    assert a.shape == b.shape == (1, 16, 3, 8, 8)
    assert a.abs().mean() > 0.1
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_v2_video_reference_modes_through_the_api(comfy_server):
    """v2v_tail, one of the official 2.0 video-conditioning modes beyond v2v_head (the _easy variants differ in
    counts only: tests/test_sampling_v2.py): a 33-frame reference video (8 + 1 latent frames) into 41 frames."""
    write_reference_image(comfy_server)
    prompt = tiny_workflow(comfy_server, "opensora20_i2v", steps=2)
    prompt["4"]["inputs"]["num_frames"] = 41
    prompt["13"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["10", 0], "amount": 33}}
    prompt["11"]["inputs"].update(image=["13", 0], cond_type="v2v_tail")
    result = comfy_server.client().run(prompt, timeout=900)
    assert result.ok, f"{result.status}: {json.dumps(result.error)[:3000]}"
    props = video_properties(output_files(result, comfy_server.base)[0])
    assert props["frames"] == 41 and props["pixels"].std() > 1.0


def test_long_prompt_truncation_is_logged_for_t5_and_clip(comfy_server):
    """CLIP-L's pooled vector reads 77 tokens, T5 512: a longer prompt is cut as the official code does, with a log
    line for each encoder that cut it."""
    prompt = tiny_workflow(comfy_server, "opensora20_t2v", steps=1)
    encode = next(node for node in prompt.values() if node["class_type"] == "OpenSoraEncodePrompt")
    encode["inputs"]["prompt"] = " ".join(f"word{i}" for i in range(150))
    assert run_ok(comfy_server, prompt)
    assert "CLIP-L tokens were truncated for the pooled vector" in comfy_server.log()


def test_dcae_latent_into_the_hunyuan_vae_is_named(comfy_server):
    """A 2.0 DC-AE latent wired into core VAEDecode with the HunyuanVideo VAE (causal fix): a message that says
    what the latent is and which decoder it needs, not torch's channel error."""
    prompt = tiny_workflow(comfy_server, "opensora20_dcae_t2v", steps=STEPS)
    hunyuan = tiny_workflow(comfy_server, "opensora20_t2v", steps=STEPS)
    for key in ("7", "8", "9"):
        del prompt[key]
    prompt["60"] = hunyuan["6"]  # VAELoader with the test HunyuanVideo VAE
    prompt["61"] = {"class_type": "OpenSoraHunyuanVAE", "inputs": {"vae": ["60", 0]}}
    prompt["62"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["61", 0]}}
    prompt["63"] = {"class_type": "PreviewImage", "inputs": {"images": ["62", 0]}}
    result = comfy_server.client().run(prompt, timeout=900)
    assert result.status == "error", result.status
    message = result.error["exception_message"]
    assert "128 channels" in message and "Open-Sora Decode" in message, message


def test_gguf_dit_and_t5_with_a_lora_through_the_api(comfy_server):
    """The 2.0 text-to-video workflow with its DiT and T5 as Q8_0 GGUF files (kept quantized: nodes/packed_layers.py,
    opensora_lib/packed_linear.py) and core LoraLoaderModelOnly on the DiT, queued through the HTTP API, writes the
    same video as with the same weights dequantized into safetensors files (and another than without the LoRA)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from helpers_gguf import write_gguf
    from safetensors.torch import save_file

    models, names = comfy_server.models, comfy_server.tiny_models
    t5_folder = models / "text_encoders" / names["t5"].rstrip("/")
    files = {}
    for role, source, folder in (
        ("dit", models / "diffusion_models" / names["dit_2.0"], "diffusion_models"),
        ("t5", t5_folder / "model.safetensors", "text_encoders"),
    ):
        stem = f"opensora-tiny-{role}-q8"
        held = write_gguf(models / folder / f"{stem}.gguf", load_file(str(source)), "Q8_0")
        save_file(held, str(models / folder / f"{stem}-dequantized.safetensors"))
        files[role] = (f"{stem}.gguf", f"{stem}-dequantized.safetensors")
    (models / "loras").mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(4)
    layer = "double_blocks.0.img_attn.q_proj"
    width = load_file(str(models / "diffusion_models" / names["dit_2.0"]))[f"{layer}.weight"].shape
    lora = {
        f"diffusion_model.{layer}.lora_A.weight": torch.randn(4, width[1], generator=gen) * 0.3,
        f"diffusion_model.{layer}.lora_B.weight": torch.randn(width[0], 4, generator=gen) * 0.3,
    }
    save_file(lora, str(models / "loras" / "opensora-tiny-lora.safetensors"))

    def video(variant: int, strength: float = 0.8) -> dict:
        prompt = tiny_workflow(comfy_server, "opensora20_t2v", steps=STEPS)
        dit_node = next(k for k, n in prompt.items() if n["class_type"] == "OpenSoraLoadDiT")
        for node in prompt.values():
            if node["class_type"] == "OpenSoraLoadDiT":
                node["inputs"].update(dit_name=files["dit"][variant], weight_dtype="default")
            if node["class_type"] == "OpenSoraLoadTextEncoder":
                node["inputs"]["t5_name"] = files["t5"][variant]
            for field, value in node["inputs"].items():
                if value == [dit_node, 0]:
                    node["inputs"][field] = ["90", 0]
        prompt["90"] = {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {
                "model": [dit_node, 0],
                "lora_name": "opensora-tiny-lora.safetensors",
                "strength_model": strength,
            },
        }
        result = comfy_server.client().run(prompt, timeout=900)
        assert result.ok, f"{result.status}: {json.dumps(result.error)[:3000]}"
        ran = {m["data"].get("node") for m in result.messages if m["type"] == "executing"}
        assert "90" in ran
        return video_properties(output_files(result, comfy_server.base)[0])

    kept, dequantized = video(0), video(1)
    assert kept["frames"] == 9 and kept["pixels"].std() > 1.0
    assert (kept["pixels"] == dequantized["pixels"]).all()
    assert (kept["pixels"] != video(0, strength=0.0)["pixels"]).any()  # the LoRA does reach the kept layer
