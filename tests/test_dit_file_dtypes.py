"""Load Open-Sora DiT with fp8 and ComfyUI scaled-fp8 files, in ComfyUI (--cpu).

- weight_dtype "default" counts the file's dtype as core's Load Diffusion Model does: an fp8 file stays fp8 where
  core would keep it (here: core told the device has fp8 compute); a bf16 file does not become fp8.
- ComfyUI's scaled fp8 files, old layout (`scaled_fp8`, `.scale_weight`) and newer one (`.weight_scale`,
  `.comfy_quant`), stay fp8 under "default" (packed rows, as core keeps them scaled) and are dequantized on loading
  under a chosen dtype: then their samples equal those of the same weights written dequantized.
- A quantization format the loader cannot read (nvfp4) is refused by name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers_comfy_probe import run_probe
from helpers_gguf import write_gguf
from safetensors.torch import load_file, save_file

LATENTS = {"1.3": ("1.3", "144p", "9:16", 17), "2.0": ("2.0", "256px", "16:9", 9, 1, 64, 48)}
LINEAR = {"1.3": "t_block.1", "2.0": "double_blocks.0.img_attn.q_proj"}
VARIANTS = ("bf16", "fp8", "scaled_old", "scaled_new", "dequantized", "nvfp4")
STEPS, SEED, CFG = 2, 5, 7.5


def variant(state_dict: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """The tiny DiT's weights stored as `kind` (nvfp4: the first matrix claims that format)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if not (tensor.ndim == 2 and key.endswith(".weight")) or kind == "bf16":
            out[key] = tensor.to(torch.bfloat16)
            continue
        layer = key[: -len(".weight")]
        scale = tensor.abs().max().float() / 448.0  # e4m3's largest value, as ComfyUI's scaled fp8 files
        fp8 = (tensor / scale).to(torch.float8_e4m3fn)
        if kind == "fp8":
            out[key] = tensor.to(torch.float8_e4m3fn)
        elif kind == "dequantized":
            out[key] = (fp8.float() * scale).to(torch.bfloat16)
        elif kind == "scaled_old":
            out |= {key: fp8, f"{layer}.scale_weight": scale.reshape(1), f"{layer}.scale_input": torch.ones(1)}
        else:
            fmt = "nvfp4" if kind == "nvfp4" and not any(k.endswith(".comfy_quant") for k in out) else "float8_e4m3fn"
            quant = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
            out |= {key: fp8, f"{layer}.weight_scale": scale, f"{layer}.comfy_quant": quant}
    if kind == "scaled_old":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def probe(out_path: str, models_dir: str) -> None:
    import comfy.model_management as mm
    import folder_paths
    from helpers_conditioning import sampler_node_samples
    from opensora_pack.nodes import loaders

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    folder_paths.add_model_folder_path("diffusion_models", str(Path(models_dir) / "diffusion_models"), True)
    names = json.loads((Path(models_dir) / "names.json").read_text())
    results: dict = {}

    def load(name, weight_dtype):
        return loaders.OpenSoraLoadDiT().load(name, weight_dtype)[0]

    def stored(model, version):
        return str(model.model.diffusion_model.get_submodule(LINEAR[version]).weight.dtype)

    def sample(model, version):
        return sampler_node_samples(model, version, LATENTS[version], SEED, STEPS, CFG)

    for version, files in names.items():
        saved = mm.supports_fp8_compute
        mm.supports_fp8_compute = lambda *args, **kwargs: True  # as on an fp8-capable GPU
        try:
            defaults = {kind: stored(load(files[kind], "default"), version) for kind in VARIANTS[:4]}
        finally:
            mm.supports_fp8_compute = saved
        reference = sample(load(files["dequantized"], "bf16"), version)
        equal = {
            kind: bool(torch.equal(sample(load(files[kind], "bf16"), version), reference)) for kind in VARIANTS[2:4]
        }
        as_fp8 = load(files["scaled_new"], "fp8_e4m3fn")
        try:
            load(files["nvfp4"], "default")
            refused = None
        except Exception as e:  # noqa: BLE001 - the message is the result
            refused = f"{type(e).__name__}: {e}"
        results[version] = {
            "default_with_fp8_compute": defaults,
            "equal_to_dequantized": equal,
            "scaled_as_fp8": {
                "stored": stored(as_fp8, version),
                "finite": bool(sample(as_fp8, version).isfinite().all()),
            },
            "differs_from_unscaled_fp8": not torch.equal(sample(load(files["fp8"], "bf16"), version), reference),
            "nvfp4": refused,
            "manual_cast": manual_cast_results(files, load, sample, version),
        }
    Path(out_path).write_text(json.dumps(results))


