"""The activation memory the pack tells ComfyUI, against the meta-device allocation tracker at full size.

- DiTs: OpenSoraModel / OpenSoraV2Model.memory_required (what core's KSampler and the Open-Sora Guider plan with, via
  prepare_sampling's estimate_memory and calc_cond_batch) equals opensora_lib.memory.forward_memory: activation_memory,
  which bounds the tracked peak of one forward (one block of each kind: the peak is per block) within 1.0x-1.25x,
  plus the constant workspace margin.
- VAEs: OpenSoraVAE.encode / decode pass opensora_lib.memory.encode_memory / decode_memory to load_models_gpu, and that
  bounds the tracked peak of the node's own encode / decode (input copy, output, float32 copy) within 1.0x-1.5x.

Every model is the released architecture built on the meta device (no memory, no compute), in one ComfyUI process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers_comfy_probe import run_probe

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the probe subprocess imports benchmarks/ without conftest

GIB = 2**30
# (name, config, latent shape, T5 tokens in cond_shapes or None for no cond_shapes, dtype)
DIT_GRID = [
    ("2.0 256px 129f cond+uncond", "v2", (2, 16, 33, 24, 42), 512, "bf16"),
    ("2.0 256px 33f, 300 T5 tokens", "v2", (1, 16, 9, 24, 42), 300, "bf16"),
    ("2.0 768px 129f, no cond_shapes", "v2", (1, 16, 33, 96, 168), None, "bf16"),
    ("2.0 DC-AE 768px 128f", "v2_dcae", (1, 128, 32, 24, 42), 512, "bf16"),
    ("1.3 360p 49f cond+uncond", "v13", (2, 16, 15, 45, 80), None, "bf16"),
    ("1.3 720p 113f", "v13", (1, 16, 35, 90, 160), None, "bf16"),
    ("1.2 720p 102f fp32", "v12", (1, 4, 30, 90, 160), None, "fp32"),
]
# (kind, direction, shape: latent for decode / pixels for encode, dtype, tile_size px, num_frames)
VAE_GRID = [
    ("1.3", "decode", (1, 16, 5, 45, 80), "bf16", 0, 17),  # 360p 17 frames
    ("1.3", "decode", (1, 16, 35, 90, 160), "bf16", 0, 113),  # 720p 113 frames
    ("1.3", "decode", (1, 16, 5, 45, 80), "bf16", 256, 17),
    ("1.3", "decode", (1, 16, 1, 90, 160), "bf16", 256, 1),  # a 720p image, tiled
    ("1.3", "decode", (2, 16, 1, 45, 80), "fp32", 0, 1),
    ("1.3", "encode", (1, 3, 1, 720, 1280), "bf16", 0, None),
    ("1.3", "encode", (1, 3, 33, 360, 640), "bf16", 0, None),
    ("1.3", "encode", (1, 3, 17, 360, 640), "fp32", 0, None),
    ("1.2", "decode", (1, 4, 5, 45, 80), "bf16", 0, 17),
    ("1.2", "decode", (1, 4, 30, 90, 160), "bf16", 0, 102),  # 720p 102 frames
    ("1.2", "decode", (1, 4, 5, 90, 160), "bf16", 512, 17),
    ("1.2", "decode", (1, 4, 1, 45, 80), "fp32", 0, 1),
    ("1.2", "encode", (1, 3, 1, 720, 1280), "bf16", 0, None),
    ("1.2", "encode", (2, 3, 17, 360, 640), "bf16", 0, None),
    ("1.2", "encode", (1, 3, 34, 360, 640), "fp32", 0, None),
    ("dc_ae", "decode", (1, 128, 8, 8, 8), "bf16", 0, None),  # one 256px x 32-frame tile
    ("dc_ae", "decode", (1, 128, 14, 8, 8), "bf16", 0, None),  # two temporal tiles
    ("dc_ae", "decode", (1, 128, 8, 14, 14), "bf16", 0, None),  # 448px: four spatial tiles
    ("dc_ae", "decode", (1, 128, 1, 16, 16), "bf16", 0, None),  # a 512px image
    ("dc_ae", "decode", (1, 128, 2, 8, 8), "fp32", 0, None),
    ("dc_ae", "encode", (1, 3, 1, 512, 512), "bf16", 0, None),
    ("dc_ae", "encode", (1, 3, 64, 256, 256), "bf16", 0, None),
    ("dc_ae", "encode", (1, 3, 32, 256, 512), "bf16", 0, None),
    ("dc_ae", "encode", (1, 3, 4, 256, 256), "fp32", 0, None),
]


def probe(out_path: str, _models_dir: str) -> None:  # noqa: C901 (one subprocess, many measurements)
    """Runs inside ComfyUI (--cpu). Writes {"dit": [...], "core": {...}, "vae": [...]} to out_path."""
    import dataclasses
    import json
    from functools import partial
    from types import SimpleNamespace

    import comfy.model_base
    import comfy.model_management as mm
    import comfy.sampler_helpers
    import torch
    from opensora_pack.nodes.comfy_model import LATENT_FORMATS, OpenSoraModelConfig
    from opensora_pack.nodes.comfy_model_v2 import OpenSoraV2DCAEModelConfig, OpenSoraV2ModelConfig
    from opensora_pack.nodes.vae import OpenSoraVAE
    from opensora_pack.opensora_lib.dcae import DCAE, dc_ae_f32t4c128_config
    from opensora_pack.opensora_lib.memory import (
        FORWARD_WORKSPACE_BYTES,
        activation_memory,
        decode_memory,
        encode_memory,
        forward_memory,
    )
    from opensora_pack.opensora_lib.mmdit import mmdit_v2_config, mmdit_v2_dcae_config
    from opensora_pack.opensora_lib.stdit3 import stdit3_v12_config, stdit3_v13_config
    from opensora_pack.opensora_lib.vae_v12 import OpenSoraVAEv12
    from opensora_pack.opensora_lib.vae_v13 import OpenSoraVAEv13

    from benchmarks.bench_comfy_memory import mmdit_forward_peak, peak_activation_bytes, stdit3_forward_peak

    torch.set_grad_enabled(False)
    meta = torch.device("meta")
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    configs = {"v2": mmdit_v2_config, "v2_dcae": mmdit_v2_dcae_config, "v13": stdit3_v13_config}
    configs["v12"] = stdit3_v12_config
    results: dict = {"dit": [], "vae": [], "workspace": FORWARD_WORKSPACE_BYTES}

    def base_model(variant: str, dtype: torch.dtype):
        config = configs[variant]()
        if variant.startswith("v2"):
            config_class = OpenSoraV2DCAEModelConfig if variant == "v2_dcae" else OpenSoraV2ModelConfig
            model_config = config_class({"config": config})
        else:
            version = "1.3" if variant == "v13" else "1.2"
            model_config = OpenSoraModelConfig({"config": config, "version": version}, LATENT_FORMATS[version])
        model_config.set_inference_dtype(dtype, None)
        model_config.unet_config["dtype"] = dtype
        return model_config.get_model(device=meta), config

    # -- DiTs: memory_required vs activation_memory vs the tracked peak
    for name, variant, shape, tokens, dtype_name in DIT_GRID:
        dtype = dtypes[dtype_name]
        model, config = base_model(variant, dtype)
        cond_shapes = None if tokens is None else {"c_crossattn": [torch.Size([1, tokens, 4096])] * shape[0]}
        if cond_shapes is not None:
            cond_shapes["y_vec"] = [torch.Size([1, 768])] * shape[0]  # core lists every cond; only T5 counts
        estimate = model.memory_required(shape, cond_shapes=cond_shapes)
        text = (tokens or 512) if variant.startswith("v2") else 0
        batch, _, frames, height, width = shape
        if variant.startswith("v2"):
            one_block = dataclasses.replace(config, depth=1, depth_single_blocks=1)
            measured = mmdit_forward_peak(one_block, batch, frames, height, width, text, dtype)
        else:
            two_blocks = dataclasses.replace(config, depth=2)  # a spatial and a temporal block
            measured = stdit3_forward_peak(two_blocks, batch, frames, height, width, dtype)
        results["dit"].append(
            {
                "name": name,
                "estimate": estimate,
                "activation_memory": activation_memory(model.diffusion_model, shape, text, dtype),
                "forward_memory": forward_memory(model.diffusion_model, shape, text, dtype),
                "without_cond_shapes": model.memory_required(shape),
                "measured": measured,
            }
        )

    # -- core's own planning calls: prepare_sampling's estimate_memory (conds before processing) ...
    model, _ = base_model("v2", torch.bfloat16)
    conds = {
        "positive": [{"cross_attn": torch.empty(1, 300, 4096, device=meta), "pooled_output": torch.empty(1, 768)}],
        "negative": [{"cross_attn": torch.empty(1, 200, 4096, device=meta), "pooled_output": torch.empty(1, 768)}],
    }
    noise_shape = (1, 16, 9, 24, 42)
    planned = comfy.sampler_helpers.estimate_memory(SimpleNamespace(model=model), noise_shape, conds)
    v1_model, _ = base_model("v13", torch.bfloat16)
    v1_shape = (1, 16, 15, 45, 80)  # 360p 49 frames
    v1_planned = comfy.sampler_helpers.estimate_memory(SimpleNamespace(model=v1_model), v1_shape, {"positive": [{}]})
    results["core"] = {
        "estimate_memory": list(planned),
        "expected": [
            forward_memory(model.diffusion_model, (2, *noise_shape[1:]), 300, torch.bfloat16),
            forward_memory(model.diffusion_model, noise_shape, 300, torch.bfloat16),
        ],
        "old_factor_formula": comfy.model_base.BaseModel.memory_required(model, (2, *noise_shape[1:])),
        "v1_estimate_memory": list(v1_planned),
        "v1_expected": forward_memory(v1_model.diffusion_model, (2, *v1_shape[1:]), 0, torch.bfloat16),
    }

    # -- VAEs: the node's own encode / decode on the meta device, with what it passed to load_models_gpu
    passed: list = []

    def load_models_gpu(models, memory_required=0, **kwargs):
        passed.append({"memory_required": memory_required, **kwargs})

    mm.load_models_gpu = load_models_gpu
    mm.intermediate_device = lambda: meta  # the result stays on the meta device
    patcher = SimpleNamespace(load_device=meta)

    def noise(shape, dtype, device):
        return torch.empty(shape, dtype=dtype, device=device)

    builders = {
        "1.3": lambda dtype: OpenSoraVAE("1.3", OpenSoraVAEv13(dtype=dtype, device=meta), patcher, dtype),
        "1.2": lambda dtype: OpenSoraVAE("1.2", OpenSoraVAEv12(dtype=dtype, device=meta), patcher, dtype),
        "dc_ae": lambda dtype: OpenSoraVAE(
            "2.0", DCAE(dc_ae_f32t4c128_config(), dtype=dtype, device=meta), patcher, dtype, "dc_ae"
        ),
    }
    for kind, direction, shape, dtype_name, tile, num_frames in VAE_GRID:
        dtype = dtypes[dtype_name]
        vae = builders[kind](dtype)
        # float64 input: .to(device, dtype) then allocates on the meta device, as the copy to the GPU does
        data = torch.empty(shape, device=meta, dtype=torch.float64)
        passed.clear()
        if direction == "decode":
            measured = peak_activation_bytes(partial(vae.decode, data, num_frames, tile, tile // 4))
            direct = decode_memory(vae.model, shape, dtype, tile, num_frames)
        else:
            measured = peak_activation_bytes(partial(vae.encode, data, noise=noise))
            direct = encode_memory(vae.model, shape, dtype)
        results["vae"].append(
            {
                "row": [kind, direction, list(shape), dtype_name, tile, num_frames],
                "passed": passed[0]["memory_required"] if len(passed) == 1 else None,
                "extra_arguments": sorted(passed[0]) if passed else None,
                "estimate": direct,
                "measured": measured,
            }
        )
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("estimates")
    return run_probe("test_memory_estimates", tmp / "results.json", tmp)


def activations(measured: dict, planned: int) -> int:
    """A planned forward's bytes without the workspace margin (opensora_lib/memory.FORWARD_WORKSPACE_BYTES)."""
    return planned - measured["workspace"]


