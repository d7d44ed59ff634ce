"""The benchmark scripts: a CPU smoke run of each (--tiny --device cpu), the FLOP formulas vs torch's counter, the
pieces of official_mmdit.py that do not need the official code, and the GPU session script's --dry-run."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import bench_mmdit, bench_stdit3, bench_vae, official_mmdit
from benchmarks.common import compare_with_official, parse_video, warmup_calls
from benchmarks.session_summary import (
    environment_line,
    fused_ops_refused,
    session_comparison,
    session_summary,
    target_text,
)
from opensora_lib import attention
from opensora_lib.mmdit_layers import RMSNorm, rotary_tables

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
    # --attention cudnn on a CPU machine: cudnn is not available, so the benchmark runs sdpa and says so.
    payload = run_script("bench_mmdit", tmp_path, "--steps", "12", "--attention", "cudnn")
    assert payload["complete"] is True
    env = payload["environment"]
    assert (env["attention_requested"], env["attention_backend"]) == ("cudnn", "sdpa")
    assert "cudnn not available here" in env["attention_note"]
    check = env["buffered_forms_check"]  # on the GPU this checks the device's kernels
    assert check["buffered_forms_ran"] is True and check["bit_identical"] is True
    assert check["fused_ops_uses"] == 0  # CPU: the torch forms
    assert payload["environment"]["fused_ops"]["forms"].keys() == check["fused_ops"]["forms"].keys()  # after the rows
    assert all(form["checked"] == {} for form in check["fused_ops"]["forms"].values())
    assert check["max_abs_difference"] == 0.0
    forwards = by_kind(payload, "forward")
    assert [r["batch"] for r in forwards] == [3, 1]
    for result in forwards:
        check_timed(result)
        assert result["image_tokens"] == 3 * 4 * 6 and result["text_tokens"] == 7
    t2v, i2v = by_kind(payload, "sampler")
    assert (t2v["cond_type"], i2v["cond_type"]) == ("t2v", "i2v_head")
    assert t2v["name"] == "sampler t2v 64x96 9f b1 12 steps"
    for sampler in (t2v, i2v):
        check_timed(sampler)
        assert "ratio_to_official" not in sampler  # tiny names have no quoted figure and no --official-json
    # t2v: cond + uncond-text each step, cond only on odd steps >= 10; the official runs 3 passes per step.
    assert t2v["passes_per_step"] == [2] * 11 + [1]
    assert (t2v["forward_passes"], t2v["official_forward_passes"]) == (23, 36)
    # i2v: all three passes while the image guidance is on (steps 0-10), cond only at step 11 (both scales 1).
    assert i2v["passes_per_step"] == [3] * 11 + [1]
    assert (i2v["forward_passes"], i2v["official_forward_passes"], i2v["model_calls"]) == (34, 36, 12)
    check_precision(payload)


def test_load_memory_script_cpu(tmp_path):
    """benchmarks/bench_load_memory.py on one full-width double block: each format loads in its own ComfyUI process
    and is reported (a Q8_0 GGUF is about half the bf16 file; fp8 weights are the same size from either)."""
    from benchmarks import bench_load_memory

    args = "--double 1 --single 0 --formats bf16 Q8_0 --dtypes fp8_e4m3fn --out".split()
    rows = bench_load_memory.main([*args, str(tmp_path / "r.json")])
    assert [(r["format"], r["weight_dtype"]) for r in rows] == [("bf16", "fp8_e4m3fn"), ("Q8_0", "fp8_e4m3fn")]
    assert json.loads((tmp_path / "r.json").read_text()) == rows
    bf16, q8 = rows
    assert 0.5 < q8["file_gib"] / bf16["file_gib"] < 0.6
    assert bf16["weights_gib"] == q8["weights_gib"] > 0
    assert all(r["peak_anon_gib"] > 0 and r["seconds"] > 0 for r in rows)


def test_t5_memory_script_cpu(tmp_path):
    """benchmarks/bench_t5_memory.py on a narrow one-block T5: every format and precision is reported, the packed
    encoder equals the dense one, and it is smaller wherever the file is narrower than the precision."""
    from benchmarks import bench_t5_memory

    rows = bench_t5_memory.main(["--blocks", "1", "--width", "256", "--repeats", "1", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text()) == rows
    cases = {(r["format"], r["precision"]): r for r in rows}
    assert set(cases) == {(f, p) for f in bench_t5_memory.FORMATS for p in bench_t5_memory.PRECISIONS}
    assert all(r["equal"] and r["kept_seconds"] > 0 and r["dense_seconds"] > 0 for r in rows)
    for (fmt, precision), r in cases.items():
        narrower = fmt != "fp16" or precision.endswith("fp32")
        assert r["packed_layers"] == (7 if narrower else 0), r  # q, k, v, o, wi_0, wi_1, wo
        assert (r["kept_gib"] < r["dense_gib"]) == narrower and r["kept_gib"] <= r["dense_gib"], r


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


# ---------------------------------------------------------------- official_mmdit.py without the official code


def test_official_liger_rope_shim_is_the_half_split_rotation():
    """The shim on the official layout (q [B, heads, L, D], cos / sin tiled to D) equals our half-split RoPE."""
    torch.manual_seed(0)
    ids = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(3), torch.arange(4), indexing="ij"), -1)
    tables = rotary_tables(ids.reshape(1, -1, 3).float(), [8, 12, 12], 10000.0, half_split=True)
    cos, sin = (torch.cat((t[:, :, 0], t[:, :, 0]), dim=-1) for t in (tables.cos, tables.sin))  # [1, L, D]
    for dtype, tolerance in ((torch.float32, 0.0), (torch.bfloat16, 0.0)):
        q, k = (torch.randn(2, 24, 3, 32).to(dtype) for _ in "qk")  # [B, L, heads, D]
        shim_q, shim_k = official_mmdit.LigerRopeShim.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        assert shim_q.dtype == dtype
        assert (shim_q.transpose(1, 2).float() - tables.apply(q).float()).abs().max() <= tolerance
        assert (shim_k.transpose(1, 2).float() - tables.apply(k).float()).abs().max() <= tolerance
    assert not torch.equal(tables.apply(q), q)  # it rotated
    # The Liger kernel reads batch item 0's table rows for every item; the shim does the same.
    other = official_mmdit.LigerRopeShim.apply(q.transpose(1, 2), k.transpose(1, 2), torch.cat((cos, -cos)), sin)
    assert torch.equal(other[0], shim_q)


def test_official_rmsnorm_shim_is_llama_casting():
    torch.manual_seed(0)
    norm = RMSNorm(16)
    norm.scale.data = 1 + 0.1 * torch.randn(16)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 5, 3, 16).to(dtype)
        norm.to(dtype)
        shim = official_mmdit.LigerRMSNormShim.apply(x, norm.scale, 1e-6, 0.0, "llama", False)
        assert shim.dtype == dtype and torch.equal(shim, norm(x))
    with pytest.raises(NotImplementedError, match="'llama' casting only"):
        official_mmdit.LigerRMSNormShim.apply(x, norm.scale, 1e-6, 0.0, "gemma", False)


def test_official_flash_attn_shim_is_sdpa_in_the_flash_layout():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 9, 3, 16) for _ in "qkv")  # flash_attn's [B, L, heads, D]
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert torch.equal(official_mmdit.flash_attn_func(q, k, v), expected.transpose(1, 2))


def test_official_attention_shim_runs_the_chosen_sdpa_backend(monkeypatch):
    """--official-attention flash (the GPU default) restricts the shim to SDPA's flash backend for fp16 / bf16, which
    issue #5's official figures used; torch's default choice (cuDNN on an H200) would make the official side faster
    than published. Float32 (the agreement check) keeps torch's choice: flash kernels, flash_attn's included, take
    half precision only, and a flash-only float32 call fails on CUDA. On the CPU: the flash backend runs, and a
    backend the CPU lacks is refused for bf16, so the restriction really reaches the call."""
    from torch.nn.attention import SDPBackend

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 9, 3, 16) for _ in "qkv")
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    monkeypatch.setattr(official_mmdit, "SDPA_BACKENDS", [SDPBackend.FLASH_ATTENTION])
    torch.testing.assert_close(official_mmdit.flash_attn_func(q, k, v), expected.transpose(1, 2))
    half = [t.bfloat16() for t in (q, k, v)]
    expected_half = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in half)).transpose(1, 2)
    torch.testing.assert_close(official_mmdit.flash_attn_func(*half), expected_half)
    monkeypatch.setattr(official_mmdit, "SDPA_BACKENDS", [SDPBackend.CUDNN_ATTENTION])
    with pytest.raises(RuntimeError, match="No viable backend"):
        official_mmdit.flash_attn_func(*half)
    torch.testing.assert_close(official_mmdit.flash_attn_func(q, k, v), expected.transpose(1, 2))  # float32


def test_profile_forward_rows(capsys):
    """--profile's table: the top ops of one forward by time, shares of the whole, the matrix products among them."""
    torch.manual_seed(0)
    config = bench_mmdit.model_config(tiny=True)
    model = bench_mmdit.MMDiT(config).eval()
    size = parse_video("64x96:9:1", bench_mmdit.VERSION, bench_mmdit.ASPECT_RATIO)
    inputs = official_mmdit.official_forward_inputs(config, size, 7, torch.float32, torch.device("cpu"))
    rows = official_mmdit.profile_forward(model, inputs, torch.device("cpu"), top=8)
    assert 0 < len(rows) <= 8 and all(row["ms"] > 0 and row["calls"] > 0 for row in rows)
    assert [row["ms"] for row in rows] == sorted((row["ms"] for row in rows), reverse=True)
    assert 0 < sum(row["share"] for row in rows) <= 1.0 + 1e-9
    assert any(row["name"] in ("aten::addmm", "aten::mm") for row in rows)
    assert "profile opensora_lib.mmdit.MMDiT: total" in capsys.readouterr().out


