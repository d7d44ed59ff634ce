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
FLOAT_TYPES = {"f16", "bf16", "f16x2", "bf16x2", "f32", "f32x2", "f64"}
HALF_TYPES = {"f16", "bf16", "f16x2", "bf16x2"}
# What a float instruction of these kernels may be: arithmetic rounding once to nearest, exact moves and conversions.
PTX_ALLOWED = {"add", "sub", "mul", "fma", "cvt", "neg", "abs", "mov", "ld", "st", "setp", "selp"}
PTX_ROUNDING = {"add", "sub", "mul", "fma"}
PTX_NOT_RN = {"approx", "full", "ftz", "sat", "rz", "rm", "rp"}
PTX_LINE = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)\s+([^;]*);", re.MULTILINE)


def ptx_constants(ptx: str) -> dict[str, int]:
    """Registers set once, by a move of an immediate, and never written again: their bit patterns."""
    definitions: dict[str, int] = {}
    moved: dict[str, int] = {}
    for opcode, operands in PTX_LINE.findall(ptx):
        if opcode.startswith("st."):
            continue  # a store's first operand is an address, not a destination
        destination, _, rest = operands.partition(",")
        for register in re.findall(r"%\w+", destination):
            definitions[register] = definitions.get(register, 0) + 1
            value = ptx_immediate(rest.strip()) if opcode.startswith("mov.") else None
            if value is not None:
                moved[register] = value
    return {register: value for register, value in moved.items() if definitions[register] == 1}


def ptx_immediate(token: str) -> int | None:
    try:
        return int(token[2:], 16) if token.startswith("0f") else int(token, 0) & 0xFFFFFFFF
    except ValueError:
        return None


def ptx_problems(ptx: str) -> tuple[list[str], int]:
    """Float instructions that are not one operation rounded once to nearest (a fused multiply-add, an approximate
    or flushing instruction, another rounding mode, an instruction these kernels should not need); and how many
    rounding float instructions there are."""
    constants = ptx_constants(ptx)
    problems, count = [], 0
    for opcode, operands in PTX_LINE.findall(ptx):
        parts = opcode.split(".")
        kinds = [part for part in parts if part in FLOAT_TYPES]
        if not kinds:
            continue
        text = f"{opcode} {operands}"
        base = parts[0]
        narrowing = base == "cvt" and kinds[0] in HALF_TYPES | {"f32"} and kinds[-1] in {"f32", "f64"} != {kinds[0]}
        if base not in PTX_ALLOWED or PTX_NOT_RN & set(parts):
            problems.append(text)
        elif base in PTX_ROUNDING or narrowing:
            count += 1
            if "rn" not in parts:
                problems.append(text)
            elif base == "fma":
                _, x, y, addend = [constants.get(o.strip(), ptx_immediate(o.strip())) for o in operands.split(",")]
                if not (addend == NEGATIVE_ZERO[kinds[0]] or ONE[kinds[0]] in (x, y)):
                    problems.append(text)
    return problems, count


SASS_FLOAT_OP = re.compile(r"\b([FH](?:ADD|MUL|FMA)(?:2|32I)?|F2F|F2FP)((?:\.\w+)*)\s+([^;]+);")
SASS_ZERO = re.compile(r"-?RZ(\.\w+)?")


def sass_problems(sass: str) -> tuple[list[str], int]:
    """Float instructions of the machine code that flush subnormals, round otherwise than to nearest, or do a real
    multiply-add (an FMA form is fine as a product: a -0 addend; a sum: a multiplier of 1; or a constant: a zero
    multiplicand, the forms the compiler gives a lone multiply or add); and how many float instructions there are."""
    problems, count = [], 0
    for match in SASS_FLOAT_OP.finditer(sass):
        op, suffixes, operands = match.groups()
        count += 1
        if set(suffixes.split(".")) & {"FTZ", "RZ", "RM", "RP", "SAT"}:
            problems.append(match.group(0))
        elif "FMA" in op:
            sources = [s.strip() for s in operands.split(",")][1:]
            product = sources[-1].startswith("-RZ")
            sum_ = sources[1:3] == ["1", "1"] if op == "HFMA2" else sources[1:2] == ["1"]
            constant = any(SASS_ZERO.fullmatch(s) for s in sources[:2])
            if not (product or sum_ or constant):
                problems.append(match.group(0))
    return problems, count


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
                where = f"{name} {dtype} sm_{arch} ({ARCHES[arch]})"
                for problems, count in (ptx_problems(compiled.asm["ptx"]), sass_problems(compiled.asm["sass"])):
                    assert count >= 2 and not problems, (where, problems)


