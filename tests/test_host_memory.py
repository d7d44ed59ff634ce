"""Work that cannot fit in free RAM is refused before it is allocated (audit 23: a 4096 x 4096 x 801 video on --cpu
grew the server to 19 GB and the kernel's OOM killer ended it, losing every queued prompt).

In one ComfyUI process (--cpu) with comfy.model_management.get_free_memory replaced by a chosen figure:
- Open-Sora Empty Latent Video refuses a latent larger than the free RAM, naming the size and both figures;
- the samplers' check (sampling_memory) counts the forward's activations as RAM only when the model runs on the CPU
  (or mps), and the latents always;
- Open-Sora Decode counts the decoded frames (float32, twice: the frames and the IMAGE batch) always and the decode's
  work on the CPU only, and refuses a 4-D (image) latent by name.
The server test in test_bad_input.py queues the audit's prompt itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the probe subprocess imports benchmarks/


def probe(out_path: str, _models_dir: str) -> None:
    import json
    from types import SimpleNamespace

    import comfy.model_management as mm
    import torch
    from helpers_comfy_probe import error_of
    from opensora_pack.nodes import common
    from opensora_pack.nodes.comfy_model import LATENT_FORMATS, OpenSoraModelConfig
    from opensora_pack.nodes.latent import OpenSoraDecode, OpenSoraEmptyLatentVideo
    from opensora_pack.nodes.vae import OpenSoraVAE
    from opensora_pack.opensora_lib.memory import decoded_elements, forward_memory
    from opensora_pack.opensora_lib.stdit3 import stdit3_v13_config
    from opensora_pack.opensora_lib.vae_v13 import OpenSoraVAEv13

    torch.set_grad_enabled(False)
    meta, gib = torch.device("meta"), 2**30
    free = {"bytes": 0}
    asked: list = []

    def get_free_memory(dev=None, torch_free_too=False):
        asked.append(str(dev))
        return free["bytes"]

    mm.get_free_memory = get_free_memory

    def load_models_gpu(*args, **kwargs):  # past the checks: stop before the work
        raise ValueError("loading")

    mm.load_models_gpu = load_models_gpu
    results: dict = {}

    # -- Empty Latent Video: 1.3, 720 x 1280, 113 frames
    empty = OpenSoraEmptyLatentVideo()
    free["bytes"] = 2**40
    shape = empty.generate("1.3", "720p", "16:9", 113, width=1280, height=720)[0]["samples"].shape
    results["empty_shape"] = list(shape)
    free["bytes"] = shape.numel() * 4 - 1
    results["empty_refused"] = error_of(lambda: empty.generate("1.3", "720p", "16:9", 113, width=1280, height=720))
    free["bytes"] = shape.numel() * 4
    results["empty_fits"] = list(empty.generate("1.3", "720p", "16:9", 113, width=1280, height=720)[0]["samples"].shape)
    results["asked_for"] = sorted(set(asked))
    # newer cores pin offloaded weights in RAM and free them under pressure (comfy.model_management.free_pins)
    pins_freed: list = []

    def free_pins(size, evict_active=False, loaded=False):
        pins_freed.append(size)
        free["bytes"] += 1000
        return 1000

    mm.free_pins, mm.TOTAL_PINNED_MEMORY = free_pins, 1001  # pins could cover a shortfall of up to 1001 bytes
    free["bytes"] = shape.numel() * 4 - 1000
    results["fits_after_freeing_pins"] = list(
        empty.generate("1.3", "720p", "16:9", 113, width=1280, height=720)[0]["samples"].shape
    )
    free["bytes"] = shape.numel() * 4 - 1001
    results["refused_after_freeing_pins"] = error_of(
        lambda: empty.generate("1.3", "720p", "16:9", 113, width=1280, height=720)
    )
    free["bytes"] = shape.numel() * 4 - 1002  # beyond what the pins hold: refused without touching them
    results["refused_beyond_pins"] = error_of(
        lambda: empty.generate("1.3", "720p", "16:9", 113, width=1280, height=720)
    )
    results["pins_freed"] = pins_freed
    del mm.free_pins, mm.TOTAL_PINNED_MEMORY

    # -- samplers: the audit's size on the released 1.3 DiT, 2 passes batched
    config = OpenSoraModelConfig({"config": stdit3_v13_config(), "version": "1.3"}, LATENT_FORMATS["1.3"])
    config.set_inference_dtype(torch.bfloat16, None)
    config.unet_config["dtype"] = torch.bfloat16
    base = config.get_model(device=meta)
    shape = (1, 16, 250, 512, 512)
    forward = forward_memory(base.diffusion_model, (2, *shape[1:]), 0, torch.bfloat16)
    latents = common.SAMPLER_HOST_LATENTS * 16 * 250 * 512 * 512 * 4
    on_cpu = int(forward * common.CPU_WORK_FACTOR)  # the CUDA-measured estimate, with the CPU's margin
    free["bytes"] = latents + on_cpu - 1
    cpu_model = SimpleNamespace(model=base, load_device=torch.device("cpu"))
    gpu_model = SimpleNamespace(model=base, load_device=torch.device("cuda"))
    results["sampling_cpu_refused"] = error_of(lambda: common.sampling_memory(cpu_model, shape, 2))
    results["sampling_gpu_fits"] = common.sampling_memory(gpu_model, shape, 2) == forward
    free["bytes"] = latents + on_cpu
    results["sampling_cpu_fits"] = common.sampling_memory(cpu_model, shape, 2) == forward
    # context windows of 9 latent frames: each forward sees 9 frames (the Guider passes window_length)
    windowed = forward_memory(base.diffusion_model, (1, 16, 9, 512, 512), 0, torch.bfloat16)
    free["bytes"] = latents + int(windowed * common.CPU_WORK_FACTOR)
    results["window_fits"] = common.sampling_memory(cpu_model, shape, 1, window=9) == windowed
    results["window_whole_refused"] = error_of(lambda: common.sampling_memory(cpu_model, shape, 1))
    free["bytes"] = latents - 1
    results["sampling_gpu_refused"] = error_of(lambda: common.sampling_memory(gpu_model, shape, 2))
    results["forward_gib"] = forward / gib

    # -- decode: the released 1.3 VAE (on the meta device), a 720p 113-frame latent
    latent = torch.empty(results["empty_shape"], device=meta)
    frames_bytes = 2 * 4 * decoded_elements(OpenSoraVAEv13(dtype=torch.bfloat16, device=meta), latent.shape, 113)
    results["frames_bytes"] = frames_bytes
    results["frames_expected"] = 2 * 4 * 3 * 113 * 720 * 1280
    decoder = OpenSoraDecode()
    info = {"version": "1.3", "height": 720, "width": 1280, "num_frames": 113, "fps": 24}
    for device in ("cpu", "cuda"):
        vae = OpenSoraVAE(
            "1.3",
            OpenSoraVAEv13(dtype=torch.bfloat16, device=meta),
            SimpleNamespace(load_device=torch.device(device)),
            torch.bfloat16,
        )
        free["bytes"] = frames_bytes - 1
        results[f"decode_{device}_refused"] = error_of(lambda vae=vae: decoder.decode(vae, {"samples": latent}))
        free["bytes"] = frames_bytes
        results[f"decode_{device}_with_frames_only"] = error_of(
            lambda vae=vae: decoder.decode(vae, {"samples": latent, "opensora": info})
        )
    # what the node itself holds around the decode's output: the frames and the IMAGE batch, no third copy (review
    # 25: the clamp / scale temporaries next to the frames made 3 copies, more than the check counted)
    from benchmarks.bench_comfy_memory import peak_activation_bytes

    class StandInVAE:  # returns the frames a 720p 113-frame decode gives, allocated inside the measured call
        def decode(self, samples, num_frames, tile_size, tile_overlap):
            return torch.empty(1, 3, 113, 720, 1280, device=meta)

    results["node_peak_frames"] = peak_activation_bytes(lambda: decoder.decode(StandInVAE(), {"samples": latent})) / (
        3 * 113 * 720 * 1280 * 4
    )
    results["decode_image_latent"] = error_of(lambda: decoder.decode(vae, {"samples": torch.zeros(1, 4, 8, 8)}))
    with open(out_path, "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    from helpers_comfy_probe import run_probe

    work = tmp_path_factory.mktemp("host-memory")
    return run_probe("test_host_memory", work / "results.json", work)


def test_empty_latent_larger_than_free_ram_is_refused(measured):
    assert measured["empty_shape"] == [1, 16, 35, 90, 160]
    error = measured["empty_refused"]
    assert error.startswith("MemoryError: Open-Sora Empty Latent Video's latent of (1, 16, 35, 90, 160)"), error
    assert "needs about 0.03 GiB of RAM but 0.03 GiB is free" in error and "refused before allocating" in error
    assert "fewer frames" in error
    assert measured["empty_fits"] == measured["empty_shape"]  # exactly enough free: made
    assert measured["asked_for"] == ["cpu"]  # RAM, whatever the device


def test_pinned_memory_is_freed_before_refusing(measured):
    assert measured["fits_after_freeing_pins"] == measured["empty_shape"]
    assert measured["refused_after_freeing_pins"].startswith("MemoryError"), measured["refused_after_freeing_pins"]
    assert measured["refused_beyond_pins"].startswith("MemoryError"), measured["refused_beyond_pins"]
    assert measured["pins_freed"] == [1000, 1001]  # the shortfall, each time, and not when the pins cannot cover it


def test_sampling_counts_activations_as_ram_only_on_the_cpu(measured):
    assert measured["forward_gib"] > 100  # 16.4 M tokens x 2 passes
    error = measured["sampling_cpu_refused"]
    assert error.startswith("MemoryError: Sampling a latent of 1 x 16 x 250 x 512 x 512 (2 guidance pass(es)"), error
    assert measured["sampling_cpu_fits"] and measured["sampling_gpu_fits"]
    assert measured["sampling_gpu_refused"].startswith("MemoryError: Sampling a latent")  # its latents alone
    # under context windows one forward sees one window: the whole video's forward is not what RAM must hold
    assert measured["window_fits"] and measured["window_whole_refused"].startswith("MemoryError"), measured


def test_decode_counts_the_frames_always_and_its_work_on_the_cpu(measured):
    assert measured["frames_bytes"] == measured["frames_expected"]
    for device in ("cpu", "cuda"):
        error = measured[f"decode_{device}_refused"]
        assert error.startswith("MemoryError: Decoding a latent of 1 x 16 x 35 x 90 x 160"), error
        assert "The decoded frames alone take 2.33 GiB" in error and "tile_size" in error, error
    assert measured["decode_cpu_with_frames_only"].startswith("MemoryError: Decoding")  # + the decode's own work
    assert measured["decode_cuda_with_frames_only"] == "ValueError: loading"  # the work is on the GPU: it loads


def test_decode_node_holds_two_copies_of_the_frames_as_counted(measured):
    assert measured["node_peak_frames"] == 2.0, measured["node_peak_frames"]


def test_decode_refuses_an_image_latent_by_name(measured):
    error = measured["decode_image_latent"]
    assert error.startswith("ValueError: Open-Sora Decode takes a video LATENT [B, C, T, H, W]"), error
    assert "4-D latent of shape [1, 4, 8, 8]" in error and "Empty Latent Image" in error
