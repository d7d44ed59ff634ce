"""Run by tests/test_fused_ops.py in a subprocess with TRITON_INTERPRET=1 (Triton's CPU interpreter, read when the
kernels are defined): the Triton kernels of opensora_lib/triton_kernels.py against the torch forms, alone, through
fused_ops' self-checks, and inside the MMDiT blocks. Prints one JSON object of findings; the test asserts on them.

The interpreter computes in numpy float32 like a GPU, but its float32 -> bfloat16 cast truncates where a GPU rounds
to nearest even; so bfloat16 results are compared with the torch form's float32 operations with every bfloat16
rounding done by truncation (`truncating`), which checks the order of operations and roundings."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from helpers_mmdit import random_blocks  # noqa: E402  (tests/ is the script's folder, first on sys.path)

from opensora_lib import fused_ops, mmdit_layers, triton_kernels  # noqa: E402

found: dict[str, object] = {"interpreting": triton_kernels.INTERPRETING, "triton": triton_kernels.triton is not None}


def uses() -> dict[str, int]:
    return {name: form["uses"] for name, form in fused_ops.state()["forms"].items()}


def used_since(before: dict[str, int]) -> dict[str, int]:
    return {name: count - before[name] for name, count in uses().items() if count != before[name]}


def truncate(t: torch.Tensor) -> torch.Tensor:
    """float32 -> the bfloat16 the interpreter's cast gives (truncation), as float32."""
    return (t.float().contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32)


def rope_truncating(x, cos, sin, gain):
    x = x.float() if gain is None else truncate(x.float() * gain.float())
    x1, x2 = x.chunk(2, dim=-1)
    return truncate(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))


def add_product_truncating(a, b, c):
    return truncate(a.float() + truncate(b.float() * c.float())).expand(c.shape)


def compare(got: torch.Tensor, expected: torch.Tensor, truncating: torch.Tensor) -> dict:
    return {"equal": torch.equal(got, expected), "equal_to_truncating": torch.equal(got.float(), truncating)}


def tables(batch: int, length: int, half: int):
    angle = torch.randn(batch, length, 1, half) * 40
    return angle.cos(), angle.sin()


def rope_case(x, cos, sin, gain=None) -> dict:
    expected, got = torch.empty_like(x), torch.empty_like(x)
    fused_ops.torch_rotate_into(expected, x.clone(), cos, sin, gain)  # (x times a gain in place)
    triton_kernels.launch_rope(got, x, cos, sin, gain)
    return compare(got, expected, rope_truncating(x, cos, sin, gain))


def add_product_case(a, b, c, over_c: bool = False) -> dict:
    expected = fused_ops.torch_add_product_into(torch.empty_like(c), a, b, c)
    truncating = add_product_truncating(a, b, c)
    got = c.clone() if over_c else torch.empty_like(c)
    triton_kernels.launch_add_product(got, a, b, got if over_c else c)
    return compare(got, expected, truncating)


torch.manual_seed(0)
cases = {}
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    name = str(dtype).removeprefix("torch.")
    x = (torch.randn(2, 6, 3, 32) * 3).to(dtype)
    gain = (1 + torch.randn(32) * 0.3).to(dtype)
    cases[f"rope {name} shared tables"] = rope_case(x, *tables(1, 6, 16))
    cases[f"rope {name} per-item tables"] = rope_case(x, *tables(2, 6, 16))
    cases[f"rope {name} gain"] = rope_case(x, *tables(1, 6, 16), gain)
    # q as the official layout gives it: a strided view of a wider projection output
    wide = (torch.randn(2, 6, 3 * 3 * 32) * 3).to(dtype)
    strided = wide[..., : 3 * 32].unflatten(-1, (3, 32))
    cases[f"rope {name} strided input, gain"] = rope_case(strided, *tables(1, 6, 16), gain)
    # a + b * c over 1500 columns (two column blocks, the second partly masked)
    c = (torch.randn(2, 5, 1500) * 3).to(dtype)
    full, per_item = (torch.randn(2, 5, 1500) * 3).to(dtype), (torch.randn(2, 1, 1500) * 3).to(dtype)
    cases[f"a + b * c {name} residual"] = add_product_case(full, per_item, c)
    # the modulation: shift and (1 + scale) one row per item; shift a chunk of a wider [B, 1, 6C] output
    shift = (torch.randn(2, 1, 6 * 1500) * 3).to(dtype)[..., 1500:3000]
    cases[f"a + b * c {name} modulation, strided a"] = add_product_case(shift, per_item, c)
    cases[f"a + b * c {name} shared b, written over c"] = add_product_case(full, per_item[:1], c, over_c=True)
found["kernel_vs_torch"] = cases

# The public functions: the self-check per (form, device, dtype); bf16 fails it here (the interpreter's casts).
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    public = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(1, 4, 3, 32).to(dtype)
        gain = (1 + torch.randn(32) * 0.3).to(dtype)
        cos, sin = tables(1, 4, 16)
        before = uses()
        out, expected = torch.empty_like(x), torch.empty_like(x)
        fused_ops.rotate_into(out, x.clone(), cos, sin, gain)
        fused_ops.torch_rotate_into(expected, x, cos, sin, gain)
        a, b, c = (torch.randn(2, 3, 64).to(dtype), torch.randn(2, 1, 64).to(dtype), torch.randn(2, 3, 64).to(dtype))
        expected_sum = fused_ops.torch_add_product_into(torch.empty_like(c), a, b, c)
        summed = fused_ops.add_product_into(c, a, b, c)
        public[str(dtype).removeprefix("torch.")] = {
            "uses": used_since(before),
            "equal": torch.equal(out, expected) and torch.equal(summed, expected_sum),
        }
    found["public"] = public
    found["warnings"] = [str(w.message) for w in caught]
found["state"] = fused_ops.state()


def blocks(dtype, head_dim: int) -> dict:
    """A double and a single block, eager (fast forms) vs the plain forms: equal? how many fast-form uses?"""
    case = random_blocks(dtype, head_dim)
    before = uses()
    fast = case.run()
    used = used_since(before)
    allowed = mmdit_layers.eager_out_allowed
    mmdit_layers.eager_out_allowed = lambda *tensors: False
    try:
        plain = case.run()
    finally:
        mmdit_layers.eager_out_allowed = allowed
    return {"uses": used, "equal": all(torch.equal(a, b) for a, b in zip(fast, plain))}


torch.set_grad_enabled(False)  # inference, as ComfyUI samples (with gradients the plain forms run)
found["blocks"] = {
    "float32": blocks(torch.float32, 64),
    "float16": blocks(torch.float16, 64),
    "float32 head 48 (half 24: not a power of two)": blocks(torch.float32, 48),
}
print(json.dumps(found))
