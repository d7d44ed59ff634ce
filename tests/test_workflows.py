"""Every shipped 1.x API workflow runs on the real host with the tiny models and writes a correct mp4."""

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_host import output_files
from helpers_server import api_workflow, node_of, run_ok, tiny_workflow, video_properties, write_reference_image
from PIL import Image
from safetensors.torch import load_file
from shipped_workflows import use_models

pytestmark = pytest.mark.server
API_DIR = Path(__file__).resolve().parent.parent / "workflows" / "api"


@pytest.mark.parametrize("name", ["opensora13_t2v", "opensora13_i2v", "opensora12_t2v"])
def test_shipped_workflow_writes_mp4(comfy_server, name):
    if "i2v" in name:
        write_reference_image(comfy_server)
    prompt = tiny_workflow(comfy_server, name)
    videos = run_ok(comfy_server, prompt)
    assert len(videos) == 1 and videos[0].is_file()
    props = video_properties(videos[0])
    assert props["frames"] == 17
    assert (props["width"], props["height"]) == (256, 144)  # 144p at H:W 9:16 is landscape
    assert props["fps"] == 24
    assert props["pixels"].std() > 1.0  # not a blank video


@pytest.mark.parametrize("name", ["opensora13_t2v", "opensora13_i2v", "opensora12_t2v"])
def test_batch_of_two_videos(comfy_server, name):
    """batch_size 2 through the Sampler node: both videos in the mp4. In t2v the first one is the batch-1 video
    (same seed: the noise of item 0 is drawn first); i2v draws noise at every step, so its items differ from it."""
    if "i2v" in name:
        write_reference_image(comfy_server)
    single = video_properties(run_ok(comfy_server, tiny_workflow(comfy_server, name, steps=2))[0])
    prompt = tiny_workflow(comfy_server, name, steps=2, batch_size=2)
    both = video_properties(run_ok(comfy_server, prompt)[0])
    frames = single["frames"]
    assert both["frames"] == 2 * frames == 34
    first, second = both["pixels"][:frames].astype(int), both["pixels"][frames:].astype(int)
    assert abs(second - first).mean() > 20  # two different videos (measured 40-48)
    if "t2v" in name:  # measured 1.4-1.6: the same frames, encoded in another mp4
        assert abs(first - single["pixels"].astype(int)).mean() < 4


def test_workflows_ship_in_ui_and_api_format():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "workflows"
    for api in (root / "api").glob("*.json"):
        ui = json.loads((root / api.name).read_text())
        prompt = json.loads(api.read_text())
        assert {n["type"] for n in ui["nodes"]} - {"Note"} == {n["class_type"] for n in prompt.values()}
        assert any(n["class_type"] == "SaveVideo" for n in prompt.values())
        assert any(n["class_type"] == "CreateVideo" for n in prompt.values())


def test_api_workflows_are_what_the_generator_writes():
    """workflows/api/*.json are scripts/shipped_workflows.py's definitions (an edit made in one place only is lost
    at the next `python scripts/shipped_workflows.py`)."""
    from shipped_workflows import definitions

    shipped = {path.stem: json.loads(path.read_text()) for path in (API_DIR).glob("*.json")}
    assert shipped == definitions()


def test_long_video_workflow_joins_its_loops(comfy_server):
    """opensora13_long: three chunks of 33 tiny frames (10 latent frames), each continuing the last 5 latent frames
    of the one before: 10 + 5 + 5 latent frames, 65 frames."""
    prompt = tiny_workflow(comfy_server, "opensora13_long", steps=2)
    (video,) = run_ok(comfy_server, prompt)
    props = video_properties(video)
    assert props["frames"] == 65 and (props["width"], props["height"]) == (256, 144), props
    assert props["pixels"].std() > 1.0


