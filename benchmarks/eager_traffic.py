"""Element-wise memory traffic of one eager 2.0 MMDiT block, traced op by op (CPU, no GPU needed).

What the GPU spends outside the matrix products and attention in an eager forward is mostly memory traffic of the
element-wise ops (norms, modulation, RoPE, GELU, residuals, copies). This script runs one double-stream and one
single-stream block at the real width ratios under a TorchDispatchMode and adds up, for every op that is not a
matrix product, attention or a view, the bytes it reads (its tensor inputs: an in-place op's self too, an out=
destination not) and writes (its outputs). The result is given in passes: multiples of one read or write of the joint [batch, tokens, hidden]
activation in the compute dtype, so it does not depend on the size. Not counted: the matrix products and
attention themselves, and the small per-sample tensors (modulation vectors, RoPE tables) that broadcast.

F.rms_norm is one fused kernel on CUDA but decomposes on the CPU, so the trace counts it as one read and one write
(what the CUDA kernel moves), listed under `clone`. With --fused, opensora_lib/fused_ops' forms (which run on CUDA
only) are counted as CUDA runs them: one kernel reading each input once and writing its output once, listed under
the form's name; the values still come from the torch forms.

With --compiled, the same blocks go through torch.compile (inductor) instead, and what its fused kernels read and
write is added up from inductor's own byte count per kernel (GraphLowering.count_bytes), leaving out the extern
kernels (matrix products, attention). Here that is inductor's CPU backend: its fusion choices, not necessarily the
CUDA backend's; each kernel is listed with the aten ops it fuses, so what is CPU-only shows (the CPU attention
kernel wants q and k copied into its layout: `_scaled_dot_product_flash_attention_for_cpu`, 3 passes each).

Usage: python benchmarks/eager_traffic.py [--batch 3] [--dtype bf16] [--fused | --compiled] [--out F.json]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections import Counter
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import DTYPES, write_json  # noqa: E402
from opensora_lib import fused_ops, mmdit_layers  # noqa: E402
from opensora_lib.mmdit_layers import DoubleStreamBlock, SingleStreamBlock, rotary_tables  # noqa: E402

# Matrix products, attention and ops that only make views or allocate: not element-wise traffic.
NOT_TRAFFIC = {
    "mm", "addmm", "bmm", "baddbmm", "linear",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention", "scaled_dot_product_attention",
    "t", "view", "_unsafe_view", "_reshape_alias", "transpose", "permute", "slice", "select", "split",
    "split_with_sizes", "unbind", "chunk", "expand", "unsqueeze", "squeeze", "detach", "alias", "as_strided",
    "empty", "empty_like", "new_empty", "empty_strided",
}  # fmt: skip


class TrafficCounter(TorchDispatchMode):
    """Bytes read + written per op name. Reads: the tensor inputs, except an out= destination and copy_'s target
    (written, not read); an in-place op's self is read and written."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.paused = False  # inside a stand-in for one fused kernel, counted by `add`

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        if name in NOT_TRAFFIC or self.paused:
            return result
        destination = kwargs.get("out")
        reads = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t is not destination]
        outputs = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
        if name == "copy_":  # copy_(dst, src): reads src only
            reads = [args[1]]
        self.add(name, reads + outputs)
        return result

    def add(self, name: str, tensors: list[torch.Tensor]) -> None:
        self.bytes[name] += sum(t.numel() * t.element_size() for t in tensors)
        self.calls[name] += 1


# fused_ops' functions -> (their torch form, what their one kernel reads and writes). The RoPE reads the tables once
# per batch item; they are float32 [1, L, 1, D / 2], counted once (a cache holds them across the batch).
FUSED_KERNELS = {
    "rotate_into": (
        fused_ops.torch_rotate_into,
        lambda out, x, cos, sin, gain=None: [x, cos, sin, out] + ([] if gain is None else [gain]),
    ),
    "add_product_into": (fused_ops.torch_add_product_into, lambda out, a, b, c: [a, b, c, out]),
    "gelu_tail_": (fused_ops.torch_gelu_tail_, lambda buffer, start: [buffer, buffer]),  # the whole buffer
}


def _one_kernel(counter: TrafficCounter, name: str):
    torch_form, moved = FUSED_KERNELS[name]

    def run(*args):
        counter.paused = True
        try:
            result = torch_form(*args)
        finally:
            counter.paused = False
        counter.add(name, moved(*args))
        return result

    return run


