"""The pack's nodes next to core nodes that feed or change their inputs, through the API of a real ComfyUI.

- Inputs linked from another node (core's Int / PrimitiveInt) reach VALIDATE_INPUTS as None when the prompt is
  queued: Empty Latent Video and Decode check them when they run instead (a bad linked value is a clear error there).
- Core latent nodes copy a LATENT with its Open-Sora info unchanged (LatentUpscaleBy for a hires fix,
  TrimVideoLatent): the size and length then come from the samples, so Decode does not crop to the old size.
- The Guider and SamplerCustomAdvanced given different LATENTs: named before any DiT call.
"""

from __future__ import annotations

import json

import pytest
from helpers_server import node_of, run_ok, tiny_workflow, video_properties, write_reference_image

pytestmark = pytest.mark.server


def linked(prompt: dict, node: str, name: str, value: int, source: str = "95") -> None:
    prompt[source] = {"class_type": "PrimitiveInt", "inputs": {"value": value}}
    prompt[node]["inputs"][name] = [source, 0]


def error_of(server, prompt: dict) -> str:
    result = server.client().run(prompt, timeout=600)
    assert not result.ok, "the prompt ran"
    return json.dumps(result.error)


def test_linked_frames_and_size_on_empty_latent_video(comfy_server):
    prompt = tiny_workflow(comfy_server, "opensora13_t2v", steps=2)
    latent = node_of(prompt, "OpenSoraEmptyLatentVideo")
    linked(prompt, latent, "num_frames", 33)
    linked(prompt, latent, "width", 256, source="96")
    prompt[latent]["inputs"]["height"] = 144
    video = video_properties(run_ok(comfy_server, prompt)[0])
    assert (video["frames"], video["width"], video["height"]) == (33, 256, 144), video


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [("num_frames", 20, "16k+1 frames"), ("batch_size", 0, "batch_size must be between 1 and")],
)
def test_bad_linked_value_is_named_when_it_runs(comfy_server, name, value, message):
    prompt = tiny_workflow(comfy_server, "opensora13_t2v", steps=2)
    linked(prompt, node_of(prompt, "OpenSoraEmptyLatentVideo"), name, value)
    assert message in error_of(comfy_server, prompt)
    run_ok(comfy_server, tiny_workflow(comfy_server, "opensora13_t2v", steps=2))  # the server keeps serving


def test_linked_decode_tile_overlap(comfy_server):
    prompt = tiny_workflow(comfy_server, "opensora13_t2v", steps=2)
    decode = node_of(prompt, "OpenSoraDecode")
    prompt[decode]["inputs"]["tile_size"] = 64
    linked(prompt, decode, "tile_overlap", 16)
    assert video_properties(run_ok(comfy_server, prompt)[0])["frames"] == 17
    linked(prompt, decode, "tile_overlap", 64)
    assert "tile_overlap (64 px) must be smaller than tile_size (64 px)" in error_of(comfy_server, prompt)


