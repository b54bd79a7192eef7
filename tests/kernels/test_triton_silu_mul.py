"""SiLU(gate) · up in one launch (kernels/triton_silu_mul.py) against its reference and a float64 oracle."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.silu_mul import reference_silu_mul
from moelink.kernels.triton_silu_mul import triton_silu_mul


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("T,I", [(1, 48), (3, 1408), (5, 100), (0, 16)])
def test_silu_mul_matches_reference(T, I, dtype, gen, kdev, check, seed):
    gu = (torch.randn(T, 2 * I, generator=gen) * 3).to(dtype)  # gate_up_proj's output: halves as strided views
    gate, up = gu[:, :I], gu[:, I:]
    got = triton_silu_mul(gate.to(kdev), up.to(kdev))
    assert got.shape == (T, I) and got.dtype == dtype
    if T == 0:
        return
    want = reference_silu_mul(gate, up)
    # Two roundings as torch: in bf16 / fp16 equal but where SiLU's fp32 value (the exp's last ulp: numpy's here,
    # torch's own vector exp there) sits at a rounding boundary, so the rounded SiLU moves by one of its ulps and
    # the product by |up| times that (up to two of its own ulps once rounded: seen at fp16); in fp32 those ulps
    # show (a few, never more).
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    ulp = eps * want.float().abs().clamp_min(tiny)
    silu_ulp = eps * torch.nn.functional.silu(gate.float()).abs().clamp_min(tiny)
    most = 4.0 if dtype == torch.float32 else 1.0
    bound = most * ulp + (0 if dtype == torch.float32 else up.float().abs() * silu_ulp)
    assert bool(((got.cpu().float() - want.float()).abs() <= bound).all()), f"seed={seed}"
    if dtype != torch.float32:
        # Rare: at most 2 % of the elements, and at least one allowed (one in a 48-element row is 2.08 %: seed
        # 1213390507 failed a plain 2 % bound on a 1 x 48 case).
        differ = int((got.cpu() != want).sum())
        assert differ <= max(1, 0.02 * want.numel()), f"more than rare last-ulp differences (seed={seed})"
    check(got, reference_silu_mul(gate.double(), up.double()), dtype, "silu_mul")


def test_silu_mul_rejects_mismatched_halves(kdev):
    with pytest.raises(ValueError, match="must both be"):
        triton_silu_mul(torch.zeros(2, 8, device=kdev), torch.zeros(2, 4, device=kdev))
