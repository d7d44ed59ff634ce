"""benchmarks/eager_traffic.py: the traced element-wise traffic of the eager 2.0 blocks (a CPU measurement)."""

import json

import pytest
import torch

from benchmarks import eager_traffic
from opensora_lib import mmdit_layers


def test_eager_blocks_stay_within_their_traced_traffic(tmp_path):
    """The buffered forms (RoPE rounded straight into one joint q / k, GELU into linear2's input) keep the double
    block at ~67 and the single block at ~52 passes over the joint activation at batch 3."""
    out = tmp_path / "traffic.json"
    results = eager_traffic.main(["--batch", "3", "--out", str(out)])
    assert json.loads(out.read_text())["results"] == results
    double, single = results["double"], results["single"]
    assert 66 < double["passes"] < 68 and 51 < single["passes"] < 53
    assert single["by_op"]["gelu_"] == 8.0 and "cat" not in single["by_op"]  # in place: reads 4x, writes 4x; no concat
    assert double["by_op"]["cat"] == 2.0  # only v is concatenated


def test_plain_forms_cost_more(monkeypatch):
    """The forms torch.compile and autograd get (float32 RoPE halves concatenated and cast, q / k concatenated
    before RoPE, cat(attn, gelu)): ~87 and ~76 passes, which inductor then fuses."""
    monkeypatch.setattr(mmdit_layers, "eager_out_allowed", lambda *tensors: False)
    results = eager_traffic.block_traffic(batch=3)
    assert 86 < results["double"]["passes"] < 88 and 75 < results["single"]["passes"] < 77
    assert results["double"]["by_op"]["cat"] == 14.0 and results["single"]["by_op"]["cat"] == 18.0


def test_fused_forms_move_less(tmp_path):
    """fused_ops' forms counted as CUDA runs them (one kernel each: RoPE with the gain, a + b * c, GELU over the
    whole [v | mlp] buffer): ~36.5 and ~27.5 passes, no separate product, sum or difference over the activation."""
    out = tmp_path / "traffic.json"
    results = eager_traffic.main(["--batch", "3", "--fused", "--out", str(out)])
    assert json.loads(out.read_text())["fused"] is True
    double, single = results["double"], results["single"]
    assert 36 < double["passes"] < 37 and 27 < single["passes"] < 28
    for row in (double, single):
        assert not {"mul", "mul_", "sub"} & row["by_op"].keys()
        assert 4.0 < row["by_op"]["rotate_into"] < 4.5  # q and k read and written once (+ the float32 tables)
    assert double["by_op"]["add_product_into"] == 10.01  # 4 modulations + 4 residuals (img and txt), 3 reads + 1 write
    # what is left of "add": the projections' bias (F.linear over the sliced joint attention output, not contiguous
    # across the batch, runs mm + add; so does the official code)
    assert double["by_op"]["add"] == 2.0
    assert single["by_op"]["gelu_tail_"] == 10.0  # the whole [v | mlp] buffer, 5x wide, read and written


def test_compiled_blocks_counted_from_inductors_kernels(tmp_path):
    """--compiled: the blocks through inductor (the CPU backend here), its kernels' bytes: fewer passes than the
    eager torch forms (~67 / ~52), and the CPU-only layout copies for the CPU attention kernel are named as such."""
    out = tmp_path / "traffic.json"
    results = eager_traffic.main(["--batch", "3", "--compiled", "--out", str(out)])
    assert json.loads(out.read_text())["compiled"] is True
    double, single = results["double"], results["single"]
    assert 30 < double["passes"] < 60 and 20 < single["passes"] < 45
    assert double["passes"] == pytest.approx(sum(passes for _, passes in double["by_kernel"]), abs=0.1)
    for row in (double, single):
        kernels = [ops for ops, _ in row["by_kernel"]]
        assert not {"mm", "addmm"} & set("+".join(kernels).split("+"))  # extern kernels are not counted
        assert sum("_scaled_dot_product_flash_attention_for_cpu" in ops for ops in kernels) == 2  # q and k copies
        assert any("tanh" in ops for ops in kernels)  # the GELU, fused with its neighbours
    # nothing global is left changed: a later inductor compile in this process works
    compiled = torch.compile(lambda x: (x * 3 + 1).cos())
    assert torch.equal(compiled(torch.ones(2)), torch.full((2,), 4.0).cos())
