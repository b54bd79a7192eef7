"""A decode batch's linear + residual add + RMSNorm in one launch (kernels/triton_linear_norm.py) against its
reference (kernels/norm.py reference_linear_add_rms_norm), a float64 oracle, the unfused Triton norm it replaces,
and its own properties: counters left zero, batch invariance, the unfused form past FUSED_MAX_TOKENS."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.norm import FUSED_MAX_TOKENS, reference_linear_add_rms_norm
from moelink.kernels.triton_linear_norm import token_counters, triton_linear_add_rms_norm
from moelink.kernels.triton_norm import triton_add_rms_norm

# (T, K, D, bias): one token, a bias (gpt-oss's o_proj), the largest fused batch, widths no tile divides.
CASES = [(1, 64, 48, False), (3, 96, 80, True), (FUSED_MAX_TOKENS, 40, 72, False), (2, 72, 136, True)]


def _inputs(gen, T, K, D, bias, dtype):
    return (torch.randn(T, K, generator=gen).to(dtype), (torch.randn(D, K, generator=gen) / K ** 0.5).to(dtype),
            (0.1 * torch.randn(D, generator=gen)).to(dtype) if bias else None,
            torch.randn(T, D, generator=gen).to(dtype), (1 + 0.1 * torch.randn(D, generator=gen)).to(dtype))


def _dev(ts, kdev):
    return [t.to(kdev) if isinstance(t, torch.Tensor) else t for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("T,K,D,bias", CASES)
def test_linear_norm_matches_reference_and_oracle(T, K, D, bias, dtype, gen, kdev, check, seed):
    args = _inputs(gen, T, K, D, bias, dtype)
    counters = token_counters(kdev)
    h, s = triton_linear_add_rms_norm(*_dev(args, kdev), 1e-6, counters_T=counters)
    assert not counters.any(), f"the launch must leave its counters zero (seed={seed})"
    want_h, want_s = reference_linear_add_rms_norm(*args, 1e-6)
    check(h, want_h.double(), dtype, "normed vs the reference")
    check(s, want_s.double(), dtype, "sum vs the reference")
    h64, s64 = reference_linear_add_rms_norm(*[a.double() if a is not None else None for a in args], 1e-6)
    check(h, h64, dtype, f"normed {T, K, D, bias}")
    check(s, s64, dtype, "sum")


def test_add_and_norm_are_the_unfused_kernels_bit_for_bit(gen, kdev, seed):
    """With a one-hot weight (its GEMV exact in any order) the sum and the norm are triton_add_rms_norm's bits."""
    T, K, D = 3, 64, 48
    x, _, _, r, nw = _inputs(gen, T, K, D, False, torch.bfloat16)
    w = torch.zeros(D, K, dtype=torch.bfloat16)
    w[torch.arange(D), torch.randperm(K, generator=gen)[:D]] = 1.0
    h, s = triton_linear_add_rms_norm(*_dev((x, w, None, r, nw), kdev), 1e-6)
    want_h, want_s = triton_add_rms_norm((x @ w.t()).to(kdev), r.to(kdev), nw.to(kdev), 1e-6)
    assert torch.equal(s.cpu(), want_s.cpu()) and torch.equal(h.cpu(), want_h.cpu()), f"seed={seed}"


def test_linear_norm_is_batch_invariant_and_replays(gen, kdev, seed):
    T, K, D = FUSED_MAX_TOKENS, 96, 80
    args = _dev(_inputs(gen, T, K, D, True, torch.bfloat16), kdev)
    counters = token_counters(kdev)
    h_all, s_all = triton_linear_add_rms_norm(*args, 1e-6, counters_T=counters)
    h_again, _ = triton_linear_add_rms_norm(*args, 1e-6, counters_T=counters)
    assert torch.equal(h_all, h_again)
    x, w, b, r, nw = args
    for t in (0, T - 1):
        h_one, s_one = triton_linear_add_rms_norm(x[t:t + 1], w, b, r[t:t + 1], nw, 1e-6, counters_T=counters)
        assert torch.equal(h_one[0], h_all[t]) and torch.equal(s_one[0], s_all[t]), f"token {t} (seed={seed})"