def test_dit_memory_required_is_the_forward_estimate(measured):
    assert len(measured["dit"]) == len(DIT_GRID)
    assert 256 * 2**20 <= measured["workspace"] <= GIB
    for row in measured["dit"]:
        assert row["estimate"] == row["forward_memory"] == row["activation_memory"] + measured["workspace"], row
        assert row["activation_memory"] > 0


def test_dit_memory_required_bounds_the_tracked_peak(measured):
    for row in measured["dit"]:
        ratio = activations(measured, row["estimate"]) / row["measured"]
        assert 1.0 <= ratio <= 1.25, (row["name"], ratio)


def test_dit_estimates_match_the_nodes_common_table(measured):
    """The 2.0 rows the table in nodes/common.py quotes (GiB per batch row, measured and estimated)."""
    rows = {row["name"]: row for row in measured["dit"]}
    table = {
        "2.0 256px 129f cond+uncond": (2, 0.660, 0.808),
        "2.0 768px 129f, no cond_shapes": (1, 10.023, 12.229),
        "2.0 DC-AE 768px 128f": (1, 2.459, 3.000),
    }
    for name, (batch, peak, estimate) in table.items():
        row = rows[name]
        assert abs(row["measured"] / batch / GIB - peak) < 0.005, (name, row)
        assert abs(activations(measured, row["estimate"]) / batch / GIB - estimate) < 0.005, (name, row)


