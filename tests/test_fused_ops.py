"""opensora_lib/fused_ops.py (+ triton_kernels.py): the fast eager forms give the torch forms' values bit for bit,
inside the MMDiT blocks too, and are only used where that was checked.

No GPU here: tests/fused_ops_probe.py runs the Triton kernels in Triton's CPU interpreter (TRITON_INTERPRET=1, in a
subprocess because Triton reads it when the kernels are defined); its docstring says how bfloat16 is checked there.
The GPU check is bench_mmdit's buffered_forms_check."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_mmdit import random_blocks

from opensora_lib import fused_ops, mmdit_layers, triton_kernels

PROBE = Path(__file__).resolve().parent / "fused_ops_probe.py"


def run_probe(**env: str) -> dict:
    environment = {**os.environ, "TRITON_INTERPRET": "1", **env}
    done = subprocess.run([sys.executable, str(PROBE)], capture_output=True, text=True, timeout=600, env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def probe() -> dict:
    return run_probe()


def test_kernels_equal_the_torch_forms(probe):
    assert probe["interpreting"] and probe["triton"]  # torch's Linux wheels bring Triton
    assert len(probe["kernel_vs_torch"]) == 21
    for name, case in probe["kernel_vs_torch"].items():
        if "bfloat16" in name:  # the interpreter's truncating cast, in the torch form's order of operations
            assert not case["equal"] and case["equal_to_truncating"], name
        else:
            assert case["equal"], name


def test_the_self_checks_admit_only_equal_kernels(probe):
    # float32 / float16: the self-check's probes (RoPE 4: shared and per-item tables, with and without a gain;
    # a + b * c 2: residual and modulation patterns), then the real call. bfloat16 is refused at the first probe
    # with one warning per form, and the torch form did the work.
    assert probe["public"] == {
        "float32": {"uses": {"RoPE": 5, "a + b * c": 3}, "equal": True},
        "float16": {"uses": {"RoPE": 5, "a + b * c": 3}, "equal": True},
        "bfloat16": {"uses": {"RoPE": 1, "a + b * c": 1}, "equal": True},
    }
    # each refusal says how many of the first probe's elements differ, and the first of them
    refused = {name: form["refused"] for name, form in probe["state"]["forms"].items()}
    assert set(refused["RoPE"]) == {"cpu bfloat16 3 32"} and set(refused["a + b * c"]) == {"cpu bfloat16"}
    differs = "differs from the torch form on cpu torch.bfloat16"
    pattern = r"\((\d+) of (\d+) elements, the first at \(\d+, \d+, \d+(, \d+)?\): \S+ expected, \S+ got\)"
    for why in (*refused["RoPE"].values(), *refused["a + b * c"].values()):
        match = re.fullmatch(f"{differs} {pattern}", why)
        assert match and 0 < int(match[1]) < int(match[2]), why
    assert probe["warnings"] == [
        f"fused {name} {next(iter(refused[name].values()))}; using the torch form" for name in ("RoPE", "a + b * c")
    ]
    checked = {"cpu float32": True, "cpu float16": True, "cpu bfloat16": False}
    assert probe["state"]["forms"]["a + b * c"]["checked"] == checked
    # the RoPE kernel is compiled per head count and head size (3 x 32 here): checked per those too
    assert probe["state"]["forms"]["RoPE"]["checked"] == {f"{key} 3 32": ok for key, ok in checked.items()}


def test_blocks_with_the_kernels_equal_the_plain_forms(probe):
    # A double block rotates q and k of txt and img (4), a single block q and k (2), after a self-check of 4 probes
    # for these heads (2 x 64); a + b * c: a double block's 4 modulations and 4 gated residuals, a single block's
    # 1 + 1 (checked before for these dtypes).
    blocks = probe["blocks"]
    assert blocks["float32"] == {"uses": {"RoPE": 4 + 6, "a + b * c": 10}, "equal": True}
    assert blocks["float16"] == {"uses": {"RoPE": 4 + 6, "a + b * c": 10}, "equal": True}
    # A head size whose half is not a power of two (tl.arange cannot cover it): the torch RoPE, the rest fused.
    assert blocks["float32 head 48 (half 24: not a power of two)"] == {"uses": {"a + b * c": 10}, "equal": True}


def test_switched_off_no_fast_form_runs():
    found = run_probe(**{fused_ops.DISABLE_VARIABLE: "0"})
    assert found["state"]["disabled"] is True
    assert all(form == {"uses": 0, "checked": {}, "refused": {}} for form in found["state"]["forms"].values())
    assert all(case["uses"] == {} and case["equal"] for case in found["public"].values())
    assert all(case["uses"] == {} and case["equal"] for case in found["blocks"].values())


WITHOUT_TRITON = """
import json, sys, types
mode, tests = sys.argv[1], sys.argv[2]
if mode == "missing":
    sys.modules["triton"] = None  # `import triton` raises ImportError, as where it is not installed