def test_past_the_fused_batch_the_op_runs_unfused(gen, kdev, check):
    args = _inputs(gen, FUSED_MAX_TOKENS + 5, 48, 64, True, torch.float32)
    h, s = triton_linear_add_rms_norm(*_dev(args, kdev), 1e-6)
    want_h, want_s = reference_linear_add_rms_norm(*args, 1e-6)
    check(h, want_h.double(), torch.float32, "unfused normed")
    check(s, want_s.double(), torch.float32, "unfused sum")


def test_linear_norm_rejects_bad_inputs(gen, kdev):
    x, w, b, r, nw = _dev(_inputs(gen, 2, 32, 48, True, torch.bfloat16), kdev)
    with pytest.raises(ValueError, match="w_DK"):
        triton_linear_add_rms_norm(x, w[:, :-1], b, r, nw, 1e-6)
    with pytest.raises(ValueError, match="residual_TD"):
        triton_linear_add_rms_norm(x, w, b, r.float(), nw, 1e-6)
    with pytest.raises(ValueError, match="counters_T"):
        triton_linear_add_rms_norm(x, w, b, r, nw, 1e-6, counters_T=torch.zeros(3, dtype=torch.int32))


@pytest.mark.parametrize("shape", [(8, 64, 3, False), (16, 32, 2, True), (8, 16, 4, False)],
                         ids=["loop-of-3-tiles", "straight-line", "loop-ragged"])
def test_gemv_walks_of_the_gpu_shapes(shape, gen, kdev, check, monkeypatch, seed):
    """The GPU's launch shapes in the interpreter (which otherwise runs one 32-wide tile a step): steps of several
    tiles with a ragged last step, and one straight-line step (ONE_STEP), over a ragged K, give the reference."""
    from moelink.kernels import triton_linear_norm

    bn, bk, tiles, one_step = shape
    monkeypatch.setattr(triton_linear_norm, "launch_shape", lambda *a, **k: (bn, bk, tiles, one_step, 1))
    K = bk * tiles - 5 if one_step else 200  # straight line: the row in one step; loops: 200 in steps of bk x tiles
    args = _inputs(gen, 3, K, 40, True, torch.float32)
    h, s = triton_linear_add_rms_norm(*_dev(args, kdev), 1e-6)
    want_h, want_s = reference_linear_add_rms_norm(*args, 1e-6)
    check(h, want_h.double(), torch.float32, f"normed, {shape}")
    check(s, want_s.double(), torch.float32, f"sum, {shape}")


def test_launch_shape_is_the_batch_s_alone_and_spill_bounded(monkeypatch):
    """The GPU launch shape depends on the weight alone (never on T: a token's summation order, hence its bits, is
    the same at every batch size), keeps a [BN, BK] tile of 4,096 products, and walks a row in straight-line
    steps of at most 32 kB a program (64 kB spilled: compile_tiny --cases fused)."""
    from moelink.kernels import triton_gemv

    monkeypatch.setattr(triton_gemv, "num_sms", lambda device: 132)
    assert triton_gemv.launch_shape(5120, 2048, 64, False, "cuda") == (16, 256, 4, False, 4)  # Qwen3 qkv: loop
    assert triton_gemv.launch_shape(2048, 4096, 64, False, "cuda") == (8, 512, 4, False, 4)  # Qwen3 o_proj
    assert triton_gemv.launch_shape(128, 2048, 8, False, "cuda", narrowest=1) == (1, 2048, 1, True, 4)  # a router
    assert triton_gemv.launch_shape(256, 7168, 8, False, "cuda", narrowest=1, itemsize=4) == (1, 4096, 2, True, 4)
    for args in ((5120, 2048, 64), (2048, 4096, 64), (12288, 4096, 32)):
        bn, bk, tiles, one_step, _ = triton_gemv.launch_shape(*args, False, "cuda")
        assert bn * bk == 4096 and bn * bk * tiles * 2 <= 32768
