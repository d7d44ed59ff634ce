"""opensora_lib/rope_kernel.py: the Triton RoPE kernel gives the torch form's values bit for bit, inside the MMDiT
blocks too, and is only used where that was checked.

No GPU here: tests/rope_kernel_probe.py runs the kernel in Triton's CPU interpreter (TRITON_INTERPRET=1, in a
subprocess because Triton reads it when the kernel is defined). The interpreter computes in numpy float32 like the
GPU, but its float32 -> bfloat16 cast truncates where the GPU rounds to nearest even; so bfloat16 is shown to be
the truncated float32 result here, and the runtime self-check refuses the kernel for it (as it would refuse any
device where the values differ). The bf16 check on the GPU is bench_mmdit's buffered_forms_check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from opensora_lib import rope_kernel

PROBE = Path(__file__).resolve().parent / "rope_kernel_probe.py"


def run_probe(**env: str) -> dict:
    environment = {**os.environ, "TRITON_INTERPRET": "1", **env}
    done = subprocess.run([sys.executable, str(PROBE)], capture_output=True, text=True, timeout=600, env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kernel_equals_the_torch_form_and_is_self_checked():
    found = run_probe()
    assert found["interpreting"] and found["triton"]  # torch's Linux wheels bring Triton
    for name, case in found["kernel_vs_torch"].items():
        if name.startswith("bfloat16"):  # the interpreter's truncating cast, not the arithmetic
            assert not case["equal"] and case["equal_to_truncated_float32"], name
        else:
            assert case["equal"], name
    # The self-check passes for float32 / float16 (then the kernel runs), refuses bfloat16 here with one warning.
    assert found["rotate_into"] == {
        "float32": {"kernel_calls": 3, "equal": True},  # the self-check's 2 (shared, per-item tables) + the real one
        "float16": {"kernel_calls": 3, "equal": True},
        "bfloat16": {"kernel_calls": 1, "equal": True},  # the self-check's first only; the torch form did the work
    }
    assert found["warnings"] == [
        "Triton RoPE kernel differs from the torch form on cpu torch.bfloat16; using the torch form"
    ]
    assert found["state"]["checked"] == {"cpu float32": True, "cpu float16": True, "cpu bfloat16": False}
    # A double block rotates q and k of txt and img (4 launches), a single block q and k (2): same values.
    assert found["blocks"]["float32"] == {"kernel_calls": 6, "equal": True}
    assert found["blocks"]["float16"] == {"kernel_calls": 6, "equal": True}
    # A head size whose half is not a power of two (tl.arange cannot cover it): the torch form.
    assert found["blocks"]["float32 head 48 (half 24: not a power of two)"] == {"kernel_calls": 0, "equal": True}


def test_switched_off_the_kernel_is_never_launched():
    found = run_probe(OPENSORA_TRITON_ROPE="0")
    assert found["state"]["disabled"] is True and found["state"]["checked"] == {}
    assert all(case["kernel_calls"] == 0 and case["equal"] for case in found["rotate_into"].values())
    assert all(case["kernel_calls"] == 0 and case["equal"] for case in found["blocks"].values())


def test_cpu_tensors_use_the_torch_form_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(rope_kernel, "_INTERPRETING", False)
    monkeypatch.setattr(rope_kernel, "_launch", lambda *args: (_ for _ in ()).throw(AssertionError("launched")))
    torch.manual_seed(0)
    x = torch.randn(1, 4, 2, 16)
    angle = torch.randn(1, 4, 1, 8)
    out, expected = torch.empty_like(x), torch.empty_like(x)
    rope_kernel.rotate_into(out, x, angle.cos(), angle.sin())
    rope_kernel.torch_rotate_into(expected, x, angle.cos(), angle.sin())
    assert torch.equal(out, expected)
