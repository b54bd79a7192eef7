"""DeepSeek Sparse Attention's kernels (kernels/dsa.py): the references against transformers' formulas and the dense MLA
reference, and the Triton selection and sparse MLA against the references (Triton in the interpreter on CPU).

Shapes are small and ragged: a decode token, a chunk over a cached prefix, a fresh prompt, contexts not multiples of
the block, blocks scattered, unwritten cache rows NaN (a read the kernels should not make shows).
"""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.attention import AttentionMetadata
from moelink.kernels.dsa import (causal_lens, reference_dsa_topk, reference_sparse_mla_attention,
                                 reference_topk_positions)
from moelink.kernels.mla import reference_mla_attention

from tests.helpers.dsa_cases import (CTX_Q, L, assert_same_sets, cache_of, fp8_index_cache, meta_of, meta_to,
                                     positions)


# -- references ------------------------------------------------------------------------------------------------------
def test_reference_selection_is_transformers_indexer_formula(gen):
    """score[t, j] = sum_h w[t, h] relu(scale q[t, h] . k[j]) over j <= position, top-k by torch.topk (as transformers'
    DeepseekV32Indexer), against the reference's paged, chunked computation: the same sets."""
    meta = meta_of(gen, CTX_Q, "cpu")
    H, D, K = 16, 16, 6  # 16 heads: no key scores an exact 0 (every head's ReLU 0), where torch.topk breaks ties its way
    cache = cache_of(gen, meta, D, torch.float64, "cpu")
    T = sum(meta.query_lens)
    q = torch.randn(T, H, D, generator=gen, dtype=torch.float64)
    w = torch.randn(T, H, generator=gen)
    got = reference_dsa_topk(q, w, cache, meta, K, D**-0.5)
    for t, (s, p) in enumerate(positions(meta, "cpu")):
        slots = [int(meta.block_tables_SM[s, j // L]) * L + j % L for j in range(p + 1)]
        keys = cache.view(-1, D)[slots].float()
        score = w[t] @ torch.relu(q[t].float() @ keys.T * D**-0.5)
        want = set(score.topk(min(K, p + 1)).indices.tolist())
        row = got[t].tolist()
        assert set(row[: len(want)]) == want and row[len(want):] == [-1] * (K - len(want)), (t, row, want)


def test_reference_topk_ties_keep_the_lowest_positions():
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, -0.0, 5.0], [0.0, -0.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    got = reference_topk_positions(scores, torch.tensor([7, 6]), 3)
    assert got.tolist() == [[1, 2, 6], [0, 1, 4]]


def test_reference_sparse_equals_dense_when_every_position_is_selected(gen):
    meta = meta_of(gen, CTX_Q, "cpu")
    N, C, P = 3, 16, 8
    cache = cache_of(gen, meta, C + P, torch.float64, "cpu")
    T = sum(meta.query_lens)
    q_lat, q_pe = torch.randn(T, N, C, generator=gen, dtype=torch.float64), torch.randn(T, N, P, generator=gen,
                                                                                        dtype=torch.float64)
    K = max(meta.seq_lens)
    n = causal_lens(meta, torch.device("cpu"))
    all_TK = torch.where(torch.arange(K)[None, :] < n[:, None], torch.arange(K)[None, :], -1).to(torch.int32)
    dense = reference_mla_attention(q_lat, q_pe, cache, meta, 0.3)
    torch.testing.assert_close(reference_sparse_mla_attention(q_lat, q_pe, cache, meta, all_TK, 0.3), dense)
    # A selection that drops positions differs (the test would notice a kernel reading everything).
    assert not torch.allclose(reference_sparse_mla_attention(q_lat, q_pe, cache, meta, all_TK[:, :3], 0.3), dense)


# -- Triton ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, "same"), (torch.bfloat16, "fp8")], ids=["fp32", "bf16-fp8"])
def test_triton_selection_equals_reference(gen, kdev, dtype, cache_dtype):
    from moelink.kernels.triton_dsa_topk import triton_dsa_topk

    meta = meta_of(gen, CTX_Q, kdev)
    H, D, K = 16, 12, 8
    cdt = torch.float8_e4m3fn if cache_dtype == "fp8" else dtype
    cache = cache_of(gen, meta, D, cdt, kdev)
    T = sum(meta.query_lens)
    q = torch.randn(T, H, D, generator=gen).to(dtype).to(kdev)
    w = torch.randn(T, H, generator=gen).to(kdev)
    want = reference_dsa_topk(q.cpu(), w.cpu(), cache.cpu(), meta_to(meta, "cpu"), K, D**-0.5)
    got = triton_dsa_topk(q, w, cache, meta, K, D**-0.5, max_len=64)
    assert_same_sets(got.cpu(), want)


def test_triton_selection_ties_and_decode_placeholders(gen, kdev):
    """Exact ties (zero weights: every score 0) keep the lowest positions, as the reference; a decode step whose host
    lengths are placeholders (a decode graph's: 1) reads the device lengths and scores max_len wide."""
    from moelink.kernels.triton_dsa_topk import triton_dsa_topk

    ctx_q = [(23, 1), (6, 1), (40, 1)]
    meta = meta_of(gen, ctx_q, kdev)
    H, D, K = 16, 16, 8
    cache = cache_of(gen, meta, D, torch.float32, kdev)
    q = torch.randn(3, H, D, generator=gen).to(kdev)
    w = torch.randn(3, H, generator=gen)
    w[0] = 0.0  # row 0: every score ties at 0
    w = w.to(kdev)
    want = reference_dsa_topk(q.cpu(), w.cpu(), cache.cpu(), meta_to(meta, "cpu"), K, 0.25)
    assert want[0].tolist() == list(range(8))
    graph_meta = AttentionMetadata(meta.query_start_loc_S1, meta.seq_lens_S, meta.block_tables_SM, meta.slot_mapping_T,
                                   [1] * 3, [1] * 3, 1, 1, meta.null_block)
    got = triton_dsa_topk(q, w, cache, graph_meta, K, 0.25, max_len=48)
    assert_same_sets(got.cpu(), want)


def test_triton_selection_breaks_many_ties_as_the_reference(gen, kdev):
    """Scores from 4 values over contexts up to 300 (keys c * e0, c in 0..3, queries e0): the K-th largest sits
    among many equal scores, which the radix select must count and break to the lowest positions exactly."""
    from moelink.kernels.triton_dsa_topk import triton_dsa_topk

    ctx_q = [(300, 1), (97, 5), (40, 1)]
    meta = meta_of(gen, ctx_q, "cpu")
    H, D, K = 16, 16, 24
    cache = torch.zeros(int(meta.block_tables_SM.max()) + 2, L, D)
    cache[..., 0] = torch.randint(0, 4, cache.shape[:2], generator=gen).float()
    T = sum(meta.query_lens)
    q = torch.zeros(T, H, D)
    q[..., 0] = 1.0
    w = torch.ones(T, H)
    want = reference_dsa_topk(q, w, cache, meta, K, 0.25)
    got = triton_dsa_topk(q.to(kdev), w.to(kdev), cache.to(kdev), meta_to(meta, kdev), K, 0.25, max_len=320)
    assert_same_sets(got.cpu(), want)


@pytest.mark.parametrize("dtype,cache_dtype,splits", [(torch.float32, "same", 1), (torch.bfloat16, "same", 3),
                                                      (torch.bfloat16, "fp8", 3)], ids=["fp32", "bf16-split", "fp8-split"])
def test_triton_sparse_mla_equals_reference(gen, kdev, dtype, cache_dtype, splits):
    """Split 3 ways with K = 20 and 16-slot tiles: a second split partly filled, a third empty, merged."""
    from moelink.kernels.triton_mla_sparse import triton_sparse_mla_attention

    meta = meta_of(gen, CTX_Q, kdev)
    N, C, P, K = 4, 32, 16, (20 if splits > 1 else 8)
    cdt = torch.float8_e4m3fn if cache_dtype == "fp8" else dtype
    cache = cache_of(gen, meta, C + P, cdt, kdev)
    T = sum(meta.query_lens)
    q_lat = torch.randn(T, N, C, generator=gen).to(dtype).to(kdev)
    q_pe = torch.randn(T, N, P, generator=gen).to(dtype).to(kdev)
    # A random selection of min(K, p + 1) causal positions per token, in random order, then -1.
    rows = []
    for _, p in positions(meta, "cpu"):
        picked = torch.randperm(p + 1, generator=gen)[:K].tolist()
        rows.append(picked + [-1] * (K - len(picked)))
    topk = torch.tensor(rows, dtype=torch.int32)
    kv_scale = 1.5 if cache_dtype == "fp8" else 1.0
    want = reference_sparse_mla_attention(q_lat.double().cpu(), q_pe.double().cpu(), cache.cpu().double(),
                                          meta_to(meta, "cpu"), topk, 0.2, kv_scale)
    got = triton_sparse_mla_attention(q_lat, q_pe, cache, meta, topk.to(kdev), 0.2, kv_scale, num_splits=splits)
    err = (got.double().cpu() - want).norm() / want.norm()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err



def test_triton_decode_path_reads_nothing_back_from_the_device(gen, kdev, monkeypatch):
    """A decode step's selection and sparse MLA (what a decode graph captures) make no device→host sync: counted on
    CPU by tests.helpers.host_syncs around the wrappers, the interpreter's own launches left out."""
    from moelink.kernels import triton_dsa_keys as keys_mod
    from moelink.kernels import triton_dsa_topk as topk_mod
    from moelink.kernels import triton_mla_sparse as sparse_mod

    from tests.helpers.host_syncs import HostSyncCounter

    ctx_q = [(23, 1), (6, 1), (40, 1)]
    meta = meta_of(gen, ctx_q, kdev)
    graph_meta = AttentionMetadata(meta.query_start_loc_S1, meta.seq_lens_S, meta.block_tables_SM, meta.slot_mapping_T,
                                   [1] * 3, [1] * 3, 1, 1, meta.null_block)  # a decode graph's placeholder lengths
    index = cache_of(gen, meta, 16, torch.bfloat16, kdev)
    index8 = fp8_index_cache(gen, meta, 16, "cpu")[0].to(kdev)
    latent = cache_of(gen, meta, 48, torch.bfloat16, kdev)
    q = torch.randn(3, 16, 16, generator=gen).to(torch.bfloat16).to(kdev)
    w = torch.randn(3, 16, generator=gen).to(kdev)
    q_lat = torch.randn(3, 4, 32, generator=gen).to(torch.bfloat16).to(kdev)
    q_pe = torch.randn(3, 4, 16, generator=gen).to(torch.bfloat16).to(kdev)
    with HostSyncCounter() as counter:
        class Paused:  # a kernel whose launch (the interpreter's numpy copies) is not counted
            def __init__(self, kernel):
                self.kernel = kernel

            def __getitem__(self, grid):
                launch = self.kernel[grid]

                def run(*a, **kw):
                    with counter.paused():
                        return launch(*a, **kw)
                return run

        for mod, name in ((topk_mod, "_index_scores_kernel"), (topk_mod, "_topk_kernel"),
                          (topk_mod, "_partial_topk_kernel"), (topk_mod, "_merge_topk_kernel"),
                          (keys_mod, "_write_fp8_keys_kernel"),
                          (sparse_mod, "_sparse_mla_kernel"), (sparse_mod, "_mla_merge_kernel")):
            monkeypatch.setattr(mod, name, Paused(getattr(mod, name)))
        with counter.counting():
            # fp8 keys: this step's written (a padding slot too), then selected on the split path
            keys_mod.triton_write_fp8_index_keys(q[:, 0], index8, graph_meta.slot_mapping_T)
            topk_mod.triton_dsa_topk(q, w, index8, graph_meta, 8, 0.25, max_len=48, num_splits=3)
            sel = topk_mod.triton_dsa_topk(q, w, index, graph_meta, 8, 0.25, max_len=48)
            for splits in (None, 3):
                sparse_mod.triton_sparse_mla_attention(q_lat, q_pe, latent, graph_meta, sel, 0.2, num_splits=splits)
    assert counter.count == 0, counter.where
