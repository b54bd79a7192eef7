"""Block-sparse attention's kernels (kernels/block_sparse.py, MiniMax-M3's sparse layers): the references against
dense paged attention, and the Triton attention against the reference (Triton in the interpreter on CPU).

Shapes are small and ragged: a decode token, a chunk over a cached prefix, a fresh prompt, contexts not multiples of
the paged block (4) nor of the selection block (3 or 8), block tables shuffled, unwritten cache rows NaN (a read the
kernel should not make shows), selections that keep every block, drop some, and keep no local block.
"""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.attention import reference_paged_attention
from moelink.kernels.block_sparse import reference_block_sparse_attention, reference_block_sparse_select

from tests.helpers.dsa_cases import CTX_Q, cache_of, meta_of, meta_to



N, K, H, HI, I = 4, 2, 16, 2, 16
# Normwise relative error against the float64 reference.
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _caches(gen, meta, dtype, device):
    L = 4
    k = cache_of(gen, meta, K * H, dtype, device).view(-1, L, K, H)
    v = cache_of(gen, meta, K * H, dtype, device).view(-1, L, K, H)
    return k, v


def _selection(gen, meta, block_size, topk, local):
    """The reference indexer's selection over random index keys, per query head (each index head's for its two)."""
    T = sum(meta.query_lens)
    index = cache_of(gen, meta, I, torch.float64, "cpu")
    q = torch.randn(T, HI, I, generator=gen, dtype=torch.float64)
    return reference_block_sparse_select(q, index, meta, block_size, topk, local).repeat_interleave(N // HI, dim=1)


def test_reference_keeping_every_block_is_dense_attention(gen):
    meta = meta_of(gen, CTX_Q, "cpu")
    k, v = _caches(gen, meta, torch.float64, "cpu")
    T = sum(meta.query_lens)
    q = torch.randn(T, N, H, generator=gen, dtype=torch.float64)
    every = _selection(gen, meta, 3, 100, 0)
    dense = reference_paged_attention(q, k, v, meta, 0.25)
    torch.testing.assert_close(reference_block_sparse_attention(q, k, v, meta, every, 3, 0.25), dense)
    # Dropping blocks changes the output (the kernels' tests would notice one reading everything).
    some = _selection(gen, meta, 3, 2, 1)
    assert (some < 0).any() or some.shape[2] < every.shape[2]
    assert not torch.allclose(reference_block_sparse_attention(q, k, v, meta, some, 3, 0.25), dense)


def test_selection_contract(gen):
    """Left-packed valid blocks, -1 after; a query's own block kept with local_blocks >= 1; no future block."""
    meta = meta_of(gen, CTX_Q, "cpu")
    sel = _selection(gen, meta, 3, 4, 2)
    t = 0
    for q_len, ctx in zip(meta.query_lens, meta.seq_lens):
        for i in range(q_len):
            p = ctx - q_len + i
            for row in sel[t].tolist():
                kept = [b for b in row if b >= 0]
                assert row == kept + [-1] * (len(row) - len(kept))
                assert len(kept) == min(4, p // 3 + 1) == len(set(kept))
                assert p // 3 in kept and max(p // 3 - 1, 0) in kept and max(kept) <= p // 3
            t += 1


# Each selection case with both groups (2: each index head's two query heads in one program, their kv head's) and
# both dtypes, the dtype alternating: the dtype sets the operands' casts and the dots' precision the same way in every
# program (no mask or selection branch reads it), so its full cross with the cases and groups (16 runs in the
# interpreter) repeated the same masks and programs; each dtype x group pair still runs on two cases.
_BLOCK_CASES = [(3, 4, 2), (8, 2, 1), (3, 3, 0), (4, 10, 1)]
_DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.slow  # the interpreter: seconds per case
@pytest.mark.parametrize("block_size,topk,local,dtype,group",
                         [(*case, _DTYPES[(i + g) % 2], g + 1) for i, case in enumerate(_BLOCK_CASES) for g in (0, 1)])
def test_triton_attention_matches_reference(gen, kdev, dtype, block_size, topk, local, group):
    from moelink.kernels.triton_block_sparse import triton_block_sparse_attention

    meta = meta_of(gen, CTX_Q, "cpu")
    sel = _selection(gen, meta, block_size, topk, local)
    k, v = _caches(gen, meta, dtype, "cpu")
    T = sum(meta.query_lens)
    q = torch.randn(T, N, H, generator=gen).to(dtype)
    want = reference_block_sparse_attention(q.double(), k.double(), v.double(), meta, sel, block_size, 0.25)
    got = triton_block_sparse_attention(q.to(kdev), k.to(kdev), v.to(kdev), meta_to(meta, kdev), sel.to(kdev),
                                        block_size, 0.25, group=group).cpu()
    assert got.dtype == dtype and not got.isnan().any()
    err = (got.double() - want).norm() / want.norm()
    assert err < REL_TOL[dtype], err


@pytest.mark.slow
def test_triton_attention_fp8_cache_scales(gen, kdev):
    """An fp8 cache's rows count as stored times k_scale / v_scale, as the reference reads them."""
    from moelink.kernels.triton_block_sparse import triton_block_sparse_attention

    meta = meta_of(gen, CTX_Q, "cpu")
    sel = _selection(gen, meta, 3, 3, 1)
    k, v = _caches(gen, meta, torch.float32, "cpu")
    k8, v8 = k.nan_to_num().to(torch.float8_e4m3fn), v.nan_to_num().to(torch.float8_e4m3fn)
    T = sum(meta.query_lens)
    q = torch.randn(T, N, H, generator=gen)
    want = reference_block_sparse_attention(q.double(), k8, v8, meta, sel, 3, 0.25, k_scale=0.5, v_scale=2.0)
    got = triton_block_sparse_attention(q.to(kdev), k8.to(kdev), v8.to(kdev), meta_to(meta, kdev), sel.to(kdev), 3,
                                        0.25, k_scale=0.5, v_scale=2.0, group=2).cpu()
    err = (got.double() - want.double()).norm() / want.double().norm()
    assert err < 1e-5, err


DECODES = [(37, 1), (9, 1), (1, 1), (20, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("ctx_q", [CTX_Q, DECODES], ids=["mixed", "decodes"])
@pytest.mark.parametrize("block_size,topk,local", [(3, 4, 2), (8, 2, 1), (3, 3, 0)])
def test_triton_selection_matches_reference(gen, kdev, block_size, topk, local, ctx_q):
    """The Triton selection keeps the reference's blocks, as sets per (token, index head): a mixed step scored as
    wide as its host bound, a decode step max_len (64) wide, as a decode graph's."""
    from moelink.kernels.triton_block_sparse import triton_block_sparse_select

    meta = meta_of(gen, ctx_q, "cpu")
    T = sum(meta.query_lens)
    index = cache_of(gen, meta, I, torch.float32, "cpu")
    q = torch.randn(T, HI, I, generator=gen)
    want = reference_block_sparse_select(q, index, meta, block_size, topk, local)
    got = triton_block_sparse_select(q.to(kdev), index.to(kdev), meta_to(meta, kdev), block_size, topk, local,
                                     max_len=64).cpu()
    assert got.dtype == torch.int32 and got.shape == want.shape
    for g, w in zip(got.reshape(-1, topk).tolist(), want.reshape(-1, topk).tolist()):
        assert sorted(x for x in g if x >= 0) == sorted(x for x in w if x >= 0) and g.count(-1) == w.count(-1)


@pytest.mark.parametrize("block_size,topk,local", [(3, 4, 2), (8, 2, 1), (3, 3, 0)])
def test_batch_invariant_forms_match_the_reference(gen, block_size, topk, local):
    """Batch-invariant mode's block-sparse ops (kernels/batch_invariant_block_sparse.py): the same blocks as sets per
    (token, index head), and the same attention over a selection, in float64."""
    from moelink.kernels.batch_invariant_block_sparse import (invariant_block_sparse_attention,
                                                              invariant_block_sparse_select)

    meta = meta_of(gen, CTX_Q, "cpu")
    T = sum(meta.query_lens)
    index = cache_of(gen, meta, I, torch.float64, "cpu")
    qi = torch.randn(T, HI, I, generator=gen, dtype=torch.float64)
    want = reference_block_sparse_select(qi, index, meta, block_size, topk, local)
    got = invariant_block_sparse_select(qi, index, meta, block_size, topk, local)
    assert got.dtype == torch.int32 and got.shape == want.shape
    for g, w in zip(got.reshape(-1, topk).tolist(), want.reshape(-1, topk).tolist()):
        assert sorted(x for x in g if x >= 0) == sorted(x for x in w if x >= 0) and g.count(-1) == w.count(-1)
    k, v = _caches(gen, meta, torch.float64, "cpu")
    q = torch.randn(T, N, H, generator=gen, dtype=torch.float64)
    sel = want.repeat_interleave(N // HI, dim=1)
    torch.testing.assert_close(invariant_block_sparse_attention(q, k, v, meta, sel, block_size, 0.25),
                               reference_block_sparse_attention(q, k, v, meta, sel, block_size, 0.25))
