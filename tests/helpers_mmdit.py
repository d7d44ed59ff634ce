"""A double and a single MMDiT block with random weights and inputs, for the tests that compare the eager forms
with the plain ones (tests/test_mmdit.py, and tests/fused_ops_probe.py in its subprocess)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from opensora_lib.mmdit_layers import DoubleStreamBlock, RotaryTables, SingleStreamBlock, rotary_tables


@dataclass
class BlockCase:
    double: DoubleStreamBlock
    single: SingleStreamBlock
    img: Tensor
    txt: Tensor
    vec: Tensor
    pe: RotaryTables

    def run(self) -> tuple[Tensor, Tensor, Tensor]:
        """The double block's img and txt outputs, then the single block's output on [txt, img]."""
        return (
            *self.double(self.img, self.txt, self.vec, self.pe),
            self.single(torch.cat((self.txt, self.img), 1), self.vec, self.pe),
        )


def random_blocks(dtype: torch.dtype, head_dim: int = 64, fused_qkv: bool = False) -> BlockCase:
    """2 heads, batch 2, 5 text + 9 image tokens, weights ~ N(0, 0.2), 3-axis RoPE tables shared by the batch."""
    torch.manual_seed(0)
    heads, batch, txt_len, img_len = 2, 2, 5, 9
    hidden = heads * head_dim
    double = DoubleStreamBlock(hidden, heads, 4.0, qkv_bias=True, fused_qkv=fused_qkv, dtype=dtype)
    single = SingleStreamBlock(hidden, heads, 4.0, fused_qkv=fused_qkv, dtype=dtype)
    for param in [*double.parameters(), *single.parameters()]:
        nn.init.normal_(param, std=0.2)
    img, txt = torch.randn(batch, img_len, hidden, dtype=dtype), torch.randn(batch, txt_len, hidden, dtype=dtype)
    vec = torch.randn(batch, hidden, dtype=dtype)
    third = head_dim // 4  # RoPE axes (t, h, w): half the head, a quarter each (2.0 splits 128 as 16 / 56 / 56)
    ids = torch.randint(0, 9, (1, txt_len + img_len, 3)).float()
    pe = rotary_tables(ids, [head_dim - 2 * third, third, third], 10000)
    return BlockCase(double, single, img, txt, vec, pe)
