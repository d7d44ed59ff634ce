"""The Open-Sora Sampler node honours core ComfyUI MODEL patches: object patches, TorchCompileModel, LoRA.

The Sampler node used to run the DiT's raw forward on `model.model.diffusion_model` (STDiT3.forward(dm, ...) /
MMDiT.forward(dm, ...)), so a module put in its place by an object patch was never called, and TorchCompileModel's
APPLY_MODEL wrapper (which swaps a compiled module in around core's apply_model) never ran. The node now calls the
ComfySTDiT3 / ComfyMMDiT latent interface through that wrapper. The probe checks, inside ComfyUI (--cpu):

- exactness: the node's output equals (torch.equal) the old direct path's (kept here as `direct_*_caller`) for the
  tiny 1.2, 1.3, 2.0 and 2.0 DC-AE DiTs, t2v and i2v;
- (a) an object patch replacing diffusion_model with a call-counting wrapper is called once per model call, and the
  output is unchanged; the old direct path never called it;
- (b) core's TorchCompileModel node, with torch.compile's backend swapped for a counting copy of backend="eager"
  (inductor compiles C++ for minutes on a CPU), compiles graphs during the Sampler run and gives the same output;
- (c) core's LoraLoaderModelOnly with a tiny LoRA file (kohya lora_up / lora_down / alpha names for one layer,
  generic diffusion_model.<layer>.lora_A / lora_B for another) patches both layers, changes the output, and equals
  sampling with the LoRA merged into the weights by hand;
- (d) core's EasyCache node (a DIFFUSION_MODEL wrapper, now run by ComfySTDiT3 / ComfyMMDiT.forward) skips calls of
  the model body (_forward) with the Open-Sora Guider + SamplerCustomAdvanced and with KSampler, and the split forward
  is bit-identical without it; the Sampler node drops it with one warning and gives the uncached latent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_comfy_probe import pack_warnings, result_of, run_probe
from helpers_conditioning import random_conditioning

DIT_FILES = {
    "1.2": "opensora-tiny-v12/",
    "1.3": "opensora-tiny-v13/",
    "2.0": "opensora-tiny-v2.safetensors",
    "2.0 DC-AE": "opensora-tiny-v2-dcae.safetensors",
}
# Empty Latent Video arguments: version, resolution, aspect ratio, frames, batch, width, height
LATENTS = {
    "1.2": ("1.2", "144p", "9:16", 17),
    "1.3": ("1.3", "144p", "9:16", 17),
    "2.0": ("2.0", "256px", "16:9", 9, 1, 64, 48),
    "2.0 DC-AE": ("2.0 DC-AE", "768px", "16:9", 8, 1, 96, 64),
}
# Two layers per family for the LoRA: (kohya-named, generic-named)
LORA_LAYERS = {
    "1.3": ("spatial_blocks.0.attn.qkv", "temporal_blocks.1.mlp.fc1"),
    "2.0": ("double_blocks.0.img_attn.q_proj", "single_blocks.0.linear2"),
}
LORA_RANK, LORA_ALPHA, LORA_STRENGTH = 4, 2.0, 0.8
STEPS = {"1.2": 4, "1.3": 4, "2.0": 12, "2.0 DC-AE": 4}  # 2.0: past step 10, odd steps run one pass (oscillation)
SEED, CFG, IMAGE_CFG = 17, 7.5, 3.0
EASYCACHE_STEPS, EASYCACHE_THRESHOLD = 16, 0.6  # core default 0.2 skips nothing on the tiny DiTs; start 15 %, end 95 %


def probe(out_path: str, models_dir: str) -> None:  # noqa: C901 (one subprocess, many measurements)
    """Runs inside ComfyUI (--cpu). Writes {check: value} to out_path."""
    import contextlib

    import comfy.model_management as mm
    import folder_paths
    import torch
    from comfy_extras.nodes_torch_compile import TorchCompileModel
    from opensora_pack.nodes import latent, loaders, sampling, sampling_v2
    from opensora_pack.opensora_lib.mmdit import MMDiT
    from opensora_pack.opensora_lib.stdit3 import STDiT3
    from safetensors.torch import save_file

    import nodes as core_nodes

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    for folder in ("diffusion_models", "loras"):
        folder_paths.add_model_folder_path(folder, str(Path(models_dir) / folder), is_default=True)
    results: dict = {}

    # -- the old direct path (the Sampler node before this change), to compare with
    def direct_dit_caller(model, _sample_sigmas=None):
        dm = model.model.diffusion_model
        dtype = model.model.manual_cast_dtype or model.model.get_dtype()

        def call(x, timestep, **kwargs):
            keep = ("height", "width", "fps")
            cast = {
                k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k not in keep else v
                for k, v in kwargs.items()
            }
            return STDiT3.forward(dm, x.to(dtype), timestep, **cast)

        return call

    def direct_mmdit_caller(model, _latent_shape, _sample_sigmas=None):
        dm = model.model.diffusion_model

        def call(**kwargs):
            return MMDiT.forward(dm, **kwargs)

        return call

    @contextlib.contextmanager
    def direct_path():
        saved = sampling.dit_caller, sampling_v2.mmdit_caller
        sampling.dit_caller, sampling_v2.mmdit_caller = direct_dit_caller, direct_mmdit_caller
        try:
            yield
        finally:
            sampling.dit_caller, sampling_v2.mmdit_caller = saved

    # -- inputs

    def latent_for(version, i2v):
        (empty,) = latent.OpenSoraEmptyLatentVideo().generate(*LATENTS[version])
        if not i2v:
            return empty
        samples = empty["samples"]
        gen = torch.Generator().manual_seed(3)
        ref = torch.randn(1, samples.shape[1], 1, *samples.shape[3:], generator=gen)
        reference = {"latent": ref, "mask_index": [0], "cond_type": "i2v_head"}
        if version.startswith("2.0"):
            reference["version"] = "2.0"
            if version == "2.0 DC-AE":
                reference["autoencoder"] = "dc_ae"
        return {**empty, "opensora_reference": reference}

    models, inputs = {}, {}
    for version, name in DIT_FILES.items():
        (models[version],) = loaders.OpenSoraLoadDiT().load(name, "fp32")
        inputs[version] = random_conditioning(version, models[version].model.diffusion_model.config)

    def sample(model, version, i2v=False):
        positive, negative = inputs[version]
        lat = latent_for(version, i2v)
        (out,) = sampling.OpenSoraSampler().sample(
            model, positive, negative, lat, SEED, STEPS[version], CFG, image_cfg=IMAGE_CFG
        )
        mm.unload_all_models()  # unpatches: the next run starts from the plain weights and modules
        return out["samples"]

    def compare(a, b) -> dict:
        return {"equal": bool(torch.equal(a, b)), "max_abs_diff": float((a - b).abs().max())}

    # -- exactness: the node == the old direct path, every family, t2v and i2v
    reference = {}
    exact = {}
    for version in DIT_FILES:
        for i2v in (False, True):  # 1.2 i2v: the reference written into the latent (mask strategy)
            key = f"{version} {'i2v' if i2v else 't2v'}"
            with direct_path():
                reference[key] = sample(models[version], version, i2v)
            node = sample(models[version], version, i2v)
            exact[key] = {**compare(node, reference[key]), "magnitude": float(node.abs().mean())}
    results["exact"] = exact

    # -- (a) an object patch on diffusion_model
    class CountingWrapper(torch.nn.Module):
        """Stands in for the original module: calls it and counts; other attributes come from it (as
        torch.compile's OptimizedModule does, since core and the pack read e.g. .dtype and .config)."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.calls = 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.inner(*args, **kwargs)

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.inner, name)

    object_patch = {}
    for version in ("1.3", "2.0"):
        original = models[version].model.diffusion_model
        for i2v in (False, True):
            key = f"{version} {'i2v' if i2v else 't2v'}"
            wrapper = CountingWrapper(original)
            patched = models[version].clone()
            patched.add_object_patch("diffusion_model", wrapper)
            with direct_path():
                before = sample(patched, version, i2v)
            direct_calls = wrapper.calls
            out = sample(patched, version, i2v)
            object_patch[key] = {
                "direct_path_calls": direct_calls,
                "direct_path_equal": bool(torch.equal(before, reference[key])),
                "calls": wrapper.calls - direct_calls,
                "steps": STEPS[version],
                **compare(out, reference[key]),
                "restored": models[version].model.diffusion_model is original,
            }
    results["object_patch"] = object_patch

    # -- (b) core's TorchCompileModel, torch.compile's backend swapped for a counting "eager"
    real_compile = torch.compile
    compile_log = {"requested": [], "graphs": 0}

    def eager_compile(model=None, **kwargs):
        def counting_eager(graph_module, example_inputs):  # what backend="eager" does, counted
            compile_log["graphs"] += 1
            return graph_module.forward

        compile_log["requested"].append(kwargs.get("backend"))
        kwargs["backend"] = counting_eager
        return real_compile(model, **kwargs)

    torch.compile = eager_compile
    compiled = {}
    try:
        for version in ("1.3", "2.0"):
            original = models[version].model.diffusion_model
            output = TorchCompileModel.execute(models[version], "inductor")
            compiled_model = result_of(output)
            compile_log["graphs"] = 0
            with direct_path():
                before = sample(compiled_model, version)
            direct_graphs = compile_log["graphs"]
            out = sample(compiled_model, version)
            compiled[version] = {
                "direct_path_graphs": direct_graphs,
                "direct_path_equal": bool(torch.equal(before, reference[f"{version} t2v"])),
                "graphs": compile_log["graphs"] - direct_graphs,
                **compare(out, reference[f"{version} t2v"]),
                "restored": models[version].model.diffusion_model is original,
            }
    finally:
        torch.compile = real_compile
    results["compile"] = {"requested_backends": compile_log["requested"], **compiled}

    # -- (c) core's LoraLoaderModelOnly with a tiny LoRA file, against the LoRA merged by hand
    lora_dir = Path(models_dir) / "loras"
    lora_dir.mkdir(parents=True, exist_ok=True)
    lora = {}
    for version in ("1.3", "2.0"):
        gen = torch.Generator().manual_seed(11)
        weights = models[version].model.diffusion_model.state_dict()
        tensors, deltas = {}, {}
        for style, layer in zip(("kohya", "generic"), LORA_LAYERS[version]):
            out_features, in_features = weights[f"{layer}.weight"].shape
            down = torch.randn(LORA_RANK, in_features, generator=gen) * 0.1
            up = torch.randn(out_features, LORA_RANK, generator=gen) * 0.1
            if style == "kohya":  # lora_unet_<layer with underscores>, alpha / rank scaling
                prefix = "lora_unet_" + layer.replace(".", "_")
                tensors[f"{prefix}.lora_down.weight"] = down
                tensors[f"{prefix}.lora_up.weight"] = up
                tensors[f"{prefix}.alpha"] = torch.tensor(LORA_ALPHA)
                scale = LORA_ALPHA / LORA_RANK
            else:  # diffusion_model.<layer>, PEFT lora_A / lora_B, no alpha (scale 1)
                tensors[f"diffusion_model.{layer}.lora_A.weight"] = down
                tensors[f"diffusion_model.{layer}.lora_B.weight"] = up
                scale = 1.0
            deltas[f"{layer}.weight"] = LORA_STRENGTH * scale * (up @ down)
        name = f"tiny-lora-{version}.safetensors"
        save_file(tensors, str(lora_dir / name))
        (lora_model,) = core_nodes.LoraLoaderModelOnly().load_lora_model_only(models[version], name, LORA_STRENGTH)
        patched_keys = sorted(lora_model.patches)
        out = sample(lora_model, version)
        (merged_model,) = loaders.OpenSoraLoadDiT().load(DIT_FILES[version], "fp32")
        merged_weights = merged_model.model.diffusion_model.state_dict()
        for key, delta in deltas.items():
            merged_weights[key].add_(delta)
        merged = sample(merged_model, version)
        lora[version] = {
            "patched_keys": patched_keys,
            "vs_base": float((out - reference[f"{version} t2v"]).abs().max()),
            "vs_merged": compare(out, merged),
            "magnitude": float(out.abs().mean()),
            "base_again_equal": bool(torch.equal(sample(models[version], version), reference[f"{version} t2v"])),
        }
    results["lora"] = lora
    results["easycache"] = easycache_probe(models, inputs, latent_for, sample, reference)
    Path(out_path).write_text(json.dumps(results))


