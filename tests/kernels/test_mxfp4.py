"""The MXFP4 reference (kernels/mxfp4.py) against transformers' own dequantization and gpt-oss experts.

- dequantize: bit for bit equal to transformers' `convert_moe_packed_tensors` (after its transpose to
  [E, K, N]) for every dtype, at every E8M0 exponent and every byte value;
- quantize: each value lands on the nearest e2m1 value of its group (ties to the even code), the group's scale
  is the smallest power of two that holds its largest magnitude, and quantize∘dequantize is the identity on
  dequantized values;
- reference_fused_moe_mxfp4 (after the load-time de-interleave) equals transformers' GptOssExperts in float64
  with the weights transformers dequantizes from the same published tensors.
"""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.moe import MoEActivation, reference_fused_moe
from moelink.kernels.mxfp4 import (FP4_VALUES, deinterleave_gate_up, mxfp4_dequantize, mxfp4_quantize,
                                   reference_fused_moe_mxfp4)

_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


@pytest.mark.parametrize("dtype", list(_BITS), ids=lambda d: str(d).split(".")[-1])
def test_dequantize_is_transformers_bit_for_bit(dtype, gen):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    E, N, S = 2, 255, 3
    blocks = torch.randint(0, 256, (E, N, S, 16), dtype=torch.uint8, generator=gen)
    blocks[0, :, 0, :] = torch.arange(256, dtype=torch.uint8).reshape(16, 16).repeat(16, 1)[:N]  # every byte value
    scales = torch.randint(0, 255, (E, N, S), dtype=torch.uint8, generator=gen)
    scales[0, :, 1] = torch.arange(255, dtype=torch.uint8)  # every finite E8M0 exponent, 2**-127 .. 2**127
    got = mxfp4_dequantize(blocks, scales, dtype)
    want = convert_moe_packed_tensors(blocks, scales, dtype=dtype).transpose(1, 2)  # transformers: [E, K, N]
    assert got.shape == (E, N, 32 * S) and got.dtype == dtype
    assert torch.equal(got.view(_BITS[dtype]), want.contiguous().view(_BITS[dtype]))


def test_dequantize_layout_worked_example():
    """One group: byte j holds element 2j (low nibble) and 2j+1 (high nibble); scale 128 doubles the values."""
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x9 << 4 | 0x7  # element 0: code 7 = 6.0, element 1: code 9 = -0.5
    blocks[0, 0, 15] = 0x0 << 4 | 0x3  # element 30: code 3 = 1.5, element 31: +0
    w = mxfp4_dequantize(blocks, torch.tensor([[128]], dtype=torch.uint8))
    assert w.shape == (1, 32)
    assert w[0, :2].tolist() == [12.0, -1.0] and w[0, 30:].tolist() == [3.0, 0.0] and not w[0, 2:30].any()


def test_quantize_rounds_to_nearest_with_smallest_scale(gen):
    w = torch.randn(3, 40, 64, generator=gen) * torch.rand(3, 40, 1, generator=gen) * 10
    w[0, 0, :32] = 0  # an all-zero group
    w[1, 1, :32] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4) * torch.tensor([1.0, -1.0]).repeat(16)
    blocks, scales = mxfp4_quantize(w)
    assert blocks.shape == (3, 40, 2, 16) and scales.shape == (3, 40, 2) and blocks.dtype == scales.dtype == torch.uint8
    got = mxfp4_dequantize(blocks, scales, torch.float64)
    scale = torch.ldexp(torch.ones(()), scales.double() - 127).repeat_interleave(32, dim=-1)
    grid = torch.tensor(FP4_VALUES[:8], dtype=torch.float64)
    dist = ((w.double() / scale).abs()[..., None] - grid).abs()
    best = dist.min(-1).values * scale
    assert torch.equal((got - w.double()).abs(), best), "not the nearest e2m1 value of the group's grid"
    amax = w.double().abs().reshape(3, 40, 2, 32).amax(-1)
    ratio = amax / torch.ldexp(torch.ones(()), scales.double() - 127)
    nonzero = amax > 0
    assert ((ratio[nonzero] > 3) & (ratio[nonzero] <= 6)).all(), "scale is not the smallest power of two holding amax"
    assert scales[0, 0, 0] == 0 and not got[0, 0, :32].any()
    # ties go to the even code: 0.25→0, 0.75→1, 1.25→1, 1.75→2, 2.5→2, 3.5→4, 5→4 (scale 1: amax 6)
    assert got[1, 1, :8].tolist() == [0.0, -1.0, 1.0, -2.0, 2.0, -4.0, 4.0, -6.0]