def test_ui_workflows_say_which_model_files_they_need_and_where_from():
    """Audit 24: a workflow opened without the official files said nothing about them. Each UI file opens with a
    Note naming every file or folder its loaders read, its Hugging Face repo and its models/ folder; each loader
    of a single file carries it in properties.models (name, url, directory) for the frontend's missing-models
    dialog (the browser test checks the dialog)."""
    from pathlib import Path

    from shipped_workflows import SOURCES

    root = Path(__file__).resolve().parent.parent / "workflows"
    for api in sorted((root / "api").glob("*.json")):
        ui = json.loads((root / api.name).read_text())
        prompt = json.loads(api.read_text())
        notes = [n for n in ui["nodes"] if n["type"] == "Note"]
        assert len(notes) == 1, api.name
        text = notes[0]["widgets_values"][0]
        files = {v for n in prompt.values() for v in n["inputs"].values() if isinstance(v, str) and v in SOURCES}
        assert files, api.name
        for name in files:
            repo, directory = SOURCES[name]
            assert f"{name} " in text and f"https://huggingface.co/{repo}" in text and f"models/{directory}/" in text
        offered = {}
        for node in ui["nodes"]:
            for model in node["properties"].get("models", []):
                offered[model["name"]] = model
                assert node["widgets_values"].count(model["name"]) == 1, (api.name, node["type"], model)
        assert set(offered) == {name for name in files if not name.endswith("/")}, api.name
        for name, model in offered.items():
            repo, directory = SOURCES[name]
            assert model == {
                "name": name,
                "url": f"https://huggingface.co/{repo}/resolve/main/{name}",
                "directory": directory,
            }


def test_workflow_templates_are_served_with_their_thumbnails(comfy_server):
    """Core's template browser lists workflows/*.json and shows workflows/<name>.jpg for each (a placeholder and a
    404 without it; audit 24)."""
    import io
    import urllib.request

    from PIL import Image

    templates = comfy_server.get_json("/workflow_templates")
    names = set(templates["ComfyUI-OpenSora"])
    shipped = {p.stem for p in (Path(__file__).resolve().parent.parent / "workflows" / "api").glob("*.json")}
    assert names == shipped
    for name in sorted(names):
        url = f"{comfy_server.url}/api/workflow_templates/ComfyUI-OpenSora/{name}.jpg"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200 and response.headers["Content-Type"] == "image/jpeg", name
            with Image.open(io.BytesIO(response.read())) as image:
                assert image.format == "JPEG" and image.width == 640, name


def _latent(comfy_server, result) -> torch.Tensor:
    files = []
    for output in result.outputs.values():
        for item in output.get("latents", []):
            files.append(comfy_server.base / item.get("type", "output") / item.get("subfolder", "") / item["filename"])
    assert len(files) == 1, result.outputs
    return load_file(str(files[0]))["latent_tensor"]


def test_guider_and_sigmas_reproduce_the_sampler_node(comfy_server):
    """Core SamplerCustomAdvanced + Open-Sora Guider/Sigmas + euler gives the Sampler node's latent."""
    base = tiny_workflow(comfy_server, "opensora13_t2v", steps=6)
    keep = {
        k: v
        for k, v in base.items()
        if v["class_type"] not in ("OpenSoraLoadVAE", "OpenSoraDecode", "CreateVideo", "SaveVideo")
    }
    seed, steps, cfg = 77, 6, 7.5
    keep["5"]["inputs"].update(seed=seed, steps=steps, cfg=cfg)
    keep["20"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "parity/sampler"}}
    reference = comfy_server.client().run(keep, timeout=900)
    assert reference.ok, reference.error

    custom = {k: v for k, v in keep.items() if k not in ("5", "20")}
    custom["30"] = {
        "class_type": "OpenSoraGuider",
        "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["3", 1], "latent": ["4", 0], "cfg": cfg},
    }
    custom["31"] = {"class_type": "OpenSoraSigmas", "inputs": {"latent": ["4", 0], "steps": steps}}
    custom["32"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    custom["33"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}}
    custom["34"] = {
        "class_type": "SamplerCustomAdvanced",
        "inputs": {
            "noise": ["33", 0],
            "guider": ["30", 0],
            "sampler": ["32", 0],
            "sigmas": ["31", 0],
            "latent_image": ["4", 0],
        },
    }
    custom["35"] = {"class_type": "SaveLatent", "inputs": {"samples": ["34", 0], "filename_prefix": "parity/custom"}}
    result = comfy_server.client().run(custom, timeout=900)
    assert result.ok, result.error

    a, b = _latent(comfy_server, reference), _latent(comfy_server, result)
    assert a.shape == b.shape == (1, 16, 5, 18, 32)
    assert a.abs().mean() > 0.1
    torch.testing.assert_close(b, a, atol=2e-3, rtol=2e-3)


def test_api_workflows_reference_official_files():
    prompt = api_workflow("opensora13_t2v")
    loaders = {n["class_type"]: n["inputs"] for n in prompt.values()}
    assert loaders["OpenSoraLoadDiT"]["dit_name"] == "OpenSora-STDiT-v4/"
    assert loaders["OpenSoraLoadVAE"]["vae_name"] == "OpenSora-VAE-v1.3/"
    assert loaders["OpenSoraLoadTextEncoder"]["t5_name"] == "t5xxl_fp16.safetensors"


