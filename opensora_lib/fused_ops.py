"""Faster eager forms of three MMDiT element-wise steps, used only where they give the torch form's values.

Why: in eager PyTorch these steps run several kernels each, with float32 or rounded intermediates going through
memory. On one H200 (torch.profiler, benchmarks/official_mmdit.py --profile, 256px batch 3) the RoPE alone was
~154 ms of a 1.10 s forward; the official code's Liger kernel takes ~9 ms.

- `rotate_into`: the half-split RoPE, with the q / k RMSNorm gain folded in: one Triton kernel.
- `add_product_into`: a + b * c (the modulation's (1 + scale) * x + shift and the gated residual x + gate * y),
  with torch's two roundings: one Triton kernel instead of two, the product never written out.
- `gelu_tail_`: tanh GELU over the MLP part of the single block's [v | mlp] buffer, run over the whole contiguous
  buffer once v is spent: torch's vectorized kernel instead of its ~5x slower strided one (the same formula).

Each fast form is checked against its torch form once per (form, device, dtype), on random inputs of the real
widths, before its first use; after any difference or error it is not used there again (one warning). The fast
forms run on CUDA only (the Triton ones also on the CPU under TRITON_INTERPRET=1: the tests), and never under
torch.compile, tracing or autograd (the caller decides that: mmdit_layers.eager_out_allowed).
OPENSORA_FUSED_OPS=0 turns them all off.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import triton_kernels
from .triton_kernels import on_kernel_device

DISABLE_VARIABLE = "OPENSORA_FUSED_OPS"
_HALF_OR_FLOAT = (torch.bfloat16, torch.float16, torch.float32)


def disabled() -> bool:
    return os.environ.get(DISABLE_VARIABLE, "1").strip().lower() in ("0", "false", "off", "no")


@dataclass
class CheckedForm:
    """A fast form and the torch form it must equal; both take the same arguments (the first is the tensor written)
    and return the result. `probes(args)` makes fresh argument tuples like args: same device, dtype and widths;
    `variant(args)`: what else selects a separately compiled fast form (a kernel's compile-time sizes), checked
    separately."""

    name: str
    fast: Callable[..., Tensor]
    reference: Callable[..., Tensor]
    probes: Callable[[tuple], list[tuple]]
    variant: Callable[[tuple], tuple] = lambda args: ()
    checked: dict[tuple, bool] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # why, per refused key
    uses: int = 0  # fast-form runs so far, the self-checks' included

    def __call__(self, eligible: bool, *args) -> Tensor:
        if eligible and not disabled():
            key = self._key(args)
            if key not in self.checked:
                self.checked[key] = self._self_check(key, args)
            if self.checked[key]:
                try:
                    return self._fast(*args)
                except Exception as e:  # e.g. a new shape that does not compile: torch form from now on
                    self.checked[key] = False
                    self._refuse(key, f"failed ({type(e).__name__}: {e})")
        return self.reference(*args)

    def _key(self, args: tuple) -> tuple:
        return (str(args[0].device), args[0].dtype, *self.variant(args))

    def _fast(self, *args) -> Tensor:
        self.uses += 1
        return self.fast(*args)

    def _refuse(self, key: tuple, why: str) -> None:
        why = why if len(why) <= 500 else f"{why[:500]}..."  # a compiler's error can run to pages
        self.refused[_key_name(key)] = why
        warnings.warn(f"fused {self.name} {why}; using the torch form", stacklevel=4)

    def _self_check(self, key: tuple, args: tuple) -> bool:
        """Equal bit for bit on every probe? ~1M elements each: a fused multiply-add or another rounding rule moves
        a few half-precision results per million. Later calls may compile other specialisations of the same kernel
        (other sizes) with the same float operations: tests/test_triton_codegen.py reads what the probes compile to."""
        device, dtype = args[0].device, args[0].dtype
        try:
            for expected_args, got_args in zip(self.probes(args), self.probes(args)):  # each form writes its inputs
                expected = self.reference(*expected_args)
                got = self._fast(*got_args)
                if not torch.equal(got, expected):
                    self._refuse(key, f"differs from the torch form on {device} {dtype} ({_difference(got, expected)})")
                    return False
        except Exception as e:  # a Triton / driver problem, or no memory for the probes: torch form from now on
            self._refuse(key, f"failed its check ({type(e).__name__}: {e})")
            return False
        logging.getLogger(__name__).info("fused %s in use on %s %s (self-check passed)", self.name, device, dtype)
        return True


def _difference(got: Tensor, expected: Tensor) -> str:
    """How many elements differ, and the first of them: what a failed self-check reports (no index list is built:
    the probes are ~1M elements)."""
    if got.shape != expected.shape:
        return f"shape {tuple(got.shape)}, the torch form's {tuple(expected.shape)}"
    differ = (got != expected).flatten()  # NaN in both counts: torch.equal says they differ
    first = int(differ.to(torch.uint8).argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), got.shape))
    return (
        f"{int(differ.sum())} of {differ.numel()} elements, the first at {where}: "
        f"{expected.flatten()[first].item()!r} expected, {got.flatten()[first].item()!r} got"
    )


def _random(like: Tensor, *shape: int, seed: int, scale: float = 3.0) -> Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(device=like.device, dtype=like.dtype)


# --- RoPE (half split), the RMSNorm gain folded in ------------------------------------------------------------


def torch_rotate_into(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None = None) -> Tensor:
    """The torch form: x (times the gain, rounded) halves times the float32 tables (float32 products), the sums
    rounded into out's halves. With a gain, x is overwritten by x * gain (see rotate_into)."""
    if gain is not None:
        x = x.mul_(gain)  # in place: no second copy of q / k next to the caller's (the activation peak's height)
    x1, x2 = x.chunk(2, dim=-1)
    out1, out2 = out.chunk(2, dim=-1)
    torch.sub(x1 * cos, x2 * sin, out=out1)
    torch.add(x2 * cos, x1 * sin, out=out2)
    return out


def _triton_rotate_into(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None = None) -> Tensor:
    triton_kernels.launch_rope(out, x, cos, sin, gain)
    return out


def _rope_probes(args: tuple) -> list[tuple]:
    """2 x 256 tokens of x's heads and head size: shared and per-item tables, with and without a gain."""
    x = args[1]
    heads, dim = x.shape[2:]
    angle = _random(x, 2, 256, 1, dim // 2, seed=1, scale=30).float()
    gain = 1 + _random(x, dim, seed=2, scale=0.25)
    probes = []
    for tables in (angle[:1], angle):
        for with_gain in (None, gain):
            probe = _random(x, 2, 256, heads, dim, seed=0, scale=4)
            probes.append((torch.empty_like(probe), probe, tables.cos(), tables.sin(), with_gain))
    return probes


_ROPE = CheckedForm("RoPE", _triton_rotate_into, torch_rotate_into, _rope_probes, lambda args: args[1].shape[2:])


def _rope_eligible(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None) -> bool:
    if not on_kernel_device(out, x, cos, sin, *([] if gain is None else [gain])):
        return False
    half = x.shape[-1] // 2
    return (
        x.dim() == 4
        and out.shape == x.shape
        and x.shape[-1] % 2 == 0
        and half >= 1
        and half & (half - 1) == 0  # tl.arange needs a power of two
        and x.dtype in _HALF_OR_FLOAT
        and out.dtype == x.dtype
        and (gain is None or (gain.shape == x.shape[-1:] and gain.dtype == x.dtype and gain.stride(0) == 1))
        and cos.dtype == sin.dtype == torch.float32
        and cos.dim() == 4
        and cos.shape == sin.shape
        and cos.stride() == sin.stride()
        and cos.shape[0] in (1, x.shape[0])
        and cos.shape[1] == x.shape[1]
        and cos.shape[2] == 1
        and cos.shape[3] == half
        and x.stride(-1) == out.stride(-1) == cos.stride(-1) == 1
    )


def rotate_into(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor, gain: Tensor | None = None) -> Tensor:
    """Write the half-split rotation of x * gain (gain [D] or None) [B, L, heads, D] into out (same shape), tables
    [B or 1, L, 1, D / 2] float32; the same values whichever form runs. With a gain, x must be a spent temporary:
    the torch form overwrites it."""
    return _ROPE(_rope_eligible(out, x, cos, sin, gain), out, x, cos, sin, gain)


# --- a + b * c ---------------------------------------------------------------------------------------------------


def torch_add_product_into(out: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    return torch.add(a, b * c, out=out)


def _triton_add_product_into(out: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    triton_kernels.launch_add_product(out, a, b, c)
    return out


def _add_product_probes(args: tuple) -> list[tuple]:
    """2 x 256 rows of the real width, written over c as the blocks do: a full with per-item b (the residual),
    a one row per item with shared b (the modulation, as for a batch sharing its vector)."""
    like, width = args[0], args[0].shape[-1]
    probes = []
    for a_rows, b_items in ((256, 2), (1, 1)):
        c = _random(like, 2, 256, width, seed=3)
        probes.append((c, _random(like, 2, a_rows, width, seed=4), _random(like, b_items, 1, width, seed=5), c))
    return probes


_ADD_PRODUCT = CheckedForm("a + b * c", _triton_add_product_into, torch_add_product_into, _add_product_probes)


def _add_product_eligible(out: Tensor, a: Tensor, b: Tensor, c: Tensor) -> bool:
    if not (on_kernel_device(out, a, b, c) and out.dim() == a.dim() == b.dim() == c.dim() == 3):
        return False
    batch, length, width = out.shape
    return (
        out.dtype in _HALF_OR_FLOAT
        and out.dtype == a.dtype == b.dtype == c.dtype
        and c.shape == out.shape
        and a.shape[0] in (1, batch)
        and a.shape[1] in (1, length)
        and b.shape[0] in (1, batch)
        and b.shape[1] == 1
        and a.shape[2] == b.shape[2] == width
        and out.stride(-1) == a.stride(-1) == b.stride(-1) == c.stride(-1) == 1
    )


def add_product_into(out: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """out = a + b * c as torch computes it (b * c rounded into the dtype, then the sum rounded); out may be c.
    out, c: [B, L, C]; a: [B or 1, L or 1, C]; b: [B or 1, 1, C]."""
    return _ADD_PRODUCT(_add_product_eligible(out, a, b, c), out, a, b, c)


# --- tanh GELU over the tail of a contiguous buffer -----------------------------------------------------------


def torch_gelu_tail_(buffer: Tensor, start: int) -> Tensor:
    return torch.ops.aten.gelu_(buffer[..., start:], approximate="tanh")


def _whole_gelu_tail_(buffer: Tensor, start: int) -> Tensor:
    torch.ops.aten.gelu_(buffer, approximate="tanh")  # the head is spent: one contiguous (vectorized) pass
    return buffer[..., start:]


def _gelu_probes(args: tuple) -> list[tuple]:
    buffer, start = args
    return [(_random(buffer, 2, 32, buffer.shape[-1], seed=6), start)]


_GELU_TAIL = CheckedForm("GELU over the whole buffer", _whole_gelu_tail_, torch_gelu_tail_, _gelu_probes)


def _gelu_eligible(buffer: Tensor) -> bool:
    # CUDA computes each element alike in its vectorized and strided kernels; the CPU's vectorized tanh (SLEEF) is
    # not its scalar one, which a tail of the whole buffer could get.
    return buffer.is_cuda and buffer.is_contiguous() and buffer.dtype in _HALF_OR_FLOAT


def gelu_tail_(buffer: Tensor, start: int) -> Tensor:
    """tanh GELU in place on buffer[..., start:], returned; buffer[..., :start] may be overwritten (with its GELU).
    On CUDA, with buffer contiguous, GELU runs over the whole buffer: torch's kernel for strided rows is slow."""
    return _GELU_TAIL(_gelu_eligible(buffer), buffer, start)


FORMS = (_ROPE, _ADD_PRODUCT, _GELU_TAIL)


def state() -> dict[str, object]:
    """What the fast forms are doing here (benchmarks record it): Triton's version, and per form its self-checks
    and uses so far."""
    return {
        "triton": getattr(triton_kernels.triton, "__version__", None),
        "disabled": disabled(),
        "forms": {
            form.name: {
                "uses": form.uses,
                "checked": {_key_name(key): ok for key, ok in form.checked.items()},
                "refused": dict(form.refused),
            }
            for form in FORMS
        },
    }


def _key_name(key: tuple) -> str:
    device, dtype, *variant = key
    return " ".join([device, str(dtype).removeprefix("torch."), *[str(size) for size in variant]])


def uses() -> int:
    """Fast-form runs so far, all forms, self-checks included."""
    return sum(form.uses for form in FORMS)
