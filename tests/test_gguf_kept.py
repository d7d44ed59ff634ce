"""GGUF and scaled-fp8 DiTs whose Linear matrices stay packed (weight_dtype "default"), inside ComfyUI (--cpu).

The tiny 2.0 MMDiT and 1.3 STDiT3 written as Q8_0 and Q4_1 GGUF files (helpers_gguf.py, the gguf package's own
quantizers) and as a ComfyUI scaled fp8 file (scales tensor-wise and per row) load with their matrices as bytes (nodes/packed_layers.py): the model's size is that of the blocks, and
sampling gives exactly (torch.equal) the samples of the same weights dequantized into a float32 safetensors file.
Core's LoraLoaderModelOnly patches a kept layer (loaded) to the same output as on the dequantized file, and the model
without the LoRA afterwards is unchanged (its bytes restored). A layer left offloaded by core's partial loading
applies the LoRA in its forward: the layer's output equals the dequantized file's patched layer; so does a patched
layer that core unloads (partially_unload gives its bytes back, the LoRA goes to the forward). Hook LoRA through core
KSampler (CreateHookLora, and a model-as-LoRA patch) gives the dequantized file's samples exactly. torch.compile
traces a kept layer in one graph (fullgraph=True).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_comfy_probe import result_of, run_probe
from helpers_gguf import write_gguf, write_scaled_fp8
from safetensors.torch import load_file, save_file

LATENTS = {"2.0": ("2.0", "256px", "16:9", 9, 1, 64, 48), "1.3": ("1.3", "144p", "9:16", 17)}
LORA_LAYER = {"2.0": "double_blocks.0.img_attn.q_proj", "1.3": "spatial_blocks.0.attn.qkv"}
QTYPES = ("Q8_0", "Q4_1")
# every kept format: the GGUF types, and a ComfyUI scaled fp8 file (kept as fp8 rows: opensora_lib/float_rows.py)
KEPT_FILES = {"Q8_0": "Q8_0.gguf", "Q4_1": "Q4_1.gguf", "F8_E4M3": "scaled-fp8.safetensors"}
CASES = [f"{v} {q}" for v in ("2.0", "1.3") for q in KEPT_FILES]


def probe(out_path: str, models_dir: str) -> None:  # noqa: C901 (one subprocess, many measurements)
    import comfy.model_management
    import folder_paths
    from helpers_conditioning import sampler_node_samples
    from opensora_pack.nodes import loaders
    from opensora_pack.nodes.packed_layers import ComfyPackedLinear
    from opensora_pack.opensora_lib import checkpoint

    import nodes as core_nodes

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    root = Path(models_dir)
    folder_paths.add_model_folder_path("diffusion_models", str(root / "diffusion_models"), True)
    folder_paths.add_model_folder_path("loras", str(root / "loras"), True)

    def load(name, weight_dtype="default"):
        return loaders.OpenSoraLoadDiT().load(name, weight_dtype)[0]

    def sample(model, version):
        return sampler_node_samples(model, version, LATENTS[version], 5, 3, 7.5)

    results = {}
    for version in ("2.0", "1.3"):
        layer = LORA_LAYER[version]
        for qtype, file in KEPT_FILES.items():
            kept = load(f"{version}-{file}")
            plain = load(f"{version}-{qtype}-dequantized.safetensors", "fp32")
            dm = kept.model.diffusion_model
            base = sample(kept, version)
            entry = {
                "patcher": type(kept).__name__,
                "kept_layers": sum(isinstance(m, ComfyPackedLinear) for m in dm.modules()),
                "quantized_linears": sum(  # the Linear weights the file holds quantized (rows of whole blocks)
                    isinstance(plain.model.diffusion_model.get_submodule(key.removesuffix(".weight")), torch.nn.Linear)
                    for key, (kind, _) in checkpoint.read_header(
                        root / "diffusion_models" / f"{version}-{file}"
                    ).items()
                    if kind == qtype and key.endswith(".weight")
                ),
                "layer_dtype": str(dm.get_submodule(layer).weight.dtype),
                "size_kept": kept.model_size(),
                "size_fp32": plain.model_size(),
                "equal_to_dequantized": bool(torch.equal(base, sample(plain, version))),
                # what the memory manager is told to keep free for a forward, over the dequantized file's
                "memory_required_extra": kept.model.memory_required([2, 16, 3, 16, 16])
                - plain.model.memory_required([2, 16, 3, 16, 16]),
                "largest_expansion": max(m.expanded_bytes() for m in dm.modules() if isinstance(m, ComfyPackedLinear)),
            }
            probe_layer = dm.get_submodule(layer)
            x = torch.randn(2, 5, probe_layer.in_features, generator=torch.Generator().manual_seed(1))
            compiled = torch.compile(probe_layer, backend="eager", fullgraph=True)  # fullgraph: a break raises
            entry["compiled_equal"] = bool(torch.equal(compiled(x), probe_layer(x)))
            lora = {}
            out_features, in_features = dm.get_submodule(layer).out_features, dm.get_submodule(layer).in_features
            gen = torch.Generator().manual_seed(3)
            lora[f"diffusion_model.{layer}.lora_A.weight"] = torch.randn(4, in_features, generator=gen) * 0.1
            lora[f"diffusion_model.{layer}.lora_B.weight"] = torch.randn(out_features, 4, generator=gen) * 0.1
            name = f"lora-{version}.safetensors"
            save_file(lora, str(root / "loras" / name))
            (kept_lora,) = core_nodes.LoraLoaderModelOnly().load_lora_model_only(kept, name, 0.8)
            (plain_lora,) = core_nodes.LoraLoaderModelOnly().load_lora_model_only(plain, name, 0.8)
            with_lora = sample(kept_lora, version)
            entry["lora"] = {
                "changes_output": not torch.equal(with_lora, base),
                "max_diff_to_dequantized": float((with_lora - sample(plain_lora, version)).abs().max()),
                "scale": float(with_lora.abs().max()),
                "base_again_equal": bool(torch.equal(sample(kept, version), base)),
                "layer_dtype_after": str(dm.get_submodule(layer).weight.dtype),
            }
            # core's partial loading: a budget of 1 byte leaves every layer offloaded, LoRA as a weight_function
            cpu = torch.device("cpu")
            kept_lora.patch_model(device_to=cpu, lowvram_model_memory=1)
            plain_lora.patch_model(device_to=cpu, lowvram_model_memory=0)
            kept_layer = dm.get_submodule(layer)
            x = torch.randn(2, 5, in_features, generator=gen)
            offloaded = kept_layer(x)
            entry["offloaded"] = {
                "cast_weights": bool(kept_layer.comfy_cast_weights),
                "weight_functions": len(kept_layer.weight_function),
                "still_bytes": str(kept_layer.weight.dtype),
                "max_diff_to_dequantized": float(
                    (offloaded - plain_lora.model.diffusion_model.get_submodule(layer)(x)).abs().max()
                ),
                "scale": float(offloaded.abs().max()),
            }
            kept_lora.unpatch_model()
            # loaded and patched: the layer keeps its bytes, the LoRA waits for its forward; core then unloads it
            # (partially_unload adds its own LowVramPatch: applied once)
            kept_lora.patch_model(device_to=cpu, lowvram_model_memory=0)
            patched_dtype = str(kept_layer.weight.dtype)
            loaded = kept_layer(x)
            kept_lora.partially_unload(cpu, memory_to_free=1 << 40)
            unloaded = kept_layer(x)
            entry["loaded"] = {
                "patched_dtype": patched_dtype,
                "size_while_patched": sum(p.numel() * p.element_size() for p in dm.parameters()),
                "size_before": entry["size_kept"],
                "diff_loaded": float((loaded - offloaded).abs().max()),
                "diff_unloaded": float((unloaded - offloaded).abs().max()),
            }
            kept_lora.unpatch_model()
            plain_lora.unpatch_model()
            entry["offloaded"]["base_again_equal"] = bool(torch.equal(sample(kept, version), base))
            if qtype == QTYPES[0]:
                entry["core_nodes"] = core_node_results(root, version, kept, kept_lora, base, load, sample)
                entry["requeue"] = requeue_after_partial_unload(kept_lora, version, with_lora)
            comfy.model_management.unload_all_models()
            results[f"{version} {qtype}"] = entry
    Path(out_path).write_text(json.dumps(results))


def requeue_after_partial_unload(model, version: str, expected) -> dict:
    """Sample and leave the MODEL loaded; core frees part of it (LoadedModel.model_unload, as when a VAE or T5 needs
    room); sample again: load_models_gpu -> partially_load -> load(), which clears the patch lists of the layers
    that stayed loaded (PackedModelPatcher.load gives them back)."""
    import comfy.model_management as mm
    from helpers_conditioning import random_conditioning
    from opensora_pack.nodes import latent, sampling
    from opensora_pack.opensora_lib.packed_linear import packed_layers

    def sample_left_loaded():
        positive, negative = random_conditioning(version, model.model.diffusion_model.config)
        (empty,) = latent.OpenSoraEmptyLatentVideo().generate(*LATENTS[version])
        return sampling.OpenSoraSampler().sample(model, positive, negative, empty, 5, 3, 7.5)[0]["samples"]

    layers = packed_layers(model.model)
    for fraction in (0.01, 0.03, 0.1, 0.2, 0.3, 0.5):  # one that leaves some kept layers loaded, not all
        mm.unload_all_models()
        sample_left_loaded()
        loaded = next(x for x in mm.current_loaded_models if x.model is model)
        loaded.model_unload(memory_to_free=int(model.model_size() * fraction))
        still_loaded = sum(bool(getattr(m, "comfy_patched_weights", False)) for m in layers.values())
        if 0 < still_loaded < len(layers):
            break
    again = sample_left_loaded()
    mm.unload_all_models()
    return {"still_loaded": still_loaded, "layers": len(layers), "diff": float((again - expected).abs().max())}


def hook_lora_results(root: Path, version: str, kept, plain) -> dict:
    """Core KSampler with hook LoRA on the conditioning (CreateHookLora + set_hooks_for_conditioning, as the hook
    nodes do; the second group a CreateHookModelAsLora-style "model_as_lora" patch, which reads the original
    weight): the kept MODEL against the dequantized file's, and against itself without the hooks."""
    import comfy.hooks
    import comfy.model_management
    import comfy.utils
    from helpers_conditioning import random_conditioning
    from opensora_pack.nodes import latent

    import nodes as core_nodes

    lora = comfy.utils.load_torch_file(str(root / "loras" / f"lora-{version}.safetensors"))
    layer_key = f"diffusion_model.{LORA_LAYER[version]}.weight"
    weight = plain.model.diffusion_model.get_submodule(LORA_LAYER[version]).weight
    other_model = {layer_key: weight + 0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(4))}
    groups = {
        "lora": comfy.hooks.create_hook_lora(lora, strength_model=0.8, strength_clip=0.0),
        "model_as_lora": comfy.hooks.create_hook_model_as_lora(other_model, None, 0.7, 0.0),
    }
    positive, negative = random_conditioning(version, kept.model.diffusion_model.config)
    (empty,) = latent.OpenSoraEmptyLatentVideo().generate(*LATENTS[version])

    def inputs(model, group=None, lora_strength=None) -> tuple:
        """(MODEL, positive, negative): the MODEL with the LoRA file at lora_strength, the prompts with the hook group."""
        if lora_strength is not None:
            (model,) = core_nodes.LoraLoaderModelOnly().load_lora_model_only(
                model, f"lora-{version}.safetensors", lora_strength
            )
        if group is None:
            return model, positive, negative
        return model, *(comfy.hooks.set_hooks_for_conditioning(c, group) for c in (positive, negative))

    def ksample(model, group=None) -> torch.Tensor:
        model, pos, neg = inputs(model, group)
        (out,) = core_nodes.KSampler().sample(model, 5, 3, 4.0, "euler", "simple", pos, neg, empty)
        comfy.model_management.unload_all_models()
        return out["samples"]

    def guided(model, group=None, lora_strength=None) -> torch.Tensor:
        """Open-Sora Guider + Sigmas + euler through SamplerCustomAdvanced (the Guider applies conditioning hooks)."""
        from comfy_extras.nodes_custom_sampler import KSamplerSelect, RandomNoise, SamplerCustomAdvanced
        from opensora_pack.nodes import guider, sampling

        model, pos, neg = inputs(model, group, lora_strength)
        (g,) = guider.OpenSoraGuider().get_guider(model, pos, neg, empty, 7.0)
        (sigmas,) = sampling.OpenSoraSigmas().sigmas(empty, 3)
        noise, euler = result_of(RandomNoise.execute(5)), result_of(KSamplerSelect.execute("euler"))
        out = result_of(SamplerCustomAdvanced.execute(noise, g, euler, sigmas, empty))
        comfy.model_management.unload_all_models()
        return out["samples"]

    def sampler_node(model, group=None, lora_strength=None) -> torch.Tensor:
        """The Open-Sora Sampler node (hooked conditioning runs through the Guider path)."""
        from opensora_pack.nodes import sampling

        model, pos, neg = inputs(model, group, lora_strength)
        (out,) = sampling.OpenSoraSampler().sample(model, pos, neg, empty, 5, 3, 7.0)
        comfy.model_management.unload_all_models()
        return out["samples"]

    hooked_guider = guided(kept, groups["lora"])
    hooked_sampler = sampler_node(kept, groups["lora"])
    results = {
        "guider": {  # the hook on both prompts is the MODEL's LoRA at the same strength
            "changes_output": not torch.equal(hooked_guider, guided(kept)),
            "max_diff_to_model_lora": float((hooked_guider - guided(kept, lora_strength=0.8)).abs().max()),
            "max_diff_to_dequantized": float((hooked_guider - guided(plain, groups["lora"])).abs().max()),
            "scale": float(hooked_guider.abs().max()),
        },
        "sampler_node": {  # the Sampler node runs a hook as the Guider does, near its own path with the MODEL's LoRA
            "equal_to_guider": bool(torch.equal(hooked_sampler, hooked_guider)),
            "max_diff_to_model_lora": float((hooked_sampler - sampler_node(kept, lora_strength=0.8)).abs().max()),
            "scale": float(hooked_sampler.abs().max()),
        },
    }
    unhooked = ksample(kept)
    for name, group in groups.items():
        on_kept, on_plain = ksample(kept, group), ksample(plain, group)
        results[name] = {
            "changes_output": not torch.equal(on_kept, unhooked),
            "max_diff_to_dequantized": float((on_kept - on_plain).abs().max()),
            "scale": float(on_kept.abs().max()),
        }
    results["unhooked_again_equal"] = bool(torch.equal(ksample(kept), unhooked))
    return results


