"""Triton kernels at real model shapes on a GPU (`pytest -m gpu`; skipped without CUDA).

Shapes: Qwen3-30B-A3B experts (E=128, top-8, D=2048, I=768), Mixtral-8x7B
(E=8, top-2, D=4096, I=14336), DeepSeek-V3 (E=256, top-8, D=7168, I=2048);
attention with Qwen3's heads (32 q / 4 kv, head 128) and Mixtral's (32 / 8).
Oracles run in float32 (float64 would not fit the DeepSeek experts twice);
bf16 outputs must be within 1e-2 relative error of them. Each kernel call
also runs under torch.cuda sync-debug mode "error": a device→host sync inside
it fails the test (the issue requires none).
"""
from __future__ import annotations

import os
import contextlib
import math

import pytest
import torch

from moelink.kernels.attention import AttentionMetadata, reference_paged_attention
from moelink.kernels.moe_align import moe_align_block_size, reference_moe_align_block_size
from moelink.kernels.norm import reference_add_rms_norm
from moelink.kernels.rotary import reference_rotary, rotary_cos_sin_cache
from moelink.kernels.triton_attention import triton_paged_attention, triton_write_kv
from moelink.kernels.triton_moe import triton_fused_moe
from moelink.kernels.triton_norm import triton_add_rms_norm
from moelink.kernels.triton_rotary import triton_rotary

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only")]

MOE_SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336), "deepseek-v3": (256, 8, 7168, 2048)}


@contextlib.contextmanager
def no_host_sync(device):
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def oracle_moe(x, w13, w2, tw, ti, emap=None):
    """Per-expert loop in float32, upcasting one expert at a time (memory: the weights stay bf16)."""
    T, K = ti.shape
    I = w2.shape[2]
    local = ti.reshape(-1).long()
    if emap is not None:
        local = torch.where(local >= 0, emap.long()[local.clamp(min=0)], -1)
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    for e in torch.unique(local).tolist():
        if e < 0:
            continue
        pairs = (local == e).nonzero().flatten()
        tok = pairs // K
        h = x[tok].float() @ w13[e].float().T
        y = (torch.nn.functional.silu(h[:, :I]) * h[:, I:]) @ w2[e].float().T
        out.index_add_(0, tok, y * tw.reshape(-1)[pairs, None].float())
    return out


def run_moe_case(E, K, D, I, T, dtype, device, gen, local_experts=None, combine="sum"):
    """One fused-MoE check; returns the relative error. local_experts: an EP-style map holding that many experts."""
    G = E
    E = local_experts or E
    x = torch.randn(T, D, generator=gen, device=device).to(dtype)
    w13 = (torch.randn(E, 2 * I, D, generator=gen, device=device) / math.sqrt(D)).to(dtype)
    w2 = (torch.randn(E, D, I, generator=gen, device=device) / math.sqrt(I)).to(dtype)
    tw, ti = torch.topk(torch.softmax(torch.randn(T, G, generator=gen, device=device), -1), K, dim=-1)
    emap = None
    if local_experts:
        emap = torch.full((G,), -1, dtype=torch.int32, device=device)
        emap[torch.randperm(G, generator=gen, device=device)[:E]] = torch.arange(E, dtype=torch.int32, device=device)
    out = torch.full((T, D), float("nan"), dtype=dtype, device=device)
    with no_host_sync(device):
        triton_fused_moe(x, w13, w2, tw, ti, emap, out=out, combine=combine)
    want = oracle_moe(x, w13, w2, tw, ti, emap)
    assert torch.isfinite(out).all()
    return float((out.float() - want).norm() / want.norm())


@pytest.mark.parametrize("T", [1, 64, 1024])
@pytest.mark.parametrize("name", list(MOE_SHAPES))
def test_fused_moe_real_shapes_bf16(name, T):
    gen = torch.Generator(device="cuda").manual_seed(T)
    err = run_moe_case(*MOE_SHAPES[name], T, torch.bfloat16, torch.device("cuda"), gen)
    assert err < 1e-2, f"{name} T={T}: relative error {err:.3g}"


def test_fused_moe_real_shapes_variants():
    dev, gen = torch.device("cuda"), torch.Generator(device="cuda").manual_seed(1)
    assert run_moe_case(*MOE_SHAPES["qwen3-30b-a3b"], 4096, torch.bfloat16, dev, gen, combine="atomic") < 1e-2
    assert run_moe_case(*MOE_SHAPES["deepseek-v3"], 256, torch.bfloat16, dev, gen, local_experts=32) < 1e-2  # EP8 rank
    assert run_moe_case(*MOE_SHAPES["qwen3-30b-a3b"], 64, torch.float32, dev, gen) < 1e-5
    assert run_moe_case(*MOE_SHAPES["mixtral-8x7b"], 16, torch.float16, dev, gen) < 2e-3


