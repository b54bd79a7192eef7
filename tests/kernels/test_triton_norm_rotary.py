"""Triton RMSNorm (+ fused residual add) and rotary against the references (HF numerics)."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.norm import reference_add_rms_norm, reference_rms_norm
from moelink.kernels.rotary import reference_rotary, rotary_cos_sin_cache
from moelink.kernels.triton_norm import triton_add_rms_norm, triton_rms_norm
from moelink.kernels.triton_rotary import triton_rotary

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_ids = lambda d: str(d).split(".")[-1]  # noqa: E731


def _ulps_bf16_or_fp16(got, want):
    """Largest difference in units of the dtype's last place (0 = bit-identical; never over-counts)."""
    ulp = torch.finfo(want.dtype).eps * want.abs().clamp_min(torch.finfo(want.dtype).tiny)
    return float(((got.float() - want.float()).abs() / ulp.float()).max())


def _x(gen, shape, dtype, strided):
    """[T, D] or [T, heads, D]; strided: a slice of a wider projection, as q/k of a fused qkv are."""
    if not strided:
        return torch.randn(*shape, generator=gen).to(dtype)
    T, rest = shape[0], shape[1:]
    wide = torch.randn(T, 3 * torch.Size(rest).numel(), generator=gen).to(dtype)
    return wide[:, torch.Size(rest).numel() : 2 * torch.Size(rest).numel()].view(T, *rest)


# (shape, strided): D not a power of two, a single row, per-head 3-D views, a real hidden size.
NORM_CASES = [((1, 16), False), ((7, 100), False), ((5, 4, 24), True), ((3, 6, 128), True), ((9, 2048), False),
              ((0, 32), False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("shape,strided", NORM_CASES)
def test_rms_norm_matches_reference(shape, strided, dtype, gen, kdev, check, nan_buffer):
    x = _x(gen, shape, dtype, strided)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype)
    out = nan_buffer(shape, dtype, kdev)
    got = triton_rms_norm(x.to(kdev), w.to(kdev), 1e-6, out=out)
    assert got is out
    if x.numel() == 0:
        return
    check(got, reference_rms_norm(x.double(), w.double(), 1e-6), dtype, f"rms_norm {shape}")
    if dtype != torch.float32:
        # Same dtype: the HF numerics. The fp32 sum order may move the normalised value by one ulp
        # before the weight multiply, which can become two ulps of the product; never more.
        assert _ulps_bf16_or_fp16(got.cpu(), reference_rms_norm(x, w, 1e-6)) <= 2.0


# [T, D] only (the model adds residuals of whole hidden states); strided x as a slice of a wider tensor.
ADD_NORM_CASES = [((1, 16), False), ((7, 100), False), ((13, 48), True), ((9, 2048), False), ((64, 384), True),
                  ((0, 32), False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("shape,strided", ADD_NORM_CASES)
def test_add_rms_norm_matches_reference(shape, strided, dtype, gen, kdev, check, nan_buffer):
    x, r = _x(gen, shape, dtype, strided), _x(gen, shape, dtype, False)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype)
    out, res_out = nan_buffer(shape, dtype, kdev), nan_buffer(shape, dtype, kdev)
    got, summed = triton_add_rms_norm(x.to(kdev), r.to(kdev), w.to(kdev), 1e-6, out=out, residual_out=res_out)
    assert got is out and summed is res_out
    if x.numel() == 0:
        return
    want, want_sum = reference_add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(summed.cpu(), want_sum), "x + residual must round exactly as torch does"
    check(got, reference_rms_norm(want_sum.double(), w.double(), 1e-6), dtype, f"add_rms_norm {shape}")


def test_rms_norm_weight_dtype_promotes(gen, kdev):
    """bf16 x with an fp32 weight gives fp32 out, as torch's promotion in the reference does."""
    x = torch.randn(4, 64, generator=gen).bfloat16()
    w = torch.randn(64, generator=gen)
    got = triton_rms_norm(x.to(kdev), w.to(kdev), 1e-5)
    want = reference_rms_norm(x, w, 1e-5)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)


# (T, N, K, H, strided): GQA, MQA, head dim whose half is not a power of two, real Qwen3 heads.
ROTARY_CASES = [(1, 2, 1, 16, False), (9, 6, 2, 24, True), (17, 4, 4, 8, False), (5, 32, 4, 128, True),
                (12, 3, 1, 64, True), (0, 2, 2, 16, False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("T,N,K,H,strided", ROTARY_CASES)
def test_rotary_matches_reference_bitwise(T, N, K, H, strided, dtype, gen, kdev, nan_buffer, seed):
    if strided:
        qkv = torch.randn(T, (N + 2 * K) * H, generator=gen).to(dtype)
        q, k = qkv[:, : N * H].view(T, N, H), qkv[:, N * H : (N + K) * H].view(T, K, H)
    else:
        q, k = torch.randn(T, N, H, generator=gen).to(dtype), torch.randn(T, K, H, generator=gen).to(dtype)
    cache = rotary_cos_sin_cache(H, 4096, 1e6)
    pos = torch.randint(0, 4096, (T,), generator=gen)
    q_out, k_out = nan_buffer((T, N, H), dtype, kdev), nan_buffer((T, K, H), dtype, kdev)
    got_q, got_k = triton_rotary(q.to(kdev), k.to(kdev), pos.to(kdev), cache.to(kdev), q_out=q_out, k_out=k_out)
    want_q, want_k = reference_rotary(q, k, pos, cache)
    # Same operations in the same order, each rounded to the dtype: identical bits.
    assert torch.equal(got_q.cpu(), want_q), f"q differs (seed={seed})"
    assert torch.equal(got_k.cpu(), want_k), f"k differs (seed={seed})"