def core_node_results(root: Path, version: str, kept, kept_lora, base, load, sample) -> dict:
    """Hook LoRA (hook_lora_results; nothing left behind), ModelSave (the expanded, patched weights: reloads and samples as the
    kept MODEL with its LoRA), LoRA extraction from ModelSubtract (as from the dequantized files)."""
    import comfy.hooks
    import comfy.model_management
    import comfy.utils
    import folder_paths
    from comfy_extras import nodes_lora_extract, nodes_model_merging

    out = {
        "hooks": hook_lora_results(root, version, kept, load(f"{version}-{QTYPES[0]}-dequantized.safetensors", "fp32"))
    }
    out["after_hooks_equal"] = bool(torch.equal(sample(kept, version), base))

    folder_paths.set_output_directory(str(root / "output"))
    nodes_model_merging.ModelSave().save(kept_lora, f"saved-{version}")
    saved = sorted((root / "output").glob(f"saved-{version}*.safetensors"))[-1]
    saved.rename(root / "diffusion_models" / saved.name)
    out["saved_equal"] = bool(torch.equal(sample(load(saved.name, "fp32"), version), sample(kept_lora, version)))

    def extracted(suffix: str, weight_dtype: str) -> dict:
        first, second = (load(f"{version}-{qtype}{suffix}", weight_dtype) for qtype in QTYPES)
        (difference,) = nodes_model_merging.ModelSubtract().merge(first, second, 1.0)
        lora_sd = nodes_lora_extract.calc_lora_model(
            difference, 4, "diffusion_model.", "diffusion_model.", {}, nodes_lora_extract.LORAType.STANDARD, False
        )
        comfy.model_management.unload_all_models()
        return lora_sd

    from_kept, from_plain = extracted(".gguf", "default"), extracted("-dequantized.safetensors", "fp32")
    out["extracted_keys"] = len(from_kept)
    out["extracted_equal"] = from_kept.keys() == from_plain.keys() and all(
        torch.equal(from_kept[k], from_plain[k]) for k in from_kept
    )
    return out


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    from demo_models import make_dit
    from demo_models_v2 import make_mmdit

    models = tmp_path_factory.mktemp("models-gguf-kept")
    dits = models / "diffusion_models"
    dits.mkdir()
    (models / "loras").mkdir()
    make_mmdit(models / "v2.safetensors")
    make_dit("1.3", models / "v13")
    sources = {
        "2.0": load_file(str(models / "v2.safetensors")),
        "1.3": load_file(str(models / "v13" / "model.safetensors")),
    }
    for version, state_dict in sources.items():
        for qtype, file in KEPT_FILES.items():
            if qtype in QTYPES:
                held = write_gguf(dits / f"{version}-{file}", state_dict, qtype)
            else:
                held = write_scaled_fp8(dits / f"{version}-{file}", state_dict)
            save_file(held, str(dits / f"{version}-{qtype}-dequantized.safetensors"))
    return run_probe("test_gguf_kept", models / "results.json", models)


