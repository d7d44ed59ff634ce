"""Run by tests/test_rope_kernel.py in a subprocess with TRITON_INTERPRET=1 (Triton's CPU interpreter, read when
the kernel is defined): the Triton RoPE kernel against the torch form, alone and inside the MMDiT blocks. Prints
one JSON object of findings; the test asserts on them."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from helpers_mmdit import random_blocks  # noqa: E402  (tests/ is the script's folder, first on sys.path)

from opensora_lib import mmdit_layers, rope_kernel  # noqa: E402


def launches() -> int:
    return rope_kernel.kernel_state()["launches"]


found: dict[str, object] = {"interpreting": rope_kernel._INTERPRETING, "triton": rope_kernel.triton is not None}


def tables(batch: int, length: int, half: int):
    angle = torch.randn(batch, length, 1, half) * 40
    return angle.cos(), angle.sin()


def kernel_vs_torch(x: torch.Tensor, cos, sin) -> dict:
    expected, got = torch.empty_like(x), torch.empty_like(x)
    rope_kernel.torch_rotate_into(expected, x, cos, sin)
    rope_kernel._launch(got, x, cos, sin)
    as_float = torch.empty(x.shape, dtype=torch.float32)
    rope_kernel.torch_rotate_into(as_float, x, cos, sin)
    truncated = (as_float.view(torch.int32) & ~0xFFFF).view(torch.float32).to(x.dtype)
    return {"equal": torch.equal(got, expected), "equal_to_truncated_float32": torch.equal(got, truncated)}


torch.manual_seed(0)
cases = {}
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    name = str(dtype).removeprefix("torch.")
    x = (torch.randn(2, 6, 3, 32) * 3).to(dtype)
    cases[f"{name} shared tables"] = kernel_vs_torch(x, *tables(1, 6, 16))
    cases[f"{name} per-item tables"] = kernel_vs_torch(x, *tables(2, 6, 16))
    # q as the official layout gives it: a strided view of a wider projection output
    wide = (torch.randn(2, 6, 3 * 3 * 32) * 3).to(dtype)
    strided = wide[..., : 3 * 32].unflatten(-1, (3, 32))
    cases[f"{name} strided input"] = kernel_vs_torch(strided, *tables(1, 6, 16))
found["kernel_vs_torch"] = cases

# rotate_into: the self-check per (device, dtype); bf16 fails it under the interpreter (its casts truncate)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    rotate = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(1, 4, 3, 32).to(dtype)
        cos, sin = tables(1, 4, 16)
        before = launches()
        out, expected = torch.empty_like(x), torch.empty_like(x)
        rope_kernel.rotate_into(out, x, cos, sin)
        rope_kernel.torch_rotate_into(expected, x, cos, sin)
        rotate[str(dtype).removeprefix("torch.")] = {
            "kernel_calls": launches() - before,
            "equal": torch.equal(out, expected),
        }
    found["rotate_into"] = rotate
    found["warnings"] = [str(w.message) for w in caught]
found["state"] = rope_kernel.kernel_state()


def blocks(dtype, head_dim: int) -> dict:
    """A double and a single block, eager (kernel) vs the plain forms: equal? how many kernel launches?"""
    case = random_blocks(dtype, head_dim)
    before = launches()
    with_kernel = case.run()
    calls = launches() - before
    allowed = mmdit_layers.eager_out_allowed
    mmdit_layers.eager_out_allowed = lambda *tensors: False
    try:
        plain = case.run()
    finally:
        mmdit_layers.eager_out_allowed = allowed
    return {"kernel_calls": calls, "equal": all(torch.equal(a, b) for a, b in zip(with_kernel, plain))}


torch.set_grad_enabled(False)  # inference, as ComfyUI samples (with gradients the plain forms run)
found["blocks"] = {
    "float32": blocks(torch.float32, 64),
    "float16": blocks(torch.float16, 64),
    "float32 head 48 (half 24: not a power of two)": blocks(torch.float32, 48),
}
print(json.dumps(found))