def test_text_tokens_are_read_from_cond_shapes(measured):
    """2.0 counts the T5 tokens of the conds (the official 512 when core gives no cond_shapes); 1.x has none."""
    rows = {row["name"]: row for row in measured["dit"]}
    short = rows["2.0 256px 33f, 300 T5 tokens"]
    image_tokens = 9 * 12 * 21  # latent 9 x 24 x 42 in 2 x 2 patches
    with_cond_shapes, without = (activations(measured, short[key]) for key in ("estimate", "without_cond_shapes"))
    assert with_cond_shapes * (image_tokens + 512) == without * (image_tokens + 300)
    assert rows["2.0 256px 129f cond+uncond"]["estimate"] == rows["2.0 256px 129f cond+uncond"]["without_cond_shapes"]
    assert rows["1.3 720p 113f"]["estimate"] == rows["1.3 720p 113f"]["without_cond_shapes"]


def test_core_planning_uses_the_estimate(measured):
    """prepare_sampling's estimate_memory (cond+uncond and one row) reads the T5 length of the conds given to it
    (the longer of 300 / 200 tokens), and the 1.x model plans with the STDiT3 formula."""
    core = measured["core"]
    assert core["estimate_memory"] == core["expected"]
    two_rows, one_row = (activations(measured, planned) for planned in core["expected"])
    assert two_rows == 2 * one_row
    assert core["old_factor_formula"] != core["expected"][0]  # core's own formula is no longer what plans
    v1_two_rows, v1_one_row = (activations(measured, planned) for planned in core["v1_estimate_memory"])
    assert core["v1_estimate_memory"][0] == core["v1_expected"] and v1_two_rows == 2 * v1_one_row