@pytest.mark.parametrize("case", CASES)
def test_kept_blocks_sample_as_their_dequantized_weights(measured, case):
    entry = measured[case]
    assert entry["patcher"] == "PackedModelPatcher", entry
    assert entry["kept_layers"] > 0 and entry["kept_layers"] == entry["quantized_linears"], entry
    assert entry["layer_dtype"] == "torch.uint8", entry
    bytes_per_value = {"Q8_0": 34 / 32, "Q4_1": 20 / 32, "F8_E4M3": 1}[case.split()[1]]
    assert entry["size_kept"] < entry["size_fp32"] * (bytes_per_value / 4) * 1.6, entry  # + norms, biases, convs
    assert entry["equal_to_dequantized"], entry
    assert entry["compiled_equal"], entry  # torch.compile traces the dequantizing forward in one graph
    assert entry["memory_required_extra"] == entry["largest_expansion"] > 0, entry


@pytest.mark.parametrize("case", CASES)
def test_lora_on_kept_blocks_matches_the_dequantized_file(measured, case):
    lora = measured[case]["lora"]
    assert lora["changes_output"], lora
    assert lora["max_diff_to_dequantized"] <= 1e-5 * max(1.0, lora["scale"]), lora
    assert lora["base_again_equal"] and lora["layer_dtype_after"] == "torch.uint8", lora