def test_official_stubs_answer_find_spec():
    """The stub modules carry a spec: transformers' availability probe (find_spec, then the distribution) says
    flash_attn is not installed instead of raising "flash_attn.__spec__ is None", the failure of the H200 run, where
    peft imported transformers' modeling code after the stubs were installed. FA3's flash_attn_interface, which the
    official code would prefer, does not import. In a subprocess: stubs are global."""
    code = (
        "import importlib.util, sys, types\n"
        "sys.modules['flash_attn_interface'] = types.ModuleType('flash_attn_interface')  # as if FA3 were installed\n"
        "from benchmarks import official_mmdit\n"
        "official_mmdit.install_shims('shim')\n"
        "for name in ('flash_attn', 'liger_kernel', 'liger_kernel.ops.rope', 'opensora.models.text'):\n"
        "    assert importlib.util.find_spec(name) is not None, name\n"
        "try:\n"
        "    import flash_attn_interface  # the official math.py would prefer FA3: issue #5's baseline is FA2\n"
        "    raise SystemExit('flash_attn_interface still imports')\n"
        "except ImportError:\n"
        "    pass\n"
        "from transformers.utils import import_utils\n"
        "assert import_utils._is_package_available('flash_attn', return_version=True)[0] is False\n"
        "import transformers.modeling_utils\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_official_code_missing_is_explained(tmp_path, monkeypatch):
    monkeypatch.setattr(official_mmdit, "OFFICIAL_DIR", tmp_path / "nothing")
    with pytest.raises(official_mmdit.OfficialMissing, match="run `bash scripts/fetch_official.sh` first"):
        official_mmdit.import_official("shim", compile_embedding=False)


def test_ratios_and_targets():
    results = [
        {"name": "forward 768px 129f b1", "seconds": 7.0},
        {"name": "sampler t2v 256px 129f b1 50 steps", "seconds": 30.0},
        {"name": "sampler i2v_head 256px 129f b1 50 steps", "seconds": 45.0},
        {"name": "error bfloat16 vs fp32 256px 129f b1"},  # untimed: left alone
    ]
    official = [{"name": "sampler t2v 256px 129f b1 50 steps", "seconds": 60.0}]
    compare_with_official(results, official, bench_mmdit.OFFICIAL_SECONDS, bench_mmdit.TARGETS)
    forward, t2v, i2v, error = results
    assert forward["official_source"].startswith("quoted") and forward["ratio_to_official"] == pytest.approx(7 / 14.1)
    assert (forward["target_ratio"], forward["meets_target"]) == (0.6, True)
    assert (t2v["official_source"], t2v["ratio_to_official"], t2v["meets_target"]) == ("measured", 0.5, False)
    # i2v: the official t2v run stands in (the official denoiser runs the same 3 passes per step for both)
    assert i2v["official_seconds"] == 60.0 and i2v["official_source"].startswith("measured (its t2v run")
    assert i2v["ratio_to_official"] == pytest.approx(0.75) and i2v["meets_target"] is False
    compare_with_official(results[2:3], [], bench_mmdit.OFFICIAL_SECONDS, bench_mmdit.TARGETS)
    assert results[2]["official_seconds"] == pytest.approx(63.0) and results[2]["official_source"].startswith("quoted")
    assert "ratio_to_official" not in error


def test_session_comparison_prefers_the_measured_official_and_judges_each_run():
    name = "sampler t2v 256px 129f b1 50 steps"
    payloads = {
        "ours_cudnn": {"results": [{"name": name, "kind": "sampler", "seconds": 25.0, "forward_passes": 80}]},
        "ours_fa3": {"results": [{"name": name, "kind": "sampler", "seconds": 31.0, "forward_passes": 80}]},
        "official": {"results": [{"name": name, "kind": "sampler", "seconds": 62.5, "forward_passes": 150}]},
    }
    (row,) = session_comparison(payloads)
    assert row["official_source"] == "measured" and row["official_passes"] == 150
    assert row["ours_cudnn_ratio"] == pytest.approx(0.4) and row["ours_fa3_ratio"] == pytest.approx(0.496)
    assert (row["target_ratio"], row["meets_target"], row["meets_target_fa3"]) == (0.45, True, False)
    assert target_text(row) == "< 0.45: eager cuDNN met, eager FA3 NOT met"
    assert "meets_target_compiled" not in row
    payloads["ours_compiled"] = {"results": [{"name": name, "kind": "sampler", "seconds": 30.0}]}
    (row,) = session_comparison(payloads)
    assert row["ours_compiled_ratio"] == pytest.approx(0.48) and row["meets_target_compiled"] is False
    assert row["meets_target"] is True  # still judged on the eager cudnn run
    i2v = "sampler i2v_head 256px 129f b1 50 steps"
    payloads["ours_cudnn"]["results"].append({"name": i2v, "kind": "sampler", "seconds": 40.0})
    row, i2v_row = session_comparison(payloads)
    assert i2v_row["official_seconds"] == 62.5 and i2v_row["official_passes"] == 150  # the t2v run stands in
    assert i2v_row["official_source"].startswith("measured") and i2v_row["meets_target"] is True  # 0.64 < 0.65
    del payloads["official"]
    row, i2v_row = session_comparison(payloads)
    assert row["official_source"] == "quoted" and row["official_seconds"] == pytest.approx(63.0)
    assert i2v_row["official_source"] == "quoted"


def test_the_summary_names_each_refused_fused_form_and_how_it_differed():
    forms = {
        "RoPE": {"uses": 12, "checked": {"cuda:0 bfloat16 24 128": True}, "refused": {}},
        "a + b * c": {
            "uses": 1,
            "checked": {"cuda:0 bfloat16": False},
            "refused": {"cuda:0 bfloat16": "differs from the torch form on cuda:0 torch.bfloat16 (3 of 1572864 ...)"},
        },
    }
    check = {"bit_identical": True, "fused_ops_uses": 13, "fused_ops": {"forms": forms}}
    env = {"device_name": "NVIDIA H200", "torch": "2.14.1", "attention_backend": "cudnn", "buffered_forms_check": check}
    line = environment_line("ours_cudnn", env)
    assert "buffered eager forms vs plain: bit-identical; fused ops used 13 times" in line
    assert line.endswith(
        "; REFUSED: a + b * c on cuda:0 bfloat16: differs from the torch form on cuda:0 "
        "torch.bfloat16 (3 of 1572864 ...)"
    )
    assert fused_ops_refused(env) == [line.split("REFUSED: ")[1]]
    forms["a + b * c"].update(checked={"cuda:0 bfloat16": True}, refused={})
    assert "REFUSED" not in environment_line("ours_cudnn", env) and fused_ops_refused(env) == []
    # a form that passed its check but failed during the timed rows: in the state recorded after them
    env["fused_ops"] = {"forms": {"RoPE": {"refused": {"cuda:0 bfloat16 24 128": "failed (RuntimeError: x)"}}}}
    assert environment_line("ours_cudnn", env).endswith(
        "; REFUSED: RoPE on cuda:0 bfloat16 24 128: failed (RuntimeError: x)"
    )
    env.update(
        attention_backend="flash_attn_3", attention_requested="flash_attn_3", attention_module="fa3_fwd_interface"
    )
    assert "torch 2.14.1 attention flash_attn_3 (fa3_fwd_interface) " in environment_line("ours_fa3", env)


def test_a_failing_attention_kernel_is_a_row_and_the_others_still_run(monkeypatch, capsys, tmp_path):
    """bench_mmdit --attention-kernels on the GPU: a kernel that raises (FA3 on a GPU it was not built for) gives a
    row with its error, the other backends' rows still come, and the summary prints it as FAILED."""
    real = attention.attention

    def fails_for_math(q, k, v, mask=None):
        if attention.get_backend() == "math":
            raise RuntimeError("FlashAttention-3 only supports Hopper GPUs or newer.")
        return real(q, k, v, mask)

    monkeypatch.setattr(attention, "attention", fails_for_math)
    config = bench_mmdit.model_config(tiny=True)
    size = parse_video("64x96:9:1", bench_mmdit.VERSION, bench_mmdit.ASPECT_RATIO)
    args = SimpleNamespace(repeats=1, max_seconds=1.0)
    rows = bench_mmdit.attention_kernels(config, [size], 7, args, torch.device("cpu"), torch.bfloat16, None)
    assert [r["backend"] for r in rows] == ["sdpa", "sdpa_flash", "math"]  # torch's kernels first, packages last
    assert all(r["seconds"] > 0 and "error" not in r for r in rows[:2])
    assert rows[2]["error"] == "RuntimeError: FlashAttention-3 only supports Hopper GPUs or newer."
    assert attention.get_backend() == "sdpa"  # the selection before the rows is restored
    (tmp_path / "mmdit_fa3.json").write_text(json.dumps({"results": rows}))
    session_summary(tmp_path, mode="dry-run")
    assert "FAILED: RuntimeError: FlashAttention-3 only supports" in capsys.readouterr().out


def test_warmup_only_for_the_first_forward_of_a_batch_size():
    warmed: set[int] = set()
    assert [warmup_calls(1, batch, warmed) for batch in (3, 1, 1, 3)] == [1, 1, 0, 0]


def test_compiled_blocks_warm_up_every_new_shape(tmp_path):
    """With torch.compile'd blocks a new resolution at an already seen batch size compiles again: its first call
    must be untimed (a GPU session once timed a 768px recompile as the forward: 23.8 s for a 9 s forward)."""
    extra = "--compile-blocks eager --forward 64x96:9:1 64x128:9:1 --steps 0 --error-size none".split()
    payload = run_script("bench_mmdit", tmp_path, *extra)
    forwards = by_kind(payload, "forward")
    assert [(r["width"], r["batch"]) for r in forwards] == [(96, 1), (128, 1)]
    assert all(r["first_call_seconds"] is not None for r in forwards)  # each shape had its untimed call
    assert payload["environment"]["compiled_blocks"] == "eager"


def test_mmdit_rows_are_written_as_they_finish(tmp_path):
    """A run killed by its time limit (the GPU session's `timeout`) still leaves the rows it finished: here the
    sampler runs fail after both forwards."""
    out = tmp_path / "m.json"
    arguments = ["--tiny", "--device", "cpu", "--repeats", "1", "--error-size", "none", "--out", str(out)]
    code = (
        "from benchmarks import bench_mmdit\n"
        "def killed(*args, **kwargs):\n    raise RuntimeError('killed')\n"
        f"bench_mmdit.bench_sampler = killed\nbench_mmdit.main({arguments!r})\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode != 0 and "RuntimeError: killed" in done.stderr
    payload = json.loads(out.read_text())
    assert payload["complete"] is False
    assert [(r["kind"], r["batch"]) for r in payload["results"]] == [("forward", 3), ("forward", 1)]
    assert not list(tmp_path.glob("*.partial"))


# ---------------------------------------------------------------- the GPU session script, on the CPU


def test_gpu_session_dry_run(tmp_path):
    """bash benchmarks/gpu_session.sh --dry-run: every step runs on tiny configs (the official one only where
    .official/ exists; CI has no mirror, so there it must say it skipped) and the summary is written."""
    out = tmp_path / "session"
    environment = {**os.environ, "PYTHON": sys.executable}
    environment.pop("OUT", None)
    done = subprocess.run(
        # A generous budget: on a loaded CI machine the default 110 s could cut the last steps and fail the test.
        ["bash", str(REPO / "benchmarks" / "gpu_session.sh"), "--dry-run", "--out", str(out), "--budget", "500"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=environment,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "==== GPU session summary (dry-run) ====" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s["status"] for s in summary["steps"]}
    official_present = (REPO / ".official" / "opensora" / "models" / "mmdit" / "model.py").is_file()
    assert steps["ours_cudnn"] == steps["ours_compiled"] == steps["ours_fa3"] == steps["ours_torch_forms"] == "ok", (
        steps
    )
    assert steps["official"] == ("ok" if official_present else "skipped"), steps
    assert steps["ours_gguf"] == "ok", steps
    assert steps["comfy_memory"] in ("ok", "skipped")
    assert steps["comfy_memory"] == "ok" or not (REPO / "benchmarks" / "bench_comfy_memory.py").exists()
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "session.log" in files  # the device tool returns at most 8 files
    log = (out / "session.log").read_text()
    assert "== END ours_cudnn: ok" in log and "buffered eager forms vs plain: bit-identical" in log
    assert summary["buffered_forms_differ"] == [] and summary["fused_ops_refused"] == {}

    cudnn = json.loads((out / "mmdit_cudnn.json").read_text())
    assert cudnn["environment"]["attention_requested"] == "cudnn"
    # the same forwards with fused_ops switched off (on the CPU the torch forms run either way)
    torch_forms = json.loads((out / "mmdit_cudnn_torch_forms.json").read_text())
    assert torch_forms["environment"]["buffered_forms_check"]["fused_ops"]["disabled"] is True
    assert by_kind(torch_forms, "sampler") == [] and len(by_kind(torch_forms, "forward")) == 2
    assert [r["cond_type"] for r in by_kind(cudnn, "sampler")] == ["t2v", "i2v_head"]
    assert all(r["seconds"] > 0 and r["finite"] for r in cudnn["results"])
    # FlashAttention-3 is not installed here: the step runs sdpa and says so; the attention rows time every
    # backend this process has (sdpa and math on the CPU) and SDPA's flash kernel at both sizes, with the float32 error
    fa3 = json.loads((out / "mmdit_fa3.json").read_text())
    assert (fa3["environment"]["attention_requested"], fa3["environment"]["attention_backend"]) == (
        "flash_attn_3",
        "sdpa",
    )
    assert len(by_kind(fa3, "sampler")) == 2 and len(by_kind(fa3, "forward")) == 2
    kernels = by_kind(fa3, "attention")
    assert [r["name"] for r in kernels] == [
        f"attention 64x96 9f {batch} {backend}" for batch in ("b3", "b1") for backend in ("sdpa", "sdpa_flash", "math")
    ]
    assert all(r["seconds"] > 0 and r["finite"] and 0 < r["relative_error"] < 0.01 for r in kernels), kernels
    assert kernels[0]["shape"] == [3, 2, 7 + 3 * 4 * 6, 64]  # batch, heads, 7 text + 3x4x6 image tokens, head_dim
    assert [r["name"] for r in summary["attention_kernels"]] == [r["name"] for r in kernels]
    assert "one joint attention call per backend" in done.stdout
    names = {row["name"] for row in summary["comparison"]}
    assert "sampler i2v_head 64x96 9f b1 12 steps" in names and "forward 64x96 9f b3" in names
    if official_present:
        official = json.loads((out / "official_mmdit.json").read_text())
        assert official["environment"]["official_attention"] == "default"  # no flash kernel choice on the CPU
        assert set(official["profile"]) == {"ours", "official"} and all(official["profile"].values())
        agreement = {r["name"]: r for r in official["results"] if r["kind"] == "agreement"}
        assert agreement["ours vs official float32 64x96 9f b1"]["relative_error"] < 1e-5
        for cond_type in ("t2v", "i2v_head"):
            check = agreement[f"ours vs official sampler float32 {cond_type} 64x96 9f b1 12 steps"]
            assert check["passed"] is True and check["relative_error"] < 1e-5
        assert summary["agreement_failed"] == []
        rows = {row["name"]: row for row in summary["comparison"]}
        assert rows["sampler t2v 64x96 9f b1 12 steps"]["official_source"] == "measured"
        assert rows["sampler t2v 64x96 9f b1 12 steps"]["official_passes"] == 36
    else:
        assert ".official/ absent" in done.stdout
        assert not (out / "official_mmdit.json").exists()


def test_mmdit_script_with_packed_packed_layerss(tmp_path):
    """--packed Q8_0: the tiny MMDiT's Linear weights become random Q8_0 blocks expanded at each forward (what a GPU
    session times for kept GGUF DiTs); the forwards run, finite, and the report says so."""
    payload = run_script("bench_mmdit", tmp_path, "--steps", "0", "--error-size", "none", "--packed", "Q8_0")
    packed = payload["environment"]["packed"]
    assert packed["qtype"] == "Q8_0" and packed["layers"] > 10 and packed["weight_gib"] > 0
    assert payload["benchmark"].endswith("kept as GGUF Q8_0")
    forwards = by_kind(payload, "forward")
    assert len(forwards) == 2
    for result in forwards:
        check_timed(result)
