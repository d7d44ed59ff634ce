"""Core's Context Windows (Manual) node with the Open-Sora MODEL, in ComfyUI (--cpu), for 1.3 and 2.0.

- Text-to-video through the Open-Sora Guider + SamplerCustomAdvanced (and core KSampler for 2.0): a window as long
  as the latent changes nothing (bit-identical); a shorter one runs the DiT on windows of that many latent frames.
- With a reference (i2v) and windows shorter than the latent, on ComfyUI 0.18.0 and newer (the model slices its own
  conditioning, BaseModel.resize_cond_for_context_window): every DiT call gets the reference conditioning of the
  frames it holds, exactly (1.3 cond / cond_mask and mask_index renumbered, 2.0 cond), also with core's
  cond_retain_index_list "0"; on older ComfyUI (0.3.75) a clear error before any DiT call.
- A batch of videos in windows (core slices the per-video timestep with frame indices): refused before any DiT call.
- The Sampler node does not run context windows: it warns, naming them, and samples the whole latent.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import pytest
import torch
from helpers_comfy_probe import probe_with_tiny_dits, result_of

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
    from opensora_pack.nodes import context_windows, guider, latent, loaders, sampling

    import nodes as core_nodes

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    folder_paths.add_model_folder_path("diffusion_models", str(Path(models_dir) / "diffusion_models"), True)
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("OpenSora").addHandler(handler)
    results: dict = {}

    def windowed(model, length, retain=""):
        options = dict(context_length=length, context_overlap=1, context_schedule="standard_static")
        options.update(context_stride=1, closed_loop=False, fuse_method="pyramid", dim=2)
        parameters = inspect.signature(ContextWindowsManualNode.execute).parameters
        if "freenoise" in parameters:  # newer ComfyUI
            options["freenoise"] = False
        if retain:
            options["cond_retain_index_list"] = retain
        return result_of(ContextWindowsManualNode.execute(model, **options))

    def reference_in_windows(version, model, dm, guided, frames_seen) -> dict:
        """Each DiT call's reference conditioning against the whole latent's, at the frames the call holds."""
        calls: list[dict] = []
        whole: dict = {}

        def record(_module, args, kwargs):
            cond = kwargs["cond"]
            mask = cond[:, :1] if version == "2.0" else kwargs["cond_mask"]  # 2.0: channel 0 is the mask
            window = (kwargs.get("transformer_options") or {}).get("context_window")
            if window is None:
                whole.update(cond=cond[:1].clone(), mask_index=list(kwargs.get("mask_index") or []))
                return
            # the frames core puts in the window: its anchor frame first (newer ComfyUI), then index_list, with the
            # cond_retain_index_list positions holding frames 0..k (core's IndexListContextWindow.get_tensor)
            anchor = getattr(window, "causal_anchor_index", None)
            frames = ([anchor] if anchor is not None and anchor >= 0 else []) + list(window.index_list)
            for position in window_retain[0]:
                frames[position] = position
            reference = [p for p, frame in enumerate(frames) if frame in (0,)]  # i2v_head: latent frame 0
            calls.append(
                {
                    "x_frames": args[0].shape[2],
                    "frames": frames,
                    "cond_equal": bool(torch.equal(cond[:1], whole["cond"][:, :, frames])),
                    "mask_positions": (mask.flatten(3).abs().amax(dim=(0, 1, 3)) > 0).nonzero().flatten().tolist(),
                    "expected_positions": reference,
                    "mask_index": list(kwargs["mask_index"]) if version == "1.3" else None,
                }
            )

        frames_seen.clear()
        handle = dm.register_forward_pre_hook(record, with_kwargs=True)
        window_retain = [[]]
        try:
            plain = guided(model, i2v=True)  # fills `whole` (no windows)
            result = {"whole_mask_index": whole["mask_index"], "slices_references": context_windows.slices_references()}
            for retain in ("", "0"):
                window_retain[0] = [int(retain)] if retain else []
                calls.clear()
                try:
                    out = guided(windowed(model, WINDOW, retain), i2v=True)
                    result[f"retain {retain!r}"] = {
                        "error": None,
                        "calls": list(calls),
                        "finite": bool(out.isfinite().all()),
                        "differs": not torch.equal(out, plain),
                    }
                except ValueError as e:
                    result[f"retain {retain!r}"] = {"error": str(e), "calls": list(calls)}
                if not context_windows.slices_references():
                    break  # older ComfyUI: no cond_retain_index_list either
        finally:
            handle.remove()
            mm.unload_all_models()
        return result

    def one_version(version: str) -> None:
        (model,) = loaders.OpenSoraLoadDiT().load(DIT[version], "fp32")
        dm = model.model.diffusion_model
        positive, negative = random_conditioning(version, dm.config)
        frames_seen: list[int] = []
        dm.register_forward_pre_hook(lambda _m, args: frames_seen.append(args[0].shape[2]))

        def latent_for(i2v, batch=1):
            (empty,) = latent.OpenSoraEmptyLatentVideo().generate(*LATENT[version])
            empty["samples"] = empty["samples"].repeat(batch, 1, 1, 1, 1)
            if not i2v:
                return empty
            s = empty["samples"]
            ref = torch.randn(1, s.shape[1], 1, *s.shape[3:], generator=torch.Generator().manual_seed(3))
            reference = {"latent": ref, "mask_index": [0], "cond_type": "i2v_head", "version": version}
            return {**empty, "opensora_reference": reference}

        def guided(m, i2v=False, batch=1):
            lat = latent_for(i2v, batch)
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

        results[f"{version} i2v"] = reference_in_windows(version, model, dm, guided, frames_seen)
        for i2v in (False, True):  # core slices the per-video timestep with frame indices: one video at a time
            frames_seen.clear()
            try:
                guided(windowed(model, WINDOW), i2v=i2v, batch=2)
                error = None
            except ValueError as e:
                error = str(e)
            results[f"{version} batch 2 i2v={i2v}"] = {"error": error, "dit_calls": len(frames_seen)}

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
    return probe_with_tiny_dits("test_context_windows", tmp_path_factory.mktemp("models-context-windows"), DIT)


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
def test_reference_in_windows(measured, version):
    """ComfyUI 0.18.0+: each window gets the reference conditioning of its frames; older: refused before the DiT."""
    values = measured[f"{version} i2v"]
    if version == "1.3":
        assert values["whole_mask_index"] == [0], values
    if not values["slices_references"]:
        refused = values["retain ''"]
        assert refused["error"] is not None and "0.18.0" in refused["error"], refused
        assert "text-to-video" in refused["error"] and "context_length" in refused["error"], refused
        assert refused["calls"] == [], refused
        return
    for retain in ("", "0"):
        run = values[f"retain {retain!r}"]
        assert run["error"] is None and run["finite"] and run["differs"], run
        calls = run["calls"]
        assert calls, run
        for call in calls:
            assert call["x_frames"] == len(call["frames"]) in (WINDOW, WINDOW + 1), call
            assert call["cond_equal"], call  # the whole latent's conditioning at the call's frames, exactly
            assert call["mask_positions"] == call["expected_positions"], call
            if version == "1.3":
                assert call["mask_index"] == call["expected_positions"], call
        with_reference = [bool(call["expected_positions"]) for call in calls]
        if retain == "0":  # core keeps the reference frame's conditioning at position 0 of every window
            assert all(call["expected_positions"] == [0] for call in calls), calls
        else:  # the windows that do not hold frame 0 get an all-zero reference
            assert any(with_reference) and not all(with_reference), calls


@pytest.mark.parametrize("i2v", [False, True])
@pytest.mark.parametrize("version", ["2.0", "1.3"])
def test_a_batch_in_windows_is_refused_before_sampling(measured, version, i2v):
    values = measured[f"{version} batch 2 i2v={i2v}"]
    assert values["error"] is not None and "one video at a time" in values["error"], values
    assert "batch of 2" in values["error"] and values["dit_calls"] == 0, values


@pytest.mark.parametrize("version", ["2.0", "1.3"])
def test_sampler_node_warns_and_samples_the_whole_latent(measured, version):
    values = measured[f"{version} sampler node"]
    assert values["equal"] and values["frames_seen"] == [measured[f"{version} guider"]["latent_frames"]], values
    assert len(values["warnings"]) == 1 and "Context Windows" in values["warnings"][0], values
