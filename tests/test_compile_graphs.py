"""torch.compile graph breaks and recompiles of the Open-Sora DiTs, as core's TorchCompileModel compiles them.

Core's TorchCompileModel runs torch.compile(diffusion_model) (ComfySTDiT3 / ComfyMMDiT) around every model call. Each
graph break splits the forward (a Python round trip, lost fusion) and the pieces recompile when the batch changes.
Measured with a counting copy of backend="eager" (the same kernels, so outputs stay bit-identical; inductor would
compile C++ for minutes on a CPU), 3 steps of different timesteps and latents with the same shapes:

- 1.2 / 1.3 STDiT3 (t2v, x_mask, i2v): 7 graphs per forward before (Tensor.item() of height / width in _first_value,
  int(counts.max()) / int(counts.min()) of the caption mask in _encode_captions, each read splitting every frame above
  it), 1 now. The values are still read (they set shapes and the pos-emb / RoPE scale), once, by
  stdit3.read_step_values (torch.compiler.disable) at the top of the outermost forward: one graph break before any
  tensor work, so no extra graph. Given numbers (height / width floats, caption_lengths) there is no break at all.
- 2.0 MMDiT (t2v, i2v, DC-AE patch 1): 1 graph, no break (before and now).
- Load Open-Sora DiT's "comfy" attention (core's optimized_attention; attention_pytorch here, as a CUDA machine gets it
  by default) compiles the same way. On --cpu core picks its sub-quadratic attention, whose own graph breaks split
  the tiny 2.0 forward into 22 graphs.
- No recompile between steps of the same shapes; the Sampler node's oscillation steps (fewer guidance rows) compile
  one more graph once (before: 6 more).

The pure library models are compiled here; ComfySTDiT3 / ComfyMMDiT and the Sampler node run in a ComfyUI probe.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_comfy_probe import result_of, run_probe
from helpers_torch import no_grad  # noqa: F401 (autouse fixtures)

V1_CONFIGS = {
    "1.2": {"depth": 2, "hidden_size": 48, "num_heads": 2, "in_channels": 4, "caption_channels": 16},
    "1.3": {
        "depth": 2,
        "hidden_size": 48,
        "num_heads": 2,
        "in_channels": 16,
        "caption_channels": 16,
        "kernel_size": (8, 8, -1),
        "use_spatial_rope": True,
    },
}
V1_CASES = [("1.2", "t2v"), ("1.2", "x_mask"), ("1.3", "t2v"), ("1.3", "i2v")]
V2_CASES = [("2.0", "t2v"), ("2.0", "i2v"), ("2.0 DC-AE", "t2v"), ("2.0 DC-AE", "i2v")]
CAPTION_LENGTH = 12
SAMPLER_STEPS = 12  # step 11 is an oscillation step: one guidance row instead of 2, a new batch size
GRAPH_BREAK_READ = "torch.compiler.disable"  # the one deliberate break: read_step_values at the top


# ---------------------------------------------------------------- inputs and measurement (also used by the probe)


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-degenerate weights (the official zero-inits would hide paths)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
        elif "norm" in name:
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return module.eval()


def v1_steps(config, kind: str, batch: int = 2) -> list[dict]:
    """3 sampler steps of STDiT3.forward keywords: same shapes, new timesteps and latents, as sample_rflow feeds them
    (per-row float32 pixel sizes / fps, a 0/1 caption mask of two lengths, i2v cond / cond_mask / mask_index list)."""
    gen = torch.Generator().manual_seed(5)
    frames, height, width = 5, 10, 18
    shape = (batch, config.in_channels, frames, height, width)
    y = torch.randn(batch, 1, CAPTION_LENGTH, config.caption_channels, generator=gen)
    mask = torch.zeros(batch, CAPTION_LENGTH, dtype=torch.long)
    mask[0, :5], mask[1:, :9] = 1, 1
    fixed = {
        "y": y,
        "mask": mask,
        "fps": torch.full((batch,), 24.0),
        "height": torch.full((batch,), height * 8.0),
        "width": torch.full((batch,), width * 8.0),
    }
    if "i2v" in kind:
        cond_mask = torch.zeros(shape)
        cond_mask[:, :, 0] = 1.0
        reference = torch.randn(shape, generator=gen)
        fixed.update(cond=reference * cond_mask, cond_mask=cond_mask, mask_index=[0], y_null=torch.randn_like(y))
    if "x_mask" in kind:
        x_mask = torch.ones(batch, frames, dtype=torch.bool)
        x_mask[:, :2] = False
        fixed["x_mask"] = x_mask
    return [
        {"x": torch.randn(shape, generator=gen), "timestep": torch.full((batch,), t), **fixed}
        for t in (1000.0, 937.5, 861.25)
    ]


def v2_steps(config, kind: str, batch: int = 2) -> list[dict]:
    """3 sampler steps of ComfyMMDiT latent-interface keywords (latent [B, C, T, H, W], t in [0, 1])."""
    gen = torch.Generator().manual_seed(6)
    channels = config.in_channels // config.patch_size**2
    shape = (batch, channels, 3, 6, 8)
    fixed = {
        "context": torch.randn(batch, 7, config.context_in_dim, generator=gen),
        "y_vec": torch.randn(batch, config.vec_in_dim, generator=gen),
        "transformer_options": {},
    }
    if kind == "i2v":
        cond = torch.zeros(batch, 1 + channels, *shape[2:])
        cond[:, 0, 0] = 1.0
        cond[:, 1:, 0] = torch.randn(batch, channels, *shape[3:], generator=gen)
        fixed["cond"] = cond
    return [
        {"x": torch.randn(shape, generator=gen), "timesteps": torch.full((batch,), t), **fixed}
        for t in (1.0, 0.9375, 0.8625)
    ]


def comfy_v1_keywords(step: dict) -> dict:
    """STDiT3.forward keywords -> ComfySTDiT3's latent interface (the renames the Sampler node makes)."""
    step = dict(step)
    x, timesteps = step.pop("x"), step.pop("timestep")
    context, mask = step.pop("y"), step.pop("mask")
    return {
        "x": x,
        "timesteps": timesteps,
        "context": context,
        "attention_mask": mask,
        "transformer_options": {},
        **step,
    }