def easycache_probe(models, inputs, latent_for, sample, reference) -> dict:  # noqa: C901 (one measurement each)
    """(d) core's EasyCache node: a DIFFUSION_MODEL wrapper plus core sampler state, on core's paths and the node."""
    import contextlib

    import comfy.model_management as mm
    import torch
    from comfy_extras.nodes_custom_sampler import KSamplerSelect, RandomNoise, SamplerCustomAdvanced
    from comfy_extras.nodes_easycache import EasyCacheNode
    from opensora_pack.nodes import guider, latent, sampling
    from opensora_pack.nodes.comfy_model import ComfySTDiT3
    from opensora_pack.nodes.comfy_model_v2 import ComfyMMDiT

    import nodes as core_nodes

    family = {"1.3": ComfySTDiT3, "2.0": ComfyMMDiT}

    @contextlib.contextmanager
    def counting(cls, old_forward=False):
        """Counts calls of cls._forward (the model body inside the wrappers); old_forward: forward = _forward, i.e.
        the forward before the wrapper split, for the bit-identity check."""
        saved_forward, saved_body = cls.__dict__["forward"], cls.__dict__["_forward"]
        counter = {"calls": 0}

        def counted(self, *args, **kwargs):
            counter["calls"] += 1
            return saved_body(self, *args, **kwargs)

        cls._forward = counted
        if old_forward:
            cls.forward = counted
        try:
            yield counter
        finally:
            cls.forward, cls._forward = saved_forward, saved_body

    def with_easycache(model):
        return result_of(EasyCacheNode.execute(model, EASYCACHE_THRESHOLD, 0.15, 0.95, False))

    def custom_advanced(model, version):  # Open-Sora Guider + Sigmas + euler in core's SamplerCustomAdvanced
        positive, negative = inputs[version]
        lat = latent_for(version, False)
        (g,) = guider.OpenSoraGuider().get_guider(model, positive, negative, lat, CFG, IMAGE_CFG)
        (sigmas,) = sampling.OpenSoraSigmas().sigmas(lat, EASYCACHE_STEPS)
        noise = result_of(RandomNoise.execute(SEED))
        sampler = result_of(KSamplerSelect.execute("euler"))
        out = result_of(SamplerCustomAdvanced.execute(noise, g, sampler, sigmas, lat))
        mm.unload_all_models()
        return out["samples"]

    def ksampler(model, version):  # core's KSampler (plain CFG), a negative core can batch with the positive
        lat = latent_for(version, False)
        (text, meta), _ = inputs[version][0][0], None
        if version == "1.3":  # 1.x conditions on the video's size and fps, as the Open-Sora Guider adds them
            info = latent.video_info(lat)
            meta = {**meta, "height": info["height"], "width": info["width"], "fps": info.get("fps") or 24}
        positive, negative = [[text, meta]], [[torch.zeros_like(text), meta]]
        (out,) = core_nodes.KSampler().sample(
            model, SEED, EASYCACHE_STEPS, 5.0, "euler", "simple", positive, negative, lat
        )
        mm.unload_all_models()
        return out["samples"]

    def measure(run, version) -> dict:
        model, cls = models[version], family[version]
        with counting(cls, old_forward=True) as old:
            before = run(model, version)
        with counting(cls) as plain:
            base = run(model, version)
        with counting(cls) as cached:
            out = run(with_easycache(model), version)
        return {
            "old_forward_equal": bool(torch.equal(before, base)),
            "calls": plain["calls"],
            "old_calls": old["calls"],
            "easycache_calls": cached["calls"],
            "finite": bool(torch.isfinite(out).all()),
            "max_abs_diff": float((out - base).abs().max()),
            "relative_mean_diff": float((out - base).abs().mean() / base.abs().mean()),
            "cosine": float(torch.nn.functional.cosine_similarity(out.flatten(), base.flatten(), dim=0)),
        }

    results = {}
    for version in ("1.3", "2.0"):
        results[f"{version} guider"] = measure(custom_advanced, version)
        results[f"{version} ksampler"] = measure(ksampler, version)

    # the pack's Sampler node: no crash, one warning, the output without EasyCache
    for version in ("1.3", "2.0"):
        for i2v in (False, True):
            key = f"{version} {'i2v' if i2v else 't2v'}"
            with counting(family[version]) as calls, pack_warnings() as warnings:
                out = sample(with_easycache(models[version]), version, i2v)
            results[f"sampler {key}"] = {
                "equal": bool(torch.equal(out, reference[key])),
                "calls": calls["calls"],
                "steps": STEPS[version],
                "warnings": warnings,
            }
    return results


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    """Run probe() once inside ComfyUI with the tiny 1.2 / 1.3 / 2.0 / 2.0 DC-AE DiTs."""
    from demo_models import make_dit
    from demo_models_v2 import make_mmdit, make_mmdit_dcae

    models = tmp_path_factory.mktemp("models-core-patches")
    folder = models / "diffusion_models"
    make_dit("1.2", folder / DIT_FILES["1.2"].rstrip("/"))
    make_dit("1.3", folder / DIT_FILES["1.3"].rstrip("/"))
    make_mmdit(folder / DIT_FILES["2.0"])
    make_mmdit_dcae(folder / DIT_FILES["2.0 DC-AE"])
    return run_probe("test_core_patches", models / "results.json", models)


