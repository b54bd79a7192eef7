"""DeepSeek-V4's grouped output projection wo_a held FP8 (engine/models/deepseek_v4/weights.grouped_fp8_linear): each group
of heads through the FP8 GEMM (the Triton kernel, in the interpreter on CPU, and the reference), against float64.

Oracle: group g's activations rounded as the W8A8 GEMM rounds them (fake_quant_activation: per token per Bk of the
group's d channels) times its rows of the dequantized weight, in float64. Cases: O = 8 rows a group in blocks of 16
(the tiny test models: a file block row covers two groups, so the scales are held in rows of 8), O = 32 (whole
blocks, as the published O = 1024 in blocks of 128) over 3 groups, and a block wider along K than a group's ragged
d = 48.
"""
from __future__ import annotations

import pytest
import torch

from moelink.engine.models.deepseek_v4.reader import DSV4Quantization
from moelink.engine.models.deepseek_v4.weights import dsv4_linear_method, grouped_fp8_linear
from moelink.engine.models.linear import Linear
from moelink.kernels.fp8 import block_dequantize, block_quantize, fake_quant_activation, reference_fp8_linear
from moelink.kernels.triton_fp8 import triton_fp8_linear


class _Kernels:
    def __init__(self, fp8_linear):
        self.fp8_linear = fp8_linear


@pytest.mark.parametrize("kernel", [reference_fp8_linear, triton_fp8_linear], ids=["reference", "triton"])
@pytest.mark.parametrize("groups,rows,block", [(2, 8, (16, 16)), (3, 32, (16, 16)), (2, 16, (16, 32))])
def test_grouped_fp8_linear_runs_each_group_through_the_fp8_gemm(kdev, kernel, groups, rows, block):
    d, T = 48, 5
    g = torch.Generator().manual_seed(rows)
    w_ND = torch.randn(groups * rows, d, generator=g, dtype=torch.float64)
    wq, s = block_quantize(w_ND, block)
    x_TGd = torch.randn(T, groups, d, generator=g, dtype=torch.float32)
    x_rounded = fake_quant_activation(x_TGd.reshape(-1, d), block[1]).double().view(T, groups, d)
    want = torch.einsum("tgd,god->tgo", x_rounded, block_dequantize(wq, s, block, torch.float64).view(groups, rows, d))
    method = dsv4_linear_method(DSV4Quantization(block), group_rows=rows)
    fine = method.block[0]
    assert fine == (8 if rows == 8 else block[0])
    lin = Linear(d, groups * rows, method, _Kernels(kernel), torch.float32, kdev)
    lin.weight.copy_(wq)
    # each file scale row over the finer rows it covers (what published_linear_plan's loader entry writes)
    lin.weight_scale_inv.copy_(s.repeat_interleave(block[0] // fine, 0)[: lin.weight_scale_inv.shape[0]])
    got = grouped_fp8_linear(lin, x_TGd.to(kdev), None)
    assert got.shape == (T, groups, rows) and got.dtype == torch.float32
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)