def test_sampler_sends_latent_previews_over_the_websocket(comfy_server):
    prompt = tiny_workflow(comfy_server, "opensora13_t2v", steps=3)
    prompt["5"]["inputs"]["seed"] = 9090  # not cached
    result = comfy_server.client().run(prompt, timeout=600)
    assert result.ok, result.error
    progress = [m for m in result.messages if m["type"] == "progress" and m["data"].get("node") == "5"]
    assert [m["data"]["value"] for m in progress][-1] == 3
    assert result.previews >= 3  # one binary preview frame per sampling step


def test_core_ksampler_sends_previews_of_1x_latents(comfy_server):
    """Core KSampler on a 1.3 MODEL previews like the Open-Sora Sampler: the latent format's principal-component
    hook feeds core's Latent2RGB previewer (1.x latents have no published RGB factors)."""
    prompt = tiny_workflow(comfy_server, "opensora13_t2v", steps=3)
    sampler = node_of(prompt, "OpenSoraSampler")
    inputs = prompt[sampler]["inputs"]
    text = inputs["positive"][0]
    ksampler = {"model": inputs["model"], "seed": 9191, "steps": 3, "cfg": 3.0, "sampler_name": "euler"}
    ksampler.update(scheduler="simple", positive=[text, 0], negative=[text, 1], latent_image=inputs["latent"])
    prompt[sampler] = {"class_type": "KSampler", "inputs": {**ksampler, "denoise": 1.0}}
    result = comfy_server.client().run(prompt, timeout=600)
    assert result.ok, result.error
    assert result.previews >= 3  # one per step
    event, image_type = struct.unpack(">II", result.last_preview[:8])
    assert (event, image_type) == (1, 1)  # PREVIEW_IMAGE, JPEG
    picture = Image.open(io.BytesIO(result.last_preview[8:]))
    assert picture.size == (512, 288)  # 144p 16:9's 256 x 144 pixels, scaled to --preview-size 512
    assert float(np.asarray(picture, dtype=np.float32).std()) > 5.0  # a picture, not one colour


def _sampled_latent(comfy_server, prefix: str, steps: int = 2, **latent_inputs) -> torch.Tensor:
    """The 1.3 t2v Sampler node's latent (SaveLatent) with Empty Latent Video inputs / Sampler seed overridden."""
    prompt = tiny_workflow(comfy_server, "opensora13_t2v", steps=steps)
    prompt = {k: v for k, v in prompt.items() if v["class_type"] not in ("OpenSoraLoadVAE", "OpenSoraDecode")}
    prompt = {k: v for k, v in prompt.items() if v["class_type"] not in ("CreateVideo", "SaveVideo")}
    seed = latent_inputs.pop("seed", None)
    if seed is not None:
        prompt["5"]["inputs"]["seed"] = seed
    prompt["4"]["inputs"].update(latent_inputs)
    prompt["20"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"fps/{prefix}"}}
    result = comfy_server.client().run(prompt, timeout=900)
    assert result.ok, result.error
    return _latent(comfy_server, result)


def test_single_image_is_conditioned_on_fps_120_as_the_reference(comfy_server):
    """Official 1.x inference embeds fps 120 for one frame whatever fps is asked for (IMG_FPS); for video the
    fps input counts."""
    image = {fps: _sampled_latent(comfy_server, f"image{fps}", num_frames=1, fps=fps) for fps in (24, 8)}
    assert torch.equal(image[24], image[8])
    video = {fps: _sampled_latent(comfy_server, f"video{fps}", num_frames=17, fps=fps) for fps in (24, 8)}
    assert (video[24] - video[8]).abs().max() > 1e-3


def test_largest_seed_the_widget_allows(comfy_server):
    latent = _sampled_latent(comfy_server, "maxseed", seed=2**64 - 1)
    assert torch.isfinite(latent).all() and latent.abs().mean() > 0.1


@pytest.mark.parametrize("name", ["opensora13_t2v", "opensora12_t2v"])
def test_core_ksampler_runs_a_1x_model(comfy_server, name):
    """Core KSampler on the 1.x MODEL with Encode Prompt's positive and its null-caption negative: the sizes come
    from the latent, the null caption is the model's learned one."""
    prompt = tiny_workflow(comfy_server, name, steps=2)
    sampler_id = next(k for k, n in prompt.items() if n["class_type"] == "OpenSoraSampler")
    inputs = prompt[sampler_id]["inputs"]
    prompt[sampler_id] = {
        "class_type": "KSampler",
        "inputs": {
            "model": inputs["model"],
            "positive": inputs["positive"],
            "negative": inputs["negative"],
            "latent_image": inputs["latent"],
            "seed": 3,
            "steps": 2,
            "cfg": 5.0,
            "sampler_name": "euler",
            "scheduler": "simple",
            "denoise": 1.0,
        },
    }
    props = video_properties(run_ok(comfy_server, prompt)[0])
    assert props["frames"] == 17 and props["pixels"].std() > 1.0


