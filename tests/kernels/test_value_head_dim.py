"""Values narrower than queries and keys (MiMo-V2-Flash: head_dim 192, v_head_dim 128): the V cache is
[blocks, L, K, Hv], the attention output [T, N, Hv]. The reference paged attention against a per-query float64
oracle, and the Triton kernels (paged attention, KV write, the fused rope + KV write; the interpreter on CPU)
against the references, through every path: decode whole and split, prefill whole and split, with the sinks and
window MiMo's sliding layers use, in an fp8 cache too.
"""
from __future__ import annotations

import math

import pytest
import torch

from moelink.kernels.attention import AttentionMetadata, reference_paged_attention, reference_write_kv
from moelink.kernels.rotary import reference_rope_write_kv
from moelink.kernels.rotary import rotary_cos_sin_cache
from moelink.kernels.triton_attention import triton_paged_attention, triton_write_kv
from moelink.kernels.triton_rope_kv import triton_rope_write_kv

from tests.kernels.test_triton_attention import _meta_to


def _oracle(q_TNH, k_cache, v_cache, meta, scale, sinks_N, window):
    """Each query of each head alone, in float64: the keys its position sees (the last `window`), the sink's
    logit in the softmax denominator, the weighted sum of the Hv-wide values."""
    L, K, Hv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    N = q_TNH.shape[1]
    out = torch.zeros(q_TNH.shape[0], N, Hv, dtype=torch.float64)
    t = 0
    for s, (qlen, ctx) in enumerate(zip(meta.query_lens, meta.seq_lens)):
        table = meta.block_tables_SM[s].tolist()
        slots = [table[p // L] * L + p % L for p in range(ctx)]
        k_CKH = k_cache.double().reshape(-1, K, k_cache.shape[3])[slots]
        v_CKH = v_cache.double().reshape(-1, K, Hv)[slots]
        for i in range(qlen):
            p = ctx - qlen + i
            lo = 0 if window is None else max(0, p - window + 1)
            for n in range(N):
                kh = n // (N // K)
                logits = (k_CKH[lo: p + 1, kh] @ q_TNH[t, n].double()) * scale
                z = logits if sinks_N is None else torch.cat([logits, sinks_N[n].double().view(1)])
                w = torch.softmax(z, 0)[: p + 1 - lo]
                out[t, n] = w @ v_CKH[lo: p + 1, kh]
            t += 1
    return out


def _build(gen, ctx_q, N, K, H, Hv, L, dtype):
    """Caches poisoned with NaN but for the null block, each sequence's earlier context written by the reference,
    blocks scattered; returns (q, k_cache, v_cache, meta, new k, new v, their slots)."""
    nb = sum(-(-c // L) for c, _ in ctx_q) + 5
    k_cache = torch.full((nb + 1, L, K, H), float("nan"), dtype=dtype)
    v_cache = torch.full((nb + 1, L, K, Hv), float("nan"), dtype=dtype)
    k_cache[nb], v_cache[nb] = 0, 0
    perm = torch.randperm(nb, generator=gen).tolist()
    tables, qs, new_k, new_v, slots = [], [], [], [], []
    for ctx, ql in ctx_q:
        blocks = [perm.pop() for _ in range(-(-ctx // L))]
        tables.append(blocks)
        k = torch.randn(ctx, K, H, generator=gen).to(dtype)
        v = torch.randn(ctx, K, Hv, generator=gen).to(dtype)
        pos_slots = [blocks[p // L] * L + p % L for p in range(ctx)]
        if ctx > ql:
            reference_write_kv(k[: ctx - ql], v[: ctx - ql], k_cache, v_cache, torch.tensor(pos_slots[: ctx - ql]))
        new_k.append(k[ctx - ql:]), new_v.append(v[ctx - ql:])
        slots += pos_slots[ctx - ql:]
        qs.append(torch.randn(ql, N, H, generator=gen).to(dtype))
    M = max(len(t) for t in tables)
    q_lens, seq_lens = [q for _, q in ctx_q], [c for c, _ in ctx_q]
    meta = AttentionMetadata(torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32),
                             torch.tensor(seq_lens, dtype=torch.int32),
                             torch.tensor([t + [0] * (M - len(t)) for t in tables], dtype=torch.int32),
                             torch.tensor(slots, dtype=torch.long), q_lens, seq_lens, max(q_lens), max(seq_lens),
                             null_block=nb)
    return torch.cat(qs), k_cache, v_cache, meta, torch.cat(new_k), torch.cat(new_v), meta.slot_mapping_T


# (ctx_q, N, K, H, Hv, block size, decode splits, prefill splits)
CASES = [
    ([(1, 1), (9, 1), (40, 1)], 4, 2, 24, 16, 4, None, None),  # decode, whole
    ([(150, 1), (3, 1)], 4, 1, 24, 8, 16, 4, None),  # decode split 4 ways
    ([(45, 13), (9, 9), (30, 1)], 4, 2, 24, 16, 8, None, None),  # chunks over prefixes + a decode
    ([(60, 5), (1, 1)], 4, 2, 12, 20, 8, None, 3),  # prefill split 3 ways (wider values than keys, too)
]


@pytest.mark.parametrize("extras", ["plain", "sinks_window"])
def test_reference_matches_oracle(extras, gen):
    ctx_q = [(45, 13), (9, 9), (30, 1), (3, 1)]
    q, kc, vc, meta, k_new, v_new, slots = _build(gen, ctx_q, 6, 2, 24, 16, 8, torch.float64)
    reference_write_kv(k_new, v_new, kc, vc, slots)
    sinks, window = (torch.randn(6, generator=gen, dtype=torch.float64), 7) if extras != "plain" else (None, None)
    got = reference_paged_attention(q, kc, vc, meta, 0.2, sinks_N=sinks, sliding_window=window)
    assert got.shape == (q.shape[0], 6, 16)
    torch.testing.assert_close(got, _oracle(q, kc, vc, meta, 0.2, sinks, window), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("extras", ["plain", "sinks_window"])
@pytest.mark.parametrize("ctx_q,N,K,H,Hv,bs,splits,psplits", CASES)
def test_triton_paged_attention_matches_reference(ctx_q, N, K, H, Hv, bs, splits, psplits, extras, gen, kdev, check,
                                                  nan_buffer):
    dtype = torch.float32
    q, kc, vc, meta, k_new, v_new, slots = _build(gen, ctx_q, N, K, H, Hv, bs, dtype)
    kc, vc = kc.to(kdev), vc.to(kdev)
    triton_write_kv(k_new.to(kdev), v_new.to(kdev), kc, vc, slots.to(kdev))
    sinks, window = (torch.randn(N, generator=gen), 6) if extras != "plain" else (None, None)
    scale = 1 / math.sqrt(H)
    out = nan_buffer((q.shape[0], N, Hv), dtype, kdev)
    dmeta = _meta_to(meta, kdev)
    got = triton_paged_attention(q.to(kdev), kc, vc, dmeta, scale, sinks_N=None if sinks is None else sinks.to(kdev),
                                 sliding_window=window, out=out, num_splits=splits, prefill_splits=psplits)
    assert got is out
    want = reference_paged_attention(q.double(), kc.double().cpu(), vc.double().cpu(), meta, scale,
                                     sinks_N=None if sinks is None else sinks.double(), sliding_window=window)
    check(got, want, dtype, f"paged attention {ctx_q} H={H} Hv={Hv} splits={splits}/{psplits} {extras}")


def test_triton_kv_writes_match_reference(gen, kdev):
    """write_kv and the fused rope + write put narrower values where the reference does, fp8 caches included,
    and a padding token (slot -1) writes nothing."""
    T, N, K, H, Hv, R, L = 4, 4, 2, 24, 16, 8, 4
    qkv = torch.randn(T, N * H + K * H + K * Hv, generator=gen)
    q, k = qkv[:, : N * H].view(T, N, H), qkv[:, N * H:(N + K) * H].view(T, K, H)
    v = qkv[:, (N + K) * H:].view(T, K, Hv)
    slots = torch.tensor([5, -1, 0, 13])
    pos = torch.tensor([3, 0, 9, 100])
    table = rotary_cos_sin_cache(R, 256, 1e4)
    for cache_dtype in (torch.float32, torch.float8_e4m3fn):
        def caches():
            return torch.zeros(5, L, K, H, dtype=cache_dtype), torch.zeros(5, L, K, Hv, dtype=cache_dtype)
        want_k, want_v = caches()
        reference_write_kv(k, v, want_k, want_v, slots, 0.5, 2.0)
        got_k, got_v = (c.to(kdev) for c in caches())
        triton_write_kv(k.to(kdev), v.to(kdev), got_k, got_v, slots.to(kdev), 0.5, 2.0)
        assert torch.equal(got_k.cpu().float(), want_k.float()) and torch.equal(got_v.cpu().float(), want_v.float())
        want_k, want_v = caches()
        want_q = reference_rope_write_kv(q, k, v, pos, table, want_k, want_v, slots, k_scale=0.5, v_scale=2.0)
        got_k, got_v = (c.to(kdev) for c in caches())
        got_q = triton_rope_write_kv(q.to(kdev), k.to(kdev), v.to(kdev), pos.to(kdev), table.to(kdev), got_k, got_v,
                                     slots.to(kdev), k_scale=0.5, v_scale=2.0)
        torch.testing.assert_close(got_q.cpu(), want_q, rtol=0, atol=0)
        torch.testing.assert_close(got_k.cpu().float(), want_k.float(), rtol=0, atol=0)
        assert torch.equal(got_v.cpu().float(), want_v.float()) and want_v.float().abs().sum() > 0