def test_sampler_output_is_bit_identical_to_the_direct_path(measured):
    exact = measured["exact"]
    assert sorted(exact) == sorted(f"{v} {k}" for v in DIT_FILES for k in ("t2v", "i2v"))
    for key, values in exact.items():
        assert values["equal"], (key, values["max_abs_diff"])
        assert values["magnitude"] > 0.05, key  # a real sample, not zeros


def test_object_patch_on_diffusion_model_is_called(measured):
    for key, values in measured["object_patch"].items():
        # the old path ran the raw forward on the patched attribute: the patch's forward was never called
        assert values["direct_path_calls"] == 0 and values["direct_path_equal"], key
        # one model call per step (guidance passes are batched), through the patch
        assert values["calls"] == values["steps"], key
        assert values["equal"], (key, values["max_abs_diff"])
        assert values["restored"], key  # unloading the patched MODEL puts the original module back


def test_torch_compile_model_takes_effect(measured):
    compiled = measured["compile"]
    assert compiled["requested_backends"] == ["inductor", "inductor"]  # the node's own torch.compile call
    for version in ("1.3", "2.0"):
        values = compiled[version]
        assert values["direct_path_graphs"] == 0 and values["direct_path_equal"], version  # the old path: no compile
        assert values["graphs"] >= 1, version  # dynamo traced the DiT during the Sampler run
        assert values["equal"], (version, values["max_abs_diff"])  # eager backend: the same kernels
        assert values["restored"], version  # the wrapper swaps the compiled module in only around each call


