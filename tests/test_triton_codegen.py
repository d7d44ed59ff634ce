"""The fused kernels, as Triton compiles them for NVIDIA GPUs, round every operation on its own (no GPU needed).

tests/test_fused_ops.py shows in Triton's CPU interpreter that the kernels do the torch forms' operations in the same
order. The interpreter cannot show the device code: a product and a sum contracted into one fused multiply-add (one
rounding where torch rounds twice) would differ from torch in the last bit, and the self-check would then refuse the
kernel on the GPU. So each kernel is compiled here, with the very arguments and options its launcher passes for the
self-check's probes, for the GPU generations users run (Ampere, Ada, Hopper, Blackwell), and the PTX and the machine
code (SASS, from the nvdisasm Triton ships) are read: each float operation rounds on its own, to nearest, without
flushing subnormals. A build with fusion allowed must fail the same reading. Where the kernels round into the tensor
dtype is the interpreter test's part (dropping a rounding passes here and fails there).

The compiler turns a float32 product or sum of two half-precision values that is then rounded to half precision into
one half-precision instruction (mul.rn.bf16, or fma with a -0 addend where the GPU has no such multiply). That gives
the same bits: a float32 result rounded again to a format of at most 11 significant bits is the directly rounded
result (double rounding is innocuous when 24 >= 2 * 11 + 2; Figueroa, 1995).

Compiling without a GPU goes through two Triton internals the JIT launch uses (its argument binder and
`_pack_args`); a Triton that changes them fails here and the helper below needs adapting.
"""

from __future__ import annotations

import re

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.compiler import compile as triton_compile
from triton.runtime.jit import JITFunction, create_function_from_signature

from opensora_lib import fused_ops, triton_kernels

ARCHES = {80: "A100", 86: "RTX 30xx", 89: "RTX 40xx / L40", 90: "H100 / H200", 100: "B200", 120: "RTX 50xx"}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNELS = ("_rope_half_split", "_add_product")


class Recorder:
    """Stands in for a JIT kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def probe_launches(monkeypatch, dtype: torch.dtype) -> dict[str, list]:
    """What the launchers pass for the self-check's probes (the 2.0 MMDiT's 24 heads of 128, width 3072)."""
    recorders = {name: Recorder() for name in KERNELS}
    for name, recorder in recorders.items():
        monkeypatch.setattr(triton_kernels, name, recorder)
    heads = torch.empty(1, 4, 24, 128, dtype=dtype)
    for args in fused_ops._rope_probes((heads, heads, None, None, None)):
        triton_kernels.launch_rope(*args)
    rows = torch.empty(1, 4, 3072, dtype=dtype)
    for args in fused_ops._add_product_probes((rows, rows, rows, rows)):
        triton_kernels.launch_add_product(*args)
    monkeypatch.undo()
    return {name: recorder.launches for name, recorder in recorders.items()}


def compile_launch(kernel: JITFunction, args: tuple, kwargs: dict, arch: int, **override):
    """Compile `kernel` for `arch` as the JIT would for this launch (same specialisation and options)."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**kwargs, **override}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton_compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


# Bit patterns of -0 (an addend that leaves a product alone) and of 1 (a multiplier that leaves a sum alone).
NEGATIVE_ZERO = {"f32": 0x80000000, "f16": 0x8000, "bf16": 0x8000, "f16x2": 0x80008000, "bf16x2": 0x80008000}
ONE = {"f32": 0x3F800000, "f16": 0x3C00, "bf16": 0x3F80, "f16x2": 0x3C003C00, "bf16x2": 0x3F803F80}
PTX_FLOAT_OP = re.compile(r"\b(add|sub|mul|fma|cvt)((?:\.[a-z]+)*)\.(f32|f16|bf16|f16x2|bf16x2)(\.\w+)?\s+([^;]*);")


def ptx_bits(token: str, constants: dict) -> int | None:
    token = constants.get(token, token)
    try:
        if token.startswith("0f"):
            return int(token[2:], 16)
        return int(token, 0) & 0xFFFFFFFF
    except (AttributeError, ValueError):
        return None