def compile_steps(module: torch.nn.Module, steps: list[dict]) -> dict:
    """torch.compile(module) with a counting eager backend over the steps: graphs compiled at each step, dynamo's
    graph-break reasons, and whether every output equals the plain eager one (torch.equal)."""
    import torch._dynamo

    eager = [module(**step) for step in steps]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    graphs = []

    def counting_eager(graph_module, example_inputs):
        graphs.append(len(graph_module.graph.nodes))
        return graph_module.forward

    compiled = torch.compile(module, backend=counting_eager)
    per_step, equal = [], True
    for step, expected in zip(steps, eager):
        before = len(graphs)
        out = compiled(**step)
        per_step.append(len(graphs) - before)
        equal = equal and bool(torch.equal(out, expected))
    breaks = {reason.splitlines()[0]: n for reason, n in torch._dynamo.utils.counters["graph_break"].items()}
    torch._dynamo.reset()
    return {"graphs_per_step": per_step, "graph_breaks": breaks, "equal": equal}


# ---------------------------------------------------------------- pure library models


def stdit3_model(version: str):
    from opensora_lib.stdit3 import STDiT3, STDiT3Config

    torch.manual_seed(0)
    config = STDiT3Config(model_max_length=CAPTION_LENGTH, **V1_CONFIGS[version])
    return randomize(STDiT3(config), 13), config


def tiny_mmdit_config(official, family: str):
    """The official 2.0 config (official: mmdit_v2_config()) with the sizes shrunk; DC-AE: 128 channels, patch 1."""
    values = {k: v for k, v in official.to_dict().items() if k != "out_channels"}
    dcae = family == "2.0 DC-AE"
    tiny = {"vec_in_dim": 32, "context_in_dim": 24, "hidden_size": 64, "num_heads": 2, "depth": 1}
    sizes = {"depth_single_blocks": 1, "axes_dim": [4, 14, 14], "in_channels": 128 if dcae else 64}
    return type(official).from_dict({**values, **tiny, **sizes, "patch_size": 1 if dcae else 2})


def mmdit_model(family: str):
    from opensora_lib.mmdit import MMDiT, mmdit_v2_config

    config = tiny_mmdit_config(mmdit_v2_config(), family)
    return randomize(MMDiT(config), 20), config


def only_read_break(breaks: dict) -> bool:
    return sum(breaks.values()) == 1 and GRAPH_BREAK_READ in next(iter(breaks))


def test_stdit3_forward_is_one_graph_without_recompiles():
    """The library model compiled directly (every family and input kind of ComfySTDiT3 is in the probe below)."""
    model, config = stdit3_model("1.2")
    result = compile_steps(model, v1_steps(config, "x_mask"))
    assert result["graphs_per_step"] == [1, 0, 0], result  # was 7 graphs on the first step
    assert only_read_break(result["graph_breaks"]), result["graph_breaks"]
    assert result["equal"]