def test_lora_model_only_patches_and_matches_hand_merged_weights(measured):
    for version, (kohya_layer, generic_layer) in LORA_LAYERS.items():
        values = measured["lora"][version]
        expected = sorted(f"diffusion_model.{layer}.weight" for layer in (kohya_layer, generic_layer))
        assert values["patched_keys"] == expected, version  # both key styles map to our layers
        assert values["vs_base"] > 1e-3, version  # the LoRA changes the sample
        assert values["vs_merged"]["max_abs_diff"] <= 1e-5 * max(1.0, values["magnitude"]), (version, values)
        assert values["base_again_equal"], version  # the LoRA clone leaves the base MODEL's weights alone


def test_easycache_skips_model_calls_on_core_paths(measured):
    """Core's EasyCache node on the Open-Sora MODELs: its DIFFUSION_MODEL wrapper now runs in ComfySTDiT3 / ComfyMMDiT.

    Measured (threshold 0.6, 16 steps; 0.3.75): Guider + SamplerCustomAdvanced 1.3 skips 2/16 calls (cosine 0.990 to
    the uncached latent, mean |diff| 0.30 of mean |latent|), 2.0 skips 3/16 (cosine 0.979, 0.47). KSampler skips
    5-6/16 but the tiny random DiTs under plain CFG are not smooth enough for EasyCache's extrapolation: its latents
    are not close (cosine < 0), so only skipping and finiteness are asserted there."""
    values = measured["easycache"]
    for version in ("1.3", "2.0"):
        for path in ("guider", "ksampler"):
            key = f"{version} {path}"
            result = values[key]
            # without a wrapper the split forward -> executor -> _forward is the old forward, bit for bit
            assert result["old_forward_equal"] and result["calls"] == result["old_calls"] == EASYCACHE_STEPS, key
            assert result["easycache_calls"] < result["calls"], (key, result)  # EasyCache skipped model calls
            assert result["finite"], key
        guided = values[f"{version} guider"]
        assert guided["max_abs_diff"] > 0, version  # the cached steps changed the latent
        assert guided["cosine"] > 0.95 and guided["relative_mean_diff"] < 0.6, (version, guided)


def test_sampler_node_ignores_diffusion_model_wrappers_with_a_warning(measured):
    for version in ("1.3", "2.0"):
        for kind in ("t2v", "i2v"):
            values = measured["easycache"][f"sampler {version} {kind}"]
            assert values["equal"], (version, kind)  # the same latent as without EasyCache
            assert values["calls"] == values["steps"], (version, kind)  # nothing skipped
            assert len(values["warnings"]) == 1, values["warnings"]  # one warning per Sampler run
            warning = values["warnings"][0]
            assert "easycache" in warning and "Open-Sora Guider" in warning and "SamplerCustomAdvanced" in warning
