"""An fp8 (e4m3) paged KV cache with per-layer k_scale / v_scale (`--kv-cache-dtype fp8`): the reference's
write and read against their definition, and the Triton write / paged attention against the reference over
the same fp8 cache (NaN-poisoned caches and outputs, ragged shapes, splits, sinks and windows).

The write is checked bit for bit (stored = saturate(x / scale) rounded to nearest even); the attention is
the reference over the same fp8 bytes in float64, so its tolerance is the query dtype's usual one: fp8
rounding is in the cache both sides read, not in the comparison.
"""
from __future__ import annotations

import math

import pytest
import torch

from moelink.kernels.attention import reference_paged_attention, reference_write_kv
from moelink.kernels.triton_attention import triton_paged_attention, triton_write_kv

from tests.kernels.test_triton_attention import _build, _meta_to

FP8 = torch.float8_e4m3fn


def _fp8(cache: torch.Tensor, scale: float) -> torch.Tensor:
    """A float cache as the fp8 write path stores it (NaN, the poison of unwritten slots, stays NaN)."""
    return (cache.float() / scale).clamp(-448, 448).to(FP8)


def test_reference_write_stores_saturated_quotient():
    k = torch.tensor([[[0.5, -3.0, 1000.0, -1e-4]]])  # [T=1, K=1, H=4]; 1000 / 0.5 saturates
    v = torch.tensor([[[2.0, 0.0, -900.0, 7.0]]])
    kc, vc = (torch.full((3, 2, 1, 4), float("nan")).to(FP8) for _ in range(2))
    reference_write_kv(k, v, kc, vc, torch.tensor([3]), k_scale=0.5, v_scale=2.0)
    assert kc[1, 1, 0].float().tolist() == [1.0, -6.0, 448.0, torch.tensor(-2e-4).to(FP8).float().item()]
    assert vc[1, 1, 0].float().tolist() == [1.0, 0.0, -448.0, 3.5]
    assert torch.isnan(kc[0].float()).all(), "only the slot written changes"


@pytest.mark.parametrize("window,sinks", [(None, False), (5, True)])
def test_reference_reads_stored_times_scale(gen, window, sinks):
    """Attention over an fp8 cache equals attention over its dequantized copy (stored * scale) in float64."""
    ctx_q, N, K, H, bs = [(19, 1), (30, 7), (6, 6)], 4, 2, 16, 4
    q, kc, vc, meta, k_new, v_new, slots = _build(gen, ctx_q, N, K, H, bs, torch.float64, "cpu")
    reference_write_kv(k_new, v_new, kc, vc, slots)
    k8, v8 = _fp8(kc, 0.25), _fp8(vc, 0.5)
    extras = dict(sliding_window=window, sinks_N=torch.randn(N, generator=gen, dtype=torch.float64) if sinks else None)
    got = reference_paged_attention(q, k8, v8, meta, 0.3, k_scale=0.25, v_scale=0.5, **extras)
    want = reference_paged_attention(q, k8.double() * 0.25, v8.double() * 0.5, meta, 0.3, **extras)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


WRITE_CASES = [(1, 1, 16, 16), (7, 2, 8, 4), (33, 4, 24, 16), (16, 2, 16, 1), (5, 8, 40, 8)]


@pytest.mark.parametrize("T,K,H,bs", WRITE_CASES)
def test_triton_write_kv_fp8_bit_exact(T, K, H, bs, gen, kdev, seed):
    """float32 inputs (bf16 ones divided by a scale hit exact ties often; both round them to even anyway)
    with scales that make some values saturate."""
    num_blocks = -(-T // bs) + 3
    k, v = torch.randn(T, K, H, generator=gen) * 4, torch.randn(T, K, H, generator=gen) * 4
    k[0, 0, 0], v[-1, -1, -1] = 100.0, -100.0  # past ±448 once divided by the scale
    slots = torch.randperm(num_blocks * bs, generator=gen)[:T]
    caches = [torch.full((num_blocks + 1, bs, K, H), float("nan")).to(FP8) for _ in range(4)]
    reference_write_kv(k, v, caches[0], caches[1], slots, 0.02, 0.05)
    got_k, got_v = caches[2].to(kdev), caches[3].to(kdev)
    triton_write_kv(k.to(kdev), v.to(kdev), got_k, got_v, slots.to(kdev), 0.02, 0.05)
    for got, want in ((got_k, caches[0]), (got_v, caches[1])):
        assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8)), f"seed={seed}"
    assert caches[0].float().abs().nan_to_num().max() == 448, "the case saturates a key"


# (ctx_q, N, K, H, block size, decode splits, window, sinks)
ATTN_CASES = [
    ([(1, 1), (5, 1), (17, 1), (40, 1)], 4, 2, 16, 4, None, None, False),  # decode, GQA 2
    ([(150, 1), (3, 1)], 8, 2, 16, 16, 4, None, True),  # split decode with sinks
    ([(45, 13), (9, 9), (30, 1), (64, 64)], 6, 2, 24, 16, 2, None, False),  # chunks over prefixes + decode
    ([(23, 2), (1, 1), (50, 17)], 4, 2, 16, 8, None, 6, True),  # mixed, window and sinks
    ([(20, 20)], 4, 1, 16, 4, None, 7, False),  # one prompt, MQA, window
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("ctx_q,N,K,H,bs,splits,window,sinks", ATTN_CASES)
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_triton_paged_attention_fp8_cache(ctx_q, N, K, H, bs, splits, window, sinks, dtype, gen, kdev, check,
                                          nan_buffer):
    k_scale, v_scale = 0.5, 0.25
    q, kc, vc, meta, k_new, v_new, slots = _build(gen, ctx_q, N, K, H, bs, torch.float32, "cpu")
    k8, v8 = _fp8(kc, k_scale).to(kdev), _fp8(vc, v_scale).to(kdev)
    triton_write_kv(k_new.to(kdev), v_new.to(kdev), k8, v8, slots, k_scale, v_scale)
    q = q.to(dtype).to(kdev)
    sinks_N = torch.randn(N, generator=gen).to(dtype).to(kdev) if sinks else None
    scale = 1 / math.sqrt(H)
    out = nan_buffer(q.shape, dtype, kdev)
    got = triton_paged_attention(q, k8, v8, meta, scale, sinks_N=sinks_N, sliding_window=window, k_scale=k_scale,
                                 v_scale=v_scale, out=out, num_splits=splits)
    assert got is out
    want = reference_paged_attention(q.double().cpu(), k8.cpu(), v8.cpu(), _meta_to(meta, "cpu"), scale,
                                     sinks_N=None if sinks_N is None else sinks_N.double().cpu(),
                                     sliding_window=window, k_scale=k_scale, v_scale=v_scale)
    check(got, want, dtype, f"fp8-cache attention {ctx_q} window={window} sinks={sinks} splits={splits}")


def test_triton_refuses_mixed_cache_dtypes(kdev):
    q = torch.zeros(1, 2, 16, device=kdev)
    kc = torch.zeros(2, 4, 1, 16, device=kdev).to(FP8)
    vc = torch.zeros(2, 4, 1, 16, device=kdev)
    meta = _build(torch.Generator().manual_seed(0), [(1, 1)], 2, 1, 16, 4, torch.float32, kdev)[3]
    with pytest.raises(ValueError, match="float8_e4m3fn for both K and V"):
        triton_paged_attention(q, kc, vc, meta, 1.0)
