"""Batch-invariant kernels (kernels/batch_invariant.py, issue 58 item 4): a row's result is bitwise the same whatever
else is in the batch, and attention gives a decode row exactly what a prefill gives the same position. Each check is
paired with the same one off the mode, which differs (so the check can fail)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelink.kernels.attention import AttentionMetadata, reference_paged_attention, reference_write_kv
from moelink.kernels.batch_invariant import TILE_M, BatchInvariantMode
from moelink.kernels.batch_invariant_kernels import (invariant_dsa_topk, invariant_mla_attention,
                                                     invariant_paged_attention, invariant_sparse_mla_attention)
from moelink.kernels.mla import reference_mla_attention


def _cache(gen, seqs, K, H, bs, dtype, fill=None):
    """A paged cache holding each (ctx, k_CKH, v_CKH) of `seqs` whole; (k_cache, v_cache, tables) with a zero null
    block last and NaN everywhere nothing was written (so a stray read shows)."""
    nb = sum(-(-ctx // bs) for ctx, _, _ in seqs)
    k_cache = torch.full((nb + 1, bs, K, H), float("nan"), dtype=dtype)
    k_cache[nb] = 0
    v_cache = k_cache.clone()
    perm = torch.randperm(nb, generator=gen).tolist()
    tables = []
    for ctx, k, v in seqs:
        blocks = [perm.pop() for _ in range(-(-ctx // bs))]
        tables.append(blocks)
        slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(ctx)])
        reference_write_kv(k, v, k_cache, v_cache, slots)
    return k_cache, v_cache, tables, nb


def _meta(tables, seq_lens, q_lens, null_block):
    M = max(len(t) for t in tables)
    tables_SM = torch.tensor([t + [0] * (M - len(t)) for t in tables], dtype=torch.int32)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    return AttentionMetadata(qsl, torch.tensor(seq_lens, dtype=torch.int32), tables_SM,
                             torch.zeros(sum(q_lens), dtype=torch.long), list(q_lens), list(seq_lens), max(q_lens),
                             max(seq_lens), null_block=null_block)


def _seq(gen, ctx, K, H, dtype):
    return ctx, torch.randn(ctx, K, H, generator=gen).to(dtype), torch.randn(ctx, K, H, generator=gen).to(dtype)


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_invariant_attention_matches_the_reference(sinks, window, dtype):
    gen = torch.Generator().manual_seed(1)
    N, K, H, bs = 6, 2, 16, 4
    ctx_q = [(1, 1), (9, 1), (13, 5), (21, 21), (6, 2), (30, 1)]
    seqs = [_seq(gen, c, K, H, dtype) for c, _ in ctx_q]
    k_cache, v_cache, tables, nb = _cache(gen, seqs, K, H, bs, dtype)
    meta = _meta(tables, [c for c, _ in ctx_q], [q for _, q in ctx_q], nb)
    q = torch.randn(sum(q for _, q in ctx_q), N, H, generator=gen).to(dtype)
    sinks_N = torch.randn(N, generator=gen) if sinks else None
    want = reference_paged_attention(q, k_cache, v_cache, meta, 0.3, sinks_N=sinks_N, sliding_window=window)
    got = invariant_paged_attention(q, k_cache, v_cache, meta, 0.3, sinks_N=sinks_N, sliding_window=window)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_of_attention_is_the_same_in_any_batch_and_as_decode_or_prefill(dtype):
    """The target sequence's rows: alone, among others (before and after it, longer and shorter), as one prefill
    chunk, as later chunks after a prefix, and as decode rows: bitwise equal at each position. The reference path
    (SDPA for chunks, padded batched decode) is not (checked, so the test can fail)."""
    gen = torch.Generator().manual_seed(2)
    N, K, H, bs, L = 8, 2, 32, 16, 70
    target = _seq(gen, L, K, H, dtype)
    q_LNH = torch.randn(L, N, H, generator=gen).to(dtype)
    others = [_seq(gen, c, K, H, dtype) for c in (3, 150, 41)]
    k_cache, v_cache, tables, nb = _cache(gen, [target] + others, K, H, bs, dtype)

    def run(fn, layout):
        """layout: [(sequence index, ctx, qlen)]; returns the target's rows by position."""
        metas = _meta([tables[s] for s, _, _ in layout], [c for _, c, _ in layout], [q for _, _, q in layout], nb)
        rows, q = [], []
        for s, ctx, ql in layout:
            if s == 0:
                rows.append((len(q), ctx - ql, ql))
                q += list(q_LNH[ctx - ql:ctx])
            else:
                q += list(torch.randn(ql, N, H, generator=gen).to(dtype))
        out = fn(torch.stack(q), k_cache, v_cache, metas, H ** -0.5)
        return {p0 + i: out[r + i] for r, p0, ql in rows for i in range(ql)}

    layouts = [
        [(0, L, L)],                                          # prefill, alone
        [(1, 3, 3), (0, L, L), (2, 150, 20)],                 # prefill among others
        [(0, 30, 30)], [(2, 100, 1), (0, L, 40)],             # two chunks (a prefix hit on the first)
        [(0, L, 1)], [(1, 3, 1), (2, 150, 1), (0, L, 1), (3, 41, 1)],  # decode of the last row, alone and batched
        [(0, 50, 1)], [(2, 120, 1), (0, 50, 1)], [(0, 50, 7)],  # a middle row as decode and in a chunk
    ]

    def spread(fn):
        seen: dict[int, list] = {}
        for layout in layouts:
            for p, row in run(fn, layout).items():
                seen.setdefault(p, []).append(row)
        return seen

    for p, rows in spread(invariant_paged_attention).items():
        assert all(torch.equal(r, rows[0]) for r in rows), f"position {p}"
    differs = any(not torch.equal(r, rows[0]) for rows in spread(reference_paged_attention).values() for r in rows)
    assert differs, "the reference path gave bitwise equal rows too: this test no longer shows what the mode fixes"


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_invariant_mla_matches_the_reference_and_a_row_is_the_same_as_decode_or_prefill(sinks, dtype):
    """Absorbed MLA as one-KV-head attention over [c_kv | k_pe] rows: equal to the reference, and a sequence's rows
    bitwise the same prefilled whole, in two chunks beside another sequence, and as decode rows."""
    gen = torch.Generator().manual_seed(6)
    N, C, P, bs, L = 4, 32, 8, 8, 40
    rows = torch.randn(L, 1, C + P, generator=gen).to(dtype)
    other = torch.randn(90, 1, C + P, generator=gen).to(dtype)
    cache, _, tables, nb = _cache(gen, [(L, rows, rows), (90, other, other)], 1, C + P, bs, dtype)
    cache_BLR = cache[:, :, 0]
    cache_BLR[nb] = 0
    ql_LNC = torch.randn(L, N, C, generator=gen).to(dtype)
    qp_LNP = torch.randn(L, N, P, generator=gen).to(dtype)
    sinks_N = torch.randn(N, generator=gen) if sinks else None
    want = reference_mla_attention(ql_LNC, qp_LNP, cache_BLR, _meta([tables[0]], [L], [L], nb), 0.2, sinks_N=sinks_N)
    whole = invariant_mla_attention(ql_LNC, qp_LNP, cache_BLR, _meta([tables[0]], [L], [L], nb), 0.2, sinks_N=sinks_N)
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(whole, want, atol=tol, rtol=tol)
    # The last 15 rows as a chunk after another sequence's decode row; each of them as a decode row.
    noise = lambda n, d: torch.randn(n, N, d, generator=gen).to(dtype)  # noqa: E731
    chunk = invariant_mla_attention(torch.cat([noise(1, C), ql_LNC[25:]]), torch.cat([noise(1, P), qp_LNP[25:]]),
                                    cache_BLR, _meta([tables[1], tables[0]], [90, L], [1, 15], nb), 0.2,
                                    sinks_N=sinks_N)
    assert torch.equal(chunk[1:], whole[25:])
    for p in (0, 17, L - 1):
        dec = invariant_mla_attention(ql_LNC[p:p + 1], qp_LNP[p:p + 1], cache_BLR, _meta([tables[0]], [p + 1], [1], nb),
                                      0.2, sinks_N=sinks_N)
        assert torch.equal(dec[0], whole[p]), p


