"""The 2.0 Sampler node's guidance_passes: "one at a time" runs one model call per guidance pass, asks ComfyUI for
one pass's activation memory, and gives the library's batch_passes=False result exactly (float rounding away from
the batched one). Runs inside the pinned ComfyUI host with the tiny 2.0 DiT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_comfy_probe import run_probe
from helpers_conditioning import random_conditioning

STEPS = 14  # past the 10 oscillation-free steps, so some steps need fewer passes


def probe(out_path: str, models_dir: str) -> None:
    """Runs inside ComfyUI (--cpu). Writes the measurements to out_path."""
    import comfy.model_management as mm
    import comfy.sample
    import folder_paths
    import torch
    from opensora_pack.nodes import latent, loaders, sampling
    from opensora_pack.nodes.comfy_model_v2 import ComfyMMDiT
    from opensora_pack.nodes.sampling_v2 import mmdit_caller, options_v2, text_v2
    from opensora_pack.opensora_lib.memory import FORWARD_WORKSPACE_BYTES, activation_memory
    from opensora_pack.opensora_lib.sampling_v2 import sample_v2

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    folder_paths.add_model_folder_path("diffusion_models", str(Path(models_dir) / "diffusion_models"), is_default=True)
    (model,) = loaders.OpenSoraLoadDiT().load("opensora-tiny-v2.safetensors", "fp32", "sdpa")
    config = model.model.diffusion_model.config
    positive, negative = random_conditioning("2.0", config)
    (empty,) = latent.OpenSoraEmptyLatentVideo().generate("2.0", "256px", "16:9", 9, width=96, height=64)

    calls: list[int] = []
    loads: list[dict] = []
    original_forward, original_load = ComfyMMDiT._forward, mm.load_models_gpu

    def counting_forward(self, x, *args, **kwargs):
        calls.append(x.shape[0])
        return original_forward(self, x, *args, **kwargs)

    def recording_load(models, *args, **kwargs):
        loads.append({k: kwargs.get(k) for k in ("memory_required", "minimum_memory_required")})
        return original_load(models, *args, **kwargs)

    ComfyMMDiT._forward, mm.load_models_gpu = counting_forward, recording_load
    results: dict = {}
    outputs = {}
    try:
        for mode in ("batched", "one at a time"):
            calls.clear()
            loads.clear()
            (out,) = sampling.OpenSoraSampler().sample(
                model, positive, negative, empty, 3, STEPS, 7.5, guidance_passes=mode
            )
            outputs[mode] = out["samples"]
            results[mode] = {"calls": list(calls), "loads": list(loads)}
        try:
            sampling.OpenSoraSampler().sample(model, positive, negative, empty, 3, 1, 7.5, guidance_passes="sideways")
            results["bad_mode"] = "no error"
        except ValueError as e:
            results["bad_mode"] = str(e)

        def out_of_memory(self, x, *args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        ComfyMMDiT._forward = out_of_memory
        for mode in ("batched", "one at a time"):
            try:
                sampling.OpenSoraSampler().sample(model, positive, negative, empty, 3, 1, 7.5, guidance_passes=mode)
                results[f"oom {mode}"] = {"type": None}
            except Exception as e:  # noqa: BLE001 (the type is what is checked)
                results[f"oom {mode}"] = {"type": type(e).__name__, "message": str(e)}
    finally:
        ComfyMMDiT._forward, mm.load_models_gpu = original_forward, original_load

    # The library with batch_passes=False on the node's inputs (noise and text drawn as the node draws them).
    samples = empty["samples"]
    noise = comfy.sample.prepare_noise(samples, 3, None).float()
    options = options_v2(STEPS, 7.5, 5.0, True, True, True, True, config.patch_size, torch.float32)
    options.batch_passes = False
    direct = sample_v2(mmdit_caller(model, samples.shape), noise, text_v2(model, positive, negative), options)
    direct = model.model.process_latent_out(direct.float())
    one_row = activation_memory(model.model.diffusion_model, samples.shape, 7, torch.float32)
    results["compare"] = {
        "sequential_vs_library": float((outputs["one at a time"] - direct).abs().max()),
        "sequential_vs_batched": float((outputs["one at a time"] - outputs["batched"]).abs().max()),
        "magnitude": float(outputs["batched"].abs().mean()),
        "one_row_estimate": one_row,
        "workspace": FORWARD_WORKSPACE_BYTES,
    }
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    from demo_models_v2 import NAMES, make_mmdit

    models = tmp_path_factory.mktemp("models-passes")
    make_mmdit(models / "diffusion_models" / NAMES["dit_2.0"])
    return run_probe("test_guidance_passes", models / "results.json", models)


def test_batched_runs_one_call_per_step_with_every_pass_as_rows(measured):
    calls = measured["batched"]["calls"]
    assert len(calls) == STEPS
    assert calls[0] == 2 and set(calls) == {1, 2}  # t2v: cond + uncond; oscillation steps need only cond


def test_one_at_a_time_runs_one_row_per_call_and_the_same_passes(measured):
    batched, sequential = measured["batched"]["calls"], measured["one at a time"]["calls"]
    assert set(sequential) == {1}
    assert len(sequential) == sum(batched)  # the same passes, each its own call


def test_one_at_a_time_asks_comfyui_for_one_pass_of_memory(measured):
    one_row, workspace = measured["compare"]["one_row_estimate"], measured["compare"]["workspace"]
    (batched_load,) = measured["batched"]["loads"]
    (sequential_load,) = measured["one at a time"]["loads"]
    expected = one_row + workspace  # one pass's activations + the workspace margin, once per forward
    assert sequential_load == {"memory_required": expected, "minimum_memory_required": expected}
    assert batched_load["memory_required"] == batched_load["minimum_memory_required"] == 2 * one_row + workspace


def test_one_at_a_time_is_the_library_result_and_close_to_batched(measured):
    compare = measured["compare"]
    assert compare["sequential_vs_library"] == 0.0
    assert compare["sequential_vs_batched"] < 1e-4 * max(1.0, compare["magnitude"])  # float rounding only
    assert compare["magnitude"] > 0.1


def test_unknown_mode_is_refused(measured):
    assert "guidance_passes" in measured["bad_mode"] and "one at a time" in measured["bad_mode"]


def test_out_of_memory_keeps_its_type_and_says_what_to_change(measured):
    batched, sequential = measured["oom batched"], measured["oom one at a time"]
    # still torch.OutOfMemoryError, so ComfyUI's executor recognises it and unloads its models
    assert batched["type"] == sequential["type"] == "OutOfMemoryError"
    for values in (batched, sequential):
        message = values["message"]
        assert "Open-Sora 2.0 ran out of GPU memory" in message and "1 video(s) of 3 latent frames at 8 x 12" in message
        assert "GiB of activations" in message and "fp8_e4m3fn" in message
        assert "Tried to allocate 20.00 GiB" in message  # the original error is kept
    assert "'one at a time'" in batched["message"] and "'one at a time'" not in sequential["message"]