def test_stdit3_given_numbers_has_no_graph_break():
    """height / width as numbers and caption_lengths: nothing to read, so not even the one deliberate break."""
    from opensora_lib.stdit3 import read_step_values

    model, config = stdit3_model("1.3")
    steps = v1_steps(config, "i2v x_mask")
    height, width, lengths = read_step_values(steps[0]["y"], steps[0]["mask"], steps[0]["height"], steps[0]["width"], 2)
    assert (height, width, lengths) == (80.0, 144.0, (5, 9))
    numbers = [{**step, "height": height, "width": width, "caption_lengths": lengths} for step in steps]
    result = compile_steps(model, numbers)
    assert result == {"graphs_per_step": [1, 0, 0], "graph_breaks": {}, "equal": True}
    with torch.no_grad():
        assert torch.equal(model(**numbers[0]), model(**steps[0]))  # the numbers are the ones the forward reads


def test_stdit3_compiled_still_rejects_bad_values():
    """The value checks moved into the eager read (read_step_values); compiled calls raise the same ValueErrors."""
    model, config = stdit3_model("1.3")
    compiled = torch.compile(model, backend="eager")
    step = v1_steps(config, "t2v")[0]
    empty_row = step["mask"].clone()
    empty_row[1] = 0
    with pytest.raises(ValueError, match="no valid caption token"):
        compiled(**{**step, "mask": empty_row})
    with pytest.raises(ValueError, match="height"):
        compiled(**{**step, "height": None})
    with pytest.raises(ValueError, match="positive pixel sizes"):
        compiled(**{**step, "width": torch.zeros(2)})
    torch._dynamo.reset()


def test_mmdit_forward_is_one_graph_without_recompiles():
    """The library model compiled directly (ComfyMMDiT, every family and kind, is in the probe below)."""
    from opensora_lib.sampling_v2 import image_ids, pack, text_ids

    model, config = mmdit_model("2.0 DC-AE")
    patch = config.patch_size
    steps = []
    for step in v2_steps(config, "i2v"):
        x = step["x"]
        cond = step.get("cond", x.new_zeros(x.shape[0], 1 + x.shape[1], *x.shape[2:]))
        steps.append(
            {
                "img": pack(x, patch),
                "img_ids": image_ids(*x.shape[2:], patch),
                "txt": step["context"],
                "txt_ids": text_ids(step["context"].shape[1]),
                "timesteps": step["timesteps"],
                "y_vec": step["y_vec"],
                "cond": pack(cond, patch),
            }
        )
    result = compile_steps(model, steps)
    assert result == {"graphs_per_step": [1, 0, 0], "graph_breaks": {}, "equal": True}


# ---------------------------------------------------------------- ComfyUI: ComfySTDiT3 / ComfyMMDiT, the Sampler node


