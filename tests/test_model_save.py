"""Core's ModelSave writes an Open-Sora MODEL (with its `model.diffusion_model.` prefix, fp8 kept) and Load
Open-Sora DiT reads that file back to the same video, through the real host."""

import shutil

import numpy as np
import pytest
from helpers_server import run_ok, tiny_workflow, video_properties
from safetensors import safe_open

pytestmark = pytest.mark.server


@pytest.mark.parametrize(("name", "weight_dtype"), [("opensora13_t2v", "default"), ("opensora20_t2v", "fp8_e4m3fn")])
def test_saved_model_loads_back_to_the_same_video(comfy_server, name, weight_dtype):
    prompt = tiny_workflow(comfy_server, name, steps=2)
    loader = next(n for n in prompt.values() if n["class_type"] == "OpenSoraLoadDiT")
    loader["inputs"]["weight_dtype"] = weight_dtype
    original = video_properties(run_ok(comfy_server, prompt)[0])["pixels"]

    prefix = f"saved/{name}_{weight_dtype}"
    save = {"class_type": "ModelSave", "inputs": {"model": ["1", 0], "filename_prefix": prefix}}
    run_ok(comfy_server, {"1": {"class_type": "OpenSoraLoadDiT", "inputs": dict(loader["inputs"])}, "2": save})
    saved = sorted((comfy_server.base / "output" / "saved").glob(f"{name}_{weight_dtype}_*.safetensors"))[-1]
    with safe_open(str(saved), "pt") as f:
        keys = list(f.keys())
        dtypes = {str(f.get_tensor(k).dtype) for k in keys}
    assert keys and all(k.startswith("model.diffusion_model.") for k in keys), keys[:3]
    assert ("torch.float8_e4m3fn" in dtypes) == (weight_dtype == "fp8_e4m3fn"), dtypes

    copy = f"resaved_{name}.safetensors"
    shutil.copy(saved, comfy_server.models / "diffusion_models" / copy)
    loader["inputs"]["dit_name"] = copy
    again = video_properties(run_ok(comfy_server, prompt)[0])["pixels"]
    assert np.array_equal(again, original)
