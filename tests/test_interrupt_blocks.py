"""ComfyUI's Cancel (POST /interrupt) stops an Open-Sora DiT inside the forward that is running, inside ComfyUI (--cpu).

One sampling step of a large video can take minutes, and core's samplers check the interrupt flag between steps.
Core's comfy.ops layers also check it at every layer call (ops.run_every_op, 0.3.75 and newer); the DiTs are built
from those layers (the `operations` seam), so a cancel lands within the block that runs: cancelled while the
first block of the first forward runs, KSampler stops in that block with InterruptProcessingException, the flag is
consumed, and the next run is bit-identical to one never interrupted. (Checked: it still holds without any check
of the pack's own, so the pack adds none.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_comfy_probe import probe_with_tiny_dits

DITS = {"2.0": "tiny-v2.safetensors", "1.3": "tiny-v13/"}
LATENTS = {"2.0": ("2.0", "256px", "16:9", 9, 1, 64, 48), "1.3": ("1.3", "144p", "9:16", 17)}


def measure(version: str, name: str) -> dict:
    import comfy.model_management as mm
    from helpers_conditioning import random_conditioning
    from opensora_pack.nodes import latent, loaders

    import nodes as core_nodes

    model = loaders.OpenSoraLoadDiT().load(name, "fp32", "sdpa")[0]
    dit = model.model.diffusion_model
    blocks = [*getattr(dit, "spatial_blocks", []), *getattr(dit, "temporal_blocks", [])]
    blocks += [*getattr(dit, "double_blocks", []), *getattr(dit, "single_blocks", [])]
    ran = []
    for block in blocks:
        block.register_forward_pre_hook(lambda *_: ran.append(1))
    positive, negative = random_conditioning(version, dit.config)
    (empty,) = latent.OpenSoraEmptyLatentVideo().generate(*LATENTS[version])

    def ksampler():
        (out,) = core_nodes.KSampler().sample(model, 5, 2, 4.0, "euler", "simple", positive, negative, empty)
        return out["samples"]

    first = ksampler()
    per_run = len(ran)
    ran.clear()
    # Cancel while the first block of the first forward runs (as a user's click lands mid-step)
    cancel = blocks[0].register_forward_pre_hook(lambda *_: mm.interrupt_current_processing(True))
    try:
        ksampler()
        raised = None
    except mm.InterruptProcessingException:
        raised = "InterruptProcessingException"
    cancel.remove()
    blocks_after_interrupt = len(ran)
    again = ksampler()
    mm.unload_all_models()
    return {
        "blocks_per_run": per_run,
        "raised": raised,
        "blocks_after_interrupt": blocks_after_interrupt,
        "flag_consumed": not mm.processing_interrupted(),
        "rerun_identical": bool(torch.equal(first, again)),
    }


def probe(out_path: str, models_dir: str) -> None:
    import folder_paths

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    folder_paths.add_model_folder_path("diffusion_models", str(Path(models_dir) / "diffusion_models"), True)
    Path(out_path).write_text(json.dumps({version: measure(version, name) for version, name in DITS.items()}))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    return probe_with_tiny_dits("test_interrupt_blocks", tmp_path_factory.mktemp("interrupt"), DITS)


@pytest.mark.parametrize("version", ["2.0", "1.3"])
def test_an_interrupt_stops_the_dit_after_one_block(measured, version):
    values = measured[version]
    assert values["raised"] == "InterruptProcessingException", values
    assert values["blocks_after_interrupt"] == 1 < values["blocks_per_run"], values
    assert values["flag_consumed"] and values["rerun_identical"], values
