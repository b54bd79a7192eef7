"""DeepSeek Sparse Attention's kernels (kernels/dsa.py): the references against transformers' formulas and the dense MLA
reference, and the Triton selection and sparse MLA against the references (Triton in the interpreter on CPU).

Shapes are small and ragged: a decode token, a chunk over a cached prefix, a fresh prompt, contexts not multiples of
the block, blocks scattered, unwritten cache rows NaN (a read the kernels should not make shows).
"""
from __future__ import annotations


import pytest
import torch

from moelink.kernels import dsa
from moelink.kernels.attention import AttentionMetadata
from moelink.kernels.dsa import (causal_lens, fp8_key_row_bytes, quantize_index_keys, reference_dsa_index_scores,
                                 reference_dsa_topk, reference_sparse_mla_attention, reference_topk_positions,
                                 reference_write_fp8_index_keys)
from moelink.kernels.mla import reference_mla_attention

CTX_Q = [(37, 1), (29, 7), (9, 9), (1, 1), (20, 1)]  # (context after the step, query tokens)
L = 4


def _meta(gen, ctx_q, device, num_blocks=None):
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


def _cache(gen, meta, width, dtype, device):
    """[blocks + 1, L, width]: every position of every sequence written (random), the null block zeros (the kernels'
    contract: reads past a sequence's end land there), the rest NaN."""
    cache = torch.full((meta.null_block + 1, L, width), float("nan"), dtype=torch.float32)
    cache[meta.null_block] = 0.0
    for s, ctx in enumerate(meta.seq_lens):
        for p in range(ctx):
            cache[int(meta.block_tables_SM[s, p // L]), p % L] = torch.randn(width, generator=gen)
    return cache.to(dtype).to(device)


def _positions(meta, device):
    """Per token, its sequence and position (host)."""
    out = []
    for s, (q, c) in enumerate(zip(meta.query_lens, meta.seq_lens)):
        out += [(s, c - q + i) for i in range(q)]
    return out


# -- references ------------------------------------------------------------------------------------------------------
def test_reference_selection_is_transformers_indexer_formula(gen):
    """score[t, j] = sum_h w[t, h] relu(scale q[t, h] . k[j]) over j <= position, top-k by torch.topk (as transformers'
    DeepseekV32Indexer), against the reference's paged, chunked computation: the same sets."""
    meta = _meta(gen, CTX_Q, "cpu")
    H, D, K = 16, 16, 6  # 16 heads: no key scores an exact 0 (every head's ReLU 0), where torch.topk breaks ties its way
    cache = _cache(gen, meta, D, torch.float64, "cpu")
    T = sum(meta.query_lens)
    q = torch.randn(T, H, D, generator=gen, dtype=torch.float64)
    w = torch.randn(T, H, generator=gen)
    got = reference_dsa_topk(q, w, cache, meta, K, D**-0.5)
    for t, (s, p) in enumerate(_positions(meta, "cpu")):
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
    meta = _meta(gen, CTX_Q, "cpu")
    N, C, P = 3, 16, 8
    cache = _cache(gen, meta, C + P, torch.float64, "cpu")
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

    meta = _meta(gen, CTX_Q, kdev)
    H, D, K = 16, 12, 8
    cdt = torch.float8_e4m3fn if cache_dtype == "fp8" else dtype
    cache = _cache(gen, meta, D, cdt, kdev)
    T = sum(meta.query_lens)
    q = torch.randn(T, H, D, generator=gen).to(dtype).to(kdev)
    w = torch.randn(T, H, generator=gen).to(kdev)
    want = reference_dsa_topk(q.cpu(), w.cpu(), cache.cpu(), _meta_to(meta, "cpu"), K, D**-0.5)
    got = triton_dsa_topk(q, w, cache, meta, K, D**-0.5, max_len=64)
    _assert_same_sets(got.cpu(), want)


def test_triton_selection_ties_and_decode_placeholders(gen, kdev):
    """Exact ties (zero weights: every score 0) keep the lowest positions, as the reference; a decode step whose host
    lengths are placeholders (a decode graph's: 1) reads the device lengths and scores max_len wide."""
    from moelink.kernels.triton_dsa_topk import triton_dsa_topk

    ctx_q = [(23, 1), (6, 1), (40, 1)]
    meta = _meta(gen, ctx_q, kdev)
    H, D, K = 16, 16, 8
    cache = _cache(gen, meta, D, torch.float32, kdev)
    q = torch.randn(3, H, D, generator=gen).to(kdev)
    w = torch.randn(3, H, generator=gen)
    w[0] = 0.0  # row 0: every score ties at 0
    w = w.to(kdev)
    want = reference_dsa_topk(q.cpu(), w.cpu(), cache.cpu(), _meta_to(meta, "cpu"), K, 0.25)
    assert want[0].tolist() == list(range(8))
    graph_meta = AttentionMetadata(meta.query_start_loc_S1, meta.seq_lens_S, meta.block_tables_SM, meta.slot_mapping_T,
                                   [1] * 3, [1] * 3, 1, 1, meta.null_block)
    got = triton_dsa_topk(q, w, cache, graph_meta, K, 0.25, max_len=48)
    _assert_same_sets(got.cpu(), want)


def test_triton_selection_breaks_many_ties_as_the_reference(gen, kdev):
    """Scores from 4 values over contexts up to 300 (keys c * e0, c in 0..3, queries e0): the K-th largest sits
    among many equal scores, which the radix select must count and break to the lowest positions exactly."""
    from moelink.kernels.triton_dsa_topk import triton_dsa_topk

    ctx_q = [(300, 1), (97, 5), (40, 1)]
    meta = _meta(gen, ctx_q, "cpu")
    H, D, K = 16, 16, 24
    cache = torch.zeros(int(meta.block_tables_SM.max()) + 2, L, D)
    cache[..., 0] = torch.randint(0, 4, cache.shape[:2], generator=gen).float()
    T = sum(meta.query_lens)
    q = torch.zeros(T, H, D)
    q[..., 0] = 1.0
    w = torch.ones(T, H)
    want = reference_dsa_topk(q, w, cache, meta, K, 0.25)
    got = triton_dsa_topk(q.to(kdev), w.to(kdev), cache.to(kdev), _meta_to(meta, kdev), K, 0.25, max_len=320)
    _assert_same_sets(got.cpu(), want)


@pytest.mark.parametrize("dtype,cache_dtype,splits", [(torch.float32, "same", 1), (torch.bfloat16, "same", 3),
                                                      (torch.bfloat16, "fp8", 3)], ids=["fp32", "bf16-split", "fp8-split"])
def test_triton_sparse_mla_equals_reference(gen, kdev, dtype, cache_dtype, splits):
    """Split 3 ways with K = 20 and 16-slot tiles: a second split partly filled, a third empty, merged."""
    from moelink.kernels.triton_mla_sparse import triton_sparse_mla_attention

    meta = _meta(gen, CTX_Q, kdev)
    N, C, P, K = 4, 32, 16, (20 if splits > 1 else 8)
    cdt = torch.float8_e4m3fn if cache_dtype == "fp8" else dtype
    cache = _cache(gen, meta, C + P, cdt, kdev)
    T = sum(meta.query_lens)
    q_lat = torch.randn(T, N, C, generator=gen).to(dtype).to(kdev)
    q_pe = torch.randn(T, N, P, generator=gen).to(dtype).to(kdev)
    # A random selection of min(K, p + 1) causal positions per token, in random order, then -1.
    rows = []
    for _, p in _positions(meta, "cpu"):
        picked = torch.randperm(p + 1, generator=gen)[:K].tolist()
        rows.append(picked + [-1] * (K - len(picked)))
    topk = torch.tensor(rows, dtype=torch.int32)
    kv_scale = 1.5 if cache_dtype == "fp8" else 1.0
    want = reference_sparse_mla_attention(q_lat.double().cpu(), q_pe.double().cpu(), cache.cpu().double(),
                                          _meta_to(meta, "cpu"), topk, 0.2, kv_scale)
    got = triton_sparse_mla_attention(q_lat, q_pe, cache, meta, topk.to(kdev), 0.2, kv_scale, num_splits=splits)
    err = (got.double().cpu() - want).norm() / want.norm()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err


def _assert_same_sets(got: torch.Tensor, want: torch.Tensor) -> None:
    for t in range(want.shape[0]):
        w = [x for x in want[t].tolist() if x >= 0]
        g = got[t].tolist()
        assert sorted(g[: len(w)]) == w and g[len(w):] == [-1] * (len(g) - len(w)), (t, g, w)


def _meta_to(meta: AttentionMetadata, device) -> AttentionMetadata:
    return AttentionMetadata(meta.query_start_loc_S1.to(device), meta.seq_lens_S.to(device),
                             meta.block_tables_SM.to(device), meta.slot_mapping_T.to(device), meta.query_lens,
                             meta.seq_lens, meta.max_query_len, meta.max_seq_len, meta.null_block)




def test_triton_decode_path_reads_nothing_back_from_the_device(gen, kdev, monkeypatch):
    """A decode step's selection and sparse MLA (what a decode graph captures) make no device→host sync: counted on
    CPU by tests.helpers.host_syncs around the wrappers, the interpreter's own launches left out."""
    from moelink.kernels import triton_dsa_keys as keys_mod
    from moelink.kernels import triton_dsa_topk as topk_mod
    from moelink.kernels import triton_mla_sparse as sparse_mod

    from tests.helpers.host_syncs import HostSyncCounter

    ctx_q = [(23, 1), (6, 1), (40, 1)]
    meta = _meta(gen, ctx_q, kdev)
    graph_meta = AttentionMetadata(meta.query_start_loc_S1, meta.seq_lens_S, meta.block_tables_SM, meta.slot_mapping_T,
                                   [1] * 3, [1] * 3, 1, 1, meta.null_block)  # a decode graph's placeholder lengths
    index = _cache(gen, meta, 16, torch.bfloat16, kdev)
    index8 = _fp8_index_cache(gen, meta, 16, "cpu")[0].to(kdev)
    latent = _cache(gen, meta, 48, torch.bfloat16, kdev)
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


# -- fp8 index keys with per-128 scales --------------------------------------------------------------------------------
def _fp8_index_cache(gen, meta, D, device):
    """An fp8 key cache (uint8 rows [e4m3 key | pad | float32 scales]) of random LayerNorm'd keys at every written
    position, written by reference_write_fp8_index_keys; the float keys [B + 1, L, D] too (NaN where unwritten)."""
    keys = _cache(gen, meta, D, torch.float32, "cpu")
    keys = torch.nn.functional.layer_norm(keys, (D,)) * 2.0
    keys[meta.null_block] = 0.0
    B1 = keys.shape[0]
    written = ~keys.view(-1, D).isnan().any(1)
    cache = torch.zeros(B1, L, fp8_key_row_bytes(D), dtype=torch.uint8)
    slots = torch.arange(B1 * L)
    reference_write_fp8_index_keys(keys.view(-1, D)[written], cache, slots[written])
    return cache.to(device), keys


def test_fp8_key_layout_matches_the_engine_config():
    """kernels/ imports nothing of the engine: the layout's numbers are held equal here."""
    from moelink.engine.config import sparse_attention as cfg

    assert dsa.SCALE_GROUP == cfg.INDEX_SCALE_GROUP and dsa.FP8_KEY_DTYPE == cfg.INDEX_FP8_DTYPE
    for D in (12, 16, 64, 128, 130, 256):
        assert fp8_key_row_bytes(D) == cfg.index_fp8_row_bytes(D)
    assert fp8_key_row_bytes(128) == 132 and fp8_key_row_bytes(130) == 132 + 8  # 2 groups: the second of 2 values


def test_fp8_keys_round_trip_within_e4m3_and_rows_are_bytes_as_documented(gen):
    """Per 128-value group: scale = amax / 448, e4m3(key / scale) * scale within e4m3's half step (2^-4 relative) of
    the float64 key; the row is [e4m3 bytes | zero pad | float32 scales]; a padding slot (-1) writes the null block's
    zeros."""
    D = 130  # two groups, the second of 2 values, and a 2-byte pad before the scales
    k = torch.randn(5, D, generator=gen, dtype=torch.float64) * torch.tensor([1e-3, 1.0, 30.0, 300.0, 0.0],
                                                                             dtype=torch.float64)[:, None]
    k8, s = quantize_index_keys(k)
    for g0, g in ((0, 0), (128, 1)):
        part = k[:, g0: g0 + 128]
        amax = part.abs().amax(1)
        assert torch.allclose(s[:, g].double(), amax / 448, rtol=1e-6)
        back = k8[:, g0: g0 + 128].double() * s[:, g, None].double()
        assert ((back - part).abs() <= part.abs() * 2**-4 + amax[:, None] * 2**-10 + 1e-30).all()
    assert (s[4] == 0).all() and (k8[4].float() == 0).all()  # an all-zero key: scale 0, no NaN
    cache = torch.full((3, 2, fp8_key_row_bytes(D)), 7, dtype=torch.uint8)
    reference_write_fp8_index_keys(k[:2], cache, torch.tensor([3, -1]))
    row = cache.view(-1, cache.shape[2])[3]
    assert torch.equal(row[:D], k8[0].view(torch.uint8)) and (row[D:132] == 0).all()
    assert torch.equal(row[132:].view(torch.float32), s[0])
    assert (cache[2, 0] == 0).all()  # the null block's (the last's) first row: the padding token's zeros
    assert (cache[:2].view(-1, cache.shape[2])[[0, 1, 2]] == 7).all()  # no other row written


@pytest.mark.parametrize("D", [12, 16, 160], ids=["D12-pad", "D16", "D160-2groups"])
def test_reference_fp8_scores_are_the_dequantized_keys_scores(gen, D):
    """The reference's per-group dot products times the scales equal the scores of the dequantized keys (float64)."""
    meta = _meta(gen, CTX_Q, "cpu")
    cache, _ = _fp8_index_cache(gen, meta, D, "cpu")
    H = 4
    T = sum(meta.query_lens)
    q = torch.randn(T, H, D, generator=gen)
    w = torch.randn(T, H, generator=gen)
    got = reference_dsa_index_scores(q, w, cache, meta, D**-0.5)
    rows = cache.view(-1, cache.shape[2])
    k8 = rows[:, :D].contiguous().view(torch.float8_e4m3fn).double()
    off = -(-D // 4) * 4
    scales = rows[:, off:].contiguous().view(torch.float32).double()
    deq = k8 * scales.repeat_interleave(128, dim=1)[:, :D]
    for t, (s, p) in enumerate(_positions(meta, "cpu")):
        slots = [int(meta.block_tables_SM[s, j // L]) * L + j % L for j in range(p + 1)]
        want = w[t].double() @ torch.relu(q[t].double() @ deq[slots].T * D**-0.5)
        torch.testing.assert_close(got[t, : p + 1].double(), want, rtol=1e-5, atol=1e-5)
        assert got[t, p + 1:].eq(float("-inf")).all()


@pytest.mark.parametrize("dtype,D", [(torch.float32, 12), (torch.bfloat16, 16), (torch.float32, 160)],
                         ids=["fp32-D12", "bf16-D16", "fp32-D160"])
def test_triton_selection_fp8_keys_equals_reference(gen, kdev, dtype, D):
    """fp8 keys with scales: the Triton scores (per-group dots times scales) select the reference's positions, one
    program per row and split over 2-4 programs."""
    from moelink.kernels.triton_dsa_topk import triton_dsa_topk

    meta = _meta(gen, CTX_Q, "cpu")
    cache, _ = _fp8_index_cache(gen, meta, D, "cpu")
    H, K = 16, 8
    T = sum(meta.query_lens)
    q = torch.randn(T, H, D, generator=gen).to(dtype)
    w = torch.randn(T, H, generator=gen)
    want = reference_dsa_topk(q, w, cache, meta, K, D**-0.5)
    for splits in (1, 3) if kdev.type == "cpu" else (1, 2, 3, 4):
        got = triton_dsa_topk(q.to(kdev), w.to(kdev), cache.to(kdev), _meta_to(meta, kdev), K, D**-0.5, max_len=64,
                              num_splits=splits)
        _assert_same_sets(got.cpu(), want)


# -- the multi-program top-k -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("splits", [2, 4, 7])
def test_split_topk_equals_reference_with_ties_and_short_rows(gen, kdev, splits):
    """The partial + merge top-k against the reference: scores of 4 values (many ties at the K-th value) over ragged
    rows: longer than P * K (partials selecting, a short last span at 4 and 7), between K and P * K (spans copied
    whole, programs past the row's end empty), shorter than K (every position), a single position."""
    from moelink.kernels.triton_dsa_topk import triton_dsa_topk

    ctx_q = [(300, 1), (97, 5), (40, 1), (7, 1), (1, 1), (61, 3)]
    meta = _meta(gen, ctx_q, "cpu")
    H, D, K = 16, 16, 12
    cache = torch.zeros(int(meta.block_tables_SM.max()) + 2, L, D)
    cache[..., 0] = torch.randint(0, 4, cache.shape[:2], generator=gen).float()
    T = sum(meta.query_lens)
    q = torch.zeros(T, H, D)
    q[..., 0] = 1.0
    w = torch.ones(T, H)
    want = reference_dsa_topk(q, w, cache, meta, K, 0.25)
    got = triton_dsa_topk(q.to(kdev), w.to(kdev), cache.to(kdev), _meta_to(meta, kdev), K, 0.25, max_len=320,
                          num_splits=splits)
    _assert_same_sets(got.cpu(), want)


def test_split_topk_random_scores_and_decode_placeholders(gen, kdev):
    """Distinct random scores, a decode batch under a graph's placeholder host lengths, split 3 ways."""
    from moelink.kernels.triton_dsa_topk import triton_dsa_topk

    ctx_q = [(200, 1), (33, 1), (9, 1), (130, 1)]
    meta = _meta(gen, ctx_q, kdev)
    H, D, K = 16, 16, 10
    cache = _cache(gen, meta, D, torch.float32, kdev)
    q = torch.randn(4, H, D, generator=gen).to(kdev)
    w = torch.randn(4, H, generator=gen).to(kdev)
    want = reference_dsa_topk(q.cpu(), w.cpu(), cache.cpu(), _meta_to(meta, "cpu"), K, 0.25)
    graph_meta = AttentionMetadata(meta.query_start_loc_S1, meta.seq_lens_S, meta.block_tables_SM, meta.slot_mapping_T,
                                   [1] * 4, [1] * 4, 1, 1, meta.null_block)
    got = triton_dsa_topk(q, w, cache, graph_meta, K, 0.25, max_len=208, num_splits=3)
    _assert_same_sets(got.cpu(), want)


def test_split_programs_follow_the_context_and_the_batch():
    """One program per row below SPLIT_MIN_WIDTH or when the batch fills the SMs; about sqrt(width / K) at 128k."""
    from moelink.kernels.triton_dsa_select import SPLIT_MIN_WIDTH, split_programs

    assert split_programs(SPLIT_MIN_WIDTH - 1, 2048, 1, 132) == 1
    assert split_programs(8192, 2048, 1, 132) == 1
    assert split_programs(131072, 2048, 1, 132) == 8
    assert split_programs(32768, 2048, 1, 132) == 4
    assert split_programs(163840, 2048, 64, 132) == 4  # 2 x 132 SMs / 64 rows
    assert split_programs(163840, 2048, 256, 132) == 1


@pytest.mark.parametrize("dtype,D", [(torch.float32, 12), (torch.bfloat16, 16), (torch.float32, 160)],
                         ids=["fp32-D12-pad", "bf16-D16", "fp32-D160-2groups"])
def test_triton_fp8_key_write_equals_reference_bytes(gen, kdev, dtype, D):
    """The Triton write's rows equal the reference's byte for byte (key, pad, scales), padding tokens into the null
    block, other rows untouched; keys at scales from 1e-3 to 300 and an all-zero one."""
    from moelink.kernels.triton_dsa_keys import triton_write_fp8_index_keys

    T = 7
    k = (torch.randn(T, D, generator=gen) * torch.tensor([1e-3, 1.0, 30.0, 300.0, 0.0, 2.0, 5.0])[:, None]).to(dtype)
    slots = torch.tensor([5, 0, -1, 11, 2, -1, 8])
    X = fp8_key_row_bytes(D)
    want = torch.full((4, 3, X), 7, dtype=torch.uint8)
    reference_write_fp8_index_keys(k, want, slots)
    got = torch.full((4, 3, X), 7, dtype=torch.uint8, device=kdev)
    triton_write_fp8_index_keys(k.to(kdev), got, slots.to(kdev))
    assert torch.equal(got.cpu(), want)
    assert (want.view(-1, X)[[1, 3, 4, 6, 7, 10]] == 7).all()  # rows no token wrote
