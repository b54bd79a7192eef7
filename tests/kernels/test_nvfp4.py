"""kernels/nvfp4.py: the published NVFP4 layout worked out by hand (nibble order, e4m3 block scales per 16 values,
the per-tensor weight_scale_2), the quantizer's round trip, and the fused-MoE reference's gate/up global scales."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.moe import reference_fused_moe
from moelink.kernels.nvfp4 import (GROUP, nvfp4_dequantize, nvfp4_quantize, reference_fused_moe_nvfp4)

F8 = torch.float8_e4m3fn


def test_layout_by_hand():
    """Byte 0x5F holds element 0 in its low nibble (0xF: -6) and element 1 in its high nibble (0x5: 3), as vLLM's
    break_fp4_bytes unpacks ModelOpt's weights; e4m3 0x38 is 1.0, 0x40 is 2.0, 0x01 is 2**-9; scale2 multiplies."""
    q = torch.zeros(2, 16, dtype=torch.uint8)  # [N=2, K=32]: two scale groups per row
    q[0, 0] = 0x5F
    q[0, 8] = 0x21  # element 16 (group 1): 0.5, element 17: 1.0
    q[1, 15] = 0x9A  # elements 30, 31: -1.0 (0xA), -0.5 (0x9)
    s = torch.tensor([[0x38, 0x40], [0x38, 0x01]], dtype=torch.uint8).view(F8)
    w = nvfp4_dequantize(q, s, torch.tensor(3.0), torch.float64)
    assert w.shape == (2, 32)
    assert w[0, :2].tolist() == [-18.0, 9.0]
    assert w[0, 16:18].tolist() == [3.0, 6.0]  # 2.0 * 3 * (0.5, 1)
    assert w[1, 30:].tolist() == [-1.0 * 2**-9 * 3, -0.5 * 2**-9 * 3]
    assert int((w != 0).sum()) == 6


def test_quantize_round_trip_and_shapes(gen):
    w = torch.randn(3, 8, 64, generator=gen) * torch.tensor([1.0, 1e-3, 50.0])[:, None, None]
    q, s, g = nvfp4_quantize(w)
    assert (q.shape, s.shape, g.shape) == ((3, 8, 32), (3, 8, 64 // GROUP), (3,))
    assert (q.dtype, s.dtype, g.dtype) == (torch.uint8, F8, torch.float32)
    d = nvfp4_dequantize(q, s, g, torch.float64)
    assert ((d - w.double()).norm() / w.norm()) < 0.15  # 4-bit values: ~10 % normwise
    assert torch.equal(nvfp4_dequantize(*nvfp4_quantize(d), dtype=torch.float64), d)  # representable: exact
    # the block scales use e4m3's range: the largest is 448 (amax / 6 / scale2)
    assert torch.allclose(s.float().amax(dim=(1, 2)), torch.full((3,), 448.0))


def test_quantize_refuses_bad_input():
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4_quantize(torch.zeros(4, 24))
    with pytest.raises(ValueError, match="NaN"):
        nvfp4_quantize(torch.full((2, 16), float("nan")))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        nvfp4_dequantize(torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(2, 1))
    assert torch.equal(nvfp4_dequantize(*nvfp4_quantize(torch.zeros(2, 16)), dtype=torch.float64), torch.zeros(2, 16))


def test_reference_scales_gate_and_up_by_their_own_global(gen):
    E, I, D, T, K = 3, 32, 48, 7, 2
    gate, up, down = (nvfp4_quantize(torch.randn(E, n, k, generator=gen)) for n, k in ((I, D), (I, D), (D, I)))
    w13q, w13s = torch.cat((gate[0], up[0]), 1), torch.cat((gate[1], up[1]), 1)
    g13 = torch.stack((gate[2], up[2]), 1)
    x, ids, wts = torch.randn(T, D, generator=gen).double(), torch.randint(0, E, (T, K), generator=gen), torch.rand(T, K)
    w13 = torch.cat((nvfp4_dequantize(gate[0], gate[1], gate[2], torch.float64),
                     nvfp4_dequantize(up[0], up[1], up[2], torch.float64)), 1)
    w2 = nvfp4_dequantize(down[0], down[1], down[2], torch.float64)
    want = reference_fused_moe(x, w13, w2, wts.double(), ids)
    got = reference_fused_moe_nvfp4(x, w13q, w13s, g13, down[0], down[1], down[2], wts.double(), ids)
    assert torch.equal(got, want)
