"""Load Open-Sora DiT under newer ComfyUI's DynamicVRAM (on by default on NVIDIA from 0.16): comfy.ops builds
Linear layers with weight and bias None until load_state_dict. The loader must still load strictly, reject wrong
shapes with a clear error and give the same model as without it.

ComfyUI is imported in ONE subprocess. --cpu turns DynamicVRAM off, so the probe sets
comfy.memory_management.aimdo_enabled itself, which is what makes comfy.ops build lazily (ComfyUI 0.15 to 0.29 do
so on Windows only, so there the probe also sets comfy.model_management.WINDOWS). Hosts older than 0.12 (e.g. the
pinned 0.3.75) have no DynamicVRAM: there only the non-lazy build exists and is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_comfy_probe import run_probe

REPO = Path(__file__).resolve().parent.parent


FILES = {"stdit3": "tiny-v13/", "mmdit": "tiny-v2.safetensors"}
BAD_FILES = {"stdit3": "tiny-v13-bad.safetensors", "mmdit": "tiny-v2-bad.safetensors"}


def probe(out_path: str, models_dir: str) -> None:
    """Runs inside ComfyUI (--cpu). Writes {check: value} to out_path."""
    import folder_paths
    import torch
    from opensora_pack.nodes.loaders import OpenSoraLoadDiT
    from opensora_pack.opensora_lib.stdit3 import STDiT3
    from safetensors.torch import load_file

    torch.set_grad_enabled(False)
    folder_paths.add_model_folder_path("diffusion_models", str(Path(models_dir)), is_default=True)
    try:
        import comfy.memory_management as memory
    except ImportError:  # 0.3.75: no DynamicVRAM
        memory = None
    modes = [False, True] if hasattr(memory, "aimdo_enabled") else [False]
    import inspect

    import comfy.model_management
    import comfy.ops

    windows_gated = "WINDOWS" in inspect.getsource(comfy.ops.disable_weight_init.Linear)

    def forward(kind, dm):
        gen = torch.Generator().manual_seed(0)
        c = dm.config
        if kind == "stdit3":
            x = torch.randn(1, c.in_channels, 5, 18, 32, generator=gen)
            y = torch.randn(1, 1, 300, c.caption_channels, generator=gen)
            mask = torch.zeros(1, 300, dtype=torch.long)
            mask[:, :7] = 1
            extra = dict(fps=torch.tensor([24.0]), height=torch.tensor([144.0]), width=torch.tensor([256.0]))
            return STDiT3.forward(dm, x, torch.tensor([500.0]), y, mask=mask, **extra)
        x = torch.randn(1, c.in_channels // c.patch_size**2, 3, 8, 12, generator=gen)
        context = torch.randn(1, 7, c.context_in_dim, generator=gen)
        pooled = torch.randn(1, c.vec_in_dim, generator=gen)
        return dm(x, torch.tensor([0.5]), context=context, y_vec=pooled)

    results = {"modes": modes}
    for kind, name in FILES.items():
        path = Path(models_dir) / name.rstrip("/")
        sd = load_file(str(path / "model.safetensors" if name.endswith("/") else path))
        outputs, sampled = [], []
        for lazy in modes:
            if len(modes) > 1:
                memory.aimdo_enabled = lazy
                if windows_gated:  # 0.15 to 0.29 build lazily on Windows only: the probe plays a Windows machine
                    comfy.model_management.WINDOWS = lazy
            (model,) = OpenSoraLoadDiT().load(name, "fp32")
            dm = model.model.diffusion_model
            loaded = dm.state_dict()
            outputs.append(forward(kind, dm))
            sampled.append(sample_with_node(kind, model))
            try:
                OpenSoraLoadDiT().load(BAD_FILES[kind], "fp32")
                wrong_shape = "loaded"
            except Exception as error:  # the type and message are asserted on below
                wrong_shape = f"{type(error).__name__}: {error}"
            lazy_layers = [m for m in dm.modules() if hasattr(m, "comfy_need_lazy_init_bias")]
            results[f"{kind}_lazy{int(lazy)}"] = {
                "lazy_layers": len(lazy_layers),
                "keys_equal": sorted(loaded) == sorted(sd),
                "values_differ": [k for k in sd if not torch.equal(loaded[k].float(), sd[k].float())][:5],
                "wrong_shape": wrong_shape,
            }
        results[f"{kind}_lazy_vs_plain"] = (outputs[-1] - outputs[0]).abs().max().item()
        results[f"{kind}_sampler"] = {
            "shape": list(sampled[0].shape),
            "finite": all(bool(torch.isfinite(out).all()) for out in sampled),
            "varies": float(sampled[0].std()),
            "lazy_vs_plain": (sampled[-1] - sampled[0]).abs().max().item(),
        }
    Path(out_path).write_text(json.dumps(results))


def sample_with_node(kind: str, model):
    """The Open-Sora Sampler node (3 steps, cfg 7.5) on a fixed latent and random conditioning."""
    import comfy.model_management
    import torch
    from opensora_pack.nodes.sampling import OpenSoraSampler

    comfy.model_management.unload_all_models()  # each mode loads its own model through the node
    gen = torch.Generator().manual_seed(5)
    config = model.model.diffusion_model.config
    if kind == "stdit3":
        version, samples, size = "1.3", torch.zeros(1, 16, 5, 18, 32), (144, 256, 17)
        y = torch.randn(1, config.model_max_length, config.caption_channels, generator=gen)
        mask = torch.zeros(1, config.model_max_length, dtype=torch.long)
        mask[:, :7] = 1
        positive = [[y, {"attention_mask": mask, "opensora_version": version}]]
        negative = [[torch.zeros(1, 1, 1), {"opensora_null_caption": True, "opensora_version": version}]]
    else:
        version, samples, size = "2.0", torch.zeros(1, 16, 3, 8, 12), (64, 96, 9)

        def text():
            pooled = torch.randn(1, config.vec_in_dim, generator=gen)
            return [[torch.randn(1, 7, config.context_in_dim, generator=gen), {"pooled_output": pooled}]]

        positive, negative = text(), text()
    info = {"version": version, "height": size[0], "width": size[1], "num_frames": size[2], "fps": 24}
    latent = {"samples": samples, "opensora": info}
    (out,) = OpenSoraSampler().sample(model, positive, negative, latent, 3, 3, 7.5)
    return out["samples"]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    import torch
    from demo_models import make_dit
    from demo_models_v2 import make_mmdit
    from safetensors.torch import load_file, save_file

    tmp = tmp_path_factory.mktemp("lazy")
    models = tmp / "models"
    make_dit("1.3", models / FILES["stdit3"].rstrip("/"))
    make_mmdit(models / FILES["mmdit"])
    for kind, name in FILES.items():  # one matrix one row too tall: detected fine, must not load
        source = models / name.rstrip("/")
        sd = load_file(str(source / "model.safetensors" if name.endswith("/") else source))
        key = "final_layer.linear.weight" if kind == "stdit3" else "cond_in.weight"
        sd[key] = torch.zeros(sd[key].shape[0] + 1, *sd[key].shape[1:], dtype=sd[key].dtype)
        save_file(sd, str(models / BAD_FILES[kind]))
    out = tmp / "results.json"
    return run_probe("test_lazy_weights", out, models)


@pytest.mark.parametrize("kind", ["stdit3", "mmdit"])
def test_dit_loads_strictly_with_and_without_lazy_layers(measured, kind):
    for lazy in measured["modes"]:
        case = measured[f"{kind}_lazy{int(lazy)}"]
        assert case["keys_equal"] and case["values_differ"] == [], (lazy, case)
        assert case["wrong_shape"].startswith("ValueError") and "wrong shapes" in case["wrong_shape"], case
    if True in measured["modes"]:
        assert measured[f"{kind}_lazy1"]["lazy_layers"] > 0  # the lazy comfy.ops path really ran
        assert measured[f"{kind}_lazy_vs_plain"] == 0.0


@pytest.mark.parametrize("kind", ["stdit3", "mmdit"])
def test_sampler_node_same_with_and_without_lazy_layers(measured, kind):
    """The Sampler node calls the DiT directly after load_models_gpu (not through core's sampling): under the
    lazy comfy.ops layers of DynamicVRAM it must give the same latent (0.3.75 has only the plain build)."""
    result = measured[f"{kind}_sampler"]
    assert result["finite"] and result["varies"] > 0.01, result
    assert result["shape"] == ([1, 16, 5, 18, 32] if kind == "stdit3" else [1, 16, 3, 8, 12])
    assert result["lazy_vs_plain"] == 0.0