else:  # importable, but defining a kernel fails (e.g. a Windows install without its compiler)
    broken = types.ModuleType("triton")
    broken.language = sys.modules["triton.language"] = types.ModuleType("triton.language")
    broken.jit = lambda fn: (_ for _ in ()).throw(RuntimeError("broken Triton install"))
    sys.modules["triton"] = broken
sys.path[:0] = [tests, tests + "/.."]
import torch
from helpers_mmdit import random_blocks
from opensora_lib import fused_ops, mmdit_layers, triton_kernels
torch.set_grad_enabled(False)
case = random_blocks(torch.float32, 64)
fast = case.run()
mmdit_layers.eager_out_allowed = lambda *tensors: False
plain = case.run()
print(json.dumps({"triton": triton_kernels.triton is not None, "state": fused_ops.state(),
                  "equal": all(torch.equal(a, b) for a, b in zip(fast, plain))}))
"""


@pytest.mark.parametrize("mode", ["missing", "broken"])
def test_without_a_working_triton_the_torch_forms_run(mode):
    # TRITON_INTERPRET=1 would put the kernels on the CPU: without Triton they must not be tried at all.
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    tests = str(Path(__file__).resolve().parent)
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRITON, mode, tests],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["triton"] is False and found["state"]["triton"] is None and found["equal"]
    assert all(form == {"uses": 0, "checked": {}, "refused": {}} for form in found["state"]["forms"].values())


def test_cpu_tensors_use_the_torch_forms_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_kernels, "INTERPRETING", False)
    launched = []
    monkeypatch.setattr(triton_kernels, "launch_rope", lambda *args: launched.append("rope"))
    monkeypatch.setattr(triton_kernels, "launch_add_product", lambda *args: launched.append("add_product"))
    torch.manual_seed(0)
    x, gain = torch.randn(1, 4, 2, 16), torch.randn(16)
    angle = torch.randn(1, 4, 1, 8)
    out, expected = torch.empty_like(x), torch.empty_like(x)
    fused_ops.rotate_into(out, x.clone(), angle.cos(), angle.sin(), gain)
    fused_ops.torch_rotate_into(expected, x.clone(), angle.cos(), angle.sin(), gain)
    assert torch.equal(out, expected)
    assert torch.equal(out, pe_reference(x * gain, angle))
    a, b, c = torch.randn(2, 3, 8), torch.randn(2, 1, 8), torch.randn(2, 3, 8)
    assert torch.equal(fused_ops.add_product_into(torch.empty_like(c), a, b, c), a + b * c)
    assert launched == []


def pe_reference(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """The plain RoPE of mmdit_layers (concatenation, then rotation) on x."""
    tables = mmdit_layers.RotaryTables(angle.cos(), angle.sin())
    with pytest.MonkeyPatch.context() as plain_forms:
        plain_forms.setattr(mmdit_layers, "eager_out_allowed", lambda *tensors: False)
        return tables.apply(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_over_the_whole_buffer_gives_the_strided_values(monkeypatch, dtype):
    """The single block's GELU over its whole [v | mlp] buffer (CUDA only; here forced on the CPU, whose vectorized
    kernel covers these widths whole) equals the plain form, and only the mlp part is what the block reads."""
    monkeypatch.setattr(fused_ops, "_gelu_eligible", lambda buffer: buffer.is_contiguous())
    form = fused_ops._GELU_TAIL
    monkeypatch.setattr(form, "checked", {})
    case = random_blocks(dtype, 64)
    used = form.uses
    with torch.no_grad():
        fast = case.run()
        with pytest.MonkeyPatch.context() as plain_forms:
            plain_forms.setattr(mmdit_layers, "eager_out_allowed", lambda *tensors: False)
            plain = case.run()
    assert form.uses - used == 2  # the self-check's probe, then the single block
    assert form.checked == {("cpu", dtype): True}
    assert all(torch.equal(a, b) for a, b in zip(fast, plain))


def test_a_fast_form_that_differs_or_fails_is_refused_once_and_the_torch_form_answers():
    calls = []

    def wrong(out, x):
        calls.append("fast")
        return out.copy_(x + 1e-3)

    def broken(out, x):
        raise RuntimeError("no kernel image for this device")

    def reference(out, x):
        return out.copy_(x * 2)

    def probes(args):
        return [(torch.empty(4), torch.ones(4))]

    for fast, why in (
        (wrong, "differs from the torch form on cpu torch.float32 (4 of 4 elements, the first at (0,): 2.0 expected, "),
        (broken, "failed its check (RuntimeError: no kernel image for this device)"),
    ):
        form = fused_ops.CheckedForm("test", fast, reference, probes)
        x = torch.arange(3.0)
        with pytest.warns(UserWarning, match=re.escape(f"fused test {why}")):
            first = form(True, torch.empty(3), x)
        second = form(True, torch.empty(3), x)  # refused for good: no second check, no warning
        assert torch.equal(first, x * 2) and torch.equal(second, x * 2)
        assert form.checked == {("cpu", torch.float32): False}
        assert list(form.refused) == ["cpu float32"] and form.refused["cpu float32"].startswith(why)
    assert calls == ["fast"]  # the differing form ran once, in its check

    def verbose(out, x):
        raise RuntimeError("ptxas error\n" * 500)  # a compiler's error can run to pages

    form = fused_ops.CheckedForm("test", verbose, reference, probes)
    with pytest.warns(UserWarning, match="fused test failed its check"):
        form(True, torch.empty(3), torch.arange(3.0))
    assert len(form.refused["cpu float32"]) == 503 and form.refused["cpu float32"].endswith("...")


def plain_and_eager(case, **patches) -> tuple[tuple, tuple]:
    """The blocks' outputs with the eager forms, then with the plain ones (mmdit_layers attributes patched in both)."""
    with pytest.MonkeyPatch.context() as patched:
        for name, value in patches.items():
            patched.setattr(mmdit_layers, name, value)
        eager = case.run()
        patched.setattr(mmdit_layers, "eager_out_allowed", lambda *tensors: False)
        return case.run(), eager


