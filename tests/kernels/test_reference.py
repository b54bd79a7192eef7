"""Plain-torch kernel references against independent, naive float64 oracles."""
from __future__ import annotations

import math

import pytest
import torch

from moelink.kernels.attention import AttentionMetadata, reference_paged_attention, reference_write_kv
from moelink.kernels.moe import reference_fused_moe
from moelink.kernels.norm import reference_add_rms_norm, reference_rms_norm
from moelink.kernels.rotary import reference_rotary, rotary_cos_sin_cache


def test_rms_norm_matches_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 32, generator=g, dtype=torch.float64)
    w = torch.randn(32, generator=g, dtype=torch.float64)
    want = w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(reference_rms_norm(x, w, 1e-6), want, rtol=1e-6, atol=1e-6)
    r = torch.randn(7, 32, generator=g, dtype=torch.float64)
    y, s = reference_add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, reference_rms_norm(x + r, w, 1e-6))


def test_rotary_matches_transformers():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(1)
    T, N, K, H = 9, 4, 2, 16
    q = torch.randn(T, N, H, generator=g, dtype=torch.float64)
    k = torch.randn(T, K, H, generator=g, dtype=torch.float64)
    pos = torch.tensor([0, 1, 2, 5, 17, 3, 100, 99, 7])
    cache = rotary_cos_sin_cache(H, 128, 10000.0)
    q2, k2 = reference_rotary(q, k, pos, cache)
    inv = 1.0 / (10000.0 ** (torch.arange(0, H, 2, dtype=torch.float) / H))
    freqs = pos[:, None].float() * inv
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().double()[None], emb.sin().double()[None]
    # transformers layout: [batch, heads, seq, dim]
    qh, kh = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    torch.testing.assert_close(q2, qh[0].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(k2, kh[0].transpose(0, 1), rtol=0, atol=0)


def _naive_attention(q_QNH, k_CKH, v_CKH, scale):
    """Dense causal attention of the last Q positions of a C-long context, float64."""
    Q, N, H = q_QNH.shape
    C, K, _ = k_CKH.shape
    rep = N // K
    out = torch.zeros_like(q_QNH)
    for i in range(Q):
        p = C - Q + i
        for n in range(N):
            s = (k_CKH[: p + 1, n // rep] @ q_QNH[i, n]) * scale
            out[i, n] = torch.softmax(s, 0) @ v_CKH[: p + 1, n // rep]
    return out


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("ctx_q", [
    [(1, 1), (5, 1), (20, 7), (33, 33), (17, 1)], [(3, 3)], [(40, 1), (9, 1)],
    [(n, 1) for n in range(1, 70, 2)],  # more decodes than one length group
])
def test_paged_attention_matches_dense(block_size, ctx_q):
    g = torch.Generator().manual_seed(hash((block_size, str(ctx_q))) % 2**31)
    N, K, H = 4, 2, 8
    num_blocks = 400
    # Poisoned with NaN except the null block (the last), which the runner keeps zero.
    k_cache = torch.full((num_blocks + 1, block_size, K, H), float("nan"), dtype=torch.float64)
    k_cache[num_blocks] = 0
    v_cache = k_cache.clone()
    perm = torch.randperm(num_blocks, generator=g).tolist()  # scattered, non-contiguous blocks
    tables, qs, ks, vs, slots, seq_lens, q_lens = [], [], [], [], [], [], []
    for ctx, ql in ctx_q:
        nb = -(-ctx // block_size)
        blocks = [perm.pop() for _ in range(nb)]
        tables.append(blocks)
        k = torch.randn(ctx, K, H, generator=g, dtype=torch.float64)
        v = torch.randn(ctx, K, H, generator=g, dtype=torch.float64)
        ks.append(k), vs.append(v)
        all_slots = [blocks[p // block_size] * block_size + p % block_size for p in range(ctx)]
        # Earlier context already cached; this step's tokens are written by write_kv below.
        old = torch.tensor(all_slots[: ctx - ql], dtype=torch.long)
        if len(old):
            reference_write_kv(k[: ctx - ql], v[: ctx - ql], k_cache, v_cache, old)
        slots += all_slots[ctx - ql :]
        qs.append(torch.randn(ql, N, H, generator=g, dtype=torch.float64))
        seq_lens.append(ctx), q_lens.append(ql)
    new_k = torch.cat([k[c - q :] for k, (c, q) in zip(ks, ctx_q)])
    new_v = torch.cat([v[c - q :] for v, (c, q) in zip(vs, ctx_q)])
    slot_T = torch.tensor(slots, dtype=torch.long)
    reference_write_kv(new_k, new_v, k_cache, v_cache, slot_T)
    M = max(len(t) for t in tables)
    tables_SM = torch.tensor([t + [0] * (M - len(t)) for t in tables], dtype=torch.int32)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    meta = AttentionMetadata(qsl, torch.tensor(seq_lens, dtype=torch.int32), tables_SM, slot_T, q_lens, seq_lens,
                             max(q_lens), max(seq_lens), null_block=num_blocks)
    q_TNH = torch.cat(qs)
    scale = 1 / math.sqrt(H)
    got = reference_paged_attention(q_TNH, k_cache, v_cache, meta, scale)
    want = torch.cat([_naive_attention(q, k, v, scale) for q, k, v in zip(qs, ks, vs)])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _naive_moe(x, w13, w2, weights, ids, expert_map=None):
    out = torch.zeros_like(x)
    inter = w2.shape[2]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if expert_map is not None:
                e = int(expert_map[e])
                if e < 0:
                    continue
            h = w13[e] @ x[t]
            out[t] += weights[t, j] * (w2[e] @ (torch.nn.functional.silu(h[:inter]) * h[inter:]))
    return out


@pytest.mark.parametrize("T,E,K,skew", [(1, 4, 1, False), (13, 6, 3, False), (40, 5, 2, True), (3, 8, 8, False), (0, 4, 2, False)])
def test_fused_moe_matches_per_token_loop(T, E, K, skew):
    g = torch.Generator().manual_seed(T * 31 + E)
    D, inter = 12, 10
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    w13 = torch.randn(E, 2 * inter, D, generator=g, dtype=torch.float64)
    w2 = torch.randn(E, D, inter, generator=g, dtype=torch.float64)
    if skew:  # every token on expert 0 first
        ids = torch.stack([torch.zeros(T, dtype=torch.long), torch.randint(1, E, (T,), generator=g)], 1)
    else:
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    weights = torch.rand(T, K, generator=g, dtype=torch.float64)
    torch.testing.assert_close(reference_fused_moe(x, w13, w2, weights, ids), _naive_moe(x, w13, w2, weights, ids))


def test_fused_moe_expert_map_skips_remote_experts():
    g = torch.Generator().manual_seed(5)
    T, D, inter, G = 11, 8, 6, 6
    # This rank holds global experts 2 and 5 as local 0 and 1.
    expert_map = torch.tensor([-1, -1, 0, -1, -1, 1], dtype=torch.int32)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    w13 = torch.randn(2, 2 * inter, D, generator=g, dtype=torch.float64)
    w2 = torch.randn(2, D, inter, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(G, generator=g)[:3] for _ in range(T)])
    weights = torch.rand(T, 3, generator=g, dtype=torch.float64)
    got = reference_fused_moe(x, w13, w2, weights, ids, expert_map)
    torch.testing.assert_close(got, _naive_moe(x, w13, w2, weights, ids, expert_map))