def _fused_rms_norm_stand_in(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x.clone()  # one read, one write: what CUDA's fused F.rms_norm moves


def _blocks(
    batch: int = 3,
    dtype: torch.dtype = torch.bfloat16,
    image_tokens: int = 2048,
    text_tokens: int = 128,
    heads: int = 3,
    head_dim: int = 128,
):
    """{"double" / "single": (block, its inputs)} with the 2.0 head size and MLP ratio (fewer heads than the real
    24: the passes are ratios, and the ops are the same), and the bytes of one pass over the joint activation."""
    torch.manual_seed(0)
    hidden = heads * head_dim
    double = DoubleStreamBlock(hidden, heads, 4.0, qkv_bias=True, fused_qkv=False, dtype=dtype)
    single = SingleStreamBlock(hidden, heads, 4.0, fused_qkv=False, dtype=dtype)
    img = torch.randn(batch, image_tokens, hidden, dtype=dtype)
    txt = torch.randn(batch, text_tokens, hidden, dtype=dtype)
    vec = torch.randn(batch, hidden, dtype=dtype)
    joint = torch.cat((txt, img), 1)  # a single block's input, made outside the trace
    ids = torch.randint(0, 9, (1, text_tokens + image_tokens, 3)).float()
    pe = rotary_tables(ids, [16, 56, 56], 10000)
    one_pass = batch * (text_tokens + image_tokens) * hidden * img.element_size()
    return {"double": (double, (img, txt, vec, pe)), "single": (single, (joint, vec, pe))}, one_pass


def block_traffic(batch: int = 3, dtype: torch.dtype = torch.bfloat16, fused: bool = False, **sizes: int) -> dict:
    """Passes per block kind, by op; fused: fused_ops' forms as one kernel each. sizes: see _blocks."""
    blocks, one_pass = _blocks(batch, dtype, **sizes)
    results = {}
    with torch.no_grad(), mock.patch.object(mmdit_layers, "rms_norm", _fused_rms_norm_stand_in):
        for name, (block, inputs) in blocks.items():
            counter = TrafficCounter()
            with contextlib.ExitStack() as stack:
                for form in FUSED_KERNELS if fused else ():
                    stack.enter_context(mock.patch.object(fused_ops, form, _one_kernel(counter, form)))
                stack.enter_context(counter)
                block(*inputs)
            by_op = {op: round(b / one_pass, 2) for op, b in counter.bytes.most_common() if b >= one_pass / 100}
            results[name] = {"passes": round(sum(counter.bytes.values()) / one_pass, 2), "by_op": by_op}
    return results


def compiled_traffic(batch: int = 3, dtype: torch.dtype = torch.bfloat16, **sizes: int) -> dict:
    """Passes per block kind for the blocks compiled by inductor (this machine's backend), per fused kernel, named
    by the aten ops it fuses; extern kernels (matrix products, attention) are left out."""
    from torch._inductor import compile_fx
    from torch._inductor import config as inductor_config
    from torch._inductor.graph import GraphLowering

    blocks, one_pass = _blocks(batch, dtype, **sizes)
    kernels: list[tuple[str, int]] = []
    count_bytes = GraphLowering.count_bytes

    def counting(graph):
        total, per_node, runtimes = count_bytes(graph)
        for node, words in per_node:  # count_bytes lists bytes // 4 per scheduler node
            if "Extern" not in type(node).__name__ and words:
                kernels.append((_fused_ops_of(node), words * 4))
        return total, per_node, runtimes

    # inductor counts bytes only while its metrics log is on: a logger of our own that is on and prints nothing,
    # so neither TORCH_LOGS nor the caller's log settings matter (and none are changed)
    metrics_log = logging.getLogger(f"{__name__}.inductor_metrics")
    metrics_log.setLevel(logging.INFO)
    metrics_log.propagate = False
    metrics_log.addHandler(logging.NullHandler())
    results = {}
    try:
        with (
            torch.no_grad(),
            mock.patch.object(GraphLowering, "count_bytes", counting),
            mock.patch.object(compile_fx, "inductor_metrics_log", metrics_log),
            inductor_config.patch(force_disable_caches=True),  # a cached graph is not lowered, so not counted
            warnings.catch_warnings(),
        ):
            warnings.filterwarnings("ignore", "dynamo_pgo force disabled")
            for name, (block, inputs) in blocks.items():
                kernels.clear()
                torch._dynamo.reset()
                torch.compile(block, fullgraph=True)(*inputs)
                if not kernels:
                    raise RuntimeError(f"inductor counted no kernel of the {name} block (has its metrics hook moved?)")
                by_kernel = [[ops, round(b / one_pass, 2)] for ops, b in kernels if b >= one_pass / 100]
                results[name] = {"passes": round(sum(b for _, b in kernels) / one_pass, 2), "by_kernel": by_kernel}
    finally:
        torch._dynamo.reset()
    return results


def _fused_ops_of(node) -> str:
    names = set()
    for part in node.get_nodes():
        for origin in getattr(part.node, "origins", None) or ():
            target = getattr(origin, "target", None)
            names.add(getattr(target, "__name__", str(target)).split(".")[0])
    return "+".join(sorted(names - {"convert_element_type", "reshape", "view", "permute", "unsqueeze", "split"}))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    forms = parser.add_mutually_exclusive_group()
    forms.add_argument("--fused", action="store_true", help="count fused_ops' forms as CUDA runs them")
    forms.add_argument("--compiled", action="store_true", help="the blocks compiled by inductor (its CPU backend)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.compiled:
        results = compiled_traffic(batch=args.batch, dtype=DTYPES[args.dtype])
    else:
        results = block_traffic(batch=args.batch, dtype=DTYPES[args.dtype], fused=args.fused)
    for name, row in results.items():
        parts = row["by_kernel"] if args.compiled else row["by_op"].items()
        print(f"{name} block: {row['passes']} passes ({', '.join(f'{op} {passes}' for op, passes in parts)})")
    if args.out:
        payload = {"benchmark": "mmdit eager traffic", "batch": args.batch, "fused": args.fused, "results": results}
        write_json({**payload, "compiled": args.compiled}, args.out)
    return results


if __name__ == "__main__":
    main()