def probe(out_path: str, models_dir: str) -> None:
    """Runs inside ComfyUI (--cpu). Writes {check: value} to out_path."""
    import comfy.model_management as mm
    import folder_paths
    from comfy.ldm.modules import attention as core_attention
    from comfy_extras.nodes_torch_compile import TorchCompileModel
    from helpers_conditioning import random_conditioning
    from opensora_pack.nodes import latent, loaders, sampling
    from opensora_pack.nodes.comfy_model import ComfySTDiT3
    from opensora_pack.nodes.comfy_model_v2 import ComfyMMDiT
    from opensora_pack.opensora_lib.mmdit import mmdit_v2_config
    from opensora_pack.opensora_lib.stdit3 import STDiT3Config

    import nodes as core_nodes

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    results: dict = {}
    core_default = core_attention.optimized_attention

    # -- the modules core compiles, called as the Sampler node calls them
    modules = {}
    for case in V1_CASES:
        version, kind = case
        config = STDiT3Config(model_max_length=CAPTION_LENGTH, **V1_CONFIGS[version])
        torch.manual_seed(0)
        module = randomize(ComfySTDiT3(config), 13)
        steps = [comfy_v1_keywords(step) for step in v1_steps(config, kind)]
        modules[f"{version} {kind}"] = compile_steps(module, steps)
    for family, kind in V2_CASES:
        config = tiny_mmdit_config(mmdit_v2_config(), family)
        modules[f"{family} {kind}"] = compile_steps(randomize(ComfyMMDiT(config), 20), v2_steps(config, kind))
    results["modules"] = modules

    # -- core's TorchCompileModel on a loaded MODEL: the Sampler node and KSampler, graphs compiled per model call
    folder_paths.add_model_folder_path("diffusion_models", str(Path(models_dir) / "diffusion_models"), is_default=True)
    real_compile = torch.compile
    graphs = []

    def eager_compile(model=None, **kwargs):
        def counting_eager(graph_module, example_inputs):
            graphs.append(1)
            return graph_module.forward

        kwargs["backend"] = counting_eager
        return real_compile(model, **kwargs)

    latents = {"1.3": ("1.3", "144p", "9:16", 17), "2.0": ("2.0", "256px", "16:9", 9, 1, 64, 48)}
    files = {"1.3": "opensora-tiny-v13/", "2.0": "opensora-tiny-v2.safetensors"}

    def per_call(model, run) -> tuple[list[int], torch.Tensor]:
        counts = []
        hook = model.model.diffusion_model.register_forward_hook(lambda *_: counts.append(len(graphs)))
        try:
            out = run(model)
        finally:
            hook.remove()
            mm.unload_all_models()
        return [b - a for a, b in zip([0, *counts[:-1]], counts)], out

    def sampler(version, positive, negative):
        def run(model):
            (lat,) = latent.OpenSoraEmptyLatentVideo().generate(*latents[version])
            (out,) = sampling.OpenSoraSampler().sample(model, positive, negative, lat, 17, SAMPLER_STEPS, 7.5)
            return out["samples"]

        return run

    def ksampler(positive):
        def run(model):
            (lat,) = latent.OpenSoraEmptyLatentVideo().generate(*latents["1.3"])
            text, meta = positive[0]
            info = latent.video_info(lat)
            meta = {**meta, "height": info["height"], "width": info["width"], "fps": 24}
            cond, uncond = [[text, meta]], [[torch.zeros_like(text), meta]]
            (out,) = core_nodes.KSampler().sample(model, 17, 4, 5.0, "euler", "simple", cond, uncond, lat)
            return out["samples"]

        return run

    node = {}
    for version, attention in (("1.3", "sdpa"), ("2.0", "sdpa"), ("2.0", "comfy")):
        (model,) = loaders.OpenSoraLoadDiT().load(files[version], "fp32", attention)
        positive, negative = random_conditioning(version, model.model.diffusion_model.config)
        runs = {"sampler" if attention == "sdpa" else f"sampler {attention}": sampler(version, positive, negative)}
        if version == "1.3":
            runs["ksampler"] = ksampler(positive)
        for name, run in runs.items():
            # "comfy": core's attention as a CUDA machine picks it by default (on --cpu core picks sub-quadratic
            # attention, whose own graph breaks are core's)
            core_attention.optimized_attention = core_attention.attention_pytorch
            _, expected = per_call(model, run)
            torch.compile = eager_compile
            try:
                output = TorchCompileModel.execute(model, "inductor")
                compiled = result_of(output)
                torch._dynamo.reset()
                graphs.clear()
                counts, out = per_call(compiled, run)
            finally:
                torch.compile = real_compile
                core_attention.optimized_attention = core_default
                torch._dynamo.reset()
            node[f"{version} {name}"] = {"graphs_per_call": counts, "equal": bool(torch.equal(out, expected))}
    results["node"] = node
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:

    from demo_models import make_dit
    from demo_models_v2 import make_mmdit

    models = tmp_path_factory.mktemp("models-compile-graphs")
    make_dit("1.3", models / "diffusion_models" / "opensora-tiny-v13")
    make_mmdit(models / "diffusion_models" / "opensora-tiny-v2.safetensors")
    return run_probe("test_compile_graphs", models / "results.json", models)


def test_comfy_dits_compile_to_one_graph_without_recompiles(measured):
    modules = measured["modules"]
    assert sorted(modules) == sorted(f"{a} {b}" for a, b in V1_CASES + V2_CASES)
    for key, result in modules.items():
        assert result["graphs_per_step"] == [1, 0, 0], (key, result)  # 1.x: was 7 graphs on the first step
        assert result["equal"], key
        if key.startswith("1."):  # the deliberate read in ComfySTDiT3.forward, before any tensor work
            assert only_read_break(result["graph_breaks"]), (key, result["graph_breaks"])
        else:
            assert result["graph_breaks"] == {}, (key, result["graph_breaks"])


def test_torch_compile_model_graphs_per_model_call(measured):
    node = measured["node"]
    # one graph at the first call; one more when the oscillation step (11) runs one guidance row instead of two
    expected = [1] + [0] * (SAMPLER_STEPS - 2) + [1]
    for key in ("1.3 sampler", "2.0 sampler", "2.0 sampler comfy"):  # comfy: Load Open-Sora DiT's core attention
        assert node[key] == {"graphs_per_call": expected, "equal": True}, key
    assert node["1.3 ksampler"] == {"graphs_per_call": [1, 0, 0, 0], "equal": True}  # core's path (extra_conds)