@pytest.mark.parametrize("case", CASES)
def test_an_offloaded_kept_layer_applies_the_lora_in_its_forward(measured, case):
    offloaded = measured[case]["offloaded"]
    assert offloaded["cast_weights"] and offloaded["weight_functions"] == 1, offloaded
    assert offloaded["still_bytes"] == "torch.uint8", offloaded
    assert offloaded["max_diff_to_dequantized"] <= 1e-5 * max(1.0, offloaded["scale"]), offloaded
    assert offloaded["base_again_equal"], offloaded


@pytest.mark.parametrize("case", CASES)
def test_lora_on_a_loaded_kept_layer_leaves_its_bytes_and_memory_alone(measured, case):
    loaded = measured[case]["loaded"]
    assert loaded["patched_dtype"] == "torch.uint8", loaded
    assert loaded["size_while_patched"] <= loaded["size_before"], loaded  # no float copy of a patched layer
    assert loaded["diff_loaded"] == 0.0 and loaded["diff_unloaded"] == 0.0, loaded  # the LoRA applied once


@pytest.mark.parametrize("version", ["2.0", "1.3"])
def test_hook_lora_on_kept_blocks_matches_the_dequantized_file(measured, version):
    core = measured[f"{version} {QTYPES[0]}"]["core_nodes"]
    hooks = core["hooks"]
    guided = hooks["guider"]  # the Open-Sora Guider applies conditioning hooks (through core's sampling)
    assert guided["changes_output"] and guided["max_diff_to_dequantized"] == 0.0, guided
    assert guided["max_diff_to_model_lora"] <= 1e-5 * max(1.0, guided["scale"]), guided
    sampler = hooks["sampler_node"]  # the Sampler node applies hooks through the Guider path: the same result
    assert sampler["equal_to_guider"], sampler
    assert sampler["max_diff_to_model_lora"] <= 2e-3 * max(1.0, sampler["scale"]), sampler  # its direct path
    for kind in ("lora", "model_as_lora"):
        result = hooks[kind]
        assert result["changes_output"], (kind, result)
        assert result["max_diff_to_dequantized"] == 0.0, (kind, result)  # core patches the float32 file the same way
    assert hooks["unhooked_again_equal"] and core["after_hooks_equal"], core


@pytest.mark.parametrize("version", ["2.0", "1.3"])
def test_model_save_writes_the_patched_expanded_weights(measured, version):
    assert measured[f"{version} {QTYPES[0]}"]["core_nodes"]["saved_equal"]


@pytest.mark.parametrize("version", ["2.0", "1.3"])
def test_lora_extraction_from_kept_models_equals_the_dequantized_files(measured, version):
    core = measured[f"{version} {QTYPES[0]}"]["core_nodes"]
    assert core["extracted_keys"] > 0 and core["extracted_equal"], core


@pytest.mark.parametrize("version", ["2.0", "1.3"])
def test_a_requeue_after_core_freed_part_of_the_model_keeps_the_lora(measured, version):
    requeue = measured[f"{version} {QTYPES[0]}"]["requeue"]
    assert 0 < requeue["still_loaded"] < requeue["layers"], requeue  # the partial state the test is about
    assert requeue["diff"] == 0.0, requeue
