"""Core's Context Windows (Manual) node with the Open-Sora MODEL, in ComfyUI (--cpu), for 1.3 and 2.0.

- Text-to-video through the Open-Sora Guider + SamplerCustomAdvanced (and core KSampler for 2.0): a window as long
  as the latent changes nothing (bit-identical); a shorter one runs the DiT on windows of that many latent frames.
- With a reference (i2v) and windows shorter than the latent: a clear error before any DiT call (core slices the
  latent per window but not the reference conditioning).
- The Sampler node does not run context windows: it warns, naming them, and samples the whole latent.
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from helpers_comfy_probe import run_probe

REPO = Path(__file__).resolve().parent.parent
DIT = {"2.0": "opensora-tiny-v2.safetensors", "1.3": "opensora-tiny-v13/"}
LATENT = {"2.0": ("2.0", "256px", "16:9", 17, 1, 64, 48), "1.3": ("1.3", "144p", "9:16", 33)}  # 5 / 10 latent frames
WINDOW = 2
STEPS, SEED, CFG, IMAGE_CFG = 4, 17, 7.5, 3.0


def probe(out_path: str, models_dir: str) -> None:  # noqa: C901 (one subprocess, many measurements)
    import comfy.model_management as mm
    import folder_paths
    from comfy_extras.nodes_context_windows import ContextWindowsManualNode
    from comfy_extras.nodes_custom_sampler import KSamplerSelect, RandomNoise, SamplerCustomAdvanced
    from helpers_conditioning import random_conditioning
    from opensora_pack.nodes import guider, latent, loaders, sampling

    import nodes as core_nodes

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    folder_paths.add_model_folder_path("diffusion_models", str(Path(models_dir) / "diffusion_models"), True)
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("OpenSora").addHandler(handler)
    results: dict = {}

    def result_of(output):
        return output.result[0] if hasattr(output, "result") else output[0]

    def windowed(model, length):
        options = dict(context_length=length, context_overlap=1, context_schedule="standard_static")
        options.update(context_stride=1, closed_loop=False, fuse_method="pyramid", dim=2)
        if "freenoise" in inspect.signature(ContextWindowsManualNode.execute).parameters:  # newer ComfyUI
            options["freenoise"] = False
        return result_of(ContextWindowsManualNode.execute(model, **options))

    def one_version(version: str) -> None:
        (model,) = loaders.OpenSoraLoadDiT().load(DIT[version], "fp32")
        dm = model.model.diffusion_model
        positive, negative = random_conditioning(version, dm.config)
        frames_seen: list[int] = []
        dm.register_forward_pre_hook(lambda _m, args: frames_seen.append(args[0].shape[2]))

        def latent_for(i2v):
            (empty,) = latent.OpenSoraEmptyLatentVideo().generate(*LATENT[version])
            if not i2v:
                return empty
            s = empty["samples"]
            ref = torch.randn(1, s.shape[1], 1, *s.shape[3:], generator=torch.Generator().manual_seed(3))
            reference = {"latent": ref, "mask_index": [0], "cond_type": "i2v_head", "version": version}
            return {**empty, "opensora_reference": reference}

        def guided(m, i2v=False):
            lat = latent_for(i2v)
            (g,) = guider.OpenSoraGuider().get_guider(m, positive, negative, lat, CFG, IMAGE_CFG)
            (sigmas,) = sampling.OpenSoraSigmas().sigmas(lat, STEPS)
            noise, euler = result_of(RandomNoise.execute(SEED)), result_of(KSamplerSelect.execute("euler"))
            return result_of(SamplerCustomAdvanced.execute(noise, g, euler, sigmas, lat))["samples"]

        def ksampler(m):
            return core_nodes.KSampler().sample(
                m, SEED, STEPS, 5.0, "euler", "simple", positive, negative, latent_for(0)
            )[0]["samples"]

        def sampler_node(m):
            return sampling.OpenSoraSampler().sample(m, positive, negative, latent_for(0), SEED, STEPS, CFG)[0][
                "samples"
            ]

        def measure(run, m):
            frames_seen.clear()
            out = run(m)
            mm.unload_all_models()
            return out, sorted(set(frames_seen))

        runs = {"guider": guided} if version == "1.3" else {"guider": guided, "ksampler": ksampler}
        for name, run in runs.items():
            plain, plain_frames = measure(run, model)
            whole, whole_frames = measure(run, windowed(model, plain.shape[2]))
            short, short_frames = measure(run, windowed(model, WINDOW))
            results[f"{version} {name}"] = {
                "latent_frames": plain.shape[2],
                "frames_seen": {"plain": plain_frames, "whole": whole_frames, "short": short_frames},
                "whole_equal": bool(torch.equal(whole, plain)),
                "short_finite": bool(short.isfinite().all()),
                "short_differs": not torch.equal(short, plain),
            }

        frames_seen.clear()
        try:
            guided(windowed(model, WINDOW), i2v=True)
            error = None
        except ValueError as e:
            error = str(e)
        results[f"{version} i2v"] = {"error": error, "dit_calls": len(frames_seen)}

        warnings.clear()
        plain, _ = measure(sampler_node, model)
        ignored, frames = measure(sampler_node, windowed(model, WINDOW))
        results[f"{version} sampler node"] = {
            "equal": bool(torch.equal(ignored, plain)),
            "frames_seen": frames,
            "warnings": [w for w in warnings if "context_handler" in w],
        }

    for version in ("2.0", "1.3"):
        one_version(version)
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    sys.path.insert(0, str(REPO / "scripts"))
    from demo_models import make_dit
    from demo_models_v2 import make_mmdit

    models = tmp_path_factory.mktemp("models-context-windows")
    make_mmdit(models / "diffusion_models" / DIT["2.0"])
    make_dit("1.3", models / "diffusion_models" / DIT["1.3"].rstrip("/"))
    return run_probe("test_context_windows", models / "results.json", models)


@pytest.mark.parametrize("run", ["2.0 guider", "2.0 ksampler", "1.3 guider"])
def test_text_to_video_runs_in_windows(measured, run):
    values = measured[run]
    frames = values["latent_frames"]
    assert frames > WINDOW
    assert values["frames_seen"]["plain"] == values["frames_seen"]["whole"] == [frames], values
    assert values["whole_equal"], "a window as long as the latent must change nothing"
    # every DiT call sees one window (newer ComfyUI adds an anchor frame to windows after the first)
    assert values["frames_seen"]["short"] in ([WINDOW], [WINDOW, WINDOW + 1]), values
    assert values["short_finite"] and values["short_differs"], values


@pytest.mark.parametrize("version", ["2.0", "1.3"])
def test_reference_with_windows_is_refused_before_sampling(measured, version):
    values = measured[f"{version} i2v"]
    assert values["error"] is not None and "Context windows" in values["error"], values
    assert "text-to-video" in values["error"] and "context_length" in values["error"], values
    assert values["dit_calls"] == 0, values


@pytest.mark.parametrize("version", ["2.0", "1.3"])
def test_sampler_node_warns_and_samples_the_whole_latent(measured, version):
    values = measured[f"{version} sampler node"]
    assert values["equal"] and values["frames_seen"] == [measured[f"{version} guider"]["latent_frames"]], values
    assert len(values["warnings"]) == 1 and "Context Windows" in values["warnings"][0], values