def _rows_in_batches(x_1K, make, sizes, seed=3):
    """make(X_MK) -> [M, ...] for the row x placed at a random position of random batches of each size."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for m in sizes:
        X = torch.randn(m, x_1K.shape[-1], generator=gen, dtype=x_1K.dtype)
        i = int(torch.randint(0, m, (1,), generator=gen))
        X[i] = x_1K[0]
        out.append(make(X)[i])
    return out


SIZES = [1, 2, 3, 5, 8, 15, 16, 17, 31, 33, 64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matmuls_under_the_mode_give_a_row_the_same_bits_in_any_batch(dtype):
    gen = torch.Generator().manual_seed(4)
    w_NK = torch.randn(384, 256, generator=gen, dtype=dtype)
    b_N = torch.randn(384, generator=gen, dtype=dtype)
    w3_EKN = torch.randn(3, 256, 96, generator=gen, dtype=dtype)
    v_K = torch.randn(256, generator=gen, dtype=dtype)
    x_1K = torch.randn(1, 256, generator=gen, dtype=dtype)
    ops = {
        "linear": lambda X: F.linear(X, w_NK, b_N),
        "matmul": lambda X: X @ w_NK.T,
        "matvec": lambda X: X @ v_K,
        "mm": lambda X: torch.mm(X, w_NK.T),
        "addmm": lambda X: torch.addmm(b_N, X, w_NK.T),
        "bmm": lambda X: torch.bmm(X[None].expand(3, -1, -1), w3_EKN).transpose(0, 1),
        "3-d linear": lambda X: F.linear(X.view(1, -1, 256), w_NK)[0],
    }
    unstable = []
    for name, op in ops.items():
        with BatchInvariantMode():
            rows = _rows_in_batches(x_1K, op, SIZES)
        assert all(torch.equal(r, rows[0]) for r in rows), name
        off = _rows_in_batches(x_1K, op, SIZES)
        if any(not torch.equal(r, off[0]) for r in off):
            unstable.append(name)
        torch.testing.assert_close(rows[0], off[0])  # the same values, up to rounding
    # Off the mode the BLAS gives a row other bits in some batch sizes: which ops it does so for is the BLAS's and
    # the CPU's (MKL's float64 matrix-vector product is row-stable on an AVX-512 Xeon, its batched matmul on an EPYC),
    # but the matrix products it runs by blocking the rows are among them on every machine, so the mode is needed.
    assert {"linear", "mm", "addmm"} & set(unstable), f"no op differs off the mode: {unstable}"


def test_the_mode_refuses_what_it_cannot_make_invariant():
    q = torch.randn(1, 2, 4, 8)
    with BatchInvariantMode(), pytest.raises(RuntimeError, match="scaled_dot_product_attention"):
        F.scaled_dot_product_attention(q, q, q)
    with BatchInvariantMode(), pytest.raises(RuntimeError, match="einsum"):
        torch.einsum("ij,jk->ik", q[0, 0], q[0, 0].T)


def test_tiles_pad_and_cut_rows_and_take_empty_inputs():
    x = torch.randn(TILE_M + 3, 5)
    w = torch.randn(7, 5)
    with BatchInvariantMode():
        y = F.linear(x, w)
        empty = torch.zeros(0, 5)  # an EP rank with no tokens runs its layers on empty inputs
        shapes = [F.linear(empty, w).shape, empty.sum(-1).shape, empty.softmax(-1).shape,
                  torch.topk(empty, 2, dim=-1).values.shape, torch.sigmoid(empty).shape,
                  empty.mean(-1, keepdim=True).shape]
    assert y.shape == (TILE_M + 3, 7)
    torch.testing.assert_close(y, x @ w.T)
    assert shapes == [(0, 7), (0,), (0, 5), (0, 2), (0, 5), (0, 1)]


def test_elementwise_and_row_ops_under_the_mode_give_a_row_the_same_bits_in_any_batch():
    """Element-wise transcendental ops run vectorized over whole vectors and scalar over the tail, which round
    differently: off the mode a router's sigmoid over 12 logits differs alone and among other rows (checked). Under
    it they run in fixed chunks, and reductions, softmax and top-k on fixed row tiles."""
    gen = torch.Generator().manual_seed(7)
    ops = {
        "sigmoid": (torch.sigmoid, 12), "exp": (torch.exp, 12), "silu": (F.silu, 40), "tanh": (torch.tanh, 20),
        "mean": (lambda t: t.pow(2).mean(-1, keepdim=True), 48), "sum": (lambda t: t.sum(dim=-1), 3),
        "amax": (lambda t: t.amax(-1), 9), "softmax": (lambda t: t.softmax(-1), 12),
        "log_softmax": (lambda t: F.log_softmax(t, dim=-1), 30), "cumsum": (lambda t: t.cumsum(-1), 11),
        "topk": (lambda t: torch.topk(t, 3, dim=-1, sorted=False).values, 12),
    }
    for name, (op, width) in ops.items():
        x_1K = torch.randn(1, width, generator=gen)
        with BatchInvariantMode():
            rows = _rows_in_batches(x_1K, op, SIZES + [65, 100])
        assert all(torch.equal(r, rows[0]) for r in rows), name
        torch.testing.assert_close(rows[0], op(x_1K)[0])
    differs = False
    for seed in range(20):  # whether a value rounds differently depends on the value: try a few rows
        x_1K = torch.randn(1, 12, generator=gen)
        off = _rows_in_batches(x_1K, torch.sigmoid, SIZES + [65, 100], seed=seed)
        differs |= any(not torch.equal(r, off[0]) for r in off)
    assert differs, "sigmoid off the mode was row-stable: the check shows nothing"


def test_dsa_selection_and_sparse_mla_match_the_reference_and_a_full_selection_walks_the_dense_blocks():
    """DSA under the mode: the indexer's top-k equals the reference's (each row scored alone, in blocks); the sparse
    MLA over a selection equals the reference's, and over a selection of every position equals the dense walk bit
    for bit (a step runs dense MLA when every row sees at most index_topk, sparse otherwise)."""
    from moelink.kernels.dsa import reference_dsa_topk, reference_sparse_mla_attention

    gen = torch.Generator().manual_seed(8)
    N, C, P, bs, H, D = 4, 32, 8, 8, 4, 16
    lens = [30, 9, 17]
    seqs = [(n, torch.randn(n, 1, C + P, generator=gen, dtype=torch.float64),
             torch.randn(n, 1, D, generator=gen, dtype=torch.float64)) for n in lens]
    cache, _, tables, nb = _cache(gen, [(n, r, r) for n, r, _ in seqs], 1, C + P, bs, torch.float64)
    cache_BLR = cache[:, :, 0]
    index_BLD = torch.zeros(nb + 1, bs, D, dtype=torch.float64)  # the index keys at the latent rows' slots
    for (n, _, k), blocks in zip(seqs, tables):
        for p in range(n):
            index_BLD[blocks[p // bs], p % bs] = k[p, 0]
    q_lens = [5, 1, 17]
    meta = _meta(tables, lens, q_lens, nb)
    T = sum(q_lens)
    q_THD = torch.randn(T, H, D, generator=gen, dtype=torch.float64)
    w_TH = torch.randn(T, H, generator=gen, dtype=torch.float64)
    topk = 8
    want = reference_dsa_topk(q_THD, w_TH, index_BLD, meta, topk, 0.25)
    got = invariant_dsa_topk(q_THD, w_TH, index_BLD, meta, topk, 0.25)
    assert torch.equal(got, want)
    ql = torch.randn(T, N, C, generator=gen, dtype=torch.float64)
    qp = torch.randn(T, N, P, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(invariant_sparse_mla_attention(ql, qp, cache_BLR, meta, got, 0.2),
                               reference_sparse_mla_attention(ql, qp, cache_BLR, meta, got, 0.2), atol=1e-12, rtol=0)
    # A selection of every position a row sees (ascending, -1 after) walks the dense blocks: the same bits.
    every = torch.full((T, 32), -1, dtype=torch.int32)
    row = 0
    for n, ql_s in zip(lens, q_lens):
        for i in range(ql_s):
            p = n - ql_s + i
            every[row, : p + 1] = torch.arange(p + 1)
            row += 1
    assert torch.equal(invariant_sparse_mla_attention(ql, qp, cache_BLR, meta, every, 0.2),
                       invariant_mla_attention(ql, qp, cache_BLR, meta, 0.2))


def test_fixed_bmm_pads_the_batch_to_whole_tiles_and_gives_the_product(monkeypatch):
    """On CUDA batched products run TILE_X matrices at a time (cuBLAS picks its kernel by the batch count: seen on an
    H100); here the tile is forced small on the CPU: any batch count gives bmm's product, and a matrix's result
    is the same bits whatever count it is among (every call sees one shape)."""
    from moelink.kernels import batch_invariant as bi

    monkeypatch.setattr(bi, "batch_tile", lambda device: 4)
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(11, 3, 8, generator=gen), torch.randn(11, 8, 5, generator=gen)
    got = bi.fixed_bmm(a, b)
    assert got.shape == (11, 3, 5)
    torch.testing.assert_close(got, torch.bmm(a, b))
    for x in (1, 2, 4, 5, 9, 11):
        assert torch.equal(bi.fixed_bmm(a[:x], b[:x])[0], got[0])
    assert bi.fixed_bmm(a[:0], b[:0]).shape == (0, 3, 5)


def test_a_matmul_by_a_weight_tiles_rows_across_leading_dims():
    """[T, N, K] @ [K, D] with the token dim leading: torch folds T x N into the rows, so the mode tiles them all
    (a per-T tile of N rows would make the row count follow T)."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(24, 7, generator=gen)
    x = torch.randn(40, 3, 24, generator=gen)
    with BatchInvariantMode():
        full = torch.matmul(x, w)
        parts = [torch.matmul(x[:n], w)[0] for n in (1, 2, 5, 17)]
    torch.testing.assert_close(full, x @ w)
    assert all(torch.equal(p, full[0]) for p in parts)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compressed_attention_ops_match_the_references_and_ignore_the_padded_width(dtype):
    """DeepSeek-V4's attention ops in the mode (kernels/batch_invariant_compressed.py): the sink attention, the
    indexer's choice and the grouped projection equal the references, and a query's result does not move when the
    step's other queries widen the keys (a batched step pads to its widest row)."""
    from moelink.kernels.batch_invariant_compressed import (invariant_compressed_indexer_topk,
                                                            invariant_grouped_linear, invariant_sink_attention)
    from moelink.kernels.compressed_attention import (reference_grouped_linear, reference_indexer_topk,
                                                      reference_sink_attention)

    gen = torch.Generator().manual_seed(7)
    T, N, H, S = 7, 4, 16, 37
    q = torch.randn(T, N, H, generator=gen).to(dtype)
    k = torch.randn(S, H, generator=gen).to(dtype)
    allowed = torch.rand(T, S, generator=gen) < 0.5
    allowed[:, 0] = True
    sinks = torch.randn(N, generator=gen)
    tol = dict(rtol=0, atol=1e-12 if dtype == torch.float64 else 2e-6)
    torch.testing.assert_close(invariant_sink_attention(q, k, allowed, sinks, 0.3),
                               reference_sink_attention(q, k, allowed, sinks, 0.3), **tol)
    wide_k = torch.cat([k, torch.randn(50, H, generator=gen).to(dtype)])
    wide = torch.cat([allowed, torch.zeros(T, 50, dtype=torch.bool)], dim=1)
    alone = invariant_sink_attention(q[:1], k, allowed[:1], sinks, 0.3)[0]
    assert torch.equal(invariant_sink_attention(q, wide_k, wide, sinks, 0.3)[0], alone)
    per_query = invariant_sink_attention(q, wide_k[None].expand(T, -1, -1).contiguous(), wide, sinks, 0.3)
    assert torch.equal(per_query[0], alone)  # a decode step's per-query rows: the same walk
    n, I, E = 3, 8, 29
    qi, w = torch.randn(T, n, I, generator=gen), torch.randn(T, n, generator=gen)
    keys, vis = torch.randn(E, I, generator=gen), torch.randint(1, E + 1, (T,), generator=gen)
    assert torch.equal(invariant_compressed_indexer_topk(qi, w, keys, vis, 5), reference_indexer_topk(qi, w, keys, vis, 5))
    x, wg = torch.randn(T, 3, 8, generator=gen).to(dtype), torch.randn(3, 5, 8, generator=gen).to(dtype)
    torch.testing.assert_close(invariant_grouped_linear(x, wg), reference_grouped_linear(x, wg), **tol)