def test_hires_fix_after_core_latent_upscale_is_not_cropped(comfy_server):
    """Sampler -> core LatentUpscaleBy x2 -> KSampler (denoise 0.5) -> Open-Sora Decode: the upscaled size."""
    prompt = tiny_workflow(comfy_server, "opensora13_t2v", steps=2)  # 144p 9:16: 144 x 256
    sampler = node_of(prompt, "OpenSoraSampler")
    model, text = prompt[sampler]["inputs"]["model"], prompt[sampler]["inputs"]["positive"][0]
    prompt["90"] = {
        "class_type": "LatentUpscaleBy",
        "inputs": {"samples": [sampler, 0], "upscale_method": "bilinear", "scale_by": 2.0},
    }
    ksampler = {"model": model, "seed": 5, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple"}
    ksampler.update(positive=[text, 0], negative=[text, 1], latent_image=["90", 0], denoise=0.5)
    prompt["91"] = {"class_type": "KSampler", "inputs": ksampler}
    prompt[node_of(prompt, "OpenSoraDecode")]["inputs"]["latent"] = ["91", 0]
    video = video_properties(run_ok(comfy_server, prompt)[0])
    assert (video["frames"], video["width"], video["height"]) == (17, 512, 288), video


def test_trimmed_latent_samples_and_decodes_its_own_length(comfy_server):
    """33 frames (10 latent frames) -> core TrimVideoLatent 5 -> the Sampler and Decode see 17 frames."""
    prompt = tiny_workflow(comfy_server, "opensora13_t2v", steps=2, num_frames=33)
    latent, sampler = node_of(prompt, "OpenSoraEmptyLatentVideo"), node_of(prompt, "OpenSoraSampler")
    prompt["90"] = {"class_type": "TrimVideoLatent", "inputs": {"samples": [latent, 0], "trim_amount": 5}}
    prompt[sampler]["inputs"]["latent"] = ["90", 0]
    assert video_properties(run_ok(comfy_server, prompt)[0])["frames"] == 17
    prompt["90"]["inputs"]["trim_amount"] = 3  # 7 latent frames: no 1.3 length has them
    message = error_of(comfy_server, prompt)
    assert "no Open-Sora 1.3 frame count gives 7 latent frames" in message and "changed it" in message, message


def test_rebatched_latents_are_refused_with_the_reason(comfy_server):
    """Core RebatchLatents rebuilds each LATENT with only samples, mask and batch index: the pack's info and any
    Encode Reference image are gone, so the Sampler refuses it, naming that node (rather than guessing the size and
    fps and silently sampling text-to-video) and pointing to core KSampler."""
    prompt = tiny_workflow(comfy_server, "opensora13_t2v", steps=2, batch_size=2)
    latent, sampler = node_of(prompt, "OpenSoraEmptyLatentVideo"), node_of(prompt, "OpenSoraSampler")
    prompt["90"] = {"class_type": "RebatchLatents", "inputs": {"latents": [latent, 0], "batch_size": 1}}
    prompt[sampler]["inputs"]["latent"] = ["90", 0]
    message = error_of(comfy_server, prompt)
    assert "no Open-Sora size information" in message and "RebatchLatents" in message, message
    assert "without any reference" in message and "core KSampler" in message, message


def guider_graph(server) -> tuple[dict, str]:
    """1.3 i2v through the Open-Sora Guider: the Guider and Sigmas take the Encode Reference latent, and
    SamplerCustomAdvanced (node "57") a latent_image to set."""
    write_reference_image(server)
    prompt = tiny_workflow(server, "opensora13_i2v", steps=2)
    reference = node_of(prompt, "OpenSoraEncodeReference")
    sampler = prompt[node_of(prompt, "OpenSoraSampler")]["inputs"]
    text = sampler["positive"][0]
    prompt["50"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}}
    guider = {"model": sampler["model"], "positive": [text, 0], "negative": [text, 1], "latent": [reference, 0]}
    prompt["51"] = {"class_type": "OpenSoraGuider", "inputs": {**guider, "cfg": 7.5}}
    prompt["52"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    prompt["53"] = {"class_type": "OpenSoraSigmas", "inputs": {"latent": [reference, 0], "steps": 2}}
    noise = {"noise": ["50", 0], "guider": ["51", 0], "sampler": ["52", 0], "sigmas": ["53", 0]}
    prompt["57"] = {"class_type": "SamplerCustomAdvanced", "inputs": noise}
    prompt[node_of(prompt, "OpenSoraDecode")]["inputs"]["latent"] = ["57", 0]
    return prompt, reference


def test_guider_with_a_batch_on_the_sampler_latent_only(comfy_server):
    """RepeatLatentBatch on SamplerCustomAdvanced's latent only: core repeats the Guider's conditioning over it."""
    prompt, reference = guider_graph(comfy_server)
    prompt["58"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": [reference, 0], "amount": 2}}
    prompt["57"]["inputs"]["latent_image"] = ["58", 0]
    assert video_properties(run_ok(comfy_server, prompt)[0])["frames"] == 2 * 17


@pytest.mark.parametrize(
    ("node", "inputs"),
    [("LatentUpscaleBy", {"upscale_method": "bilinear", "scale_by": 2.0}), ("TrimVideoLatent", {"trim_amount": 5})],
)
def test_reference_made_before_a_core_latent_node_is_named(comfy_server, node, inputs):
    """Encode Reference -> a core node that changes the latent -> Sampler: the reference no longer fits it."""
    write_reference_image(comfy_server)
    prompt = tiny_workflow(comfy_server, "opensora13_i2v", steps=2, num_frames=33)
    reference, sampler = node_of(prompt, "OpenSoraEncodeReference"), node_of(prompt, "OpenSoraSampler")
    prompt[reference]["inputs"]["cond_type"] = "i2v_tail"  # latent frame 9 of 10: gone after trimming 5
    prompt["90"] = {"class_type": node, "inputs": {"samples": [reference, 0], **inputs}}
    prompt[sampler]["inputs"]["latent"] = ["90", 0]
    message = error_of(comfy_server, prompt)
    assert "Open-Sora Encode Reference" in message and "Run Encode Reference after that node" in message, message


def test_guider_and_sampler_given_different_latents(comfy_server):
    """The Guider and Sigmas get the 17-frame Encode Reference latent, SamplerCustomAdvanced a 33-frame one."""
    prompt, _ = guider_graph(comfy_server)
    empty = {"version": "1.3", "resolution": "144p", "aspect_ratio": "9:16", "num_frames": 33, "batch_size": 1}
    prompt["56"] = {"class_type": "OpenSoraEmptyLatentVideo", "inputs": empty}
    prompt["57"]["inputs"]["latent_image"] = ["56", 0]
    message = error_of(comfy_server, prompt)
    assert "Open-Sora Guider was made for a latent of shape [1, 16, 5, 18, 32]" in message, message
    assert "latent_image [1, 16, 10, 18, 32]" in message, message
