"""Shared cases of the DeepSeek Sparse Attention kernel tests (tests/kernels/test_dsa*.py): ragged paged metadata,
caches written at every position (the null block zeros, unwritten rows NaN), fp8 key caches, set comparisons."""
from __future__ import annotations

import torch

from moelink.kernels.attention import AttentionMetadata
from moelink.kernels.dsa import fp8_key_row_bytes, reference_write_fp8_index_keys

CTX_Q = [(37, 1), (29, 7), (9, 9), (1, 1), (20, 1)]  # (context after the step, query tokens)
L = 4


def meta_of(gen, ctx_q, device, num_blocks=None):
    num_blocks = num_blocks or sum(-(-c // L) for c, _ in ctx_q) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[perm.pop() for _ in range(-(-c // L))] for c, _ in ctx_q]
    q_lens, seq_lens = [q for _, q in ctx_q], [c for c, _ in ctx_q]
    M = max(len(t) for t in tables)
    slots = [t[p // L] * L + p % L for t, (c, q) in zip(tables, ctx_q) for p in range(c - q, c)]
    return AttentionMetadata(
        torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
        torch.tensor([t + [0] * (M - len(t)) for t in tables], dtype=torch.int32, device=device),
        torch.tensor(slots, dtype=torch.long, device=device), q_lens, seq_lens, max(q_lens), max(seq_lens),
        null_block=num_blocks)  # past every block a sequence owns: the contract's all-zero null block


def cache_of(gen, meta, width, dtype, device):
    """[blocks + 1, L, width]: every position of every sequence written (random), the null block zeros (the kernels'
    contract: reads past a sequence's end land there), the rest NaN."""
    cache = torch.full((meta.null_block + 1, L, width), float("nan"), dtype=torch.float32)
    cache[meta.null_block] = 0.0
    for s, ctx in enumerate(meta.seq_lens):
        for p in range(ctx):
            cache[int(meta.block_tables_SM[s, p // L]), p % L] = torch.randn(width, generator=gen)
    return cache.to(dtype).to(device)


def positions(meta, device):
    """Per token, its sequence and position (host)."""
    out = []
    for s, (q, c) in enumerate(zip(meta.query_lens, meta.seq_lens)):
        out += [(s, c - q + i) for i in range(q)]
    return out


def assert_same_sets(got: torch.Tensor, want: torch.Tensor) -> None:
    for t in range(want.shape[0]):
        w = [x for x in want[t].tolist() if x >= 0]
        g = got[t].tolist()
        assert sorted(g[: len(w)]) == w and g[len(w):] == [-1] * (len(g) - len(w)), (t, g, w)


def meta_to(meta: AttentionMetadata, device) -> AttentionMetadata:
    return AttentionMetadata(meta.query_start_loc_S1.to(device), meta.seq_lens_S.to(device),
                             meta.block_tables_SM.to(device), meta.slot_mapping_T.to(device), meta.query_lens,
                             meta.seq_lens, meta.max_query_len, meta.max_seq_len, meta.null_block)


def fp8_index_cache(gen, meta, D, device):
    """An fp8 key cache (uint8 rows [e4m3 key | pad | float32 scales]) of random LayerNorm'd keys at every written
    position, written by reference_write_fp8_index_keys; the float keys [B + 1, L, D] too (NaN where unwritten)."""
    keys = cache_of(gen, meta, D, torch.float32, "cpu")
    keys = torch.nn.functional.layer_norm(keys, (D,)) * 2.0
    keys[meta.null_block] = 0.0
    B1 = keys.shape[0]
    written = ~keys.view(-1, D).isnan().any(1)
    cache = torch.zeros(B1, L, fp8_key_row_bytes(D), dtype=torch.uint8)
    slots = torch.arange(B1 * L)
    reference_write_fp8_index_keys(keys.view(-1, D)[written], cache, slots[written])
    return cache.to(device), keys
