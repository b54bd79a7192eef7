"""Triton paged attention and KV write against the plain-torch references (float64 oracle).

Caches are poisoned with NaN everywhere except the null block, blocks are
scattered at random, and context lengths are mostly not multiples of the
block size, so a kernel that reads a slot it should not comes out NaN.
"""
from __future__ import annotations

import math

import pytest
import torch

from moelink.kernels.attention import AttentionMetadata, reference_paged_attention, reference_write_kv
from moelink.kernels.triton_attention import triton_paged_attention, triton_write_kv

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _build(gen, ctx_q, N, K, H, block_size, dtype, device, num_blocks=None):
    """Cache holding each sequence's earlier context; returns (q, caches, meta, new k/v, slots) on `device`."""
    nb_total = sum(-(-c // block_size) for c, _ in ctx_q)
    num_blocks = num_blocks or nb_total + 7
    k_cache = torch.full((num_blocks + 1, block_size, K, H), float("nan"), dtype=dtype)
    k_cache[num_blocks] = 0  # the null block stays zero, as the runner keeps it
    v_cache = k_cache.clone()
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, qs, new_k, new_v, slots, seq_lens, q_lens = [], [], [], [], [], [], []
    for ctx, ql in ctx_q:
        blocks = [perm.pop() for _ in range(-(-ctx // block_size))]
        tables.append(blocks)
        k = torch.randn(ctx, K, H, generator=gen).to(dtype)
        v = torch.randn(ctx, K, H, generator=gen).to(dtype)
        all_slots = [blocks[p // block_size] * block_size + p % block_size for p in range(ctx)]
        if ctx > ql:
            reference_write_kv(k[: ctx - ql], v[: ctx - ql], k_cache, v_cache, torch.tensor(all_slots[: ctx - ql]))
        new_k.append(k[ctx - ql :]), new_v.append(v[ctx - ql :])
        slots += all_slots[ctx - ql :]
        qs.append(torch.randn(ql, N, H, generator=gen).to(dtype))
        seq_lens.append(ctx), q_lens.append(ql)
    M = max(len(t) for t in tables)
    tables_SM = torch.tensor([t + [0] * (M - len(t)) for t in tables], dtype=torch.int32)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    slot_T = torch.tensor(slots, dtype=torch.long)
    meta = AttentionMetadata(qsl.to(device), torch.tensor(seq_lens, dtype=torch.int32, device=device),
                             tables_SM.to(device), slot_T.to(device), q_lens, seq_lens, max(q_lens), max(seq_lens),
                             null_block=num_blocks)
    return (torch.cat(qs).to(device), k_cache.to(device), v_cache.to(device), meta,
            torch.cat(new_k).to(device), torch.cat(new_v).to(device), slot_T.to(device))


def _meta_to(meta: AttentionMetadata, device) -> AttentionMetadata:
    return AttentionMetadata(meta.query_start_loc_S1.to(device), meta.seq_lens_S.to(device),
                             meta.block_tables_SM.to(device), meta.slot_mapping_T.to(device), meta.query_lens,
                             meta.seq_lens, meta.max_query_len, meta.max_seq_len, meta.null_block)


# (ctx_q [(context length after this step, query length)], N, K, H, block size, decode splits)
ATTN_CASES = [
    ([(1, 1), (5, 1), (17, 1), (40, 1)], 4, 2, 16, 4, None),  # decode only, GQA 2, lengths off the block size
    ([(150, 1), (3, 1)], 8, 2, 16, 16, 4),  # long decode split 4 ways (one split of the short one is empty)
    ([(33, 1), (70, 1)], 4, 4, 8, 16, 3),  # MHA, head dim 8 (< 16, padded), 3 splits
    ([(20, 20)], 4, 1, 16, 4, None),  # one prompt, no cached prefix, MQA (G = 4)
    ([(45, 13), (9, 9), (30, 1), (40, 40)], 6, 2, 24, 16, 2),  # chunks over cached prefixes + a decode; H=24
    ([(23, 2), (1, 1), (50, 17)], 4, 2, 16, 8, None),  # two-token chunk, a first-token decode, mixed
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("ctx_q,N,K,H,bs,splits", ATTN_CASES)
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_paged_attention_matches_reference(ctx_q, N, K, H, bs, splits, dtype, gen, kdev, check, nan_buffer):
    q, kc, vc, meta, k_new, v_new, slots = _build(gen, ctx_q, N, K, H, bs, dtype, kdev)
    triton_write_kv(k_new, v_new, kc, vc, slots)
    scale = 1 / math.sqrt(H)
    out = nan_buffer(q.shape, dtype, kdev)
    got = triton_paged_attention(q, kc, vc, meta, scale, out=out, num_splits=splits)
    assert got is out
    want = reference_paged_attention(q.double().cpu(), kc.double().cpu(), vc.double().cpu(), _meta_to(meta, "cpu"), scale)
    check(got, want, dtype, f"paged attention {ctx_q} N={N} K={K} H={H} L={bs} splits={splits}")


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_decode_split_counts_agree(gen, kdev, check):
    """1, 2, 5 and 8 splits of the same long decode batch give the same answer."""
    q, kc, vc, meta, k_new, v_new, slots = _build(gen, [(97, 1), (130, 1), (2, 1)], 4, 2, 16, 16, torch.float32, kdev)
    triton_write_kv(k_new, v_new, kc, vc, slots)
    want = reference_paged_attention(q.double().cpu(), kc.double().cpu(), vc.double().cpu(), _meta_to(meta, "cpu"), 0.25)
    for z in (1, 2, 5, 8):
        check(triton_paged_attention(q, kc, vc, meta, 0.25, num_splits=z), want, torch.float32, f"{z} splits")


# Prefill split-K: (ctx_q, N, K, H, block size, prefill splits).
PREFILL_SPLIT_CASES = [
    ([(150, 3)], 4, 2, 16, 16, 4),  # a 3-token chunk over a 147-token cached prefix (the prefix-hit case)
    ([(97, 5), (40, 1), (3, 2)], 8, 2, 16, 4, 3),  # + a decode riding along, + a chunk shorter than the splits
    ([(20, 20), (66, 1)], 4, 1, 16, 16, 5),  # no prefix: late splits are invisible to early rows (causal, lse -inf)
    ([(66, 17), (31, 9)], 6, 2, 24, 8, 2),  # q blocks spanning several rows, H=24 (padded)
    ([(64, 2)], 4, 4, 8, 16, 8),  # MHA, head dim 8, more splits than key tiles of the short rows
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("ctx_q,N,K,H,bs,zp", PREFILL_SPLIT_CASES)
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_prefill_split_matches_reference(ctx_q, N, K, H, bs, zp, dtype, gen, kdev, check, nan_buffer):
    q, kc, vc, meta, k_new, v_new, slots = _build(gen, ctx_q, N, K, H, bs, dtype, kdev)
    triton_write_kv(k_new, v_new, kc, vc, slots)
    out = nan_buffer(q.shape, dtype, kdev)
    got = triton_paged_attention(q, kc, vc, meta, 0.3, out=out, prefill_splits=zp)
    want = reference_paged_attention(q.double().cpu(), kc.double().cpu(), vc.double().cpu(), _meta_to(meta, "cpu"), 0.3)
    check(got, want, dtype, f"prefill split {ctx_q} N={N} K={K} H={H} L={bs} Zp={zp}")


def _prefill_grids(monkeypatch) -> list[tuple]:
    """Records the grid of every prefill-kernel launch (its third entry is the split count)."""
    from moelink.kernels import triton_attention as ta

    grids = []
    real = ta._prefill_kernel
    monkeypatch.setattr(ta, "_prefill_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: grids.append(grid) or real[grid]})())
    return grids


def test_short_chunk_on_long_prefix_splits_by_itself(gen, kdev, check, monkeypatch):
    """Without forcing: a few query tokens over a long prefix leave SMs idle, so the wrapper splits the keys."""
    launched = _prefill_grids(monkeypatch)
    q, kc, vc, meta, k_new, v_new, slots = _build(gen, [(300, 4), (12, 1)], 4, 2, 16, 16, torch.float32, kdev)
    triton_write_kv(k_new, v_new, kc, vc, slots)
    got = triton_paged_attention(q, kc, vc, meta, 0.25)
    assert launched and launched[0][2] > 1, "a 4-token chunk over 296 cached tokens should have been split"
    want = reference_paged_attention(q.double().cpu(), kc.double().cpu(), vc.double().cpu(), _meta_to(meta, "cpu"), 0.25)
    check(got, want, torch.float32, "auto prefill split")


# (T, K, H, block size, strided k/v input)
WRITE_CASES = [(1, 1, 16, 16, False), (7, 2, 8, 4, False), (33, 4, 24, 16, True), (5, 8, 128, 16, True), (16, 2, 16, 1, False)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("T,K,H,bs,strided", WRITE_CASES)
def test_write_kv_matches_reference(T, K, H, bs, strided, dtype, gen, kdev, seed):
    num_blocks = -(-T // bs) + 3
    if strided:  # k and v as slices of one projection output, as the model produces them
        kv = torch.randn(T, 3 * K * H, generator=gen).to(dtype)
        k, v = kv[:, K * H : 2 * K * H].view(T, K, H), kv[:, 2 * K * H :].view(T, K, H)
    else:
        k, v = (torch.randn(T, K, H, generator=gen).to(dtype) for _ in range(2))
    slots = torch.randperm(num_blocks * bs, generator=gen)[:T]
    caches = [torch.full((num_blocks + 1, bs, K, H), float("nan"), dtype=dtype) for _ in range(4)]
    reference_write_kv(k, v, caches[0], caches[1], slots)
    got_k, got_v = caches[2].to(kdev), caches[3].to(kdev)
    triton_write_kv(k.to(kdev), v.to(kdev), got_k, got_v, slots.to(kdev))
    for got, want in ((got_k, caches[0]), (got_v, caches[1])):
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, equal_nan=True, msg=f"seed={seed}")


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_write_kv_skips_negative_slots(gen, kdev, impl):
    """Slot -1 marks a padding token (decode graphs): its K/V land nowhere, and the null block (the
    cache's last block) stays zero. Both implementations, as the reference is the oracle."""
    write = triton_write_kv if impl == "triton" else reference_write_kv
    k = torch.randn(4, 2, 16, generator=gen, device="cpu").to(kdev)
    kc = torch.zeros(3, 4, 2, 16, device=kdev)
    vc = torch.zeros_like(kc)
    write(k, k + 1, kc, vc, torch.tensor([5, -1, 2, -1], device=kdev))
    for cache, src in ((kc, k), (vc, k + 1)):
        flat = cache.view(-1, 2, 16)
        assert torch.equal(flat[5], src[0]) and torch.equal(flat[2], src[2])
        assert int((flat.abs().sum((1, 2)) != 0).sum()) == 2
        assert not cache[-1].any()


def test_short_prompt_without_prefix_is_not_split(gen, kdev, monkeypatch):
    """The split pays only over a long cached prefix: a short fresh prompt keeps the plain kernels."""
    grids = _prefill_grids(monkeypatch)
    q, kc, vc, meta, k_new, v_new, slots = _build(gen, [(40, 40), (12, 1)], 4, 2, 16, 16, torch.float32, kdev)
    triton_write_kv(k_new, v_new, kc, vc, slots)
    triton_paged_attention(q, kc, vc, meta, 0.25)
    assert grids and grids[0][2] == 1