def _v12_i2v(comfy_server, seed: int, cond_type: str) -> dict:
    """The shipped 1.3 i2v graph on the 1.2 models, sampled latent saved."""
    write_reference_image(comfy_server)
    names = comfy_server.tiny_models
    prompt = use_models(
        api_workflow("opensora13_i2v"), {"dit_1.3": names["dit_1.2"], "vae_1.3": names["vae_1.2"], "t5": names["t5"]}
    )
    prompt["2"]["inputs"]["version"] = "1.2"
    prompt["4"]["inputs"].update(version="1.2", resolution="144p", aspect_ratio="9:16", num_frames=17)
    prompt["5"]["inputs"].update(seed=seed, steps=3)
    prompt["11"]["inputs"]["cond_type"] = cond_type
    for key in ("7", "8", "9"):
        del prompt[key]
    prompt["20"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "v12i2v/out"}}
    return prompt


def test_v12_image_to_video_through_the_api(comfy_server):
    """1.2 i2v on the real host: the reference's latent frame is kept whatever the seed (what is kept, and where,
    is checked against the official strategies in tests/test_v12_reference.py)."""
    runs = []
    for seed in (1, 2):
        result = comfy_server.client().run(_v12_i2v(comfy_server, seed, "i2v_head"), timeout=900)
        assert result.ok, result.error
        runs.append(_latent(comfy_server, result))
    a, b = runs
    assert torch.equal(a[:, :, 0], b[:, :, 0])
    assert (a[:, :, 1:] - b[:, :, 1:]).abs().max() > 0.1


def test_v12_reference_in_the_guider_is_refused_clearly(comfy_server):
    prompt = _v12_i2v(comfy_server, 1, "i2v_head")
    prompt["30"] = {
        "class_type": "OpenSoraGuider",
        "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["3", 1], "latent": ["11", 0], "cfg": 7.0},
    }
    prompt["31"] = {"class_type": "OpenSoraSigmas", "inputs": {"latent": ["11", 0], "steps": 3}}
    prompt["32"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    prompt["33"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}}
    prompt["5"] = {
        "class_type": "SamplerCustomAdvanced",
        "inputs": {"noise": ["33", 0], "guider": ["30", 0], "sampler": ["32", 0], "sigmas": ["31", 0]},
    }
    prompt["5"]["inputs"]["latent_image"] = ["11", 0]
    result = comfy_server.client().run(prompt, timeout=900)
    assert result.status == "error", result.status
    assert "1.2 references" in result.error["exception_message"] and "Sampler node" in result.error["exception_message"]


def test_decode_a_v12_latent_saved_and_loaded_by_core(comfy_server):
    """Core SaveLatent keeps only the samples; Open-Sora Decode of the loaded 1.2 latent gives the whole video."""
    import shutil

    prompt = tiny_workflow(comfy_server, "opensora12_t2v", steps=2)
    prompt["20"] = {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "roundtrip/v12"}}
    result = comfy_server.client().run(prompt, timeout=900)
    assert result.ok, result.error
    direct = video_properties(output_files(result, comfy_server.base)[0])
    item = next(i for o in result.outputs.values() for i in o.get("latents", []))
    saved = comfy_server.base / "output" / item["subfolder"] / item["filename"]
    shutil.copy(saved, comfy_server.base / "input" / "v12_roundtrip.latent")
    loaded = {k: v for k, v in prompt.items() if v["class_type"] in ("OpenSoraLoadVAE", "CreateVideo", "SaveVideo")}
    decode = next(k for k, v in prompt.items() if v["class_type"] == "OpenSoraDecode")
    loaded[decode] = {**prompt[decode], "inputs": {**prompt[decode]["inputs"], "latent": ["40", 0]}}
    loaded["40"] = {"class_type": "LoadLatent", "inputs": {"latent": "v12_roundtrip.latent"}}
    again = video_properties(run_ok(comfy_server, loaded)[0])
    assert again["frames"] == direct["frames"] == 17
    assert abs(again["pixels"].astype(int) - direct["pixels"].astype(int)).mean() < 1.0
