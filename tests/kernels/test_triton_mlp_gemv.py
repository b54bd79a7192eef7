"""A decode batch's dense MLP in two GEMVs (kernels/triton_mlp_gemv.py: gate-up with SiLU·up, down with the
addend) against their references (kernels/mlp_gemv.py) and a float64 oracle, float and FP8 (W8A8) weights: the
epilogues the unfused kernels' bits (one-hot weights), batch invariance, the GPU's tile walks, the unfused form past
FUSED_MAX_TOKENS and where an FP8 stack's up rows start off a scale row, bad arguments."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.fp8 import FP8_DTYPE, block_quantize, block_scale_shape
from moelink.kernels.mlp_gemv import reference_gate_up_silu_mul, reference_linear_add
from moelink.kernels.norm import FUSED_MAX_TOKENS
from moelink.kernels.triton_mlp_gemv import triton_gate_up_silu_mul, triton_linear_add
from moelink.kernels.triton_silu_mul import triton_silu_mul

# (T, K, I, U, block): one token, the up rows right after the gate rows (a float stack); three tokens, an FP8
# stack whose up rows start on the next 32-row block (I = 40: 8 zero rows between); the largest fused batch, 16 x
# 16 blocks; a ragged K.
GATE_UP_CASES = [(1, 64, 48, 48, (16, 32)), (3, 96, 40, 64, (32, 32)), (FUSED_MAX_TOKENS, 80, 32, 32, (16, 16)),
                 (2, 200, 24, 32, (16, 128))]


def _stack(gen, K, inter, up_row, dtype, block=None):
    """A gate-up weight of up_row + I rows (the rows between gate and up zero, as an FP8 stack holds them), float
    or (block) e4m3 with its scales."""
    w = torch.randn(up_row + inter, K, generator=gen) / K ** 0.5
    w[inter:up_row] = 0
    if block is None:
        return w.to(dtype), None
    return block_quantize(w, block)


def _dev(kdev, *ts):
    return [t.to(kdev) if isinstance(t, torch.Tensor) else t for t in ts]


@pytest.mark.parametrize("fp8", [False, True], ids=["float", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("T,K,I,U,block", GATE_UP_CASES)
def test_gate_up_silu_mul_matches_reference_and_oracle(T, K, I, U, block, dtype, fp8, gen, kdev, check):
    x = torch.randn(T, K, generator=gen).to(dtype)
    w, ws = _stack(gen, K, I, U, dtype, block if fp8 else None)
    kw = dict(w_scale_inv=ws, block=block) if fp8 else {}
    got = triton_gate_up_silu_mul(*_dev(kdev, x, w), I, U, **{k: _dev(kdev, v)[0] for k, v in kw.items()})
    assert got.shape == (T, I) and got.dtype == dtype
    check(got, reference_gate_up_silu_mul(x, w, I, U, **kw).double(), dtype, f"vs the reference {T, K, I, U}")
    if not fp8:  # the float64 oracle (FP8's is its own W8A8 reference)
        check(got, reference_gate_up_silu_mul(x.double(), w.double(), I, U), dtype, "vs float64")


@pytest.mark.parametrize("fp8", [False, True], ids=["float", "fp8"])
@pytest.mark.parametrize("add", [False, True], ids=["alone", "with-addend"])
@pytest.mark.parametrize("T,K,N", [(1, 64, 48), (3, 200, 72), (FUSED_MAX_TOKENS, 96, 40)])
def test_linear_add_matches_reference(T, K, N, add, fp8, gen, kdev, check):
    dtype, block = torch.bfloat16, (16, 64)
    x = torch.randn(T, K, generator=gen).to(dtype)
    w = torch.randn(N, K, generator=gen) / K ** 0.5
    w, ws = block_quantize(w, block) if fp8 else (w.to(dtype), None)
    a = torch.randn(T, N, generator=gen).to(dtype) if add else None
    kw = dict(w_scale_inv=ws, block=block) if fp8 else {}
    got = triton_linear_add(*_dev(kdev, x, w, a), **{k: _dev(kdev, v)[0] for k, v in kw.items()})
    check(got, reference_linear_add(x, w, a, **kw).double(), dtype, f"linear_add {T, K, N} add={add} fp8={fp8}")


def test_epilogues_are_the_unfused_kernels_bits(gen, kdev, seed):
    """One-hot weights (each GEMV exact in any order): SiLU·up is triton_silu_mul's bits on the rounded gate and up,
    the add torch's; FP8 (unit scales) too, after the row's W8A8 rounding."""
    T, K, I = 3, 96, 32
    x = (3 * torch.randn(T, K, generator=gen)).to(torch.bfloat16)
    w = torch.zeros(2 * I, K)
    w[torch.arange(2 * I), torch.randperm(K, generator=gen)[:2 * I]] = 1.0
    x_, w_ = _dev(kdev, x, w.to(torch.bfloat16))
    y = x_ @ w_.t()
    want = triton_silu_mul(y[:, :I], y[:, I:])
    assert torch.equal(triton_gate_up_silu_mul(x_, w_, I, I), want), f"seed={seed}"
    a = torch.randn(T, 2 * I, generator=gen).to(torch.bfloat16).to(kdev)
    assert torch.equal(triton_linear_add(x_, w_, a), y + a), f"seed={seed}"
    block = (32, 32)
    wq, ws = w.to(FP8_DTYPE), torch.ones(block_scale_shape(2 * I, K, block))
    got = triton_gate_up_silu_mul(x_, wq.to(kdev), I, I, w_scale_inv=ws.to(kdev), block=block)
    yq = reference_linear_add(x, wq, w_scale_inv=ws, block=block).to(kdev)
    assert torch.equal(got, triton_silu_mul(yq[:, :I], yq[:, I:])), f"fp8 (seed={seed})"


def test_batch_invariant(gen, kdev, seed):
    T, K, I = FUSED_MAX_TOKENS, 128, 40
    x = torch.randn(T, K, generator=gen).to(torch.bfloat16)
    w, ws = _stack(gen, K, I, 64, torch.bfloat16, (32, 64))
    x, w, ws = _dev(kdev, x, w, ws)
    all_ = triton_gate_up_silu_mul(x, w, I, 64, w_scale_inv=ws, block=(32, 64))
    for t in (0, T - 1):
        one = triton_gate_up_silu_mul(x[t:t + 1], w, I, 64, w_scale_inv=ws, block=(32, 64))
        assert torch.equal(one[0], all_[t]), f"token {t} (seed={seed})"


@pytest.mark.parametrize("shape", [(8, 32, 3, False), (16, 128, 2, True)], ids=["loop-ragged", "straight-line"])
def test_gpu_tile_walks(shape, gen, kdev, check, monkeypatch):
    from moelink.kernels import triton_mlp_gemv

    bn, bk, tiles, one_step = shape
    monkeypatch.setattr(triton_mlp_gemv, "launch_shape", lambda *a, **k: (bn, bk, tiles, one_step, 1))
    K = bk * tiles - 5 if one_step else 200
    x = torch.randn(2, K, generator=gen)
    for block in (None, (64, 32)):
        w, ws = _stack(gen, K, 48, 64, torch.float32, block)
        kw = dict(w_scale_inv=ws, block=block) if block else {}
        got = triton_gate_up_silu_mul(*_dev(kdev, x, w), 48, 64, **{k: _dev(kdev, v)[0] for k, v in kw.items()})
        check(got, reference_gate_up_silu_mul(x, w, 48, 64, **kw).double(), torch.float32, f"{shape} {block}")


@pytest.mark.parametrize("T,up_row,block", [(FUSED_MAX_TOKENS + 3, 48, (16, 32)), (2, 40, (32, 32)),
                                           (2, 48, (12, 32))],
                         ids=["past-the-fused-batch", "up-rows-off-a-scale-row", "scale-rows-no-program-fits"])
def test_unfused_forms_keep_the_contract(T, up_row, block, gen, kdev, check):
    K, I = 64, 40
    x = torch.randn(T, K, generator=gen)
    w, ws = _stack(gen, K, I, up_row, torch.float32, block)
    got = triton_gate_up_silu_mul(*_dev(kdev, x, w), I, up_row, w_scale_inv=ws.to(kdev), block=block)
    check(got, reference_gate_up_silu_mul(x, w, I, up_row, w_scale_inv=ws, block=block).double(), torch.float32,
          f"T={T} up_row={up_row} block={block}")


def test_bad_arguments(gen, kdev):
    x = torch.randn(2, 32, generator=gen).to(torch.bfloat16).to(kdev)
    w = torch.randn(64, 32, generator=gen).to(torch.bfloat16).to(kdev)
    with pytest.raises(ValueError, match="up_row"):
        triton_gate_up_silu_mul(x, w, 40, 32)
    with pytest.raises(ValueError, match="w_FK"):
        triton_gate_up_silu_mul(x, w[:, :-1], 32, 32)
    with pytest.raises(ValueError, match="addend_TN"):
        triton_linear_add(x, w, torch.zeros(2, 63, dtype=torch.bfloat16, device=kdev))
    with pytest.raises(ValueError, match="w_NK_scale_inv"):
        triton_linear_add(x, w.to(FP8_DTYPE), w_scale_inv=torch.ones(1, 1, device=kdev), block=(16, 16))
