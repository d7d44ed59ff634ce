"""The benchmark scripts: a CPU smoke run of each (--tiny --device cpu) and the FLOP formulas vs torch's counter."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import bench_mmdit, bench_stdit3, bench_vae
from benchmarks.common import parse_video
from opensora_lib import attention

REPO = Path(__file__).resolve().parent.parent


def run_script(name: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    command = [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--tiny", "--device", "cpu"]
    command += ["--repeats", "1", "--warmup", "1", "--out", str(out), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "official (quoted)" in done.stdout  # the table was printed
    payload = json.loads(out.read_text())
    assert payload["environment"]["mode"] == "tiny" and payload["environment"]["device"] == "cpu"
    assert payload["model"]["parameters"] > 0
    return payload


def check_timed(result: dict) -> None:
    assert result["seconds"] > 0 and result["seconds_mean"] >= result["seconds"]
    assert all(seconds > 0 for seconds in result["seconds_runs"])
    assert result["flops"] > 0 and result["tflops"] > 0
    assert abs(result["tflops"] - result["flops"] / result["seconds"] / 1e12) < 1e-9 * result["tflops"]
    assert result["peak_memory_gib"] >= 0 and result["memory_kind"] == "cpu_peak_rss_growth"
    assert result["peak_fraction"] is None  # no known peak on the CPU
    assert result["finite"] is True


def by_kind(payload: dict, kind: str) -> list[dict]:
    return [r for r in payload["results"] if r["kind"] == kind]


def check_precision(payload: dict) -> None:
    (precision,) = by_kind(payload, "precision")
    assert 0 < precision["relative_error"] < 0.05  # bf16 rounding: ~1e-2, not 0 (it ran) and not garbage
    assert precision["max_abs_error"] > 0 and precision["finite"] is True


def test_stdit3_script_tiny_cpu(tmp_path):
    payload = run_script("bench_stdit3", tmp_path, "--steps", "12")
    (forward,) = by_kind(payload, "forward")
    check_timed(forward)
    assert forward["batch"] == 2 and forward["latent_shape"] == [2, 16, 5, 8, 18]
    (sampler,) = by_kind(payload, "sampler")
    check_timed(sampler)
    # 1.3 oscillation: steps 0-9 and 10 run cond + uncond, step 11 only cond; the official runs both always.
    assert (sampler["forward_passes"], sampler["official_forward_passes"], sampler["model_calls"]) == (23, 24, 12)
    assert sampler["seconds_per_step"] == pytest.approx(sampler["seconds"] / 12)
    check_precision(payload)


def test_mmdit_script_tiny_cpu(tmp_path):
    payload = run_script("bench_mmdit", tmp_path, "--steps", "12")
    forwards = by_kind(payload, "forward")
    assert [r["batch"] for r in forwards] == [3, 1]
    for result in forwards:
        check_timed(result)
        assert result["image_tokens"] == 3 * 4 * 6 and result["text_tokens"] == 7
    (sampler,) = by_kind(payload, "sampler")
    check_timed(sampler)
    # t2v: cond + uncond-text each step, cond only on odd steps >= 10; the official runs 3 passes per step.
    assert sampler["passes_per_step"] == [2] * 11 + [1]
    assert (sampler["forward_passes"], sampler["official_forward_passes"]) == (23, 36)
    check_precision(payload)


def test_vae_script_tiny_cpu(tmp_path):
    payload = run_script("bench_vae", tmp_path)
    (decode,) = by_kind(payload, "decode")
    check_timed(decode)
    assert decode["latent_shape"] == [1, 16, 10, 4, 4] and decode["output_shape"] == [1, 3, 33, 32, 32]


@pytest.fixture
def math_attention():
    """Attention as plain matmuls, which FlopCounterMode counts on the CPU (its SDPA kernel is not counted)."""
    previous = attention.get_backend()
    attention.set_backend("math")
    yield
    attention.set_backend(previous)


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_stdit3_flops_match_torch_counter(version, math_attention):
    torch.manual_seed(0)
    config = bench_stdit3.model_config(version, tiny=True)
    model = bench_stdit3.STDiT3(config).eval()
    size = parse_video("64x144:17:2", version, "9:16")  # 4 x 9 tokens per frame: whole and edge windows
    inputs = bench_stdit3.forward_inputs(config, version, size, 7, torch.float32, "cpu")  # 7 of 12 tokens valid
    with torch.no_grad():
        flops = counted(lambda: model(**inputs))
    assert flops == bench_stdit3.stdit3_flops(config, 2, tuple(inputs["x"].shape[2:]), 7)


def test_mmdit_flops_match_torch_counter(math_attention):
    torch.manual_seed(0)
    config = bench_mmdit.model_config(tiny=True)
    model = bench_mmdit.MMDiT(config).eval()
    size = parse_video("64x96:9:3", "2.0", "16:9")
    inputs = bench_mmdit.forward_inputs(config, size, 7, torch.float32, "cpu")
    with torch.no_grad():
        flops = counted(lambda: model(**inputs))
    assert flops == bench_mmdit.mmdit_flops(config, 3, 72, 7)


def test_full_size_flops_match_torch_counter_on_meta():
    """Full-size models traced on the meta device (no memory): the formulas hold at the benchmark sizes, and
    they reproduce the quoted official throughput (4.4 s ~ 170 TFLOP/s, 1.26 s ~ 400 TFLOP/s)."""
    config = bench_stdit3.model_config("1.3", tiny=False)
    model = bench_stdit3.STDiT3(config, device="meta")
    size = parse_video("720p:113:2", "1.3", "9:16")
    inputs = bench_stdit3.forward_inputs(config, "1.3", size, 300, torch.float32, "meta")
    inputs.update(mask=None, height=720.0, width=1280.0)  # meta tensors cannot be read back
    assert tuple(inputs["x"].shape) == (2, 16, 35, 90, 160)
    with torch.no_grad():
        flops = counted(lambda: model(**inputs))
    assert flops == bench_stdit3.stdit3_flops(config, 2, (35, 90, 160), 300)
    assert 160 < flops / 4.4 / 1e12 < 180

    config = bench_mmdit.model_config(tiny=False)
    model = bench_mmdit.MMDiT(config, device="meta")
    inputs = bench_mmdit.forward_inputs(config, parse_video("256px:129:3", "2.0", "16:9"), 512, torch.float32, "meta")
    assert inputs["img"].shape[1] == 8316
    with torch.no_grad():
        flops = counted(lambda: model(**inputs))
    assert flops == bench_mmdit.mmdit_flops(config, 3, 8316, 512)
    assert 390 < flops / 1.26 / 1e12 < 410


def test_vae_flops_count_the_convolutions():
    config = bench_vae.model_config(tiny=True)
    flops = bench_vae.decode_flops(config, (1, 16, 10, 4, 4), None, None)
    conv_in = 2 * (2 * 5 * 4 * 4) * 32 * 16 * 27  # two chunks of 5 latents: 16 -> 32 channels, 3x3x3
    assert flops > 100 * conv_in
    assert bench_vae.decode_flops(config, (1, 16, 5, 4, 4), None, None) < flops


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="RESOLUTION:FRAMES"):
        parse_video("720p", "1.3", "9:16")
    with pytest.raises(ValueError, match="aspect ratio"):
        parse_video("720p:113", "1.3", "7:5")
    with pytest.raises(ValueError, match="multiples of 16"):
        parse_video("100x100:129", "2.0", "16:9")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            bench_vae.main(["--device", "cuda"])