@pytest.mark.parametrize("arch", sorted(ARCHES), ids=[f"sm_{a}" for a in sorted(ARCHES)])
def test_a_build_that_allows_fusion_fails_the_reading(launches, arch):
    # The control: with fusion allowed, LLVM contracts the products and sums, and both readings say so.
    for dtype, by_kernel in launches.items():
        for name, calls in by_kernel.items():
            args, kwargs = calls[0]
            compiled = compile_launch(getattr(triton_kernels, name), args, kwargs, arch, enable_fp_fusion=True)
            assert ptx_problems(compiled.asm["ptx"])[0], (name, dtype)
            assert sass_problems(compiled.asm["sass"])[0], (name, dtype)


def test_the_readers_flag_approximate_and_flushing_instructions():
    # What a later kernel could bring in (a division, an exp, a square root): each is flagged, not passed over.
    ptx = """
    mov.b32 %r1, -2147483648;
    div.full.f32 %f3, %f1, %f2;
    ex2.approx.f32 %f4, %f3;
    sqrt.approx.ftz.f32 %f5, %f4;
    mul.rn.ftz.f32 %f6, %f5, %f5;
    fma.rn.f32 %f7, %f6, %f6, %r1;
    fma.rn.f32 %f8, %f6, %f6, %f7;
    @%p1 ld.global.b32 %r2, [%rd1];
    mov.b32 %r2, -2147483648;
    fma.rn.f32 %f9, %f6, %f6, %r2;
    """
    problems, count = ptx_problems(ptx)
    assert [p.split()[0] for p in problems] == [
        "div.full.f32", "ex2.approx.f32", "sqrt.approx.ftz.f32", "mul.rn.ftz.f32", "fma.rn.f32", "fma.rn.f32"
    ]  # fmt: skip
    assert problems[-2].startswith("fma.rn.f32 %f8") and problems[-1].startswith("fma.rn.f32 %f9")  # %r2: loaded too
    assert count == 3  # the rounding instructions read further: the three fma (the flushing mul is flagged first)
    sass = "FFMA R1, R2, R3, R4 ;\nFFMA R1, R2, R3, RZ ;\nFMUL.FTZ R1, R2, R3 ;\nFFMA R1, R2, R3, -RZ ;\n"
    sass += "HFMA2 R1, R2, 1, 1, R3 ;\nHFMA2.MMA R1, -RZ, RZ, 0, 0 ;\nF2FP.BF16.F32.PACK_AB.RZ R1, R2, R3 ;"
    problems, count = sass_problems(sass)
    assert count == 7 and problems == [
        "FFMA R1, R2, R3, R4 ;", "FFMA R1, R2, R3, RZ ;", "FMUL.FTZ R1, R2, R3 ;", "F2FP.BF16.F32.PACK_AB.RZ R1, R2, R3 ;"
    ]  # fmt: skip


def test_the_kernels_move_memory_128_bits_at_a_time(launches):
    # Element-wise kernels are bound by memory bandwidth: every global load and store of the probes' launches (the
    # real widths, aligned as the blocks' buffers are) is a 128-bit access on the H100 / H200.
    for dtype, by_kernel in launches.items():
        for name, calls in by_kernel.items():
            for args, kwargs in calls:
                ptx = compile_launch(getattr(triton_kernels, name), args, kwargs, 90).asm["ptx"]
                accesses = re.findall(r"\b(?:ld|st)\.global[\w.]*", ptx)
                assert accesses and all(a.endswith(".v4.b32") for a in accesses), (name, dtype, set(accesses))
