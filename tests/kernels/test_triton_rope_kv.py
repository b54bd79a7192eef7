"""The fused GQA attention input (q/k norm + rotary + KV write, kernels/triton_rope_kv.py) against its reference
(kernels/rotary.py reference_rope_write_kv), a float64 oracle and the unfused Triton kernels it replaces."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.attention import reference_write_kv
from moelink.kernels.rotary import reference_rope_write_kv
from moelink.kernels.rotary import rotary_cos_sin_cache
from moelink.kernels.triton_kv_write import triton_write_kv
from moelink.kernels.triton_norm import triton_rms_norm
from moelink.kernels.triton_rope_kv import triton_rope_write_kv
from moelink.kernels.triton_rotary import triton_rotary

BLOCK = 4
# (T, N, K, H, R, norm): Qwen3-like (norm, full rotary), GLM-like partial rotary with norm, no norm (Mixtral,
# gpt-oss), head dims whose halves are not powers of two, MQA.
CASES = [(1, 4, 2, 16, 16, True), (3, 6, 2, 24, 12, True), (5, 4, 1, 64, 64, False), (2, 3, 3, 24, 8, False),
         (1, 8, 2, 128, 128, True)]


def _inputs(gen, T, N, K, H, R, norm, dtype, cache_dtype=None):
    """q, k, v as slices of one qkv projection output (strided, as the model passes them), weights, table,
    caches (zeros) and slots: each token in its own block, one padding token (slot -1) when T > 2."""
    qkv = torch.randn(T, (N + 2 * K) * H, generator=gen).to(dtype)
    q, k, v = qkv[:, : N * H].view(T, N, H), qkv[:, N * H:(N + K) * H].view(T, K, H), qkv[:, (N + K) * H:].view(T, K, H)
    w = [(1 + 0.1 * torch.randn(H, generator=gen)).to(dtype) for _ in range(2)] if norm else [None, None]
    table = rotary_cos_sin_cache(R, 4096, 1e6)
    pos = torch.randint(0, 4096, (T,), generator=gen)
    caches = [torch.zeros(T + 2, BLOCK, K, H, dtype=cache_dtype or dtype) for _ in range(2)]
    slots = torch.randperm(T + 1, generator=gen)[:T] * BLOCK + torch.randint(0, BLOCK, (T,), generator=gen)
    if T > 2:
        slots[1] = -1
    return q, k, v, pos, table, caches, slots, w


def _dev(ts, kdev):
    return [t.to(kdev) if isinstance(t, torch.Tensor) else t for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("T,N,K,H,R,norm", CASES)
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_rope_write_kv_matches_unfused_triton_and_reference(T, N, K, H, R, norm, dtype, gen, kdev, check, seed):
    q, k, v, pos, table, caches, slots, (wq, wk) = _inputs(gen, T, N, K, H, R, norm, dtype)
    got_caches = [c.clone().to(kdev) for c in caches]
    got_q = triton_rope_write_kv(*_dev((q, k, v, pos, table), kdev), *got_caches, slots.to(kdev),
                                 *_dev((wq, wk), kdev), 1e-6)
    assert got_q.shape == (T, N, H) and got_q.is_contiguous()

    # The unfused Triton path the model ran before (norms, rotary on the first R dims, KV write), step by step.
    qd, kd, vd = _dev((q, k, v), kdev)
    if norm:
        qd, kd = triton_rms_norm(qd, wq.to(kdev), 1e-6), triton_rms_norm(kd, wk.to(kdev), 1e-6)
    qr, kr = triton_rotary(qd[..., :R], kd[..., :R], pos.to(kdev), table.to(kdev))
    if R < H:
        qr, kr = torch.cat([qr, qd[..., R:]], dim=-1), torch.cat([kr, kd[..., R:]], dim=-1)
    old_caches = [c.clone().to(kdev) for c in caches]
    triton_write_kv(kr.contiguous(), vd.contiguous(), *old_caches, slots.to(kdev))
    # Same roundings in the same order: identical bits (the interpreter sums squares in one order).
    assert torch.equal(got_q.cpu(), qr.cpu()), f"q differs from the unfused path (seed={seed})"
    for got, old in zip(got_caches, old_caches):
        assert torch.equal(got.cpu(), old.cpu()), f"cache differs from the unfused path (seed={seed})"

    want_caches = [c.clone() for c in caches]
    want_q = reference_rope_write_kv(q, k, v, pos, table, *want_caches, slots, wq, wk, 1e-6)
    if not norm:  # rotary and the write are elementwise: bit for bit with torch
        assert torch.equal(got_q.cpu(), want_q), f"q differs from the reference (seed={seed})"
        assert all(torch.equal(g.cpu(), w) for g, w in zip(got_caches, want_caches)), f"cache (seed={seed})"
    # Against float64 (the norm's fp32 sum of squares may sit an ulp from torch's).
    q64, k64 = q.double(), k.double()
    want64_caches = [c.double() for c in caches]
    w64 = [w.double() if w is not None else None for w in (wq, wk)]
    want64_q = reference_rope_write_kv(q64, k64, v.double(), pos, table, *want64_caches, slots, *w64, 1e-6)
    check(got_q, want64_q, dtype, f"q {T, N, K, H, R, norm}")
    for got, want in zip(got_caches, want64_caches):
        check(got, want, dtype, "cache")
    if T > 2:  # the padding token wrote nothing: only the T - 1 real rows of each cache are set
        assert int((got_caches[0].cpu() != 0).any(-1).any(-1).sum()) == T - 1


def test_rope_write_kv_fp8_cache(gen, kdev, seed):
    """An fp8 cache stores x / scale saturated to ±448, as the unfused write does (values pushed past 448)."""
    T, N, K, H, R = 3, 4, 2, 32, 32
    q, k, v, pos, table, caches, slots, (wq, wk) = _inputs(gen, T, N, K, H, R, True, torch.bfloat16,
                                                          torch.float8_e4m3fn)
    v = v * 300  # some values past 448 / 0.5: saturation matters
    got_caches = [c.clone().to(kdev) for c in caches]
    triton_rope_write_kv(*_dev((q, k, v, pos, table), kdev), *got_caches, slots.to(kdev), wq.to(kdev), wk.to(kdev),
                         1e-6, k_scale=0.25, v_scale=0.5)
    qd, kd = triton_rms_norm(q.to(kdev), wq.to(kdev), 1e-6), triton_rms_norm(k.to(kdev), wk.to(kdev), 1e-6)
    _, kr = triton_rotary(qd, kd, pos.to(kdev), table.to(kdev))
    old = [c.clone().to(kdev) for c in caches]
    triton_write_kv(kr, v.to(kdev).contiguous(), *old, slots.to(kdev), k_scale=0.25, v_scale=0.5)
    for g, o in zip(got_caches, old):
        assert torch.equal(g.cpu().view(torch.uint8), o.cpu().view(torch.uint8)), f"fp8 cache (seed={seed})"
    ref = [c.clone() for c in caches]
    reference_write_kv(kr.cpu(), v.contiguous(), *ref, slots, 0.25, 0.5)
    assert torch.equal(got_caches[1].cpu().view(torch.uint8), ref[1].view(torch.uint8))
    assert got_caches[1].float().abs().max() == 448


def test_rope_write_kv_rejects_bad_inputs(gen, kdev):
    q, k, v, pos, table, caches, slots, (wq, wk) = _inputs(gen, 2, 4, 2, 16, 16, True, torch.bfloat16)
    args = _dev((q, k, v, pos, table, *caches, slots), kdev)
    with pytest.raises(ValueError, match="given together"):
        triton_rope_write_kv(*args, wq.to(kdev), None)
    with pytest.raises(ValueError, match="q_norm_H"):
        triton_rope_write_kv(*args, wq.float().to(kdev), wk.float().to(kdev))
    with pytest.raises(ValueError, match="rotary dims"):
        triton_rope_write_kv(*_dev((q, k, v, pos, rotary_cos_sin_cache(32, 64, 1e6)), kdev), *args[5:])