def ptx_problems(ptx: str) -> tuple[list[str], int]:
    """Float instructions that round otherwise than each on its own to nearest (a fused multiply-add, a flush of
    subnormals, another rounding mode); and how many rounding float instructions there are."""
    constants = dict(re.findall(r"\bmov\.\w+\s+(%\w+),\s*([-\w]+);", ptx))
    problems, count = [], 0
    for match in PTX_FLOAT_OP.finditer(ptx):
        op, modifiers, kind, source, operands = match.groups()
        if op == "cvt" and not (source == ".f32" and kind != "f32"):
            continue  # a widening conversion: exact
        count += 1
        text = match.group(0)
        if ".rn" not in modifiers or ".ftz" in modifiers or ".sat" in modifiers:
            problems.append(text)
        elif op == "fma":
            _, x, y, addend = [ptx_bits(o.strip(), constants) for o in operands.split(",")]
            if not (addend == NEGATIVE_ZERO[kind] or ONE[kind] in (x, y)):
                problems.append(text)
    return problems, count


SASS_FLOAT_OP = re.compile(r"\b(FADD|FMUL|FFMA|HADD2|HMUL2|HFMA2|F2FP)((?:\.\w+)*)\s+([^;]+);")


def sass_problems(sass: str) -> list[str]:
    """Float instructions of the machine code that flush subnormals, round otherwise than to nearest, or do a real
    multiply-add: an FMA form is fine as a product (zero addend), a sum (a multiplier of 1) or a constant (a zero
    multiplicand), the forms the compiler gives a lone multiply or add."""
    problems = []
    for match in SASS_FLOAT_OP.finditer(sass):
        op, suffixes, operands = match.groups()
        if set(suffixes.split(".")) & {"FTZ", "RZ", "RM", "RP", "SAT"}:
            problems.append(match.group(0))
        elif op.endswith("FMA") or op == "HFMA2":
            sources = [s.strip() for s in operands.split(",")][1:]
            zero = any(re.fullmatch(r"-?RZ(\.\w+)?", s) for s in sources)
            one = sources[1:3] == ["1", "1"] if op == "HFMA2" else sources[1:2] == ["1"]
            if not (zero or one):
                problems.append(match.group(0))
    return problems


@pytest.fixture(scope="module")
def launches() -> dict:
    with pytest.MonkeyPatch.context() as monkeypatch:
        return {dtype: probe_launches(monkeypatch, dtype) for dtype in DTYPES}


def test_the_launchers_ask_for_no_fusion(launches):
    for dtype, by_kernel in launches.items():
        assert {name: len(calls) for name, calls in by_kernel.items()} == {"_rope_half_split": 4, "_add_product": 2}
        for calls in by_kernel.values():
            assert all(kwargs.get("enable_fp_fusion") is False for _, kwargs in calls), dtype


@pytest.mark.parametrize("arch", sorted(ARCHES), ids=[f"sm_{a}" for a in sorted(ARCHES)])
def test_every_float_operation_rounds_on_its_own(launches, arch):
    assert triton.__version__  # torch's Linux wheels bring Triton; these kernels are its JIT functions
    for dtype, by_kernel in launches.items():
        for name, calls in by_kernel.items():
            kernel = getattr(triton_kernels, name)
            assert isinstance(kernel, JITFunction), name
            for args, kwargs in calls:
                compiled = compile_launch(kernel, args, kwargs, arch)
                problems, count = ptx_problems(compiled.asm["ptx"])
                where = f"{name} {dtype} sm_{arch} ({ARCHES[arch]})"
                assert count >= 2 and not problems, (where, problems)
                assert not sass_problems(compiled.asm["sass"]), (where, sass_problems(compiled.asm["sass"]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_build_that_allows_fusion_fails_the_reading(launches, dtype):
    # The control: with fusion allowed, LLVM contracts the products and sums, and both readings say so.
    for name, calls in launches[dtype].items():
        args, kwargs = calls[0]
        compiled = compile_launch(getattr(triton_kernels, name), args, kwargs, 90, enable_fp_fusion=True)
        assert ptx_problems(compiled.asm["ptx"])[0], name
        assert sass_problems(compiled.asm["sass"]), name


def test_the_kernels_move_memory_128_bits_at_a_time(launches):
    # Element-wise kernels are bound by memory bandwidth: every global load and store of the probes' launches (the
    # real widths, aligned as the blocks' buffers are) is a 128-bit access on the H100 / H200.
    for dtype, by_kernel in launches.items():
        for name, calls in by_kernel.items():
            for args, kwargs in calls:
                ptx = compile_launch(getattr(triton_kernels, name), args, kwargs, 90).asm["ptx"]
                accesses = re.findall(r"\b(?:ld|st)\.global[\w.]*", ptx)
                assert accesses and all(a.endswith(".v4.b32") for a in accesses), (name, dtype, set(accesses))
