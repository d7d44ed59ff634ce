"""The loader nodes with GGUF files, inside ComfyUI (--cpu): Load Open-Sora DiT on a Q8_0 file of the tiny 2.0
MMDiT (written by the `gguf` package, see helpers_gguf.py) samples exactly as the same weights dequantized into a
safetensors file; both loaders list .gguf files; a truncated file is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_comfy_probe import run_probe
from helpers_gguf import write_gguf
from safetensors.torch import load_file, save_file

LATENT = ("2.0", "256px", "16:9", 9, 1, 64, 48)
MATRIX = "double_blocks.0.img_attn.q_proj"


def probe(out_path: str, models_dir: str) -> None:
    import folder_paths
    from helpers_conditioning import sampler_node_samples
    from opensora_pack.nodes import loaders

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    root = Path(models_dir)
    folder_paths.add_model_folder_path("diffusion_models", str(root / "diffusion_models"), True)
    folder_paths.add_model_folder_path("text_encoders", str(root / "text_encoders"), True)

    def load(name, weight_dtype):
        return loaders.OpenSoraLoadDiT().load(name, weight_dtype)[0]

    def sample(model):
        return sampler_node_samples(model, "2.0", LATENT, 5, 2, 7.5)

    def stored(model):
        return str(model.model.diffusion_model.get_submodule(MATRIX).weight.dtype)

    dit_choices = loaders.OpenSoraLoadDiT.INPUT_TYPES()["required"]["dit_name"][0]
    t5_choices = loaders.OpenSoraLoadTextEncoder.INPUT_TYPES()["required"]["t5_name"][0]
    gguf_model = load("sub/v2-q8.gguf", "bf16")
    try:
        load("v2-truncated.gguf", "default")
        truncated = None
    except Exception as e:  # noqa: BLE001 - the message is the result
        truncated = f"{type(e).__name__}: {e}"
    as_fp8 = load("sub/v2-q8.gguf", "fp8_e4m3fn")
    results = {
        "dit_choices": dit_choices,
        "t5_choices": t5_choices,
        "equal_to_dequantized": bool(
            torch.equal(sample(gguf_model), sample(load("v2-dequantized.safetensors", "bf16")))
        ),
        "differs_from_original": not torch.equal(sample(gguf_model), sample(load("v2.safetensors", "bf16"))),
        "default_stored": stored(load("sub/v2-q8.gguf", "default")),
        "fp8": {"stored": stored(as_fp8), "finite": bool(sample(as_fp8).isfinite().all())},
        "truncated": truncated,
    }
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    from demo_models_v2 import make_mmdit

    models = tmp_path_factory.mktemp("models-gguf")
    dits = models / "diffusion_models"
    (dits / "sub").mkdir(parents=True)
    (models / "text_encoders").mkdir()
    make_mmdit(models / "original.safetensors")
    state_dict = load_file(str(models / "original.safetensors"))
    save_file({k: v.bfloat16() for k, v in state_dict.items()}, str(dits / "v2.safetensors"))
    held = write_gguf(dits / "sub" / "v2-q8.gguf", state_dict, "Q8_0")
    save_file(held, str(dits / "v2-dequantized.safetensors"))  # fp32: biases and norms stay exact, as from the GGUF
    data = (dits / "sub" / "v2-q8.gguf").read_bytes()
    (dits / "v2-truncated.gguf").write_bytes(data[: len(data) // 2])
    (models / "text_encoders" / "t5-encoder-Q8_0.gguf").write_bytes(b"GGUF")  # listed by name only
    return run_probe("test_gguf_loader", models / "results.json", models)


def test_loaders_list_gguf_files(measured):
    assert "sub/v2-q8.gguf" in measured["dit_choices"] and "v2-truncated.gguf" in measured["dit_choices"]
    assert "t5-encoder-Q8_0.gguf" in measured["t5_choices"]


def test_a_gguf_dit_samples_as_its_dequantized_weights(measured):
    assert measured["equal_to_dequantized"], measured
    assert measured["differs_from_original"], "the Q8_0 rounding must show"


def test_gguf_dit_dtypes(measured):
    # "default" keeps a GGUF's matrices in their blocks (test_gguf_kept.py); a dtype choice dequantizes into it
    assert measured["default_stored"] == "torch.uint8", measured
    assert measured["fp8"] == {"stored": "torch.float8_e4m3fn", "finite": True}, measured


def test_a_truncated_gguf_dit_is_refused_with_its_size(measured):
    message = measured["truncated"]
    assert message is not None and "truncated" in message and "v2-truncated.gguf" in message, message