def test_vae_passes_its_estimate_to_load_models_gpu(measured):
    assert len(measured["vae"]) == len(VAE_GRID)
    for row in measured["vae"]:
        assert row["passed"] == row["estimate"] > 0, row
        assert row["extra_arguments"] == ["memory_required"], row  # the minimum defaults to it, as for core's VAE


def test_vae_estimate_bounds_the_tracked_peak(measured):
    bad = []
    for row in measured["vae"]:
        ratio = row["estimate"] / row["measured"]
        if not 1.0 <= ratio <= 1.5:
            bad.append((row["row"], round(ratio, 3)))
    assert not bad, bad


def test_vae_tiles_lower_the_estimate(measured):
    """720p 1.3: untiled decode needs ~32 GiB; a 256 px tile decode of one frame far less (the numbers the
    nodes/vae.py table quotes)."""
    rows = {(r["row"][0], r["row"][1], tuple(r["row"][2]), r["row"][4]): r for r in measured["vae"]}
    untiled = rows[("1.3", "decode", (1, 16, 35, 90, 160), 0)]
    assert 31.5 < untiled["measured"] / GIB < 33 and untiled["estimate"] / GIB < 33.5
    tiled_image = rows[("1.3", "decode", (1, 16, 1, 90, 160), 256)]
    assert tiled_image["estimate"] < untiled["estimate"] / 20
