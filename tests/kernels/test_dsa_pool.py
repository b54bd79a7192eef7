"""GLM-5.3-Flash's pooled DSA selection (kernels/dsa.reference_dsa_pool_topk, kernels/triton_dsa_pool_topk.py): the
reference against transformers' own Glm5NextTextIndexer (no cache), and the Triton kernels against the reference at
small ragged paged shapes (the interpreter on CPU): a decode token, a chunk over a cached prefix, a fresh prompt,
contexts not multiples of the pool or the block, blocks scattered, unwritten cache rows NaN."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelink.kernels.attention import AttentionMetadata
from moelink.kernels.dsa import reference_dsa_pool_topk

from tests.helpers.dsa_cases import CTX_Q, L, cache_of, meta_of, meta_to

H, D, KP, TOPK = 16, 12, 4, 8  # 16 heads: no pool scores an exact 0, where torch.topk breaks ties its own way


def _sets(out: torch.Tensor) -> list[list[int]]:
    return [sorted(x for x in row if x >= 0) for row in out.tolist()]


def test_reference_is_transformers_indexer(gen):
    """One 41-token prompt (10 pools and a tail of 1): transformers' indexer without a cache, on its own keys, gate
    scores, queries and weights, selects per query the positions the paged reference does."""
    from transformers import Glm5NextTextConfig
    from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextIndexer

    S, hidden, Q = 41, 32, 16
    cfg = Glm5NextTextConfig(hidden_size=hidden, q_lora_rank=Q, index_topk=TOPK, index_kpool=KP, index_n_heads=H,
                             index_head_dim=D, num_hidden_layers=1, vocab_size=16, pad_token_id=0)
    torch.manual_seed(0)
    ix = Glm5NextTextIndexer(cfg, 0).to(torch.float64)
    with torch.no_grad():
        for p in ix.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    x = torch.randn(1, S, hidden, generator=gen, dtype=torch.float64)
    q_resid = torch.randn(1, S, Q, generator=gen, dtype=torch.float64)
    want = ix(x, q_resid, torch.ones(1, S, dtype=torch.bool), None)[0]
    with torch.no_grad():
        k = ix.k_norm(ix.wk(x))[0]
        gate = F.linear(x, ix.index_kpool_compress_gate)[0]
        q = ix.wq_b(q_resid).view(S, H, D)
        w = ix.weights_proj(x)[0].float() * H**-0.5
    meta = meta_of(gen, [(S, S)], "cpu")
    cache = torch.zeros(meta.null_block + 1, L, 2 * D, dtype=torch.float64)
    cache.view(-1, 2 * D)[meta.slot_mapping_T] = torch.cat([k, gate], dim=-1)
    got = reference_dsa_pool_topk(q, w, cache, ix.index_kpool_compress_ape.detach(), meta, TOPK, D**-0.5)
    assert got.shape == (S, TOPK + KP - 1)
    assert _sets(got) == _sets(want)
    assert any(len(r) < min(p + 1, 99) for p, r in enumerate(_sets(got)))  # sparse rows: some positions left out


def _case(gen, ctx_q, device, dtype=torch.float32):
    meta = meta_of(gen, ctx_q, device)
    cache = cache_of(gen, meta, 2 * D, dtype, device)
    T = sum(meta.query_lens)
    q = torch.randn(T, H, D, generator=gen).to(dtype).to(device)
    w = torch.randn(T, H, generator=gen).to(device)
    ape = torch.randn(KP, D, generator=gen).to(dtype).to(device)
    return meta, cache, q, w, ape


def test_triton_selection_equals_reference(gen, kdev):
    from moelink.kernels.triton_dsa_pool_topk import triton_dsa_pool_topk

    meta, cache, q, w, ape = _case(gen, CTX_Q, kdev)
    want = reference_dsa_pool_topk(q.cpu(), w.cpu(), cache.cpu(), ape.cpu(), meta_to(meta, "cpu"), TOPK, D**-0.5)
    got = triton_dsa_pool_topk(q, w, cache, ape, meta, TOPK, D**-0.5, max_len=64)
    assert got.shape == want.shape and _sets(got.cpu()) == _sets(want)


def test_triton_selection_decode_placeholders(gen, kdev):
    """Decode rows whose host lengths are placeholders (a decode graph's: 1) read the device lengths and score
    max_len wide; one row short enough to take every pool."""
    from moelink.kernels.triton_dsa_pool_topk import triton_dsa_pool_topk

    meta, cache, q, w, ape = _case(gen, [(23, 1), (6, 1), (40, 1), (8, 1)], kdev)
    want = reference_dsa_pool_topk(q.cpu(), w.cpu(), cache.cpu(), ape.cpu(), meta_to(meta, "cpu"), TOPK, D**-0.5)
    graph_meta = AttentionMetadata(meta.query_start_loc_S1, meta.seq_lens_S, meta.block_tables_SM, meta.slot_mapping_T,
                                   [1] * 4, [1] * 4, 1, 1, meta.null_block)
    got = triton_dsa_pool_topk(q, w, cache, ape, graph_meta, TOPK, D**-0.5, max_len=48)
    assert _sets(got.cpu()) == _sets(want)
    assert _sets(want)[1] == list(range(6)) and _sets(want)[3] == list(range(8))