def test_quantize_dequantize_is_identity_on_the_grid(gen):
    blocks = torch.randint(0, 256, (4, 8, 3, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(100, 150, (4, 8, 3), dtype=torch.uint8, generator=gen)
    w = mxfp4_dequantize(blocks, scales, torch.float64)
    assert torch.equal(mxfp4_dequantize(*mxfp4_quantize(w), torch.float64), w)


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4_quantize(torch.zeros(4, 48))
    with pytest.raises(ValueError, match="NaN or inf"):
        mxfp4_quantize(torch.full((2, 32), float("inf")))
    with pytest.raises(ValueError, match="uint8"):
        mxfp4_dequantize(torch.zeros(2, 1, 16), torch.zeros(2, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="do not fit"):
        mxfp4_dequantize(torch.zeros(2, 1, 8, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.uint8))


def test_deinterleave_gate_up():
    t = torch.arange(2 * 6 * 3).reshape(2, 6, 3)  # rows g0 u0 g1 u1 g2 u2
    d = deinterleave_gate_up(t)
    assert torch.equal(d[:, :3], t[:, 0::2]) and torch.equal(d[:, 3:], t[:, 1::2])
    with pytest.raises(ValueError, match="F = 2I"):
        deinterleave_gate_up(torch.zeros(2, 5))


def test_fused_moe_mxfp4_matches_transformers_gpt_oss_experts(gen):
    """The published tensors (interleaved gate_up rows) → transformers dequantizes them into GptOssExperts (float64);
    moelink de-interleaves the same blocks/scales/bias at load and runs reference_fused_moe_mxfp4."""
    from transformers import GptOssConfig
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    T, E, K, D, I = 11, 4, 2, 64, 96
    cfg = GptOssConfig(hidden_size=D, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
                       swiglu_limit=7.0)
    cfg._experts_implementation = "eager"
    gu_blocks, gu_scales = mxfp4_quantize(torch.randn(E, 2 * I, D, generator=gen) / 2)  # published: [E, F, D/32, 16]
    dn_blocks, dn_scales = mxfp4_quantize(torch.randn(E, D, I, generator=gen) / 3)
    gu_bias = torch.randn(E, 2 * I, generator=gen)
    dn_bias = torch.randn(E, D, generator=gen)
    experts = GptOssExperts(cfg).double()
    with torch.no_grad():
        experts.gate_up_proj.copy_(convert_moe_packed_tensors(gu_blocks, gu_scales, dtype=torch.float64))
        experts.down_proj.copy_(convert_moe_packed_tensors(dn_blocks, dn_scales, dtype=torch.float64))
        experts.gate_up_proj_bias.copy_(gu_bias)
        experts.down_proj_bias.copy_(dn_bias)
    x = torch.randn(T, D, generator=gen, dtype=torch.float64) * 3  # large enough that the clamp at 7 bites
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        want = experts(x, ids, weights)
    act = MoEActivation("swiglu_oai", alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
    got = reference_fused_moe_mxfp4(x, deinterleave_gate_up(gu_blocks), deinterleave_gate_up(gu_scales), dn_blocks,
                                    dn_scales, weights, ids, b13_EF=deinterleave_gate_up(gu_bias), b2_ED=dn_bias,
                                    activation=act)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the float reference on the dequantized weights is the same function
    w13 = mxfp4_dequantize(deinterleave_gate_up(gu_blocks), deinterleave_gate_up(gu_scales), torch.float64)
    same = reference_fused_moe(x, w13, mxfp4_dequantize(dn_blocks, dn_scales, torch.float64), weights, ids,
                               b13_EF=deinterleave_gate_up(gu_bias).double(), b2_ED=dn_bias.double(), activation=act)
    assert torch.equal(got, same)