def manual_cast_results(files: dict, load, sample, version: str) -> dict:
    """As on a GPU without bf16 compute, where core stores bf16 weights and computes in fp32 / fp16 (here: default
    made to pick bf16 storage; on the CPU core then computes in fp32): a kept scaled-fp8 or GGUF DiT rounds each
    expansion to bf16 first, so it samples exactly as the same file loaded dense into bf16."""
    import comfy.model_management as mm
    from opensora_pack.opensora_lib.packed_linear import packed_layers

    saved = mm.unet_dtype
    mm.unet_dtype = lambda *args, **kwargs: torch.bfloat16
    try:
        out = {}
        for kind in ("scaled_old", "scaled_new", "q8_gguf"):
            kept = load(files[kind], "default")
            layers = packed_layers(kept.model.diffusion_model)
            out[kind] = {
                "kept": len(layers),
                "weight_dtypes": sorted({str(m.weight_dtype) for m in layers.values()}),
                "compute_dtype": str(kept.model.manual_cast_dtype),
                "equal_to_dense_bf16": bool(
                    torch.equal(sample(kept, version), sample(load(files[kind], "bf16"), version))
                ),
            }
        return out
    finally:
        mm.unet_dtype = saved


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    from demo_models import make_dit
    from demo_models_v2 import make_mmdit

    models = tmp_path_factory.mktemp("models-file-dtypes")
    root = models / "diffusion_models"
    make_dit("1.3", models / "v13")
    make_mmdit(models / "v2.safetensors")
    names: dict = {"1.3": {}, "2.0": {}}
    for kind in VARIANTS:
        tensors = variant(load_file(str(models / "v13" / "model.safetensors")), kind)
        folder = root / f"v13-{kind}"
        folder.mkdir(parents=True)
        shutil.copy(models / "v13" / "config.json", folder / "config.json")
        save_file(tensors, str(folder / "model.safetensors"))
        names["1.3"][kind] = f"v13-{kind}/"
        save_file(variant(load_file(str(models / "v2.safetensors")), kind), str(root / f"v2-{kind}.safetensors"))
        names["2.0"][kind] = f"v2-{kind}.safetensors"
    write_gguf(root / "v13-q8.gguf", load_file(str(models / "v13" / "model.safetensors")), "Q8_0")
    write_gguf(root / "v2-q8.gguf", load_file(str(models / "v2.safetensors")), "Q8_0")
    names["1.3"]["q8_gguf"], names["2.0"]["q8_gguf"] = "v13-q8.gguf", "v2-q8.gguf"
    (models / "names.json").write_text(json.dumps(names))
    return run_probe("test_dit_file_dtypes", models / "results.json", models)


@pytest.mark.parametrize("version", ["1.3", "2.0"])
def test_default_keeps_an_fp8_file_where_core_would(measured, version):
    defaults = measured[version]["default_with_fp8_compute"]
    assert defaults["fp8"] == "torch.float8_e4m3fn", defaults
    assert defaults["bf16"] != "torch.float8_e4m3fn", defaults
    # scaled files keep their matrices as fp8 rows (bytes; tests/test_gguf_kept.py samples them), as core keeps them
    assert defaults["scaled_old"] == defaults["scaled_new"] == "torch.uint8", defaults


@pytest.mark.parametrize("version", ["1.3", "2.0"])
def test_scaled_fp8_files_sample_as_their_dequantized_weights(measured, version):
    values = measured[version]
    assert values["equal_to_dequantized"] == {"scaled_old": True, "scaled_new": True}, values
    assert values["differs_from_unscaled_fp8"], "the scales must matter"
    assert values["scaled_as_fp8"] == {"stored": "torch.float8_e4m3fn", "finite": True}, values


@pytest.mark.parametrize("version", ["1.3", "2.0"])
def test_a_format_it_cannot_read_is_refused_by_name(measured, version):
    message = measured[version]["nvfp4"]
    assert message is not None and "'nvfp4'" in message and "float8_e4m3fn" in message, message


@pytest.mark.parametrize("version", ["1.3", "2.0"])
def test_kept_layers_round_to_the_stored_dtype_under_manual_cast(measured, version):
    for kind, result in measured[version]["manual_cast"].items():
        assert result["kept"] > 0 and result["weight_dtypes"] == ["torch.bfloat16"], (kind, result)
        assert result["compute_dtype"] == "torch.float32", (kind, result)  # core casts the bf16 weights at the forward
        assert result["equal_to_dense_bf16"], (kind, result)
