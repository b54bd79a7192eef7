"""The decode GEMVs that carry a layer's small ops (kernels/triton_linear_norm.py: o_proj + add + norm;
kernels/triton_qkv_rope_kv.py: norm + q/k/v + rope/KV write) over FP8 block-scaled weights (e4m3 with
weight_scale_inv, W8A8 as kernels/fp8.reference_fp8_linear computes it): against the references given the same
scales, bit for bit through one-hot weights (the in-kernel activation quantization is triton_per_token_group_quant's),
the GPU's tile walks, the blocks no program's rows fit (unfused, same contract) and bad scales."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.attention_input import MAX_TOKENS, reference_norm_qkv_rope_kv
from moelink.kernels.fp8 import (FP8_DTYPE, block_dequantize, block_quantize, block_scale_shape, fp8_gemv_rows,
                                 reference_fp8_linear)
from moelink.kernels.norm import FUSED_MAX_TOKENS, reference_linear_add_rms_norm
from moelink.kernels.triton_linear_norm import token_counters, triton_linear_add_rms_norm
from moelink.kernels.triton_norm import triton_add_rms_norm
from moelink.kernels.triton_qkv_rope_kv import group_counters, triton_norm_qkv_rope_kv
from moelink.kernels.triton_rope_kv import triton_rope_write_kv
from tests.kernels.test_triton_qkv_rope_kv import _inputs as _qkv_inputs
from tests.kernels.test_triton_qkv_rope_kv import _run as _qkv_run

# (T, K, D, block): one token in 128 x 128 blocks over a ragged K (two groups, the last partial); three tokens in
# 128 x 32 blocks (a tile a group); the largest fused batch with Bn = 48 (programs of 16 rows, three a scale row)
# and Bk = 16 (tiles narrowed to a group); a D of ragged scale rows.
LINEAR_CASES = [(1, 200, 80, (128, 128)), (3, 96, 72, (128, 32)), (FUSED_MAX_TOKENS, 64, 96, (48, 16)),
                (2, 128, 136, (64, 64))]


def _fp8_weight(gen, n, k, block, spread=True):
    """An e4m3 weight and its block scales as the checkpoint's quantizer writes them (fp8.block_quantize), the
    blocks' magnitudes spread (each block its own scale)."""
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    if spread:
        w = w * torch.exp(torch.randn(*block_scale_shape(n, k, block), generator=gen)).repeat_interleave(
            block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    return block_quantize(w, block)


def _linear_inputs(gen, T, K, D, block, dtype, bias=True):
    wq, ws = _fp8_weight(gen, D, K, block)
    return (torch.randn(T, K, generator=gen).to(dtype), wq, (0.1 * torch.randn(D, generator=gen)).to(dtype) if bias
            else None, torch.randn(T, D, generator=gen).to(dtype), (1 + 0.1 * torch.randn(D, generator=gen)).to(dtype),
            ws)


def _linear(args, kdev, block, **kw):
    x, wq, b, r, nw, ws = (a.to(kdev) if isinstance(a, torch.Tensor) else a for a in args)
    return triton_linear_add_rms_norm(x, wq, b, r, nw, 1e-6, w_scale_inv=ws, block=block, **kw)


def _linear_ref(args, block):
    x, wq, b, r, nw, ws = args
    return reference_linear_add_rms_norm(x, wq, b, r, nw, 1e-6, w_scale_inv=ws, block=block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("T,K,D,block", LINEAR_CASES)
def test_fp8_linear_norm_matches_the_w8a8_reference(T, K, D, block, dtype, gen, kdev, check, seed):
    args = _linear_inputs(gen, T, K, D, block, dtype)
    counters = token_counters(kdev)
    h, s = _linear(args, kdev, block, counters_T=counters)
    assert not counters.any(), f"the launch must leave its counters zero (seed={seed})"
    want_h, want_s = _linear_ref(args, block)
    check(h, want_h.double(), dtype, f"normed {T, K, D, block}")
    check(s, want_s.double(), dtype, "sum")
    if dtype == torch.float32:
        # The activations are quantized (W8A8, not a dequantized weight times x): without that the sums differ by
        # the e4m3 rounding of x, some 1e-2, three orders past the tolerance above.
        x, wq, _, _, _, ws = args
        w8a8, w8a16 = reference_fp8_linear(x, wq, ws, block), x @ block_dequantize(wq, ws, block).t()
        gap = float((w8a8 - w8a16).norm() / w8a8.norm())
        assert gap > 1e-3, f"the case should tell W8A8 from W8A16 (gap {gap:.3g}, seed={seed})"


def test_fp8_linear_norm_quantizes_as_the_unfused_kernels_bit_for_bit(gen, kdev, seed):
    """A one-hot e4m3 weight with unit scales (its GEMV exact in any order): y is x's own W8A8 rounding, so the
    sum and the norm are the unfused path's bits (triton_per_token_group_quant, then the norm kernel)."""
    T, K, D, block = 3, 200, 48, (16, 128)
    x, _, _, r, nw, _ = _linear_inputs(gen, T, K, D, block, torch.bfloat16, bias=False)
    x[0, :128] *= 1e-3  # groups far apart in scale
    w = torch.zeros(D, K)
    w[torch.arange(D), torch.randperm(K, generator=gen)[:D]] = 1.0
    wq, ws = w.to(FP8_DTYPE), torch.ones(block_scale_shape(D, K, block))
    h, s = _linear((x, wq, None, r, nw, ws), kdev, block)
    y = reference_fp8_linear(x, wq, ws, block)
    want_h, want_s = triton_add_rms_norm(y.to(kdev), r.to(kdev), nw.to(kdev), 1e-6)
    assert torch.equal(s.cpu(), want_s.cpu()) and torch.equal(h.cpu(), want_h.cpu()), f"seed={seed}"


@pytest.mark.parametrize("shape", [(8, 32, 3, False, (128, 128)), (16, 128, 2, True, (64, 32)),
                                   (8, 64, 1, False, (128, 16))],
                         ids=["loop-of-3-tiles-a-group-spans", "straight-line-4-groups-a-tile", "loop-4-groups-a-tile"])
def test_fp8_gemv_walks_of_the_gpu_shapes(shape, gen, kdev, check, monkeypatch):
    """The GPU's launch shapes in the interpreter: steps of several tiles over a ragged K, a group spanning four
    tiles; one straight-line step whose tiles hold four groups each ([BN, 4, 32]: the scales loaded once a group);
    a tile a step of four groups."""
    from moelink.kernels import triton_linear_norm

    bn, bk, tiles, one_step, block = shape
    monkeypatch.setattr(triton_linear_norm, "launch_shape", lambda *a, **k: (bn, bk, tiles, one_step, 1))
    K = bk * tiles - 5 if one_step else 300
    args = _linear_inputs(gen, 2, K, 40, block, torch.float32)
    h, s = _linear(args, kdev, block)
    want_h, want_s = _linear_ref(args, block)
    check(h, want_h.double(), torch.float32, f"normed, {shape}")
    check(s, want_s.double(), torch.float32, f"sum, {shape}")


@pytest.mark.parametrize("T,block", [(FUSED_MAX_TOKENS + 3, (128, 128)), (2, (12, 32))],
                         ids=["past-the-fused-batch", "scale-rows-no-program-fits"])
def test_fp8_linear_norm_unfused_keeps_the_contract(T, block, gen, kdev, check):
    """A prefill batch, or a Bn no program of 8-64 rows divides (fp8_gemv_rows < 8): the FP8 GEMM and the norm
    apart, the same W8A8 result."""
    assert block[0] != 12 or fp8_gemv_rows(64, block) < 8
    args = _linear_inputs(gen, T, 96, 60, block, torch.float32)
    h, s = _linear(args, kdev, block)
    want_h, want_s = _linear_ref(args, block)
    check(h, want_h.double(), torch.float32, f"normed T={T} block={block}")
    check(s, want_s.double(), torch.float32, "sum")


def test_fp8_linear_norm_rejects_bad_scales(gen, kdev):
    x, wq, b, r, nw, ws = (a.to(kdev) for a in _linear_inputs(gen, 2, 64, 32, (16, 32), torch.bfloat16))
    with pytest.raises(ValueError, match="w_DK_scale_inv"):
        triton_linear_add_rms_norm(x, wq, b, r, nw, 1e-6, w_scale_inv=ws[:, :1], block=(16, 32))
    with pytest.raises(ValueError, match="w_DK.dtype"):
        triton_linear_add_rms_norm(x, wq.to(x.dtype), b, r, nw, 1e-6, w_scale_inv=ws, block=(16, 32))
    with pytest.raises(ValueError, match="weight_block_size"):
        triton_linear_add_rms_norm(x, wq, b, r, nw, 1e-6, w_scale_inv=ws, block=(16, 24))


# The attention input: (T, D, N, K, H, Hv, R, block). Qwen3's shape in small (qk norm, full rotary, 128 x 128 blocks
# over a ragged hidden: two groups, the last partial); MiMo-like narrower values with 32 x 32 blocks (a head's rows
# in two scale rows); the largest fused batch with Bn = 48 (programs of 16 rows).
QKV_CASES = [(1, 200, 4, 2, 16, 16, 16, (128, 128)), (3, 96, 3, 1, 32, 16, 32, (32, 32)),
             (MAX_TOKENS, 64, 2, 2, 16, 16, 8, (48, 16))]


def _qkv_fp8(gen, T, D, N, K, H, Hv, R, block, dtype):
    a = _qkv_inputs(gen, T, D, N, K, H, Hv, R, True, True, False, dtype)
    a["w"], ws = _fp8_weight(gen, a["w"].shape[0], D, block)
    return a, ws


def _qkv_ref(a, N, K, Hv, caches, ws, block):
    return reference_norm_qkv_rope_kv(a["x"], a["res"], a["norm"], 1e-6, a["w"], a["b"], N, K, Hv, a["pos"],
                                      a["table"], *caches, a["slots"], *a["qk"], 1e-6, w_scale_inv=ws, block=block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("T,D,N,K,H,Hv,R,block", QKV_CASES)
def test_fp8_fused_input_matches_the_w8a8_reference(T, D, N, K, H, Hv, R, block, dtype, gen, kdev, check, seed):
    a, ws = _qkv_fp8(gen, T, D, N, K, H, Hv, R, block, dtype)
    counters = group_counters(N, K, kdev)
    got_caches = [c.clone().to(kdev) for c in a["caches"]]
    got_q, got_sum = _qkv_run(triton_norm_qkv_rope_kv, a, N, K, Hv, kdev, got_caches, counters_G=counters,
                              w_scale_inv=ws.to(kdev), block=block)
    assert not counters.any(), f"the launch must leave its counters zero (seed={seed})"
    want_caches = [c.clone() for c in a["caches"]]
    want_q, want_sum = _qkv_ref(a, N, K, Hv, want_caches, ws, block)
    assert torch.equal(got_sum.cpu(), want_sum), f"x + residual (seed={seed})"
    check(got_q, want_q.double(), dtype, f"q {T, D, N, K, H, Hv, block}")
    for got, want in zip(got_caches, want_caches):
        check(got, want.double(), dtype, "cache")


def test_fp8_fused_input_quantizes_as_the_unfused_kernels_bit_for_bit(gen, kdev, seed):
    """One-hot e4m3 rows with unit scales: the normed row's W8A8 rounding, then the epilogue, are the unfused
    kernels' bits (the norm kernel, triton_per_token_group_quant inside triton_fp8_linear, rope_write_kv)."""
    T, D, N, K, H = 3, 160, 2, 1, 16
    block = (16, 64)
    a = _qkv_inputs(gen, T, D, N, K, H, H, H, True, True, False, torch.bfloat16)
    rows = N * H + 2 * K * H
    w = torch.zeros(rows, D)
    w[torch.arange(rows), torch.randperm(D, generator=gen)[:rows]] = 1.0
    a["w"], ws = w.to(FP8_DTYPE), torch.ones(block_scale_shape(rows, D, block))
    got_caches = [c.clone().to(kdev) for c in a["caches"]]
    got_q, _ = _qkv_run(triton_norm_qkv_rope_kv, a, N, K, H, kdev, got_caches, w_scale_inv=ws.to(kdev), block=block)
    h, _ = triton_add_rms_norm(a["x"].to(kdev), a["res"].to(kdev), a["norm"].to(kdev), 1e-6)
    qkv = reference_fp8_linear(h.cpu(), a["w"], ws, block).to(kdev)
    old_caches = [c.clone().to(kdev) for c in a["caches"]]
    want_q = triton_rope_write_kv(qkv[:, :N * H].view(T, N, H), qkv[:, N * H:(N + K) * H].view(T, K, H),
                                  qkv[:, (N + K) * H:].view(T, K, H), a["pos"].to(kdev), a["table"].to(kdev),
                                  *old_caches, a["slots"].to(kdev), *(q.to(kdev) for q in a["qk"]), 1e-6)
    assert torch.equal(got_q.cpu(), want_q.cpu()), f"q (seed={seed})"
    for g, o in zip(got_caches, old_caches):
        assert torch.equal(g.cpu(), o.cpu()), f"caches (seed={seed})"


def test_fp8_fused_input_is_batch_invariant(gen, kdev, seed):
    T, D, N, K, H = MAX_TOKENS, 96, 2, 1, 32
    block = (64, 32)
    a, ws = _qkv_fp8(gen, T, D, N, K, H, H, H, block, torch.bfloat16)
    a["slots"] = torch.arange(T) * 4
    kw = dict(w_scale_inv=ws.to(kdev), block=block)
    caches = [c.clone().to(kdev) for c in a["caches"]]
    q_all, _ = _qkv_run(triton_norm_qkv_rope_kv, a, N, K, H, kdev, caches, **kw)
    for t in (0, T - 1):
        one = {k: (v[t:t + 1] if k in ("x", "res", "pos", "slots") else v) for k, v in a.items()}
        alone = [c.clone().to(kdev) for c in a["caches"]]
        q_one, _ = _qkv_run(triton_norm_qkv_rope_kv, one, N, K, H, kdev, alone, **kw)
        assert torch.equal(q_one.cpu()[0], q_all.cpu()[t]), f"token {t}: q depends on the batch (seed={seed})"


@pytest.mark.parametrize("T,block", [(MAX_TOKENS + 2, (128, 128)), (2, (12, 64))],
                         ids=["past-the-fused-batch", "scale-rows-no-program-fits"])
def test_fp8_fused_input_unfused_keeps_the_contract(T, block, gen, kdev, check):
    N, K, H = 2, 1, 16
    a, ws = _qkv_fp8(gen, T, 96, N, K, H, H, H, block, torch.float32)
    got_caches = [c.clone().to(kdev) for c in a["caches"]]
    got_q, got_sum = _qkv_run(triton_norm_qkv_rope_kv, a, N, K, H, kdev, got_caches, w_scale_inv=ws.to(kdev),
                              block=block)
    want_caches = [c.clone() for c in a["caches"]]
    want_q, want_sum = _qkv_ref(a, N, K, H, want_caches, ws, block)
    check(got_q, want_q.double(), torch.float32, f"unfused q, T={T} block={block}")
    assert torch.equal(got_sum.cpu(), want_sum)


def test_fp8_fused_input_rejects_bad_scales(gen, kdev):
    a, ws = _qkv_fp8(gen, 2, 64, 2, 1, 16, 16, 16, (16, 32), torch.bfloat16)
    caches = [c.to(kdev) for c in a["caches"]]
    with pytest.raises(ValueError, match="w_RD_scale_inv"):
        _qkv_run(triton_norm_qkv_rope_kv, a, 2, 1, 16, kdev, caches, w_scale_inv=ws[:-1].to(kdev), block=(16, 32))
    with pytest.raises(ValueError, match="w_RD.dtype"):
        _qkv_run(triton_norm_qkv_rope_kv, dict(a, w=a["w"].to(torch.bfloat16)), 2, 1, 16, kdev, caches,
                 w_scale_inv=ws.to(kdev), block=(16, 32))


@pytest.mark.parametrize("fp8_weight", [False, True], ids=["float-o_proj", "fp8-o_proj"])
@pytest.mark.parametrize("T,D,group", [(1, 80, 16), (3, 136, 32), (FUSED_MAX_TOKENS + 2, 72, 16)],
                         ids=["one-token", "ragged-groups", "past-the-fused-batch"])
def test_quantized_output_is_the_norm_s_own_quantization(fp8_weight, T, D, group, gen, kdev, seed):
    """linear_add_rms_norm_fp8 (the FP8 experts' input written by the output launch's last program): h and the
    sum are linear_add_rms_norm's bits, hq / hs per_token_group_quant's of that h, bit for bit."""
    from moelink.kernels.fp8 import per_token_group_quant
    from moelink.kernels.norm import reference_linear_add_rms_norm_fp8
    from moelink.kernels.triton_linear_norm import triton_linear_add_rms_norm_fp8

    block = (16, 32)
    x, wq, b, r, nw, ws = _linear_inputs(gen, T, 96, D, block, torch.bfloat16)
    w, kw = (wq, dict(w_scale_inv=ws.to(kdev), block=block)) if fp8_weight else (block_dequantize(wq, ws, block).to(
        torch.bfloat16), {})
    args = [a.to(kdev) if isinstance(a, torch.Tensor) else a for a in (x, w, b, r, nw)]
    counters = token_counters(kdev)
    h, s, hq, hs = triton_linear_add_rms_norm_fp8(*args, 1e-6, group, counters_T=counters, **kw)
    assert not counters.any()
    want_h, want_s = triton_linear_add_rms_norm(*args, 1e-6, counters_T=counters, **kw)
    assert torch.equal(h, want_h) and torch.equal(s, want_s), f"seed={seed}"
    want_q, want_scale = per_token_group_quant(h.cpu(), group)
    assert torch.equal(hq.cpu().view(torch.uint8), want_q.view(torch.uint8)), f"hq (seed={seed})"
    assert torch.equal(hs.cpu(), want_scale), f"hs (seed={seed})"
    ref = reference_linear_add_rms_norm_fp8(x, w.cpu(), b, r, nw, 1e-6, group,
                                            **{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    assert [tuple(t.shape) for t in ref] == [tuple(t.shape) for t in (h, s, hq, hs)]
    torch.testing.assert_close(h.cpu().float(), ref[0].float(), rtol=2e-2, atol=2e-2)  # (the GEMV's own order)
    assert torch.equal(ref[3], per_token_group_quant(ref[0], group)[1])


def test_quantized_output_rejects_a_group_no_power_of_two(gen, kdev):
    from moelink.kernels.triton_linear_norm import triton_linear_add_rms_norm_fp8

    x, wq, b, r, nw, ws = (a.to(kdev) for a in _linear_inputs(gen, 2, 64, 32, (16, 32), torch.bfloat16))
    with pytest.raises(ValueError, match="group=24"):
        triton_linear_add_rms_norm_fp8(x, wq, b, r, nw, 1e-6, 24, w_scale_inv=ws, block=(16, 32))