def test_a_trainable_gain_gets_the_plain_forms_and_its_gradient():
    """Gradients on, activations and weights frozen but the q / k norm gains (norm-only tuning): the gains must not
    go to the eager RoPE (out= forms and the Triton kernel have no backward)."""
    case = random_blocks(torch.float32)
    gains = []
    for name, param in [*case.double.named_parameters(), *case.single.named_parameters()]:
        param.requires_grad_(name.endswith("norm.scale"))
        if param.requires_grad:
            gains.append(param)
    assert len(gains) == 6  # img / txt query and key norms, the single block's two
    with torch.enable_grad():
        outputs = case.run()
        sum(out.sum() for out in outputs).backward()
    assert all(gain.grad is not None and gain.grad.abs().sum() > 0 for gain in gains)


def test_float32_norms_under_autocast_keep_the_official_order():
    """CUDA autocast runs rms_norm in float32 (emulated here): the q / k the blocks attend with are then the gain's
    product cast to v's dtype, as forward gives, and the eager blocks equal the plain ones."""
    case = random_blocks(torch.bfloat16)

    def as_float32(x, eps):
        return torch.nn.functional.rms_norm(x.float(), x.shape[-1:], eps=eps)

    norm = case.single.norm
    q, k, v = (torch.randn(2, 5, 2, 64, dtype=torch.bfloat16) for _ in range(3))
    with torch.no_grad(), pytest.MonkeyPatch.context() as patched:
        patched.setattr(mmdit_layers, "rms_norm", as_float32)
        heads = norm.heads(q, k, v)
        expected = norm(q, k, v)
    assert heads.q_gain is None and heads.k_gain is None
    assert heads.q.dtype == heads.k.dtype == torch.bfloat16
    assert torch.equal(heads.q, expected[0]) and torch.equal(heads.k, expected[1])
    with torch.no_grad():
        plain, eager = plain_and_eager(case, rms_norm=as_float32)
    assert all(a.dtype == torch.bfloat16 and torch.equal(a, b) for a, b in zip(eager, plain))


def test_the_interleaved_layout_takes_the_gains_in_place():
    """Flux-layout tables (half_split=False) rotate in torch: the deferred gains are multiplied into the q / k
    temporaries in place (no second copy), with the plain forms' values."""
    case = random_blocks(torch.float32)
    case.pe = mmdit_layers.RotaryTables(case.pe.cos, case.pe.sin, half_split=False)
    with torch.no_grad():
        plain, eager = plain_and_eager(case)
        q, gain = torch.randn(2, 14, 2, 64), torch.randn(64)
        expected, gained = case.pe.apply(q * gain), q * gain
        rotated = case.pe.apply_joint((q,), (gain,))
    assert all(torch.equal(a, b) for a, b in zip(eager, plain))
    assert torch.equal(rotated, expected)
    assert torch.equal(q, gained)  # in place: q now holds q * gain


@pytest.mark.parametrize(("value", "off"), [("0", True), ("false", True), ("Off", True), ("1", False), ("", False)])
def test_the_switch_reads_common_spellings(monkeypatch, value, off):
    monkeypatch.setenv(fused_ops.DISABLE_VARIABLE, value)
    assert fused_ops.disabled() is off