@pytest.mark.parametrize("T,E,K,bm", [(16384, 256, 8, 64), (4096, 128, 8, 128), (1, 8, 2, 16), (333, 128, 8, 16)])
def test_align_real_shapes(T, E, K, bm):
    ids = torch.topk(torch.rand(T, E, device="cuda"), K, dim=-1).indices
    with no_host_sync(ids.device):
        got = moe_align_block_size(ids, bm, E)
    want = reference_moe_align_block_size(ids, bm, E)
    n = int(want[2])
    assert int(got[2]) == n and torch.equal(got[1], want[1]) and torch.equal(got[0][:n], want[0][:n])


def run_attention_case(ctx_q, N, K, H, L, dtype, device, gen, num_splits=None):
    """Random paged caches (scattered blocks), this step's K/V written by the Triton kernel; relative error vs fp32 reference."""
    num_blocks = sum(-(-c // L) for c, _ in ctx_q) + 8
    k_cache = torch.randn(num_blocks + 1, L, K, H, generator=gen, device=device).to(dtype)
    v_cache = torch.randn(num_blocks + 1, L, K, H, generator=gen, device=device).to(dtype)
    k_cache[-1] = 0
    v_cache[-1] = 0
    perm = torch.randperm(num_blocks, generator=gen, device=device).tolist()
    tables, slots = [], []
    for ctx, ql in ctx_q:
        blocks = [perm.pop() for _ in range(-(-ctx // L))]
        tables.append(blocks)
        slots += [blocks[p // L] * L + p % L for p in range(ctx - ql, ctx)]
    T = sum(q for _, q in ctx_q)
    M = max(map(len, tables))
    q_lens, seq_lens = [q for _, q in ctx_q], [c for c, _ in ctx_q]
    qsl = [0]
    for q in q_lens:
        qsl.append(qsl[-1] + q)
    meta = AttentionMetadata(torch.tensor(qsl, dtype=torch.int32, device=device),
                             torch.tensor(seq_lens, dtype=torch.int32, device=device),
                             torch.tensor([t + [0] * (M - len(t)) for t in tables], dtype=torch.int32, device=device),
                             torch.tensor(slots, dtype=torch.long, device=device), q_lens, seq_lens, max(q_lens),
                             max(seq_lens), null_block=num_blocks)
    q = torch.randn(T, N, H, generator=gen, device=device).to(dtype)
    k_new = torch.randn(T, K, H, generator=gen, device=device).to(dtype)
    v_new = torch.randn(T, K, H, generator=gen, device=device).to(dtype)
    out = torch.full_like(q, float("nan"))
    with no_host_sync(device):
        triton_write_kv(k_new, v_new, k_cache, v_cache, meta.slot_mapping_T)
        triton_paged_attention(q, k_cache, v_cache, meta, H**-0.5, out=out, num_splits=num_splits)
    want = reference_paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, H**-0.5)
    assert torch.isfinite(out).all()
    return float((out.float() - want).norm() / want.norm())


@pytest.mark.parametrize("heads", [(32, 4), (32, 8)], ids=["qwen3", "mixtral"])
@pytest.mark.parametrize("case", ["decode64", "decode1_long", "mixed", "prefix_hit"])
def test_paged_attention_real_shapes(heads, case):
    N, K = heads
    gen = torch.Generator(device="cuda").manual_seed(7)
    lens = torch.randint(1, 4096, (64,), generator=torch.Generator().manual_seed(3)).tolist()
    ctx_q = {"decode64": [(n, 1) for n in lens], "decode1_long": [(16001, 1)],
             "mixed": [(1000, 1), (777, 777), (2048, 300), (5, 1), (130, 2)],
             # short chunks over long cached prefixes: few q blocks, so the prefill kernel splits the keys
             "prefix_hit": [(16000, 4), (8000, 20), (1000, 1)]}[case]
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
        err = run_attention_case(ctx_q, N, K, 128, 16, dtype, torch.device("cuda"), gen)
        assert err < tol, f"{case} {dtype}: relative error {err:.3g}"


@pytest.mark.parametrize("D", [2048, 4096, 7168])
def test_add_rms_norm_and_rotary_real_shapes(D):
    gen = torch.Generator(device="cuda").manual_seed(D)
    x, r = (torch.randn(257, D, generator=gen, device="cuda").bfloat16() for _ in range(2))
    w = torch.randn(D, generator=gen, device="cuda").bfloat16()
    with no_host_sync(x.device):
        got, summed = triton_add_rms_norm(x, r, w, 1e-6)
    want, want_sum = reference_add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(summed, want_sum)
    assert float((got.float() - want.float()).norm() / want.float().norm()) < 1e-2
    q, k = torch.randn(257, 32, 128, device="cuda").bfloat16(), torch.randn(257, 4, 128, device="cuda").bfloat16()
    pos = torch.randint(0, 40960, (257,), device="cuda")
    cache = rotary_cos_sin_cache(128, 40960, 1e6, device="cuda")
    with no_host_sync(q.device):
        gq, gk = triton_rotary(q, k, pos, cache)
    wq, wk = reference_rotary(q, k, pos, cache)
    assert torch.equal(gq, wq) and torch.equal(gk, wk)


def test_paged_attention_cache_past_int32_offsets():
    """A KV cache of more than 2**31 elements per layer (here 140k blocks x 16 x 8 x 128 bf16 = 4.6 GB each
    for K and V): sequences whose blocks sit past element 2**31 must read and write there, which an int32
    offset would wrap. The same case on a compact cache (blocks renumbered from 0) is the oracle."""
    dev = torch.device("cuda")
    L, K, N, H = 16, 8, 32, 128
    num_blocks = 140_000
    assert num_blocks * L * K * H > 2**31
    gen = torch.Generator(device="cuda").manual_seed(11)
    ctx_q = [(3000, 1), (700, 5), (64, 64)]
    need = [-(-c // L) for c, _ in ctx_q]
    big_k = torch.zeros(num_blocks + 1, L, K, H, dtype=torch.bfloat16, device=dev)
    big_v = torch.zeros_like(big_k)
    first = num_blocks - sum(need) - 3  # the highest blocks: offsets ~ 2.29e9 elements
    tables_big, tables_small, slots_big, slots_small = [], [], [], []
    nxt = 0
    for (ctx, ql), nb in zip(ctx_q, need):
        small = list(range(nxt, nxt + nb))
        nxt += nb
        big = [first + b for b in small]
        tables_small.append(small)
        tables_big.append(big)
        slots_small += [small[p // L] * L + p % L for p in range(ctx - ql, ctx)]
        slots_big += [big[p // L] * L + p % L for p in range(ctx - ql, ctx)]
    small_k = torch.randn(nxt + 1, L, K, H, generator=gen, device=dev).bfloat16()
    small_v = torch.randn(nxt + 1, L, K, H, generator=gen, device=dev).bfloat16()
    small_k[-1], small_v[-1] = 0, 0
    big_k[first : first + nxt], big_v[first : first + nxt] = small_k[:nxt], small_v[:nxt]
    T = sum(q for _, q in ctx_q)
    q = torch.randn(T, N, H, generator=gen, device=dev).bfloat16()
    k_new, v_new = (torch.randn(T, K, H, generator=gen, device=dev).bfloat16() for _ in range(2))
    outs = {}
    for kc, vc, tables, slots, null in ((big_k, big_v, tables_big, slots_big, num_blocks),
                                        (small_k, small_v, tables_small, slots_small, nxt)):
        M = max(map(len, tables))
        qsl = [0]
        for _, ql in ctx_q:
            qsl.append(qsl[-1] + ql)
        meta = AttentionMetadata(torch.tensor(qsl, dtype=torch.int32, device=dev),
                                 torch.tensor([c for c, _ in ctx_q], dtype=torch.int32, device=dev),
                                 torch.tensor([t + [null] * (M - len(t)) for t in tables], dtype=torch.int32, device=dev),
                                 torch.tensor(slots, dtype=torch.long, device=dev), [ql for _, ql in ctx_q],
                                 [c for c, _ in ctx_q], max(ql for _, ql in ctx_q), max(c for c, _ in ctx_q), null)
        with no_host_sync(dev):
            triton_write_kv(k_new, v_new, kc, vc, meta.slot_mapping_T)
            # Both attention paths: decode kernel split 4 ways + plain prefill, and the split prefill
            # kernel that takes the decode sequence along.
            for name, kw in (("decode split", dict(num_splits=4, prefill_splits=1)), ("prefill split", dict(prefill_splits=4))):
                outs.setdefault(name, []).append(triton_paged_attention(q, kc, vc, meta, H**-0.5, **kw))
    for name, (big, small) in outs.items():
        assert torch.equal(big, small), name
    assert torch.equal(big_k[first : first + nxt], small_k[:nxt]) and torch.equal(big_v[first : first + nxt], small_v[:nxt])
